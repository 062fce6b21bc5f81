"""Packaging: the bundled weights install, with no setuptools warning about their folders.

Before, every install printed a "Package would be ignored" warning for each weights folder
(about 160 lines on a first ``./dev setup``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_build_copies_every_weights_file_without_warnings(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(
        ROOT / "interventions", src / "interventions", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(
        ROOT / "adapters", src / "adapters", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = tmp_path / "build"
    code = (
        "import sys, setuptools\n"
        f"sys.argv = ['setup.py', 'build_py', '--build-lib', {str(build)!r}]\n"
        "setuptools.setup()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "would be ignored" not in out.stderr and "absent from" not in out.stderr, out.stderr
    weights = ROOT / "interventions" / "reference_models" / "weights"
    wanted = sorted(p.relative_to(ROOT).as_posix() for p in weights.rglob("*") if p.is_file())
    built = sorted(
        p.relative_to(build).as_posix()
        for p in (build / "interventions").rglob("*")
        if "weights" in p.parts and p.is_file()
    )
    assert wanted and built == wanted
