"""Deploy a checkpoint on a local NDIF stack, with NDIF's own deploy function.

    .ndif-venv/bin/python scripts/ndif/deploy.py CHECKPOINT [--state DIR] [--model-key KEY]

CHECKPOINT is a hub id or a directory written by ``save_pretrained`` (with its
tokenizer). The model key defaults to the one nnsight's client sends for
``TransformersModel(CHECKPOINT, task="text-generation")`` -- which is what the
``interventions`` nnsight backend sends -- so requests find the deployment. The
size is measured from the checkpoint's files (the auto-deploy path of ndif 0.1.2
with nnsight 0.8.1 cannot size a checkpoint), the dtype is float32 and the actor is
``ndif_cpu_actor.CPUModelActor``. Runs in the stack's virtual environment; prints the
model key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from stack import DEFAULT_STATE, Stack  # noqa: E402


def model_key(checkpoint: str, task: str = "text-generation") -> str:
    """nnsight's remote key for ``TransformersModel(checkpoint, task=task)``."""
    if os.path.isdir(checkpoint):
        # a local directory is its own id: nnsight would ask the hub otherwise
        from nnsight.modeling.huggingface import _ID_CACHE

        _ID_CACHE.setdefault(checkpoint, checkpoint)
    from nnsight.modeling.transformers import TransformersModel

    data = {"repo_id": checkpoint, "revision": None, "task": task}
    return f"{TransformersModel.__module__}.{TransformersModel.__qualname__}:{json.dumps(data)}"


def checkpoint_bytes(checkpoint: str) -> int:
    path = Path(checkpoint)
    files = list(path.glob("*.safetensors")) + list(path.glob("*.bin")) if path.is_dir() else []
    return max(sum(f.stat().st_size for f in files), 1 << 20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--model-key", default=None)
    parser.add_argument("--size-bytes", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=None, help="execution timeout (s)")
    args = parser.parse_args(argv)
    state = Stack(args.state).load()
    if not state.get("pids"):
        print(f"no running stack in {args.state}; start one first", file=sys.stderr)
        return 1
    checkpoint = (
        str(Path(args.checkpoint).resolve()) if os.path.isdir(args.checkpoint) else args.checkpoint
    )
    key = args.model_key or model_key(checkpoint)
    os.environ.update(Stack(args.state).env(state))
    from ndif.cli.lib.deploy import deploy

    spec = {
        "checkpoint": checkpoint,
        "model_key": key,
        "actor_class": "ndif_cpu_actor.CPUModelActor",
        "dtype": "float32",
        "size_bytes": args.size_bytes or checkpoint_bytes(checkpoint),
        "replicas": 1,
        "pinned": True,
        "execution_timeout_seconds": args.timeout,
    }
    result = deploy(
        [spec],
        ray_address=os.environ["NDIF_RAY_ADDRESS"],
        redis_url=os.environ["NDIF_REDIS_URL"],
        on_message=lambda m: print(m, file=sys.stderr),
    )
    failed = [d for d in result.get("deployments", []) if d.get("status") != "READY"]
    if failed:
        print(f"deploy failed: {failed}", file=sys.stderr)
        return 1
    print(key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
