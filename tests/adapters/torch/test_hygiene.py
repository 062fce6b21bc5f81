"""Law 4: after any run, failed or not, the model holds no hooks and no state from it."""

from __future__ import annotations

import pytest
import torch

import interventions as iv
from tests.tiny_models import HF_FAMILIES, fails_on_real_data, hf_model, hook_count

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def _busy_graph(layers: int = 2) -> iv.Graph:
    g = iv.Graph()
    clean = g.run("clean", tokens=IDS)
    corrupt = g.run("corrupt", tokens=IDS.flip(1))
    h = clean.read("resid_post", layer=0)
    clean.read("logits", pos=-1, name="clean_end")  # the clean run's forward goes to the end
    corrupt.patch("resid_post", layer=0, pos=-1, value=h)
    corrupt.add("mlp_out", layer=layers - 1, direction=torch.ones(32), scale=0.5)
    corrupt.read("attn_pattern", layer=layers - 1)
    corrupt.read("logits", name="out")
    return g


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_failure_midway_leaves_no_hooks_and_same_outputs(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = hf_model(family)
    before = model(IDS).logits
    impl_before = model.config._attn_implementation
    from interventions.architectures import describe

    info = describe(model)
    assert info.arch is not None
    last_mlp = model.get_submodule(f"{info.arch.layers}.1.{info.arch.mlp}")
    calls = {"n": 0}
    original = last_mlp.forward

    def explode(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:  # the second run, after the first finished and hooks are live
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(last_mlp, "forward", explode)
    with pytest.raises(iv.ExecutionError, match=r"run 'corrupt' failed.*injected failure"):
        iv.run(_busy_graph(), model, backend="torch")
    monkeypatch.undo()
    assert calls["n"] == 2
    assert hook_count(model) == 0
    assert model.config._attn_implementation == impl_before
    torch.testing.assert_close(model(IDS).logits, before, atol=0, rtol=0)


def test_failure_in_a_plain_module() -> None:
    model = fails_on_real_data()
    before = model.blocks[1](model.embed(IDS))
    g = iv.Graph()
    run = g.run("a", tokens=IDS)
    run.read("blocks.0.output", name="x")
    run.add("blocks.1.output", direction=torch.ones(16))
    with pytest.raises(iv.ExecutionError, match=r"run 'a' failed.*failed on real data"):
        iv.run(g, model)
    assert hook_count(model) == 0
    torch.testing.assert_close(model.blocks[1](model.embed(IDS)), before, atol=0, rtol=0)


def test_success_leaves_no_hooks() -> None:
    model = hf_model("llama")
    iv.run(_busy_graph(), model)
    assert hook_count(model) == 0
    assert model.config._attn_implementation == "sdpa"
