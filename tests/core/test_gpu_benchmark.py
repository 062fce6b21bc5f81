"""benchmarks/gpu.py is a clean no-op without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run")
def test_gpu_benchmark_says_no_cuda_and_exits_0() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA device here" in done.stdout
    assert "nothing to run" in done.stdout


def _gpu_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_circuit_workloads_run_on_cpu_and_the_batched_acdc_equals_its_loop() -> None:
    """The ``acdc`` and ``eap`` workloads' functions on a tiny fp32 GPT-2 on the CPU:
    ACDC's batched passes find the circuit its one-edge-per-forward loop finds, in fewer
    passes; its candidates are the edges into the logits (counted by hand); EAP scores
    every edge."""
    import transformers

    gpu = _gpu_module()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    data = gpu.circuit_data(model, prompts=2, seq=6)
    assert len(data["edges"]) == 2 * 4 + 2  # 8 heads and 2 MLPs (not embed) -> logits
    assert len(gpu.circuit_data(model, prompts=2, seq=6, last_layers=1)["edges"]) == 4 + 1
    loop = gpu.run_acdc(model, data, 1)
    fast = gpu.run_acdc(model, data, gpu.ACDC_BATCH)
    assert gpu.same_circuit(fast, loop) == f"same {len(loop.edges)} edges"
    assert set(loop.edges) == set(fast.edges)
    torch.testing.assert_close(
        torch.tensor(fast.scores), torch.tensor(loop.scores), atol=1e-4, rtol=1e-4
    )
    assert gpu.passes(loop) == 1 + dict(loop.stats)["tested"]  # the clean run, then one each
    assert gpu.passes(fast) < gpu.passes(loop)
    guided = gpu.run_acdc(model, data, gpu.ACDC_BATCH, "eap_ig")
    assert guided.edges == fast.edges and guided.stat("guide_passes") == 2
    assert gpu.passes(guided) == guided.stat("passes") + 2
    eap = gpu.run_eap(model, data)
    # by hand: 12 q/k/v inputs of layer 0 read embed; MLP 0 reads embed and 4 heads; the
    # 12 of layer 1 read those 6 nodes; MLP 1 reads 10 nodes; the logits read all 11
    assert len(eap.edges) == 12 * 1 + 5 + 12 * 6 + 10 + 11
    assert len(set(eap.edges)) == len(eap.edges) and torch.tensor(eap.scores).abs().sum() > 0
