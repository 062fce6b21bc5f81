"""A model left in ``train()`` mode runs in eval mode for the run, then gets its modes back.

Decision: eval for the run (not a refusal), because dropout makes every rerun differ and
nothing in an intervention graph wants it. Oracle: the same model's results in eval mode.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

import interventions as iv


def _dropout_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=64,
        resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def _graph() -> iv.Graph:
    g = iv.Graph()
    g.run("a", tokens=torch.tensor([[3, 5, 7, 11, 13]])).read("logits", name="y")
    return g


@pytest.mark.parametrize("backend", ["torch", "nnsight", "pyvene"])
def test_train_mode_runs_as_eval_and_is_restored(backend: str) -> None:
    model = _dropout_gpt2()
    expected = iv.run(_graph(), model.eval(), backend="torch")["y"]
    model.train()
    model.transformer.h[1].eval()  # a mixed state must come back exactly as it was
    before = {name: m.training for name, m in model.named_modules()}
    first = iv.run(_graph(), model, backend=backend)["y"]
    second = iv.run(_graph(), model, backend=backend)["y"]
    assert {name: m.training for name, m in model.named_modules()} == before
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, first, atol=0, rtol=0)


def test_modes_are_restored_when_the_run_fails() -> None:
    model = _dropout_gpt2().train()
    g = iv.Graph()
    g.run("a", tokens=torch.tensor([[3, 5]])).read("resid_post", 7, name="y")  # no layer 7
    with pytest.raises(iv.ValidationError):
        iv.run(g, model)
    assert all(m.training for m in model.modules())
