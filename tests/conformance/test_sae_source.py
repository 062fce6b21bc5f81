"""Cross-site transcoders (``sae_splice(source=...)``): read ``resid_pre[L]``, write ``mlp_out[L]``.

The oracle is written by hand with forward hooks on GPT-2: the block's input is kept, and the
MLP's output is replaced by the transcoder's reconstruction of it (plus the error term).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import interventions as iv
from interventions.ops import SAESplice
from interventions.sites import Site

LAYER = 1
PROMPTS = [[1, 5, 9, 3, 7], [2, 4, 6, 8, 10]]


@pytest.fixture(scope="module")
def model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def tc() -> iv.Transcoder:
    g = torch.Generator().manual_seed(3)
    return iv.Transcoder(
        torch.randn(16, 24, generator=g) * 0.3,
        torch.randn(24, generator=g) * 0.1,
        torch.randn(24, 16, generator=g) * 0.3,
        torch.randn(16, generator=g) * 0.1,
    )


def _oracle(model, tc, prompts, error: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) with the MLP output of block LAYER replaced by hand."""
    block = model.transformer.h[LAYER]
    kept: dict[str, torch.Tensor] = {}

    def keep_input(module, args):
        kept["x"] = args[0]

    def replace(module, args, out):
        x = kept["x"]
        f = torch.relu(x @ tc.W_enc + tc.b_enc)  # the Transcoder's formula, by hand
        kept["f"] = f
        recon = f @ tc.W_dec + tc.b_dec
        return recon if error == "drop" else recon + (out - recon)

    handles = [
        block.register_forward_pre_hook(keep_input),
        block.mlp.register_forward_hook(replace),
    ]
    try:
        with torch.no_grad():
            logits = torch.cat([model(torch.tensor([p])).logits for p in prompts])
    finally:
        for h in handles:
            h.remove()
    return logits, kept["f"]


def _graph(tc, prompts, error: str) -> iv.Graph:
    g = iv.Graph()
    r = g.run("r", tokens=prompts)
    r.sae_splice(
        "mlp_out", LAYER, sae=tc, source="resid_pre", source_layer=LAYER, error=error, features="f"
    )
    r.read("logits", name="logits")
    return g


@pytest.mark.parametrize("backend", ["torch", "nnsight"])
def test_cross_site_transcoder_matches_a_hand_written_oracle(model, tc, backend) -> None:
    want, _ = _oracle(model, tc, PROMPTS, "drop")
    clean = _oracle(model, tc, PROMPTS, "keep")[0]
    assert (want - clean).abs().max() > 1e-2  # the splice changes the output
    got = iv.run(_graph(tc, PROMPTS, "drop"), model, backend=backend)
    torch.testing.assert_close(got["logits"], want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the features are the transcoder's encoding of resid_pre[LAYER]
        x = model(torch.tensor(PROMPTS), output_hidden_states=True).hidden_states[LAYER]
    torch.testing.assert_close(got["f"], torch.relu(x @ tc.W_enc + tc.b_enc), atol=1e-5, rtol=1e-5)
    for error in ("keep", "detach"):  # the error term is mlp_out - reconstruction: neutral
        kept = iv.run(_graph(tc, PROMPTS, error), model, backend=backend)
        torch.testing.assert_close(kept["logits"], clean, atol=1e-5, rtol=1e-5)


def test_prompts_of_different_lengths_carry_the_source(model, tc) -> None:
    prompts = [[1, 5, 9, 3, 7], [2, 4], [6, 8, 10]]
    want = [_oracle(model, tc, [p], "drop")[0][0] for p in prompts]
    got = iv.run(_graph(tc, prompts, "drop"), model)
    mask = got.mask("logits")
    for i, p in enumerate(prompts):
        assert mask is not None and int(mask[i].sum()) == len(p)
        torch.testing.assert_close(got["logits"][i, : len(p)], want[i], atol=1e-5, rtol=1e-5)


def test_pyvene_refuses_by_name(model, tc) -> None:
    with pytest.raises(iv.UnsupportedOp, match=r"cross-site sae_splice \(source=resid_pre\[1\]\)"):
        iv.validate(_graph(tc, PROMPTS, "drop"), model, backend="pyvene")


@pytest.mark.parametrize(
    ("source", "layer", "site", "message"),
    [
        ("resid_post", 1, "mlp_out", "does not come before mlp_out"),
        ("mlp_out", 1, "mlp_out", "is its own site"),
        ("mlp_hidden", 1, "mlp_out", "reads vectors of size 16 but its source mlp_hidden"),
        ("head", 1, "mlp_out", "its source head"),
    ],
)
def test_bad_sources_are_named(model, tc, source, layer, site, message) -> None:
    with pytest.raises((iv.ValidationError, iv.SpecError), match=message):
        g = iv.Graph()
        g.run("r", tokens=PROMPTS).sae_splice(
            site, LAYER, sae=tc, source=source, source_layer=layer, error="drop"
        )
        iv.validate(g, model)


def test_source_round_trips_and_prints(tc) -> None:
    g = _graph(tc, PROMPTS, "detach")
    back = iv.Graph.from_json(g.to_json())
    assert back == g and back.fingerprint() == g.fingerprint()
    assert isinstance(back.ops[0], SAESplice) and back.ops[0].source == Site("resid_pre", LAYER)
    assert "source=resid_pre[1] error=detach" in str(g)
    plain = iv.Graph()
    plain.run("r", tokens=PROMPTS).sae_splice("resid_pre", 1, sae=iv.StandardSAE(
        tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec))  # fmt: skip
    assert "source" not in plain.to_json()  # graphs without it keep their JSON and hash


def test_transcoder_info_gives_both_sites(model, tc) -> None:
    info = iv.SAEInfo.from_hook("blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out")
    g = iv.Graph()
    r = g.run("r", tokens=PROMPTS)
    r.sae_splice(sae=tc.with_info(info), error="drop")
    op = g.ops[0]
    assert isinstance(op, SAESplice)
    assert (op.site, op.source) == (Site("mlp_out", 1), Site("resid_pre", 1))
    r.read("logits", name="logits")
    want, _ = _oracle(model, tc, PROMPTS, "drop")
    torch.testing.assert_close(iv.run(g, model)["logits"], want, atol=1e-5, rtol=1e-5)


def test_graph_sae_fit_check_on_demand(model) -> None:
    eye = torch.eye(16)
    exact = iv.StandardSAE(  # relu(x) - relu(-x) = x: a perfect reconstruction
        torch.cat([eye, -eye], 1), torch.zeros(32), torch.cat([eye, -eye], 0), torch.zeros(16)
    )
    g = torch.Generator().manual_seed(5)
    noise = iv.StandardSAE(
        torch.randn(16, 32, generator=g), torch.zeros(32),
        torch.randn(32, 16, generator=g), torch.zeros(16),
    )  # fmt: skip
    probe = torch.randint(0, 40, (4, 8), generator=g)
    for sae, ok in ((exact, True), (noise, False)):
        graph = iv.Graph()
        graph.run("r", tokens=PROMPTS).sae_splice("resid_pre", 1, sae=sae)
        fits = iv.check_graph_saes(graph, model, probe, strict=False)
        assert list(fits) == ["r.resid_pre[1]"] and fits["r.resid_pre[1]"].ok == ok
        if ok:
            assert fits["r.resid_pre[1]"].explained_variance == pytest.approx(1.0, abs=1e-5)
            iv.check_graph_saes(graph, model, probe)
            continue
        with pytest.raises(iv.ValidationError, match=r"r\.resid_pre\[1\]: SAE 'sae0': explained"):
            iv.check_graph_saes(graph, model, probe)


def test_batched_runs_and_selections_agree_across_backends(model, tc) -> None:
    g = iv.Graph()
    g.run("a", tokens=PROMPTS).read("logits", name="a")
    b = g.run("b", tokens=PROMPTS)  # batched with a and c in one forward
    b.sae_splice("mlp_out", 1, sae=tc, source="resid_pre", source_layer=1, error="drop", batch=1)
    b.read("logits", name="b")
    c = g.run("c", tokens=PROMPTS)
    c.sae_splice("mlp_out", 0, sae=tc, source="resid_pre", source_layer=0, error="drop", pos=[1, 3])
    c.read("logits", name="c")
    ref = iv.run(g, model)
    clean = _oracle(model, tc, PROMPTS, "keep")[0]
    torch.testing.assert_close(ref["a"], clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref["b"][0], clean[0], atol=1e-5, rtol=1e-5)  # row 0 untouched
    torch.testing.assert_close(ref["b"][1], _oracle(model, tc, PROMPTS, "drop")[0][1])
    assert (ref["c"] - clean).abs().max() > 1e-2
    torch.testing.assert_close(ref["c"][:, 0], clean[:, 0], atol=1e-5, rtol=1e-5)  # before pos 1
    got = iv.run(g, model, backend="nnsight")
    for name in ("a", "b", "c"):
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-5)
