"""First-use frictions, each as a new user meets it (issue 13), and what happens now."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import interventions as iv
from interventions.cli import EXIT_OUTPUT, EXIT_USAGE, main
from tests.tiny_models import hf_model, word_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "gpt2"
    hf_model("gpt2").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bare_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 saved without tokenizer files: transformers then gives an empty tokenizer."""
    path = tmp_path_factory.mktemp("bare") / "gpt2"
    hf_model("gpt2").save_pretrained(path)
    return path


def test_help_and_version_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from interventions.cli import main\n"
        "for argv in (['--help'], ['run', '--help'], ['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok") and "interventions 0.1.0" in out.stdout


def test_lazy_package_attributes_are_the_real_ones() -> None:
    import interventions.architectures as arch_module  # noqa: F401  (the clashing name)
    from interventions.graph import Graph

    assert iv.Graph is Graph
    assert callable(iv.architectures) and "gpt2" in iv.architectures()
    with pytest.raises(AttributeError, match="no attribute 'Grpah'"):
        iv.Grpah  # noqa: B018


def test_missing_nnsight_is_a_typed_error_naming_the_extra() -> None:
    code = (
        "import sys; sys.modules['nnsight'] = None\n"
        "import torch, interventions as iv\n"
        "from interventions.cli import main\n"
        "assert main(['backends']) == 0\n"
        "g = iv.Graph(); g.run('a', inputs=torch.ones(1, 2, 4)).read('output', name='y')\n"
        "try:\n"
        "    iv.run(g, torch.nn.Linear(4, 3), backend='nnsight')\n"
        "except iv.InterventionError as e:\n"
        "    print('typed:', e)\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert (
        "nnsight: unavailable (backend 'nnsight' needs nnsight, which is not installed"
        in out.stdout
    )
    assert "typed: backend 'nnsight' needs nnsight" in out.stdout
    assert "pip install 'interventions[nnsight]'" in out.stdout


def test_backends_lists_the_site_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "standard sites: embed, resid_pre, resid_post" in out and "'.output' or '.input'" in out


def test_an_empty_tokenizer_says_the_model_has_none(
    bare_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, tokenizer = iv.load_model(str(bare_model_dir))
    assert tokenizer is None
    argv = ["patch-sweep", "--model", str(bare_model_dir), "--clean", "a b", "--corrupt", "a c"]
    assert main([*argv, "--answer", " on", "--out", "x"]) == EXIT_USAGE
    assert "this model has no tokenizer; pass --clean-ids" in capsys.readouterr().err
    from transformers import AutoTokenizer

    empty = AutoTokenizer.from_pretrained(bare_model_dir)  # what users pass by hand
    g = iv.Graph()
    g.run("a", text="hello").read("logits", name="y")
    with pytest.raises(iv.ValidationError, match=r"this model has no tokenizer.*pass tokens="):
        iv.run(g, model, tokenizer=empty)


def test_a_missing_model_directory_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("/nonexistent/model", "./nope", "models/a/b"):
        with pytest.raises(iv.InterventionError, match="no such directory"):
            iv.load_model(name)
    assert main(["validate", "x.json", "--model", "./nope"]) == EXIT_USAGE


def test_argument_mistakes_are_usage_errors(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["patch-sweep", "--model", str(model_dir), "--clean-ids", "5,6,7", "--corrupt-ids"]
    base += ["5,9,7", "--answer", "10", "--out", str(tmp_path / "o")]
    assert main([*base, "--site", "mlpp_out"]) == EXIT_USAGE
    assert "bad argument: SpecError: cannot sweep site 'mlpp_out'; sites: resid_pre" in (
        capsys.readouterr().err
    )
    steer = ["steer", "--model", str(model_dir), "--prompt-ids", "5,6", "--layer", "7"]
    assert main([*steer, "--token-direction", "9"]) == EXIT_USAGE
    assert "bad argument" in capsys.readouterr().err


def test_out_naming_a_file_is_a_usage_error(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g = iv.Graph()
    g.run("a", tokens=[[1, 2]]).read("logits", name="y")
    g.save(str(tmp_path / "g.json"))
    (tmp_path / "file").write_text("x")
    argv = ["run", str(tmp_path / "g.json"), "--model", str(model_dir), "--out"]
    assert main([*argv, str(tmp_path / "file")]) == EXIT_USAGE
    assert "is a file; give a folder" in capsys.readouterr().err


def test_an_unwritable_output_is_exit_6(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import errno
    import os

    g = iv.Graph()
    g.run("a", tokens=[[1, 2]]).read("logits", name="y")
    g.save(str(tmp_path / "g.json"))

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    argv = [
        "run",
        str(tmp_path / "g.json"),
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == EXIT_OUTPUT
    assert "No space left on device" in capsys.readouterr().err


def test_device_and_dtype_options(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g = iv.Graph()
    g.run("a", tokens=[[1, 2]]).read("logits", name="y")
    g.save(str(tmp_path / "g.json"))
    argv = [
        "run",
        str(tmp_path / "g.json"),
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--device", "cpu", "--dtype", "float16"]) == 0
    assert iv.Results.load(tmp_path / "o")["y"].dtype == torch.float16
    assert main([*argv, "--device", "nonsense"]) == EXIT_USAGE


def test_patch_sweep_without_matplotlib_keeps_its_data(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from interventions.cli import main\n"
        f"raise SystemExit(main(['patch-sweep', '--model', {str(model_dir)!r}, '--clean', "
        f"'w5 w6 w7', '--corrupt', 'w5 w9 w7', '--answer', 'w10', '--out', {str(out)!r}]))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "note: no picture (pictures need matplotlib" in result.stderr
    assert json.loads((out / "scores.json").read_text())["rows"]
    assert iv.Graph.load(str(out / "sweep.json")).runs
    assert not (out / "patching.png").exists()


def test_steer_reports_its_effect_size(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["steer", "--model", str(model_dir), "--prompt", "w5 w6 w7", "--layer", "1"]
    assert main([*argv, "--token-direction", "w20", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "effect: added a vector of norm 4 at resid_post[1], whose mean norm is" in out
    model = hf_model("gpt2")
    probe = iv.Graph()
    probe.run("p", tokens=word_tokenizer()("w5 w6 w7", return_tensors="pt")["input_ids"]).read(
        "resid_post", 1, name="r"
    )
    norm = float(iv.run(probe, model)["r"].norm(dim=-1).mean())
    assert f"whose mean norm is {norm:.3g}" in out


@pytest.mark.parametrize("skip", ["0", "1"])
def test_dev_test_says_up_front_what_it_installs(tmp_path: Path, skip: str) -> None:
    """The notice comes before anything is installed: here setup fails at once (PYTHON is
    ``false``), so nothing is installed, and the notice has already been printed."""
    import os

    env = {
        **os.environ,
        "INTERVENTIONS_VENV": str(tmp_path / "venv"),
        "PYTHON": "false",
        "INTERVENTIONS_SKIP_REMOTE": skip,
    }
    out = subprocess.run(
        ["bash", str(ROOT / "dev"), "test"], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode != 0 and not (tmp_path / "venv").exists()
    said = "redis-server and PostgreSQL from apt" in out.stderr
    assert said == (skip == "0"), out.stderr
    if skip == "0":
        assert "INTERVENTIONS_SKIP_REMOTE=1 ./dev test" in out.stderr
