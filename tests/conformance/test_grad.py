"""grad ops: the gradient at a site of a metric of the logits, on every backend.

Oracles: hand-written ``torch.autograd`` on the model (hooks that swap a leaf into the
forward), and the torch reference (client-side autograd) for nnsight, which takes the
gradient inside its trace; the gradient recipes (attribution patching, EAP, EAP-IG, input
attribution) agree across backends at fp32 1e-5.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import interventions as iv
from interventions.architectures import describe
from interventions.circuits.eap import edge_attribution
from interventions.errors import SpecError, UnsupportedOp, ValidationError
from interventions.ops import Const, Grad
from interventions.recipes import Metric, attribution_patching, input_attribution
from tests.core.strategies import GRAD_OP_KINDS, graphs
from tests.tiny_models import hf_model, hook_count

pytest.importorskip("nnsight")

FAMILIES = ("gpt2", "llama")
CLEAN = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
CORRUPT = torch.tensor([[1, 2, 11, 4, 5], [6, 7, 12, 9, 10]])
METRICS = {
    "logit_diff": Metric.logit_diff(torch.tensor([3, 4]), torch.tensor([5, 6])),
    "prob": Metric.prob(7),
    "logprob": Metric("logprob", torch.tensor([2, 9])),
}


def _hand_grads(model: Any, layer: int, metric: Metric) -> tuple[torch.Tensor, torch.Tensor]:
    """d sum(metric) / d (block ``layer``'s input) and / d (that block's output), by hooks."""
    block = model.get_submodule(describe(model).arch.layers)[layer]
    seen: dict[str, torch.Tensor] = {}

    def pre(_: Any, args: Any, kwargs: Any) -> Any:
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        x.retain_grad()
        seen["in"] = x
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    def post(_: Any, __: Any, out: Any) -> Any:
        y = (out[0] if isinstance(out, tuple) else out).clone()
        y.retain_grad()
        seen["out"] = y
        return (y, *out[1:]) if isinstance(out, tuple) else y

    handles = [
        block.register_forward_pre_hook(pre, with_kwargs=True),
        block.register_forward_hook(post),
    ]
    try:
        logits = model(CLEAN, use_cache=False).logits[:, -1]
        metric(logits).sum().backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    assert seen["in"].grad is not None and seen["out"].grad is not None
    return seen["in"].grad, seen["out"].grad


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", sorted(METRICS))
@pytest.mark.parametrize("backend", ("torch", "nnsight", "pyvene"))
def test_grad_equals_hand_written_autograd(family: str, kind: str, backend: str) -> None:
    model, metric = hf_model(family), METRICS[kind]
    g = iv.Graph()
    r = g.run("r", tokens=CLEAN)
    pre = r.grad("resid_pre", 1, metric=metric)
    post = r.grad("resid_post", 1, metric=metric, pos=[0, -1])
    r.read("logits", pos=-1, name="logits")
    res = iv.run(g, model, backend=backend)
    want_in, want_out = _hand_grads(model, 1, metric)
    assert want_in.abs().max() > 1e-4  # the metric does depend on the site
    torch.testing.assert_close(res[pre], want_in, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res[post], want_out[:, [0, -1]], atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(res["logits"], model(CLEAN).logits[:, -1])
    assert not res["logits"].requires_grad and not res[pre].requires_grad


@pytest.mark.parametrize("family", FAMILIES)
def test_nnsight_grads_equal_torch_at_every_kind_of_site(family: str) -> None:
    model = hf_model(family)
    arch = describe(model).arch
    metric = METRICS["logit_diff"]
    g = iv.Graph()
    r = g.run("r", tokens=CLEAN)
    r.add("resid_pre", 1, direction=torch.ones(model.config.hidden_size), scale=0.5)
    names = [
        r.grad("embed", metric=metric),
        r.grad("head", 0, metric=metric, head=1),
        r.grad("mlp_out", 0, metric=metric, pos=-1),
        r.grad("q", 1, metric=metric),
        r.grad("k", 1, metric=metric),
        r.grad("resid_pre", 1, metric=metric),
        r.grad(f"{arch.layers}.1.{arch.mlp_norm}.input", metric=metric),
    ]
    want = iv.run(g, model)
    got = iv.run(g, model, backend="nnsight")
    for name in names:
        assert want[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


RAW = {
    "gpt2": ("transformer.h.0.mlp.output", "transformer.h.1.attn.c_proj.input"),
    "llama": ("model.layers.0.mlp.output", "model.layers.1.self_attn.o_proj.input"),
}


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_random_graphs_with_grad_ops_agree(family: str, data: st.DataObject) -> None:
    """Random graphs with grad ops among every other op: nnsight equals torch."""
    g = data.draw(
        graphs(2, 4, 32, 7, 64, d_mlp=128 if family == "gpt2" else 48, op_kinds=GRAD_OP_KINDS,
               run_kinds=("tokens",), raw_sites=RAW[family], generation=False, nonfinite=False)
    )  # fmt: skip
    model = hf_model(family)
    want = iv.run(g, model)
    got = iv.run(g, model, backend="nnsight")
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)
    assert hook_count(model) == 0


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    return float((a - b).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_recipes_on_nnsight_equal_torch(family: str) -> None:
    model, metric = hf_model(family), METRICS["logit_diff"]
    ref = attribution_patching(model, CLEAN, CORRUPT, metric)
    got = attribution_patching(model, CLEAN, CORRUPT, metric, backend="nnsight")
    assert ref.approx.values.abs().max() > 1e-3
    _close(got.approx.values, ref.approx.values)
    for steps in (None, 3):
        a = edge_attribution(model, CLEAN, CORRUPT, metric, steps=steps)
        b = edge_attribution(model, CLEAN, CORRUPT, metric, steps=steps, backend="nnsight")
        assert a.edges == b.edges and max(abs(s) for s in a.scores) > 1e-4
        _close(torch.tensor(b.scores), torch.tensor(a.scores))
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11]]
    for method in ("saliency", "input_x_gradient", "integrated_gradients"):
        x = input_attribution(model, prompts, Metric.logit(3), method=method, steps=4)
        y = input_attribution(
            model, prompts, Metric.logit(3), method=method, steps=4, backend="nnsight"
        )
        for p, q in zip(x.attributions, y.attributions, strict=True):
            _close(q, p)


def test_a_grad_graph_prints_and_round_trips() -> None:
    g = iv.Graph()
    g.run("r", tokens=CLEAN).grad("resid_pre", 0, metric=METRICS["logit_diff"], metric_pos=-2)
    assert iv.Graph.from_json(g.to_json()) == g
    assert "= grad r resid_pre[0] of sum logit_diff(%t1 int64[2] - %t2 int64[2] @ pos -2)" in str(g)


def test_bad_grad_graphs_are_refused_by_name() -> None:
    model = hf_model("gpt2")

    def graph(**kw: Any) -> iv.Graph:
        g = iv.Graph()
        g.run("r", tokens=kw.pop("tokens", CLEAN), **kw)
        return g

    h = iv.Graph()
    rr = h.run("r", tokens=CLEAN)
    rr.grad("resid_pre", 0, metric=Metric.logit(1))
    rr.grad("resid_pre", 1, metric=Metric.logit(2))
    with pytest.raises(ValidationError, match="differentiates one metric"):
        iv.run(h, model, backend="nnsight")
    h = iv.Graph()
    h.run("r", tokens=CLEAN).grad("resid_pre", 0, metric=Metric.logit(torch.tensor([1, 2, 3])))
    with pytest.raises(ValidationError, match=r"int64 \[2\]"):
        iv.validate(h, model)
    h = iv.Graph()
    h.run("r", tokens=CLEAN).grad("resid_pre", 0, metric=Metric.logit(1), metric_pos=5)
    with pytest.raises(ValidationError, match="metric_pos 5 is outside"):
        iv.run(h, model)
    h = iv.Graph()
    h.run("r", tokens=[[1, 2, 3], [4, 5]]).grad("resid_pre", 0, metric=Metric.logit(1))
    with pytest.raises(ValidationError, match="one length"):
        iv.run(h, model)
    h = iv.Graph()
    h.run("r", tokens=CLEAN, max_new_tokens=2).grad("resid_pre", 0, metric=Metric.logit(1))
    with pytest.raises(ValidationError, match="does not generate"):
        iv.run(h, model, backend="nnsight")
    with pytest.raises(SpecError, match="wrong= token ids go with 'logit_diff'"):
        Grad("r", iv.Site("embed"), iv.Select(), "g", "logit", Const("t0"),
                    Const("t0"))  # fmt: skip
    h = iv.Graph()
    ref = h.run("a", tokens=CLEAN).grad("embed", metric=Metric.logit(1))
    with pytest.raises(SpecError, match="is a gradient"):
        h.run("b", tokens=CLEAN).patch("embed", value=iv.Ref(ref))
    h = iv.Graph()
    h.run("r", tokens=CLEAN).grad("embed", metric=Metric.logit(1))
    with pytest.raises(SpecError, match="not in chunks"):
        iv.run(h, model, chunk_size=1)
    with pytest.raises(UnsupportedOp, match=r"keeps no autograd graph.*grad ops"):
        iv.run(graph(), model, backend="nnsight", grad=True)


def test_grad_ops_with_equal_ids_in_distinct_tensors_share_one_metric() -> None:
    """Each grad call stores its own copy of the ids (int32 in, int64 stored): equal by value
    is one metric; different values are refused."""
    model = hf_model("gpt2")
    g = iv.Graph()
    r = g.run("r", tokens=CLEAN)
    a = r.grad("resid_pre", 1, metric=Metric("logprob", torch.tensor([2, 9], dtype=torch.int32)))
    b = r.grad("resid_post", 1, metric=Metric("logprob", torch.tensor([2, 9], dtype=torch.int32)))
    assert a != b and len(g.tensors) == 3  # the tokens, and the ids under two keys
    res = iv.run(g, model, backend="torch")
    want_in, want_out = _hand_grads(model, 1, METRICS["logprob"])
    torch.testing.assert_close(res[a], want_in, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res[b], want_out, atol=1e-6, rtol=1e-5)
    r.grad("resid_pre", 0, metric=Metric("logprob", torch.tensor([2, 8])))
    with pytest.raises(ValidationError, match="different ones"):
        iv.run(g, model, backend="torch")
