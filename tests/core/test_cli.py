"""The command line: every subcommand, its outputs, and exit codes scripts can rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import interventions as iv
from interventions.cli import main
from tests.tiny_models import hf_model, word_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "llama"
    hf_model("llama").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture()
def spec(tmp_path: Path) -> Path:
    g = iv.Graph()
    r = g.run("a", text="w5 w6 w7")
    r.add("resid_post", layer=0, direction=torch.ones(32), scale=0.5)
    r.read("logits", pos=-1, name="y")
    g.save(str(tmp_path / "spec.json"))
    return tmp_path / "spec.json"


def test_run_writes_results_with_provenance(model_dir: Path, spec: Path, tmp_path: Path) -> None:
    assert main(["run", str(spec), "--model", str(model_dir), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["provenance"]["backend"] == "torch"
    assert summary["results"]["y"]["shape"] == [1, 64]
    back = iv.Results.load(tmp_path / "out")
    expected = iv.run(iv.Graph.load(str(spec)), hf_model("llama"), tokenizer=word_tokenizer())
    torch.testing.assert_close(back["y"], expected["y"])


def test_show_and_validate(model_dir: Path, spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(spec)]) == 0
    assert "add a resid_post[0] += 0.5" in capsys.readouterr().out
    assert main(["validate", str(spec), "--model", str(model_dir)]) == 0
    assert "ok: 1 runs, 2 ops" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["show", "/nonexistent/spec.json"], 2, "does not exist"),
        (["validate", "SPEC", "--model", "MODEL", "--backend", "torhc"], 4, "did you mean 'torch'"),
        (["run", "SPEC", "--model", "/nonexistent/model", "--out", "OUT"], 2, "cannot load model"),
        (["show", "BAD"], 3, "unknown op 'frobnicate'"),
        (["validate", "WRONG_SITE", "--model", "MODEL"], 4, "layer 9 is out of range"),
    ],
)
def test_exit_codes(
    argv: list[str],
    code: int,
    needle: str,
    model_dir: Path,
    spec: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"format": "interventions.graph", "version": 1, "ops": [{"op": "frobnicate"}]})
    )
    g = iv.Graph()
    g.run("a", tokens=[[1, 2]]).read("resid_post", layer=9)
    g.save(str(tmp_path / "wrong.json"))
    subs = {
        "SPEC": str(spec),
        "MODEL": str(model_dir),
        "OUT": str(tmp_path / "o"),
        "BAD": str(bad),
        "WRONG_SITE": str(tmp_path / "wrong.json"),
    }
    assert main([subs.get(a, a) for a in argv]) == code
    assert needle in capsys.readouterr().err


def test_recipes_from_the_command_line(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    code = main(
        [
            "patch-sweep",
            "--model",
            str(model_dir),
            "--clean",
            "w5 w6 w7 w8",
            "--corrupt",
            "w5 w9 w7 w8",
            "--answer",
            "w10",
            "--wrong",
            "w11",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["scores"][0] == pytest.approx([0.0, 1.0, 0.0, 0.0], abs=1e-4)
    assert (out / "patching.png").stat().st_size > 1000 and (out / "sweep.json").is_file()
    assert (
        main(
            [
                "logit-lens",
                "--model",
                str(model_dir),
                "--prompt",
                "w5 w6",
                "--out",
                str(tmp_path / "l"),
            ]
        )
        == 0
    )
    assert (tmp_path / "l" / "logit_lens.png").is_file()
    capsys.readouterr()
    assert (
        main(
            [
                "steer",
                "--model",
                str(model_dir),
                "--prompt",
                "w5 w6 w7",
                "--layer",
                "1",
                "--token-direction",
                "w20",
                "--scale",
                "30",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert "steered → 'w20 w20 w20'" in capsys.readouterr().out
    assert main(["patch-sweep", "--model", str(model_dir), "--clean", "w5", "--out", str(out)]) == 2


def test_installed_command_and_backends_listing() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "interventions.cli", "backends", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    table = json.loads(out.stdout)
    assert "sae_splice" in table["torch"]["ops"]
