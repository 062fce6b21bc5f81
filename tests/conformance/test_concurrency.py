"""Runs on one model from several threads never see each other's interventions.

Thread A steers ``resid_post[0]`` hard, thread B reads plain logits, both on the same
GPT-2 object; every result must equal the one computed sequentially (the oracle), on
every backend. Bounded: 2 threads x 20 runs each, with a time limit on the joins.
"""

from __future__ import annotations

import threading

import pytest
import torch

import interventions as iv
from tests.tiny_models import hf_model, hook_count

RUNS = 20
JOIN_SECONDS = 120.0


def _graphs() -> tuple[iv.Graph, iv.Graph]:
    tokens = torch.tensor([[3, 5, 7, 11, 13, 17]])
    steered = iv.Graph()
    a = steered.run("a", tokens=tokens)
    a.add("resid_post", 0, direction=torch.ones(32) * 50, scale=1.0)
    a.read("logits", name="y")
    plain = iv.Graph()
    plain.run("b", tokens=tokens).read("logits", name="y")
    return steered, plain


@pytest.mark.parametrize("backend", ["torch", "nnsight", "pyvene"])
def test_concurrent_runs_on_one_model_do_not_mix(backend: str) -> None:
    model = hf_model("gpt2")
    steered, plain = _graphs()
    expected = {
        "steered": iv.run(steered, model, backend=backend)["y"],
        "plain": iv.run(plain, model, backend=backend)["y"],
    }
    assert not torch.allclose(expected["steered"], expected["plain"])  # the probe can tell
    wrong: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(which: str, graph: iv.Graph) -> None:
        barrier.wait()
        for i in range(RUNS):
            try:
                got = iv.run(graph, model, backend=backend)["y"]
            except BaseException as exc:  # recorded and asserted below
                errors.append(exc)
                continue
            if not torch.equal(got, expected[which]):
                wrong.append(f"{which} run {i}")

    threads = [
        threading.Thread(target=worker, args=("steered", steered), daemon=True),
        threading.Thread(target=worker, args=("plain", plain), daemon=True),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_SECONDS)
    assert not any(t.is_alive() for t in threads), "a run hung"
    assert not errors, f"{len(errors)} runs failed, first: {errors[0]!r}"
    assert not wrong, f"{len(wrong)} of {2 * RUNS} results were wrong: {wrong[:5]}"
    assert hook_count(model) == 0


def test_a_run_inside_a_run_on_the_same_model_does_not_deadlock() -> None:
    """The per-model lock is re-entrant: a recipe may call ``run`` while holding it."""
    from interventions.execute import model_lock

    model = hf_model("gpt2")
    _, plain = _graphs()
    with model_lock(model):
        y = iv.run(plain, model)["y"]
    torch.testing.assert_close(y, iv.run(plain, model)["y"], atol=0, rtol=0)
