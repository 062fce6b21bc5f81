"""A real NDIF stack on 127.0.0.1 for the ``remote`` tests, started once per session.

The fixture installs the stack's virtual environment if it is missing
(``scripts/ndif/install.sh``: NDIF, Ray, Redis, PostgreSQL, an S3 stand-in; never this
package), starts it with ``scripts/ndif/stack.py`` in a temporary state directory,
saves the tiny Llama of ``tests/tiny_models.py`` (with its tokenizer) with
``save_pretrained``, deploys it with NDIF's own deploy function, points ``NDIF_HOST`` and
``NDIF_API_KEY`` at the stack (nnsight's own settings: nothing else is configured), and
at the end stops every service it started, by process id.

Run with ``pytest -m remote`` (or ``./dev test-remote``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "ndif"
VENV = Path(os.environ.get("NDIF_VENV", ROOT / ".ndif-venv"))


@dataclass
class Stack:
    state_dir: Path
    state: dict
    checkpoint: str  # the deployed tiny Llama (a save_pretrained directory)
    model_key: str  # the key it is deployed under (nnsight's, as the client sends it)
    spare: str  # a checkpoint directory that is NOT deployed

    @property
    def url(self) -> str:
        return str(self.state["url"])

    @property
    def api_key(self) -> str:
        return str(self.state["api_key"])

    def port(self, name: str) -> int:
        return int(self.state["ports"][name])

    def stack(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV / "bin" / "python"), str(SCRIPTS / "stack.py"), *args,
             "--state", str(self.state_dir)],
            capture_output=True, text=True, timeout=timeout, check=True,
        )  # fmt: skip

    def model_actor_pids(self) -> list[int]:
        """Process ids of the live CPU model actors (from Ray's state API, on loopback)."""
        url = f"http://127.0.0.1:{self.port('ray_dashboard')}/api/v0/actors?detail=1&limit=100"
        with urllib.request.urlopen(url, timeout=10) as response:
            data = json.load(response)
        return [
            int(a["pid"])
            for a in data["data"]["result"]["result"]
            if a["class_name"] == "CPUModelActor" and a["state"] == "ALIVE"
        ]


def _save(family: str, directory: Path) -> str:
    from tests.tiny_models import hf_model, word_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    hf_model(family).save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def ndif(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    t0 = time.monotonic()
    install = subprocess.run(
        ["bash", str(SCRIPTS / "install.sh")], capture_output=True, text=True, timeout=1800
    )
    if install.returncode != 0:
        pytest.fail(f"installing the NDIF stack failed:\n{install.stderr[-4000:]}")
    base = tmp_path_factory.mktemp("ndif")
    state_dir = base / "state"
    python = str(VENV / "bin" / "python")
    started = subprocess.run(
        [python, str(SCRIPTS / "stack.py"), "start", "--state", str(state_dir)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    try:
        if started.returncode != 0:
            pytest.fail(f"starting the NDIF stack failed:\n{started.stderr[-4000:]}")
        state = json.loads((state_dir / "state.json").read_text())
        assert state["url"].startswith("http://127.0.0.1:")
        checkpoint = _save("llama", base / "tiny-llama")
        spare = _save("gpt2", base / "tiny-gpt2")
        deployed = subprocess.run(
            [python, str(SCRIPTS / "deploy.py"), checkpoint, "--state", str(state_dir)],
            capture_output=True, text=True, timeout=600, cwd=str(base),
        )  # fmt: skip
        if deployed.returncode != 0:
            pytest.fail(f"deploying the test model failed:\n{deployed.stderr[-4000:]}")
        model_key = deployed.stdout.strip().splitlines()[-1]
        saved = {k: os.environ.get(k) for k in ("NDIF_HOST", "NDIF_API_KEY")}
        os.environ["NDIF_HOST"] = state["url"]
        os.environ["NDIF_API_KEY"] = state["api_key"]
        print(
            f"\n[ndif] stack up and model deployed in {time.monotonic() - t0:.0f}s", file=sys.stderr
        )
        try:
            yield Stack(state_dir, state, checkpoint, model_key, spare)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        subprocess.run(
            [python, str(SCRIPTS / "stack.py"), "stop", "--state", str(state_dir)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
