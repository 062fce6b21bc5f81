"""Graphs that used to fail mid-run are refused before anything runs (issue 13, item 6).

Each reproducer below failed inside the forward pass before the shape-only dry run
(:mod:`interventions.dry_run`): a typed error now names the op or run, what was wrong and
what is valid, no real forward runs (a counting hook sees no call with real tensors) and
the model keeps no hook. The oracles are torch's own indexing and the model's own modules.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

import interventions as iv
from interventions import dry_run
from interventions.locks import model_lock
from tests.tiny_models import ToyNet, _ours, hf_model, hook_count, toy_net

IDS = torch.tensor([[5, 6, 7, 8, 9]])
MLP = "transformer.h.0.mlp.output"  # GPT-2's MLP output: [batch, pos, 32]


def _gpt2() -> nn.Module:
    return hf_model("gpt2")


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 2).eval()


@contextmanager
def forwards(model: nn.Module) -> Iterator[dict[str, int]]:
    """Count the model's forward calls with real tensors and with fake ones."""
    seen = {"real": 0, "fake": 0}

    def count(module: nn.Module, args: Any, kwargs: Any) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        seen["fake" if isinstance(x, FakeTensor) else "real"] += 1

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _no_hooks_left(model: nn.Module) -> None:
    """No forward hook or pre-hook on any module (transformers' own output-capturing hooks,
    which an earlier test asking for hidden states may have installed, aside)."""
    for name, module in model.named_modules():
        assert not [h for h in module._forward_hooks.values() if _ours(h)], name
        assert not [h for h in module._forward_pre_hooks.values() if _ours(h)], name


# --- the reproducers: each (graph builder, model, error, words the message must hold) ---


def raw_add_wrong_width(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).add(MLP, direction=torch.ones(31))


def raw_constant_patch_wrong_shape(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).patch(MLP, pos=-1, value=torch.ones(2, 32))


def raw_patch_from_a_wider_module(g: iv.Graph) -> None:
    h = g.run("a", tokens=IDS).read("transformer.h.0.mlp.c_fc.output")  # [1, 5, 128]
    g.run("b", tokens=IDS).patch(MLP, value=h)


def raw_patch_from_a_shorter_run(g: iv.Graph) -> None:
    h = g.run("a", tokens=IDS[:, :3]).read(MLP)
    g.run("b", tokens=IDS).patch(MLP, value=h)


def raw_value_into_standard_site_shorter(g: iv.Graph) -> None:
    h = g.run("a", tokens=IDS[:, :3]).read(MLP)
    g.run("b", tokens=IDS).patch("resid_post", layer=0, value=h)


def raw_pos_out_of_range(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).read(MLP, pos=10)


def raw_negative_pos_out_of_range(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).scale(MLP, pos=-6, factor=2.0)


def raw_batch_out_of_range(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).read(MLP, batch=3)


def raw_dims_out_of_range(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).read(MLP, dims=[0, 40])


def raw_project_out_wrong_width(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).project_out(MLP, direction=torch.ones(8))


def raw_sae_wrong_width(g: iv.Graph) -> None:
    sae = iv.StandardSAE(
        W_enc=torch.zeros(16, 8),
        b_enc=torch.zeros(8),
        W_dec=torch.zeros(8, 16),
        b_dec=torch.zeros(16),
    )
    g.run("a", tokens=IDS).sae_splice(MLP, sae=sae)


def raw_pos_past_generation(g: iv.Graph) -> None:
    g.run("a", tokens=IDS, max_new_tokens=2).read(MLP, pos=6)  # 5 + 1 positions fed


def raw_add_in_a_ragged_run(g: iv.Graph) -> None:
    g.run("a", tokens=[[5, 6, 7], [5, 6, 7, 8, 9]]).add(MLP, direction=torch.ones(3, 32))


def raw_input_site_pos(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).read("transformer.h.1.input", pos=5)


def toy_raw_add_wrong_width(g: iv.Graph) -> None:
    g.run("a", tokens=IDS).add("blocks.0.output", direction=torch.ones(3))


def integer_inputs(g: iv.Graph) -> None:
    g.run("a", inputs=torch.ones(1, 3, 4, dtype=torch.long)).read("output")


def float8_inputs(g: iv.Graph) -> None:
    g.run("a", inputs=torch.ones(1, 3, 4).to(torch.float8_e4m3fn)).read("output")


def bool_inputs(g: iv.Graph) -> None:
    g.run("a", inputs=torch.ones(1, 3, 4, dtype=torch.bool)).read("output")


def float64_inputs(g: iv.Graph) -> None:
    g.run("a", inputs=torch.ones(1, 3, 4, dtype=torch.float64)).read("output")


def inputs_of_the_wrong_width(g: iv.Graph) -> None:
    g.run("a", inputs=torch.ones(1, 3, 5)).read("output")


def float_inputs_into_an_embedding(g: iv.Graph) -> None:
    g.run("a", inputs=torch.ones(1, 5)).read("blocks.0.output")


def ids_past_the_embedding(g: iv.Graph) -> None:
    g.run("a", inputs=IDS * 100).read("blocks.0.output")


def token_ids_past_a_plain_embedding(g: iv.Graph) -> None:
    g.run("a", tokens=IDS * 100).read("blocks.0.output")


CASES: list[tuple[Callable[[iv.Graph], None], Callable[[], nn.Module], list[str]]] = [
    (raw_add_wrong_width, _gpt2, [f"add on a.{MLP}", "direction of shape [31]", "[1, 5, 32]"]),
    (
        raw_constant_patch_wrong_shape,
        _gpt2,
        [f"patch on a.{MLP} pos=-1", "shape [2, 32]", "patched region is [1, 32]"],
    ),
    (raw_patch_from_a_wider_module, _gpt2, [f"patch on b.{MLP}", "[1, 5, 128]", "[1, 5, 32]"]),
    (raw_patch_from_a_shorter_run, _gpt2, [f"patch on b.{MLP}", "run 'a'", "[1, 3, 32]"]),
    (raw_value_into_standard_site_shorter, _gpt2, ["patch on b.resid_post[0]", "[1, 3, 32]"]),
    (
        raw_pos_out_of_range,
        _gpt2,
        [f"read on a.{MLP} pos=10", "size 5", "'pos': 5", "'hidden': 32", "dry run"],
    ),
    (raw_negative_pos_out_of_range, _gpt2, [f"scale on a.{MLP} pos=-6", "size 5"]),
    (raw_batch_out_of_range, _gpt2, [f"read on a.{MLP} batch=3", "size 1", "'batch': 1"]),
    (raw_dims_out_of_range, _gpt2, ["dims=(0, 40)", "=40 is out of range", "'hidden': 32"]),
    (raw_project_out_wrong_width, _gpt2, [f"project_out on a.{MLP}", "[32] or [k, 32]", "[8]"]),
    (raw_sae_wrong_width, _gpt2, [f"sae_splice on a.{MLP}", "size 16", "[1, 5, 32]"]),
    (raw_pos_past_generation, _gpt2, [f"read on a.{MLP} pos=6", "6 positions"]),
    (raw_add_in_a_ragged_run, _gpt2, ["[3, 32]", "[1, 5, 32]", "of run 'a', 5 tokens"]),
    (raw_input_site_pos, _gpt2, ["read on a.transformer.h.1.input pos=5", "size 5"]),
    (toy_raw_add_wrong_width, toy_net, ["add on a.blocks.0.output", "[3]", "[1, 5, 16]"]),
    (integer_inputs, _linear, ["run 'a'", "(Linear, float32 weights)", "int64 [1, 3, 4]"]),
    (float8_inputs, _linear, ["run 'a'", "float8_e4m3fn [1, 3, 4]", "torch.float32"]),
    (bool_inputs, _linear, ["run 'a'", "bool [1, 3, 4]", "it takes float32"]),
    (float64_inputs, _linear, ["run 'a'", "float64", "it takes float32"]),
    (inputs_of_the_wrong_width, _linear, ["run 'a'", "size 4 on the last axis", "[1, 3, 5]"]),
    (
        float_inputs_into_an_embedding,
        toy_net,
        ["run 'a'", "first layer 'embed' (Embedding of 64)", "token ids", "float32 [1, 5]"],
    ),
    (ids_past_the_embedding, toy_net, ["run 'a'", "'embed'", "ids in 0..63", "500..900"]),
    (token_ids_past_a_plain_embedding, toy_net, ["run 'a'", "ids in 0..63", "500..900"]),
]


@pytest.mark.parametrize(("build", "make", "needles"), CASES, ids=[c[0].__name__ for c in CASES])
def test_graph_that_failed_mid_run_is_refused_before_anything_runs(
    build: Callable[[iv.Graph], None], make: Callable[[], nn.Module], needles: list[str]
) -> None:
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = iv.Graph()
    build(g)
    with forwards(model) as seen, pytest.raises(iv.ValidationError) as info:
        iv.run(g, model)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert seen["real"] == 0, "a real forward ran"
    assert hook_count(model) == 0
    _no_hooks_left(model)
    for key, value in model.state_dict().items():
        assert not isinstance(value, FakeTensor), key
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


# --- valid graphs at raw sites still run, with the values of the model's own modules ---


def test_valid_raw_graphs_run_and_match_the_modules_themselves() -> None:
    model = _gpt2()
    mlp = model.get_submodule("transformer.h.0.mlp")
    captured: list[torch.Tensor] = []
    handle = mlp.register_forward_hook(lambda m, a, o: captured.append(o.detach().clone()))
    with torch.no_grad():
        model(input_ids=IDS, use_cache=False)
    handle.remove()
    want = captured[0]
    g = iv.Graph()
    a = g.run("a", tokens=IDS)
    a.read(MLP, pos=-1, name="last")
    a.read(MLP, pos=slice(1, None, 2), name="odd")
    a.read(MLP, dims=[0, 31], name="dims")
    b = g.run("b", tokens=IDS)
    b.patch("resid_post", layer=0, value=a.read(MLP, name="whole"))  # raw -> standard
    b.add(MLP, direction=torch.ones(32), scale=0.0)
    b.read("logits", name="logits")
    res = iv.run(g, model)
    torch.testing.assert_close(res["last"], want[:, -1])
    torch.testing.assert_close(res["odd"], want[:, 1::2])
    torch.testing.assert_close(res["dims"], want[..., [0, 31]])
    assert hook_count(model) == 0


def test_valid_inputs_pass_the_first_layer_rules() -> None:
    lin = _linear()
    g = iv.Graph()
    x = torch.randn(1, 3, 4)
    g.run("a", inputs=x).read("output", name="y")
    torch.testing.assert_close(iv.run(g, lin)["y"], lin(x).detach())
    g = iv.Graph()
    g.run("a", inputs=IDS).read("blocks.0.output", name="h")
    toy = toy_net()
    torch.testing.assert_close(iv.run(g, toy)["h"], toy.blocks[0](toy.embed(IDS)).detach())


# --- slices with huge steps: torch multiplied the step into a stride and overflowed ---


@pytest.mark.parametrize("step", [10**20, 2**62, 7])
def test_huge_slice_steps_select_what_python_selects(step: int) -> None:
    model = _gpt2()
    g = iv.Graph()
    a = g.run("a", tokens=IDS)
    a.read("resid_post", layer=0, name="whole")
    a.read("resid_post", layer=0, pos=slice(1, None, step), name="picked")
    a.read(MLP, pos=slice(0, None, step), name="raw")
    a.read("resid_post", layer=0, dims=slice(3, None, step), name="dims")
    loaded = iv.Graph.from_json(g.to_json())  # {"step": 10**20} in the JSON as well
    for graph in (g, loaded):
        res = iv.run(graph, model)
        whole = res["whole"]
        picked = list(range(5))[1::step]
        torch.testing.assert_close(res["picked"], whole[:, picked])
        assert res["raw"].shape == (1, len(list(range(5))[0::step]), 32)
        torch.testing.assert_close(res["dims"], whole[..., list(range(32))[3::step]])


def test_huge_step_on_a_write_touches_what_python_selects() -> None:
    model = _gpt2()
    g = iv.Graph()
    a = g.run("a", tokens=IDS)
    a.scale("resid_post", layer=0, pos=slice(2, None, 10**20), factor=0.0)
    a.read("resid_post", layer=0, name="h")
    h = iv.run(g, model)["h"]
    assert torch.all(h[:, 2] == 0)
    assert torch.all(h[:, [0, 1, 3, 4]].abs().sum(-1) > 0)


# --- the dry run itself: leaves the model as it was, falls back per module, is cached ---


class _FakeUnfriendly(ToyNet):
    """A forward that a fake tensor cannot follow after its first block (``tolist`` needs
    values), and that writes tensors onto itself as it goes (a cache, a buffer)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        self.cache = x  # an attribute the forward assigns
        self.register_buffer("last", x.detach(), persistent=False)
        x = x + self.blocks[0](x)
        if sum(1 for _ in x.flatten().tolist()) < 0:  # fake tensors have no values
            raise AssertionError("unreachable")
        x = x + self.blocks[1](x)
        return self.unembed(x)


def test_a_failed_dry_run_falls_back_per_module_and_leaves_nothing_behind() -> None:
    torch.manual_seed(0)
    model = _FakeUnfriendly().eval()
    objects = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    # reached before the forward failed on fake tensors: checked
    g = iv.Graph()
    g.run("a", tokens=IDS).read("blocks.0.output", pos=9)
    with pytest.raises(iv.ValidationError, match=r"pos=9 is out of range.*'pos': 5"):
        iv.validate(g, model)
    _no_hooks_left(model)
    assert not hasattr(model, "cache") and "last" not in model._buffers
    assert {k: id(v) for k, v in model.state_dict(keep_vars=True).items()} == objects
    # not reached: no check, as before the dry run (the real run then fails, typed)
    g = iv.Graph()
    g.run("a", tokens=IDS).read("blocks.1.output", pos=9)
    iv.validate(g, model)
    _no_hooks_left(model)
    with pytest.raises(iv.ExecutionError, match="pos=9"):
        iv.run(g, model)
    _no_hooks_left(model)


def test_probe_fallback_reports_unknown_shapes() -> None:
    torch.manual_seed(0)
    model = _FakeUnfriendly().eval()
    found = dry_run.probe(
        model,
        IDS,
        call="positional",
        points={("blocks.0", "output"), ("blocks.1", "output"), ("unembed", "input")},
    )
    assert found.shapes == {
        ("blocks.0", "output"): (1, 5, 16),
        ("blocks.1", "output"): None,
        ("unembed", "input"): None,
    }
    assert found.failure is not None


def test_mixture_of_experts_falls_back_after_the_experts() -> None:
    model = hf_model("mixtral")  # the grouped expert matmul has no fake kernel for fp32
    before = "model.layers.0.self_attn.o_proj.output"  # reached before the experts
    after = "model.layers.1.self_attn.o_proj.output"
    g = iv.Graph()
    g.run("a", tokens=IDS).read(before, pos=7)
    with pytest.raises(iv.ValidationError, match="pos=7 is out of range"):
        iv.validate(g, model)
    g = iv.Graph()
    g.run("a", tokens=IDS).read(after, pos=-1, name="x")
    assert iv.run(g, model)["x"].shape == (1, 32)
    assert hook_count(model) == 0


def test_dry_run_is_cached_per_run_shape_and_notices_a_changed_module() -> None:
    model = ToyNet().eval()
    g = iv.Graph()
    g.run("a", tokens=IDS).add("blocks.0.output", direction=torch.ones(16))
    with forwards(model) as seen:
        iv.validate(g, model)
        iv.validate(g, model)
    assert seen == {"real": 0, "fake": 1}
    model.blocks[0][2] = nn.Linear(32, 8)  # the block's output is now 8 wide
    with forwards(model) as seen, pytest.raises(iv.ValidationError, match=r"\[1, 5, 8\]"):
        iv.validate(g, model)
    assert seen == {"real": 0, "fake": 1}


def test_dry_run_works_on_a_structure_without_weights() -> None:
    """Remote runs validate against the model's structure on the meta device."""
    from transformers import AutoModelForCausalLM

    config = _gpt2().config
    with torch.device("meta"):
        structure = AutoModelForCausalLM.from_config(config).eval()
    g = iv.Graph()
    g.run("a", tokens=IDS).read(MLP, pos=5)
    with pytest.raises(iv.ValidationError, match=r"pos=5 is out of range for an axis of size 5"):
        iv.validate(g, structure)
    g = iv.Graph()
    g.run("a", tokens=IDS).read(MLP, pos=4)
    iv.validate(g, structure)
    _no_hooks_left(structure)


def test_dry_run_waits_for_a_run_holding_the_model() -> None:
    model = ToyNet().eval()
    g = iv.Graph()
    g.run("a", tokens=IDS).read("blocks.0.output")
    done = threading.Event()

    def validate() -> None:
        iv.validate(g, model)
        done.set()

    with model_lock(model):
        worker = threading.Thread(target=validate)
        worker.start()
        assert not done.wait(0.3), "the dry run put hooks on a model another run holds"
    worker.join(30)
    assert done.is_set()
    _no_hooks_left(model)


def test_dry_run_changes_no_value_even_in_train_mode() -> None:
    """Batch norm counts its batches in place in train mode; the dry run's fake weights
    take that count, the model's own buffer does not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = iv.Graph()
    g.run("a", inputs=torch.randn(3, 4)).read("1.output", batch=5)
    with pytest.raises(iv.ValidationError, match=r"batch=5 is out of range.*'batch': 3"):
        iv.validate(g, model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)
    assert int(model[1].num_batches_tracked) == 0
    _no_hooks_left(model)
