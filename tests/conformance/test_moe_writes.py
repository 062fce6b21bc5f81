"""Writes to the MoE router sites re-route: held to the block routed by hand.

``router_logits`` written: the experts and weights come from the new logits by the family's
rule; ``experts_chosen`` patched: the new ids are weighed by the router's own logits. The
oracle routes by hand from the weights (``_by_hand`` of the family tests: softmax, top-k,
renormalisation as each transformers router does it) and runs every expert by hand; the
final logits are held to a hand-written hook that hands the model the hand-routed gate
output. fp32, 1e-5.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

import interventions as iv
from tests.conformance.test_families import IDS, _by_hand, _moe_input
from tests.tiny_models import MOE_FAMILIES, hf_model, hook_count

TOL = {"atol": 1e-5, "rtol": 1e-5}
OTHER = IDS.flip(0)  # another run's prompts: other router logits, other experts


def _routed(model: torch.nn.Module, x: torch.Tensor, every: torch.Tensor, chosen, weights):
    """The sparse block's output for ``x`` routed to ``chosen`` with ``weights``."""
    d = every.shape[-1]
    out = (every.gather(2, chosen[..., None].expand(*chosen.shape, d)) * weights[..., None]).sum(2)
    moe = model.model.layers[1].mlp
    if hasattr(moe, "shared_expert"):  # Qwen2-MoE: plus its gated shared expert
        with torch.no_grad():
            out = out + torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)
    return out


@contextmanager
def _gate_returns(model: torch.nn.Module, logits, chosen, weights) -> Iterator[None]:
    """A hand-written hook: layer 1's gate hands the block this routing instead."""
    gate = model.model.layers[1].mlp.gate

    def hook(module, args, out):
        return (logits.reshape(-1, logits.shape[-1]), weights.reshape(-1, 2), chosen.reshape(-1, 2))

    handle = gate.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _hand_logits(model: torch.nn.Module, logits, chosen, weights) -> torch.Tensor:
    with _gate_returns(model, logits, chosen, weights), torch.no_grad():
        return model(IDS).logits


def _gate_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    x = _moe_input_of(model, ids)
    return x @ model.model.layers[1].mlp.gate.weight.T


def _moe_input_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    block = model.model.layers[1].mlp
    handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return seen[0]


def _norm_topk(family: str) -> torch.nn.Module:
    """The family with its top-k renormalised (Qwen/OLMoE's ``norm_topk_prob=True``), so
    both branches of the rule are held to the hand-routed block."""
    model = copy.deepcopy(hf_model(family))
    model.config.norm_topk_prob = True
    for layer in model.model.layers:
        layer.mlp.gate.norm_topk_prob = True
    return model


def _models() -> list[tuple[str, bool]]:
    return [(f, False) for f in MOE_FAMILIES] + [("qwen3_moe", True), ("olmoe", True)]


def _model(family: str, renorm: bool) -> torch.nn.Module:
    return _norm_topk(family) if renorm else hf_model(family)


@pytest.mark.parametrize(("family", "renorm"), _models())
def test_router_logits_writes_route_like_the_block_routed_by_hand(
    family: str, renorm: bool
) -> None:
    model = _model(family, renorm)
    x = _moe_input(model, 1)
    own = x @ model.model.layers[1].mlp.gate.weight.T
    other = _gate_logits(model, OTHER)
    direction = torch.linspace(-3.0, 3.0, 4)
    setting = torch.tensor([2.0, -1.0, 0.5, 1.5])
    # the logits each write leaves, built by hand
    patched = own.clone()
    patched[:, [2, 5]] = other[:, [2, 5]]
    added = own + 2.5 * direction
    set_ = own.clone()
    set_[1, 3] = setting
    g = iv.Graph()
    o = g.run("other", tokens=OTHER)
    ref = o.read("router_logits", layer=1, name="other.logits")
    cases = {"patched": patched, "added": added, "set": set_}
    runs = {name: g.run(name, tokens=IDS) for name in cases}
    runs["patched"].patch("router_logits", layer=1, value=ref, pos=[2, 5])
    runs["added"].add("router_logits", layer=1, direction=direction, scale=2.5)
    runs["set"].patch("router_logits", layer=1, batch=1, pos=3, value=setting)
    for name, run in runs.items():
        run.read("router_logits", layer=1, name=f"{name}.logits")
        run.read("experts_chosen", layer=1, name=f"{name}.chosen")
        run.read("mlp_out", layer=1, name=f"{name}.mlp")
        run.read("logits", name=f"{name}.out")
    out = iv.run(g, model)
    for name, logits in cases.items():
        every, chosen, weights = _by_hand(model, x, logits=logits)
        assert torch.equal(out[f"{name}.chosen"], chosen), name
        torch.testing.assert_close(out[f"{name}.logits"], logits, **TOL)
        torch.testing.assert_close(
            out[f"{name}.mlp"], _routed(model, x, every, chosen, weights), **TOL
        )
        want = _hand_logits(model, logits, chosen, weights)
        torch.testing.assert_close(out[f"{name}.out"], want, **TOL)
    # the writes did move the routing somewhere (else the oracle proves nothing)
    _, clean_chosen, _ = _by_hand(model, x)
    assert not torch.equal(out["patched.chosen"], clean_chosen)
    assert hook_count(model) == 0


@pytest.mark.parametrize(("family", "renorm"), _models())
def test_experts_chosen_patches_weigh_the_new_ids_by_the_routers_logits(
    family: str, renorm: bool
) -> None:
    model = _model(family, renorm)
    x = _moe_input(model, 1)
    _, other_chosen, _ = _by_hand(model, _moe_input_of(model, OTHER))
    _, clean_chosen, _ = _by_hand(model, x)
    g = iv.Graph()
    o = g.run("other", tokens=OTHER)
    ref = o.read("experts_chosen", layer=1, name="other.chosen")
    from_other = g.run("from_other", tokens=IDS)
    from_other.patch("experts_chosen", layer=1, value=ref)
    set_ = g.run("set", tokens=IDS)
    set_.patch("experts_chosen", layer=1, batch=0, pos=2, value=[3, 1])  # any order
    patched_ids = {"from_other": other_chosen, "set": clean_chosen.clone()}
    patched_ids["set"][0, 2] = torch.tensor([3, 1])
    for name, run in (("from_other", from_other), ("set", set_)):
        run.read("experts_chosen", layer=1, name=f"{name}.chosen")
        run.read("mlp_out", layer=1, name=f"{name}.mlp")
        run.read("logits", name=f"{name}.out")
    out = iv.run(g, model)
    for name, ids in patched_ids.items():
        every, chosen, weights = _by_hand(model, x, chosen=ids)
        assert torch.equal(out[f"{name}.chosen"], ids), name
        torch.testing.assert_close(
            out[f"{name}.mlp"], _routed(model, x, every, chosen, weights), **TOL
        )
        own = x @ model.model.layers[1].mlp.gate.weight.T
        torch.testing.assert_close(
            out[f"{name}.out"], _hand_logits(model, own, ids, weights), **TOL
        )
    assert not torch.equal(other_chosen, clean_chosen)
    assert hook_count(model) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_writing_the_routers_own_values_back_changes_nothing(
    family: str, dtype: torch.dtype
) -> None:
    """Law 3: the rule re-run on the gate's own logits (or ids) gives the gate's own
    weights bit for bit (bf16: Mixtral keeps them float32, the others cast them back)."""
    model = copy.deepcopy(hf_model(family)).to(dtype)
    for site in ("router_logits", "experts_chosen"):
        g = iv.Graph()
        clean = g.run("clean", tokens=IDS)
        own = clean.read(site, layer=1, name="own")
        clean.read("logits", name="clean.out")
        again = g.run("again", tokens=IDS)  # depends on clean: a pass of its own, same shape
        again.patch(site, layer=1, value=own)
        again.read("logits", name="again.out")
        out = iv.run(g, model)
        assert torch.equal(out["again.out"], out["clean.out"]), site
    assert hook_count(model) == 0


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([0, 4], r"experts_chosen\[1\].*must be in 0\.\.3, found 0\.\.4"),
        ([-1, 2], r"must be in 0\.\.3, found -1\.\.2"),
        ([1, 1], r"repeat within one token's top-k.*2 different experts in 0\.\.3"),
        (torch.tensor([0.0, 1.0]), r"must be integers.*got torch\.float32.*0\.\.3"),
        ([0, 1, 2], r"need 2 per token.*shape \[3\]"),
    ],
)
def test_invalid_expert_ids_are_refused_by_validation(value: object, match: str) -> None:
    model = hf_model("mixtral")
    g = iv.Graph()
    g.run("a", tokens=IDS).patch("experts_chosen", layer=1, pos=2, value=value)
    with pytest.raises(iv.ValidationError, match=match):
        iv.run(g, model)
    assert hook_count(model) == 0


def test_ids_that_repeat_only_once_written_fail_the_run_by_name_with_no_hooks_left() -> None:
    """One slot set to the expert already in the other: only the run can see it."""
    model = hf_model("olmoe")
    x = _moe_input(model, 1)
    _, chosen, _ = _by_hand(model, x)
    g = iv.Graph()
    g.run("a", tokens=IDS).patch(
        "experts_chosen", layer=1, batch=0, pos=4, dims=0, value=int(chosen[0, 4, 1])
    )
    with pytest.raises(iv.ValidationError, match=r"a\.experts_chosen\[1\].*repeat"):
        iv.run(g, model)
    assert hook_count(model) == 0


def test_expert_ids_take_patches_only_from_expert_ids() -> None:
    model = hf_model("qwen2_moe")
    g = iv.Graph()
    g.run("a", tokens=IDS).ablate("experts_chosen", layer=1, method="zero")
    with pytest.raises(iv.ValidationError, match=r"can only be patched.*not ablate"):
        iv.validate(g, model)
    g = iv.Graph()
    logits = g.run("a", tokens=IDS).read("router_logits", layer=1, dims=[0, 1])
    g.run("b", tokens=IDS).patch("experts_chosen", layer=1, value=logits)
    with pytest.raises(iv.ValidationError, match=r"come from a read of experts_chosen"):
        iv.validate(g, model)
    assert hook_count(model) == 0


def test_a_router_with_no_routing_rule_is_read_only_by_name() -> None:
    """A map registered without a routing rule (a custom router): reads work, writes are
    refused before running, naming the site and the map."""
    model = hf_model("mixtral")
    saved = iv.architectures()["mixtral"]
    iv.register_architecture(replace(saved, name="custom-moe", routing=None), override=True)
    try:
        g = iv.Graph()
        g.run("a", tokens=IDS).read("router_logits", layer=0, name="r")
        assert iv.run(g, model)["r"].shape == (2, 7, 4)
        for site, value in (("router_logits", torch.zeros(4)), ("experts_chosen", [0, 1])):
            g = iv.Graph()
            g.run("a", tokens=IDS).patch(site, layer=0, value=value)
            with pytest.raises(
                iv.UnsupportedOp, match=rf"writing '{site}'.*custom-moe.*no routing rule"
            ):
                iv.run(g, model)
    finally:
        iv.register_architecture(saved, override=True)
    assert hook_count(model) == 0


@pytest.mark.parametrize("backend", ["nnsight", "pyvene"])
def test_router_writes_are_refused_by_name_on_other_backends(backend: str) -> None:
    g = iv.Graph()
    g.run("a", tokens=IDS).scale("router_logits", layer=1, factor=2.0)
    with pytest.raises(iv.UnsupportedOp, match=r"cannot reach site 'router_logits'.*torch"):
        iv.validate(g, hf_model("mixtral"), backend=backend)
