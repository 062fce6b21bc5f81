"""The attribute, tuned-lens and probe subcommands on the IOI reference model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from interventions.cli import EXIT_OK, EXIT_USAGE, main
from interventions.reference_models import ioi


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("prompts")
    g = torch.Generator().manual_seed(0)
    clean, _, io, _ = ioi.ioi_batch(48, g, 0)
    texts = ioi.ioi_texts(clean)
    (d / "train.txt").write_text("\n".join(texts[:32]))
    (d / "test.txt").write_text("\n".join(texts[32:]))
    (d / "labels.txt").write_text("\n".join(str(int(i) % 2) for i in io[:32]))
    return d / "train.txt", d / "test.txt", d / "labels.txt"


def test_attribute_prints_tokens_and_completeness(
    prompts: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = prompts[1].read_text().splitlines()[0]
    code = main(["attribute", "--model", "ioi", "--prompt", first, "--answer", "1", "--steps", "8"])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "completeness error" in out
    lines = out.splitlines()
    assert lines[0].startswith("prompt 0") and lines[-1].startswith("completeness error")
    shown = [line.split()[0] for line in lines[1:-1]]
    assert shown[-len(first.split()) :] == first.split()  # after any <bos> the tokenizer adds


def test_tuned_lens_and_probe(
    prompts: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train, test, labels = prompts
    args = ["tuned-lens", "--model", "ioi", "--train-prompts", str(train), "--prompts", str(test)]
    assert main([*args, "--steps", "5", "--out", str(tmp_path / "t")]) == EXIT_OK
    assert "tuned lens" in capsys.readouterr().out
    saved = tmp_path / "t" / "tuned_lens.safetensors"
    assert saved.is_file()
    load = ["tuned-lens", "--model", "ioi", "--load", str(saved), "--prompts", str(test)]
    assert main([*load, "--out", str(tmp_path / "t2")]) == EXIT_OK
    assert main(["tuned-lens", "--model", "ioi", "--prompts", str(test), "--out", "x"]) == (
        EXIT_USAGE
    )
    code = main(["probe", "--model", "ioi", "--prompts", str(train), "--labels", str(labels)])
    assert code == EXIT_OK
    assert "resid_post[2]" in capsys.readouterr().out
