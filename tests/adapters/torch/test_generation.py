"""Generating runs against ``model.generate`` with hand hooks, and a no-cache greedy loop.

Position semantics (adapters/torch_hooks/__init__.py docstring): an op applies on the prompt pass
and on every generated step; non-negative positions count from the start of the prompt,
negative ones from the end of the prompt; ``pos=None`` touches every position. With a KV
cache the prompt pass feeds positions ``0..P-1`` and generated step ``k >= 1`` feeds the
single position ``P + k - 1``. Reads keep every fed position: ``[b, P + n - 1, ...]``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import pytest
import torch
from torch.testing import assert_close

import interventions as iv
from interventions.plan import resample_indices
from tests.adapters.torch.hand import FP32, IDS, capture, hooked, model_of, randn, run

P = IDS.shape[1]  # 6
N = 5  # new tokens
FAMILIES = ("llama", "gpt_neox")

StepEdit = Callable[[torch.Tensor, int], None]  # (x of one forward call, call number)


def generate(model: torch.nn.Module, family: str, step_edit: StepEdit | None = None, n: int = N):
    """Greedy ``model.generate`` (KV cache) with a hand hook on resid_post[0].

    Returns (new tokens [b, n], that site's tensor of every call, concatenated on pos).
    """
    calls: list[torch.Tensor] = []

    def edit(x: torch.Tensor) -> None:
        if step_edit is not None:
            step_edit(x, len(calls))
        calls.append(x.clone())

    with hooked(model, family, [("resid_post", 0, edit)]), torch.no_grad():
        out = model.generate(
            input_ids=IDS,
            attention_mask=torch.ones_like(IDS),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=[],  # never stop early: exactly n tokens
            pad_token_id=0,
        )
    assert out.shape == (2, P + n)
    return out[:, P:], torch.cat(calls, dim=1)


def greedy_loop(
    model: torch.nn.Module,
    family: str,
    at: Callable[[int], list[int] | None],
    v: torch.Tensor,
    n: int = N,
) -> torch.Tensor:
    """Greedy decoding with no cache: every pass re-reads the whole sequence, and ``v`` is
    added at the absolute positions ``at(seq_len)`` (``None``: all) of resid_post[0]."""
    seq = IDS.clone()
    for _ in range(n):

        def edit(x: torch.Tensor) -> None:
            where = at(x.shape[1])
            if where is None:
                x += v
            else:
                for p in where:
                    if p < x.shape[1]:
                        x[:, p, :] += v

        with hooked(model, family, [("resid_post", 0, edit)]), torch.no_grad():
            logits = model(input_ids=seq, use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, P:]


def steer(family: str, pos: Any, v: torch.Tensor | None, n: int = N, **reads: Any) -> iv.Results:
    g = iv.Graph()
    r = g.run("x", tokens=IDS, max_new_tokens=n)
    if v is not None:
        r.add("resid_post", 0, direction=v, pos=pos)
    for name, kwargs in reads.items():
        r.read(**kwargs, name=name)
    return run(g, model_of(family))


@cache
def baseline(family: str) -> torch.Tensor:
    """Unsteered greedy tokens (cached)."""
    return generate(model_of(family), family)[0]


def direction(family: str) -> torch.Tensor:
    return randn(32, seed=21) * 4.0


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_generation_is_greedy_generate(family: str) -> None:
    model = model_of(family)
    res = steer(family, None, None)
    tokens = baseline(family)
    assert torch.equal(res["x.generated"], tokens)
    assert torch.equal(tokens, greedy_loop(model, family, lambda s: [], torch.zeros(32)))


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_every_step(family: str) -> None:
    """pos=None: every position of every forward call."""
    model = model_of(family)
    v = direction(family)
    res = steer(family, None, v)

    def edit(x: torch.Tensor, call: int) -> None:
        x += v

    tokens, _ = generate(model, family, edit)
    assert torch.equal(res["x.generated"], tokens)
    assert torch.equal(tokens, greedy_loop(model, family, lambda s: None, v))
    assert not torch.equal(tokens, baseline(family))  # the steering matters


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_last_prompt_position_only(family: str) -> None:
    """pos=-1 is the last prompt token, on the prompt pass only; generated tokens untouched."""
    model = model_of(family)
    v = direction(family)
    res = steer(family, -1, v)

    def edit(x: torch.Tensor, call: int) -> None:
        if call == 0:
            x[:, -1, :] += v

    tokens, _ = generate(model, family, edit)
    assert torch.equal(res["x.generated"], tokens)
    assert torch.equal(tokens, greedy_loop(model, family, lambda s: [P - 1], v))
    everywhere = steer(family, None, v)["x.generated"]
    assert not torch.equal(tokens, everywhere)  # really only one position
    assert not torch.equal(tokens, baseline(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_a_generated_position(family: str) -> None:
    """pos=P+1 is fed by generated step 2 (call 2); nothing earlier changes."""
    model = model_of(family)
    v = direction(family) * 2
    res = steer(family, P + 1, v, every=dict(site="resid_post", layer=0))

    def edit(x: torch.Tensor, call: int) -> None:
        if call == 2:
            assert x.shape[1] == 1
            x[:, 0, :] += v

    tokens, fed = generate(model, family, edit)
    assert torch.equal(res["x.generated"], tokens)
    assert torch.equal(tokens, greedy_loop(model, family, lambda s: [P + 1], v))
    base = baseline(family)
    assert torch.equal(tokens[:, :2], base[:, :2])  # tokens before the step are untouched
    assert not torch.equal(tokens, base)
    assert_close(res["every"], fed, **FP32)


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_a_slice_from_the_prompt_end(family: str) -> None:
    """slice(-2, None): the last two prompt tokens and everything generated after them."""
    model = model_of(family)
    v = direction(family)
    res = steer(family, slice(-2, None), v)

    def edit(x: torch.Tensor, call: int) -> None:
        if call == 0:
            x[:, -2:, :] += v
        else:
            x += v

    tokens, _ = generate(model, family, edit)
    assert torch.equal(res["x.generated"], tokens)
    assert torch.equal(tokens, greedy_loop(model, family, lambda s: list(range(P - 2, s)), v))


@pytest.mark.parametrize("family", FAMILIES)
def test_reads_concatenate_prompt_and_generated_positions(family: str) -> None:
    model = model_of(family)
    v = direction(family)
    reads = dict(
        h=dict(site="resid_post", layer=0),
        heads=dict(site="head", layer=1),
        logits=dict(site="logits"),
        at=dict(site="resid_post", layer=0, pos=[0, P + 2], dims=slice(0, 4)),
    )
    res = steer(family, None, v, **reads)
    tokens = res["x.generated"]
    fed = P + N - 1
    assert res["h"].shape == (2, fed, 32)
    assert res["heads"].shape[:3] == (2, fed, 4)
    assert res["logits"].shape == (2, fed, 64)

    def edit(x: torch.Tensor, call: int) -> None:
        x += v

    _, hand = generate(model, family, edit)
    assert_close(res["h"], hand, **FP32)
    # The same values from one no-cache pass over everything that was fed.
    seq = torch.cat([IDS, tokens[:, :-1]], dim=1)

    def add(x: torch.Tensor) -> None:
        x += v

    h, heads, logits = capture(
        model,
        family,
        [("resid_post", 0), ("head", 1), ("logits", None)],
        seq,
        [("resid_post", 0, add)],
    )
    assert_close(res["h"], h, **FP32)
    assert_close(res["heads"], heads, **FP32)
    assert_close(res["logits"], logits, **FP32)
    assert_close(res["at"], h[:, [0, P + 2], :4], **FP32)
    assert torch.equal(logits[:, P - 1 :].argmax(-1), tokens)  # greedy, position by position


def test_generation_does_not_stop_at_eos() -> None:
    """Greedy generation of exactly max_new_tokens, even when EOS (id 2) comes first."""
    family = "llama"
    model = model_of(family)
    w_eos = model.lm_head.weight[2].detach() * 50.0
    g = iv.Graph()
    r = g.run("x", tokens=IDS, max_new_tokens=N)
    r.add("final_norm", direction=w_eos, pos=-1)  # the first new token is EOS
    r.read("resid_post", 0, name="h")
    res = run(g, model)

    def boost(x: torch.Tensor) -> None:
        if x.shape[1] > 1:  # prompt pass only
            x[:, -1, :] += w_eos

    with hooked(model, family, [("final_norm", None, boost)]):
        tokens, _ = generate(model, family)
    assert tokens[:, 0].tolist() == [2, 2]
    assert torch.equal(res["x.generated"], tokens)
    assert res["h"].shape == (2, P + N - 1, 32)


def test_logits_site_in_generation() -> None:
    """HF generate asks for the last position's logits only; the site must still see all."""
    family = "gpt_neox"
    model = model_of(family)
    bonus = torch.zeros(64)
    bonus[7] = 30.0
    g = iv.Graph()
    r = g.run("x", tokens=IDS, max_new_tokens=3)
    r.add("logits", direction=bonus, pos=-1)  # the logits that choose the first new token
    r.read("logits", name="logits")
    res = run(g, model)
    assert res["x.generated"][:, 0].tolist() == [7, 7]
    assert res["logits"].shape == (2, P + 2, 64)


def test_patch_and_ablate_into_a_generating_run() -> None:
    """Values from a plain run go into the prompt pass; mean ablation applies every step."""
    family = "llama"
    model = model_of(family)
    other = torch.tensor([[1, 9, 8, 7, 6, 5], [2, 13, 14, 15, 16, 17]])
    g = iv.Graph()
    clean = g.run("clean", tokens=other)
    x = g.run("x", tokens=IDS, max_new_tokens=N)
    x.patch("resid_post", 0, pos=-1, value=clean.read("resid_post", 0))
    x.ablate("mlp_out", 1, method="mean", source=clean)
    x.ablate("attn_out", 1, method="resample", source=clean, seed=4, pos=[0, 1])
    res = run(g, model, unbatched=True)
    src, mlp, attn = capture(
        model, family, [("resid_post", 0), ("mlp_out", 1), ("attn_out", 1)], other
    )
    mean = mlp.mean(dim=(0, 1))
    draw = resample_indices(4, 2, 2)
    calls = {"resid": 0, "attn": 0}

    def patch(x: torch.Tensor) -> None:
        if calls["resid"] == 0:
            x[:, -1, :] = src[:, -1, :]
        calls["resid"] += 1

    def ablate_mlp(x: torch.Tensor) -> None:
        x[:] = mean

    def resample(x: torch.Tensor) -> None:
        if calls["attn"] == 0:
            x[:, [0, 1], :] = attn[draw][:, [0, 1], :]
        calls["attn"] += 1

    edits = [("resid_post", 0, patch), ("mlp_out", 1, ablate_mlp), ("attn_out", 1, resample)]
    with hooked(model, family, edits):
        tokens, _ = generate(model, family)
    assert torch.equal(res["x.generated"], tokens)


def test_read_selectors_in_generation_count_from_the_prompt_end() -> None:
    family = "llama"
    g = iv.Graph()
    r = g.run("x", tokens=IDS, max_new_tokens=3)
    r.read("resid_post", 0, name="all")
    r.read("resid_post", 0, pos=-1, name="last")
    r.read("resid_post", 0, pos=slice(-2, None), name="tail")
    res = run(g, model_of(family))
    assert_close(res["last"], res["all"][:, P - 1], **FP32)  # like an op at pos=-1
    assert_close(res["tail"], res["all"][:, P - 2 :], **FP32)


GEN_GAPS = {
    "per-position-mean": lambda x, ref: x.ablate(
        "resid_post", 0, method="mean", source=ref, per_position=True
    ),
    "resample-generated-pos": lambda x, ref: x.ablate(
        "resid_post", 0, method="resample", source=ref, pos=P + 1
    ),
    "per-position-direction-across-steps": lambda x, ref: x.add(
        "resid_post", 0, direction=torch.randn(2, 32), pos=[P - 1, P]
    ),
}


@pytest.mark.parametrize("case", list(GEN_GAPS))
def test_generation_ops_that_cannot_apply_are_rejected_by_validation(case: str) -> None:
    g = iv.Graph()
    ref = g.run("ref", tokens=IDS)
    x = g.run("x", tokens=IDS, max_new_tokens=3)
    GEN_GAPS[case](x, ref)
    with pytest.raises(iv.ValidationError):
        run(g, model_of("llama"))
