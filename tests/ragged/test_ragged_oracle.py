"""Prompts of different lengths are exact: every op on a ragged batch equals the same op on
each prompt run alone, unpadded (the oracle), on every family and every backend.

Hypothesis draws the prompt lengths (and the per-prompt positions); the oracle runs each
prompt (pair) as its own one-row graph on the torch reference. Reads over whole
positions come back zero-padded on the run's padding side, with a mask.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import interventions as iv
from tests.tiny_models import HF_FAMILIES, hf_model

BACKENDS = ("torch", "nnsight", "pyvene")
TOL = {"atol": 1e-5, "rtol": 1e-5}
D = 32


def prompts(draw: st.DrawFn, n: int, low: int = 2, high: int = 9) -> list[list[int]]:
    lengths = draw(st.lists(st.integers(low, high), min_size=n, max_size=n))
    return [draw(st.lists(st.integers(3, 60), min_size=k, max_size=k)) for k in lengths]


@st.composite
def experiments(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.integers(2, 4))
    clean, corrupt = prompts(draw, n), prompts(draw, n)
    # a position inside each pair's shorter prompt, counted from its first token
    where = [
        draw(st.integers(0, min(len(a), len(b)) - 1)) for a, b in zip(clean, corrupt, strict=True)
    ]
    return {"clean": clean, "corrupt": corrupt, "where": where}


def ragged_graph(ex: dict[str, object], direction: torch.Tensor, side: str) -> iv.Graph:
    g = iv.Graph()
    clean = g.run("clean", tokens=ex["clean"], padding_side=side)
    corrupt = g.run("corrupt", tokens=ex["corrupt"], padding_side=side)
    where = iv.per_prompt(ex["where"])  # type: ignore[arg-type]
    whole = clean.read("resid_pre", layer=1, name="clean_whole")
    corrupt.patch("resid_pre", layer=1, pos=where, value=whole)  # aligned, per prompt
    last = clean.read("resid_post", layer=0, pos=-1, name="clean_last")
    corrupt.patch("resid_post", layer=0, pos=-2, value=last)  # selected value, by row
    corrupt.ablate("mlp_out", layer=0, pos=0)
    corrupt.add("resid_post", layer=1, direction=direction, pos=-1)
    corrupt.read("logits", pos=-1, name="end")
    corrupt.read("resid_post", layer=1, name="corrupt_whole")
    corrupt.read("head", layer=0, pos=where, head=1, name="head_at")
    return g


def one_pair(
    ex: dict[str, object], i: int, direction: torch.Tensor, family: str
) -> dict[str, torch.Tensor]:
    """The oracle: prompt pair ``i`` as a graph of its own (no padding anywhere)."""
    a, b = ex["clean"][i], ex["corrupt"][i]  # type: ignore[index]
    w = ex["where"][i]  # type: ignore[index]
    g = iv.Graph()
    clean = g.run("clean", tokens=[a])
    corrupt = g.run("corrupt", tokens=[b])
    h = clean.read("resid_pre", layer=1, pos=w)
    corrupt.patch("resid_pre", layer=1, pos=w, value=h)
    last = clean.read("resid_post", layer=0, pos=-1)
    corrupt.patch("resid_post", layer=0, pos=-2, value=last)
    corrupt.ablate("mlp_out", layer=0, pos=0)
    corrupt.add("resid_post", layer=1, direction=direction, pos=-1)
    corrupt.read("logits", pos=-1, name="end")
    corrupt.read("resid_post", layer=1, name="corrupt_whole")
    corrupt.read("head", layer=0, pos=w, head=1, name="head_at")
    clean.read("resid_pre", layer=1, name="clean_whole")
    return dict(iv.run(g, hf_model(family)))


def check(ex: dict[str, object], family: str, backend: str, side: str) -> None:
    torch.manual_seed(1)
    direction = torch.randn(D)
    res = iv.run(ragged_graph(ex, direction, side), hf_model(family), backend=backend)
    for i in range(len(ex["clean"])):  # type: ignore[arg-type]
        want = one_pair(ex, i, direction, family)
        for name in ("end", "head_at"):
            torch.testing.assert_close(res[name][i], want[name][0], **TOL)
        for name, run in (("corrupt_whole", "corrupt"), ("clean_whole", "clean")):
            n = len(ex[run][i])  # type: ignore[index]
            got, mask = res[name][i], res.mask(name)
            width = got.shape[0]
            real = slice(width - n, width) if side == "left" else slice(0, n)
            torch.testing.assert_close(got[real], want[name][0], **TOL)
            if mask is not None:
                assert mask[i].tolist() == [real.start <= p < real.stop for p in range(width)]
                assert not got[~mask[i]].any()  # padding is zero


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", HF_FAMILIES)
@settings(max_examples=2)
@given(ex=experiments(), side=st.sampled_from(["left", "right"]))
def test_a_ragged_batch_equals_each_prompt_alone(
    family: str, backend: str, ex: dict[str, object], side: str
) -> None:
    check(ex, family, backend, side)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", HF_FAMILIES)
@settings(max_examples=25)
@given(ex=experiments(), side=st.sampled_from(["left", "right"]))
def test_a_ragged_batch_equals_each_prompt_alone_long(
    family: str, backend: str, ex: dict[str, object], side: str
) -> None:
    check(ex, family, backend, side)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_ablation_over_a_ragged_source_counts_real_tokens_only(backend: str) -> None:
    model = hf_model("llama")
    source = [[5, 6, 7, 8, 9], [10, 11]]
    target = [[12, 13, 14], [15, 16, 17, 18]]
    g = iv.Graph()
    src = g.run("source", tokens=source)
    tgt = g.run("target", tokens=target)
    tgt.ablate("mlp_out", layer=0, method="mean", source=src, pos=-1)
    tgt.read("logits", pos=-1, name="end")
    res = iv.run(g, model, backend=backend)
    # by hand: the mean of mlp_out[0] over the 7 real source tokens
    outs = []
    for p in source:
        h = iv.Graph()
        h.run("a", tokens=[p]).read("mlp_out", layer=0, name="m")
        outs.append(iv.run(h, model)["m"][0])
    mean = torch.cat(outs).mean(0)
    for i, p in enumerate(target):
        h = iv.Graph()
        r = h.run("a", tokens=[p])
        r.patch("mlp_out", layer=0, pos=-1, value=mean)
        r.read("logits", pos=-1, name="end")
        torch.testing.assert_close(res["end"][i], iv.run(h, model)["end"][0], **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_generation_and_a_steered_sae_splice_equal_each_prompt_alone(backend: str) -> None:
    model = hf_model("gpt2")
    torch.manual_seed(0)
    sae = iv.StandardSAE(
        torch.randn(D, 48) * 0.3, torch.zeros(48), torch.randn(48, D) * 0.3, torch.zeros(D)
    )
    prompts = [[4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15]]

    def build(tokens: list[list[int]]) -> iv.Graph:
        g = iv.Graph()
        r = g.run("r", tokens=tokens, max_new_tokens=3)
        r.sae_splice("resid_post", layer=0, sae=sae, edits=[iv.FeatureEdit((1, 2), "set", 2.0)])
        r.read("logits", pos=-1, name="last")
        return g

    res = iv.run(build(prompts), model, backend=backend)
    for i, p in enumerate(prompts):
        one = iv.run(build([p]), model)
        assert torch.equal(res["r.generated"][i], one["r.generated"][0])
        torch.testing.assert_close(res["last"][i], one["last"][0], **TOL)


@pytest.mark.parametrize("family", ["llama", "falcon_alibi", "falcon_alibi_par"])
def test_the_pad_id_of_padded_inputs_never_matters(family: str) -> None:
    """Left-padded ids with their mask (ALiBi's positions come from the mask in Falcon):
    the pad id changes nothing, and each row's real tokens are those of the row alone."""
    model = hf_model(family)
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])
    mask = (torch.arange(4)[None] >= torch.tensor([[2], [0], [1]])).long()  # left padding
    outs = []
    for pad in (0, 3, 63):
        g = iv.Graph()
        padded = torch.where(mask.bool(), ids, pad)
        r = g.run("r", tokens=padded, attention_mask=mask, padding_side="left")
        r.read("resid_post", layer=1, name="all")
        r.read("logits", pos=-1, name="end")
        outs.append(iv.run(g, model))
    for other in outs[1:]:
        assert torch.equal(other["all"], outs[0]["all"])
        assert torch.equal(other["end"], outs[0]["end"])
    for i, row in enumerate(([5, 6], [7, 8, 9, 10], [11, 12, 13])):
        alone = iv.Graph()
        r = alone.run("r", tokens=[row])
        r.read("resid_post", layer=1, name="all")
        r.read("logits", pos=-1, name="end")
        want = iv.run(alone, model)
        torch.testing.assert_close(outs[0]["end"][i], want["end"][0], **TOL)
        real = outs[0].mask("all")[i]  # laid out on the run's padding side
        assert int(real.sum()) == len(row)
        torch.testing.assert_close(outs[0]["all"][i, real], want["all"][0], **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_gives_the_same_tokens_on_every_backend_for_a_seed(backend: str) -> None:
    model = hf_model("llama")
    prompts = [[5, 6, 7], [8, 9, 10, 11]]

    def sample(seed: int, on: str) -> torch.Tensor:
        g = iv.Graph()
        g.run("r", tokens=prompts, max_new_tokens=6, temperature=1.5, top_k=20, seed=seed)
        return iv.run(g, model, backend=on)["r.generated"]

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    got = sample(3, backend)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global state is kept
    assert torch.equal(got, sample(3, "torch"))
    assert not torch.equal(got, sample(4, "torch"))  # a different seed samples differently
    greedy = iv.Graph()
    greedy.run("r", tokens=prompts, max_new_tokens=6)
    assert not torch.equal(got, iv.run(greedy, model)["r.generated"])
