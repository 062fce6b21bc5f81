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


@pytest.fixture(scope="module")
def lens_dir(prompts: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tuned lens trained once by the command (5 steps), with its data and picture."""
    train, test, _ = prompts
    out = tmp_path_factory.mktemp("lens")
    args = ["tuned-lens", "--model", "ioi", "--train-prompts", str(train), "--prompts", str(test)]
    assert main([*args, "--steps", "5", "--out", str(out)]) == EXIT_OK
    return out


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
    prompts: tuple[Path, Path, Path],
    lens_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    train, test, labels = prompts
    assert "tuned lens" in (lens_dir / "kl.txt").read_text()
    saved = lens_dir / "tuned_lens.safetensors"
    assert saved.is_file()
    load = ["tuned-lens", "--model", "ioi", "--load", str(saved), "--prompts", str(test)]
    assert main([*load, "--out", str(tmp_path / "t2")]) == EXIT_OK
    assert main(["tuned-lens", "--model", "ioi", "--prompts", str(test), "--out", "x"]) == (
        EXIT_USAGE
    )
    code = main(["probe", "--model", "ioi", "--prompts", str(train), "--labels", str(labels)])
    assert code == EXIT_OK
    assert "resid_post[2]" in capsys.readouterr().out


def test_each_tool_writes_its_data_then_its_picture(
    prompts: tuple[Path, Path, Path],
    lens_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json
    import sys

    from interventions.recipes import TunedLens, lens_kl

    pytest.importorskip("matplotlib")
    train, test, labels = prompts
    out = lens_dir
    assert (out / "lens_kl.png").stat().st_size > 0
    kl = json.loads((out / "kl.json").read_text())
    # the oracle: the Python recipe on the saved translators
    model, tok = ioi.load_ioi_model()
    lens = TunedLens.load(out / "tuned_lens.safetensors")
    again = lens_kl(model, test.read_text().splitlines(), lens, tokenizer=tok)
    assert [r["layer"] for r in kl["layers"]] == list(again.labels)
    assert [r["tuned_lens"] for r in kl["layers"]] == pytest.approx(again.tuned.tolist(), abs=1e-6)
    assert [r["logit_lens"] for r in kl["layers"]] == pytest.approx(again.logit.tolist(), abs=1e-6)
    probe = ["probe", "--model", "ioi", "--prompts", str(train), "--labels", str(labels)]
    task = ["--control", "task", "--layers", "0", "2", "--out", str(tmp_path / "p")]
    assert main([*probe, *task]) == EXIT_OK
    rows = json.loads((tmp_path / "p" / "probe_sweep.json").read_text())
    assert [(r["site"], r["control"]) for r in rows] == [
        ("resid_post[0]", "task"),
        ("resid_post[2]", "task"),
    ]
    assert (tmp_path / "p" / "probe_sweep.png").stat().st_size > 0
    first = test.read_text().splitlines()[0]
    attribute = ["attribute", "--model", "ioi", "--prompt", first, "--answer", "1", "--steps", "4"]
    assert main([*attribute, "--out", str(tmp_path / "a")]) == EXIT_OK
    data = json.loads((tmp_path / "a" / "attribution.json").read_text())
    assert data["prompts"][0]["completeness_error"] >= 0
    assert (tmp_path / "a" / "attribution.png").stat().st_size > 0
    capsys.readouterr()
    # without matplotlib: the data still, a note instead of each picture, exit 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    load = ["tuned-lens", "--model", "ioi", "--load", str(out / "tuned_lens.safetensors")]
    assert main([*load, "--prompts", str(test), "--out", str(tmp_path / "l2")]) == EXIT_OK
    assert main([*probe, "--layers", "2", "--out", str(tmp_path / "p2")]) == EXIT_OK
    assert main([*attribute, "--out", str(tmp_path / "a2")]) == EXIT_OK
    assert capsys.readouterr().err.count("note: no picture (pictures need matplotlib") == 3
    assert json.loads((tmp_path / "l2" / "kl.json").read_text())["layers"] == kl["layers"]
    assert (tmp_path / "p2" / "probe_sweep.json").is_file()
    assert (tmp_path / "a2" / "attribution.json").is_file()
    for name in ("l2/lens_kl.png", "p2/probe_sweep.png", "a2/attribution.png"):
        assert not (tmp_path / name).exists()
