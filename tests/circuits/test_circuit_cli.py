"""``interventions circuit``: the data and the picture written, usage errors exit 2, and
``--help`` imports no torch (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from interventions.circuits.circuit import Circuit
from interventions.cli import main


def test_help_imports_no_torch() -> None:
    code = (
        "import sys\nfrom interventions.cli import main\n"
        "try:\n    main(['circuit', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--method" in out.stdout and "acdc" in out.stdout


def test_circuit_on_the_induction_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c"
    argv = ["circuit", "--model", "induction", "--task", "induction", "--prompts", "4"]
    assert main([*argv, "--method", "eap", "--top-k", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    c = Circuit.load(out / "circuit.json")
    assert len(c.edges) == 6 and c.method == "eap"
    assert printed.startswith("Circuit(eap, 6 edges") and "faithfulness" in printed
    pytest.importorskip("matplotlib")
    assert (out / "circuit.png").read_bytes()[:4] == b"\x89PNG"


def test_a_guided_acdc_finds_the_same_circuit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["circuit", "--model", "induction", "--task", "induction", "--prompts", "4"]
    found = []
    for extra in ([], ["--guide", "eap_ig"]):
        out = tmp_path / str(len(found))
        assert main([*argv, "--method", "acdc", *extra, "--out", str(out)]) == 0
        found.append(Circuit.load(out / "circuit.json"))
    capsys.readouterr()
    plain, guided = found
    assert guided.edges == plain.edges and plain.edges
    assert guided.stat("guide_passes") == 2 and plain.stat("guide_passes") == 0
    assert guided.stat("passes") < plain.stat("passes")


@pytest.mark.parametrize(
    "extra",
    [
        ["--task", "ioi", "--clean-ids", "1,2"],  # both kinds of input
        [],  # no input
        ["--clean-ids", "1,2", "--corrupt-ids", "1,2,3", "--answer", "4"],  # lengths differ
        ["--task", "induction", "--threshold", "-1"],
        ["--task", "induction", "--ablation", "mode"],
        ["--task", "induction", "--method", "path"],
        ["--task", "induction", "--guide", "eap"],
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, extra: list[str]) -> None:
    argv = ["circuit", "--model", "induction", "--out", str(tmp_path / "o"), *extra]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = int(exc.code or 0)
    assert code == 2
    assert not (tmp_path / "o" / "circuit.json").exists()
