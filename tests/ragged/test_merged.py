"""A ragged run as one right-padded forward (no attention mask): exact on causal families.

The planner merges the length groups of a run into one forward where the family is exact
under right padding and the cost estimate says it pays; otherwise it keeps one forward
per length. Both paths are held to the same oracle as ``test_ragged_oracle``: each prompt
(pair) run alone, unpadded, on the torch reference.
"""

from __future__ import annotations

import pytest
import torch

import interventions as iv
import interventions.ragged_layout as ragged_layout
from interventions.assembly import Assembly, Piece, assemble
from interventions.validation import validate
from tests.ragged.test_ragged_oracle import check
from tests.tiny_models import ALL_FAMILIES, FALCON_FAMILIES, MOE_FAMILIES, NEW_FAMILIES, hf_model

EXAMPLE = {
    "clean": [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]],
    "corrupt": [[15, 16, 17], [18, 19, 20, 21, 22, 23], [24, 25, 26]],
    "where": [1, 0, 2],
}


def parts(graph: iv.Graph, model: torch.nn.Module, run: str = "r") -> list[tuple[int, int | None]]:
    plan = validate(graph, model)
    return [(p.length, p.width) for p in plan.assembly.parts[run]]


def ragged_read(*extra: tuple[str, str], **run: object) -> iv.Graph:
    """A ragged run reading its last tokens, plus reads (site, name) at pos=-1."""
    g = iv.Graph()
    r = g.run("r", tokens=[[1, 2, 3, 4], [5, 6], [7, 8, 9]], **run)  # type: ignore[arg-type]
    r.read("resid_post", layer=0, pos=-1, name="last")
    for site, name in extra:
        r.read(site, layer=0 if site == "attn_pattern" else None, pos=-1, name=name)
    return g


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_causal_families_merge_and_mixtures_of_experts_keep_one_forward_per_length(
    family: str,
) -> None:
    got = parts(ragged_read(), hf_model(family))
    if family in MOE_FAMILIES:
        assert got == [(2, None), (3, None), (4, None)]
    else:
        assert got == [(2, 4), (3, 4), (4, 4)]


def test_generation_attention_patterns_and_raw_sites_keep_one_forward_per_length() -> None:
    model = hf_model("gpt2")
    assert parts(ragged_read(max_new_tokens=2), model)[0][1] is None
    assert parts(ragged_read(("attn_pattern", "pattern")), model)[0][1] is None
    assert parts(ragged_read(("transformer.h.0.mlp.output", "raw")), model)[0][1] is None


def test_a_merged_forward_computes_the_logits_its_ops_need_only() -> None:
    model = hf_model("gpt2")
    plan = validate(ragged_read(("logits", "end")), model)
    # the last real token of the shortest prompt (2 of 4) is 3 positions from the end
    assert plan.logits_to_keep("r") == 3
    assert validate(ragged_read(), model).logits_to_keep("r") == 1  # no op needs logits


@pytest.mark.parametrize(
    ("family", "side"),
    [(f, ("left", "right")[i % 2]) for i, f in enumerate(NEW_FAMILIES + FALCON_FAMILIES)],
)
def test_merged_forwards_equal_each_prompt_alone_on_every_causal_family(
    family: str, side: str
) -> None:
    # the first six families run merged, on every backend, in test_ragged_oracle
    check(EXAMPLE, family, "torch", side)


@pytest.mark.parametrize("backend", ["torch", "nnsight", "pyvene"])
def test_the_split_path_stays_exact_when_the_estimate_picks_it(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ragged_layout, "FORWARD_OVERHEAD", {"cpu": 0.0, "cuda": 0.0})
    assert parts(ragged_read(), hf_model("gpt2")) == [(2, None), (3, None), (4, None)]
    check(EXAMPLE, "gpt2", backend, "left")


def test_mixtures_of_experts_stay_exact_on_the_split_path() -> None:
    check(EXAMPLE, "mixtral", "torch", "right")


def test_equal_lengths_with_per_prompt_positions_merge_even_at_no_overhead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ragged_layout, "FORWARD_OVERHEAD", {"cpu": 0.0, "cuda": 0.0})
    g = iv.Graph()
    r = g.run("r", tokens=[[1, 2, 3], [4, 5, 6]])
    r.read("resid_post", layer=0, pos=iv.per_prompt([0, 2]), name="at")
    model = hf_model("llama")
    assert parts(g, model) == [(3, 3), (3, 3)]
    got = iv.run(g, model)["at"]
    for i, (row, p) in enumerate([([1, 2, 3], 0), ([4, 5, 6], 2)]):
        alone = iv.Graph()
        alone.run("r", tokens=[row]).read("resid_post", layer=0, pos=p, name="at")
        torch.testing.assert_close(got[i], iv.run(alone, model)["at"][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_piece_with_row_lengths_is_zeroed_and_laid_out_on_its_side(side: str) -> None:
    t = torch.arange(1.0, 13.0).reshape(3, 4, 1)  # rows right-padded: 4, 2 and 3 real
    a = Assembly("x", (Piece("x#0", (0, 1, 2), lengths=(4, 2, 3)),), rows=3, side=side)
    out, masks = assemble([a], {"x#0": t})
    rows = [[1, 2, 3, 4], [5, 6], [9, 10, 11]]
    want = [r + [0] * (4 - len(r)) if side == "right" else [0] * (4 - len(r)) + r for r in rows]
    assert out["x"][..., 0].tolist() == want
    assert masks["x"].tolist() == [[v != 0 for v in r] for r in want]
    assert Assembly.from_dict(a.to_dict()) == a


def test_a_piece_with_row_lengths_among_others_fills_its_rows_only() -> None:
    t = torch.ones(2, 5, 2)
    pieces = (Piece("a", (2, 0), lengths=(3, 5)), Piece("b", (1,)))
    out, masks = assemble(
        [Assembly("x", pieces, 3, "right")], {"a": t, "b": 2 * torch.ones(1, 2, 2)}
    )
    assert out["x"][:, :, 0].tolist() == [[1] * 5, [2, 2, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert masks["x"].sum(1).tolist() == [5, 2, 3]
