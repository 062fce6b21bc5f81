"""The README's Python example runs as written and prints what the README shows."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks(lang: str) -> list[str]:
    """Fenced blocks of the README whose opening fence names ``lang`` ('' for none)."""
    blocks, current, inside = [], [], None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if inside is None:
                inside, current = line[3:].strip(), []
            else:
                if inside == lang:
                    blocks.append("\n".join(current) + "\n")
                inside = None
        elif inside is not None:
            current.append(line)
    return blocks


def test_readme_examples_run_and_print_the_shown_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the examples write pictures to the working directory
    first, *rest = _blocks("python")
    out = io.StringIO()
    namespace: dict[str, object] = {}
    with contextlib.redirect_stdout(out):
        exec(compile(first, "README.md", "exec"), namespace)
    shown = _blocks("")[0] if _blocks("") else ""
    printed = out.getvalue().strip()
    assert printed.startswith("Graph(2 runs, 3 ops)")
    assert printed == shown.strip()
    with contextlib.redirect_stdout(io.StringIO()):
        for block in rest:  # later examples continue from the first one's names
            exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "patching.png").is_file()


def test_readme_commands_exist() -> None:
    bash = _blocks("bash")[0]
    assert "./dev demo" in bash and "./dev test" in bash
    ci = (README.parent / ".ci" / "run").read_text()
    assert "./dev test" in ci


def test_readme_remote_example_is_run_by_the_remote_tests() -> None:
    """The ``py`` block needs an NDIF host: tests/remote runs it against a local one."""
    (block,) = _blocks("py")
    assert "remote=True" in block and "iv.Job.attach" in block
    remote_tests = (README.parent / "tests" / "remote" / "test_remote.py").read_text()
    assert "test_the_readme_remote_example_runs" in remote_tests
    for command in ("./dev ndif start", "./dev ndif stop", "./dev test-remote"):
        assert command in README.read_text()
