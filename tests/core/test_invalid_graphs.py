"""A table of invalid graphs: each raises its own error, naming the offender."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import interventions as iv
from tests.tiny_models import hf_model, toy_net

IDS = torch.tensor([[5, 6, 7, 8, 9]])


def _two_runs() -> tuple[iv.Graph, iv.RunHandle, iv.RunHandle]:
    g = iv.Graph()
    return g, g.run("clean", tokens=IDS), g.run("corrupt", tokens=IDS)


def typo_site(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).read("resid_psot", layer=0)


def layer_out_of_range(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).read("resid_post", layer=7)


def head_out_of_range(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).read("head", layer=0, head=4)


def position_out_of_range(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).read("resid_post", layer=0, pos=5)


def negative_position_out_of_range(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).read("resid_post", layer=0, pos=-6)


def missing_layer(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).read("resid_post")


def layer_on_unlayered_site(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).read("logits", layer=1)


def patch_attention_pattern(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).scale("attn_pattern", layer=0, factor=2.0)


def direction_wrong_width(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).add("resid_post", layer=0, direction=torch.ones(31))


def project_out_wrong_width(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).project_out("resid_post", layer=0, direction=torch.ones(3, 8))


def constant_patch_wrong_shape(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).patch("resid_post", layer=0, pos=-1, value=torch.ones(2, 32))


def sae_wrong_width(g: iv.Graph) -> None:
    sae = iv.StandardSAE(
        W_enc=torch.zeros(16, 8),
        b_enc=torch.zeros(8),
        W_dec=torch.zeros(8, 16),
        b_dec=torch.zeros(16),
    )
    g.run("a", tokens=IDS).sae_splice("resid_post", layer=0, sae=sae)


def sae_feature_out_of_range(g: iv.Graph) -> None:
    sae = iv.StandardSAE(
        W_enc=torch.zeros(32, 8),
        b_enc=torch.zeros(8),
        W_dec=torch.zeros(8, 32),
        b_dec=torch.zeros(32),
    )
    g.run("a", tokens=IDS).sae_splice(
        "resid_post", layer=0, sae=sae, edits=[iv.FeatureEdit.set(9, 1.0)]
    )


def value_from_same_run(g: iv.Graph) -> None:
    a = g.run("a", tokens=IDS)
    h = a.read("resid_post", layer=0)
    a.patch("resid_post", layer=1, value=h)


def value_never_read(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).patch("resid_post", layer=0, value=iv.Ref("nowhere"))


def duplicate_read_name(g: iv.Graph) -> None:
    a = g.run("a", tokens=IDS)
    a.read("logits", name="x")
    a.read("embed", name="x")


def duplicate_run(g: iv.Graph) -> None:
    g.run("a", tokens=IDS)
    g.run("a", tokens=IDS)


def unknown_ablation(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).ablate("resid_post", layer=0, method="median")


def grad_metric_pos_out_of_range(g: iv.Graph) -> None:
    from interventions.recipes import Metric

    g.run("a", tokens=IDS).grad("resid_post", 0, metric=Metric.logit(1), metric_pos=5)


def grad_two_metrics(g: iv.Graph) -> None:
    from interventions.recipes import Metric

    r = g.run("a", tokens=IDS)
    r.grad("resid_post", 0, metric=Metric.logit(1))
    r.grad("resid_post", 1, metric=Metric.logit(2))


def mean_without_source(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).ablate("resid_post", layer=0, method="mean")


def unknown_source_run(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).ablate("resid_post", layer=0, method="mean", source="nope")


def unknown_error_term(g: iv.Graph) -> None:
    sae = iv.StandardSAE(
        W_enc=torch.zeros(32, 8),
        b_enc=torch.zeros(8),
        W_dec=torch.zeros(8, 32),
        b_dec=torch.zeros(32),
    )
    g.run("a", tokens=IDS).sae_splice("resid_post", layer=0, sae=sae, error="kept")


def aligned_value_across_lengths(g: iv.Graph) -> None:
    h = g.run("short", tokens=IDS[:, :3]).read("resid_post", layer=0)
    g.run("long", tokens=IDS).patch("resid_post", layer=0, value=h)


def token_out_of_vocab(g: iv.Graph) -> None:
    g.run("a", tokens=torch.tensor([[1, 2, 640]])).read("logits")


def text_without_tokenizer(g: iv.Graph) -> None:
    g.run("a", text="hello").read("logits")


def head_selector_on_residual(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).read("resid_post", layer=0, head=1)


def float_tokens(g: iv.Graph) -> None:
    g.run("a", tokens=torch.ones(1, 3))


def nan_scale(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).scale("embed", factor=float("nan"))


def bool_selector(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).read("embed", pos=True)


def zero_step_slice(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).read("embed", pos=slice(0, 3, 0))


def generate_zero_tokens(g: iv.Graph) -> None:
    g.run("a", tokens=IDS, max_new_tokens=0)


def features_in_generation(g: iv.Graph) -> None:
    sae = iv.StandardSAE(
        W_enc=torch.zeros(32, 8),
        b_enc=torch.zeros(8),
        W_dec=torch.zeros(8, 32),
        b_dec=torch.zeros(32),
    )
    g.run("a", tokens=IDS, max_new_tokens=2).sae_splice(
        "resid_post", layer=0, sae=sae, features="f"
    )


def attn_pattern_in_generation(g: iv.Graph) -> None:
    g.run("a", tokens=IDS, max_new_tokens=2).read("attn_pattern", layer=0)


CASES: list[tuple[Callable[[iv.Graph], None], type[Exception], list[str]]] = [
    (typo_site, iv.UnknownSite, ["resid_psot", "did you mean 'resid_post'", "resid_pre"]),
    (layer_out_of_range, iv.ValidationError, ["layer 7", "0..1", "resid_post[7]"]),
    (head_out_of_range, iv.ValidationError, ["head=4", "head[0]", "'head': 4"]),
    (position_out_of_range, iv.ValidationError, ["pos=5", "'pos': 5"]),
    (negative_position_out_of_range, iv.ValidationError, ["pos=-6"]),
    (missing_layer, iv.SpecError, ["'resid_post' needs a layer"]),
    (layer_on_unlayered_site, iv.SpecError, ["'logits' has no layer"]),
    (patch_attention_pattern, iv.SpecError, ["attn_pattern", "read only"]),
    (direction_wrong_width, iv.ValidationError, ["add on a.resid_post[0]", "[31]", "[1, 5, 32]"]),
    (project_out_wrong_width, iv.ValidationError, ["project_out on a.resid_post[0]", "[3, 8]"]),
    (
        constant_patch_wrong_shape,
        iv.ValidationError,
        ["patch on a.resid_post[0] pos=-1", "[2, 32]"],
    ),
    (sae_wrong_width, iv.ValidationError, ["sae_splice on a.resid_post[0]", "size 16"]),
    (sae_feature_out_of_range, iv.ValidationError, ["feature(s) [9]", "0..7"]),
    (value_from_same_run, iv.SpecError, ["same run", "a.resid_post.0"]),
    (value_never_read, iv.SpecError, ["'nowhere'", "not read earlier"]),
    (duplicate_read_name, iv.SpecError, ["'x'", "already used"]),
    (duplicate_run, iv.SpecError, ["run 'a' already exists"]),
    (unknown_ablation, iv.SpecError, ["'median'", "zero, mean, resample"]),
    (mean_without_source, iv.SpecError, ["'mean' needs source"]),
    (grad_metric_pos_out_of_range, iv.ValidationError, ["grad on a.resid_post[0]", "-5..4"]),
    (grad_two_metrics, iv.ValidationError, ["one metric", "'a.grad.resid_post.0'"]),
    (unknown_source_run, iv.SpecError, ["'nope'", "runs: a"]),
    (unknown_error_term, iv.SpecError, ["'kept'", "keep, drop, detach"]),
    (aligned_value_across_lengths, iv.ValidationError, ["patch on long.resid_post[0]", "short"]),
    (token_out_of_vocab, iv.ValidationError, ["run 'a'", "0..63", "640"]),
    (text_without_tokenizer, iv.ValidationError, ["run 'a'", "tokenizer"]),
    (
        head_selector_on_residual,
        iv.ValidationError,
        ["head=", "'head', 'attn_pattern' and 'attn_scores'"],
    ),
    (float_tokens, iv.SpecError, ["run 'a'", "integer ids"]),
    (nan_scale, iv.SpecError, ["scale factor", "finite"]),
    (bool_selector, iv.SpecError, ["pos=True"]),
    (zero_step_slice, iv.SpecError, ["step cannot be zero"]),
    (generate_zero_tokens, iv.SpecError, ["max_new_tokens", "1..100000"]),
    (features_in_generation, iv.ValidationError, ["features=", "generating run"]),
    (attn_pattern_in_generation, iv.ValidationError, ["attention patterns", "generating run"]),
]


@pytest.mark.parametrize(("build", "error", "needles"), CASES, ids=[c[0].__name__ for c in CASES])
def test_invalid_graph_is_rejected_with_a_clear_message(
    build: Callable[[iv.Graph], None], error: type[Exception], needles: list[str]
) -> None:
    model = hf_model("gpt2")
    g = iv.Graph()
    with pytest.raises(error) as info:
        build(g)
        iv.validate(g, model)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_standard_site_on_unmapped_module_suggests_raw_paths() -> None:
    g = iv.Graph()
    g.run("a", tokens=IDS).read("resid_post", layer=0)
    with pytest.raises(
        iv.UnknownArchitecture, match=r"ToyNet.*Known model types.*gpt2.*'<module>.output'"
    ):
        iv.validate(g, toy_net())


def test_unknown_module_path_suggests_a_module() -> None:
    g = iv.Graph()
    g.run("a", tokens=IDS).read("blocks.0.outptu.output")
    with pytest.raises(iv.UnknownSite, match=r"'blocks.0.outptu' is not a module of ToyNet"):
        iv.validate(g, toy_net())
    g = iv.Graph()
    g.run("a", tokens=IDS).read("blokcs.0.output")
    with pytest.raises(iv.UnknownSite, match=r"did you mean 'blocks.0'"):
        iv.validate(g, toy_net())


def test_backend_capabilities_are_checked_before_running() -> None:
    from interventions.backends import get_backend

    model = hf_model("gpt2")
    g = iv.Graph()
    g.run("a", tokens=IDS).read("logits")
    backend = get_backend("torch")
    narrowed = iv.Capabilities(
        ops=frozenset({"patch"}),
        views=backend.capabilities.views,
        generation=False,
        gradients=False,
        remote=False,
        raw_modules=False,
    )
    original = backend.capabilities
    try:
        backend.capabilities = narrowed  # type: ignore[misc]
        with pytest.raises(
            iv.UnsupportedOp, match=r"read on a.logits: the backend cannot run 'read'"
        ):
            iv.run(g, model, backend="torch")
    finally:
        backend.capabilities = original  # type: ignore[misc]


def test_cycle_between_runs_is_named() -> None:
    from interventions.ops import Patch, Read, Ref
    from interventions.sites import Select, Site

    g = iv.Graph()
    g.run("a", tokens=IDS)
    g.run("b", tokens=IDS)
    s = Site("resid_post", 0)
    g.ops = [
        Read("a", s, Select(), "ra"),
        Read("b", s, Select(), "rb"),
        Patch("a", s, Select(), Ref("rb")),
        Patch("b", s, Select(), Ref("ra")),
    ]
    with pytest.raises(iv.SpecError, match=r"cycle: a -> b -> a"):
        g.check()
