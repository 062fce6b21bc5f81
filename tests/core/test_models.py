"""Models where users have them: objects, paths, plain modules, text runs, new families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import interventions as iv
from tests.tiny_models import hf_model, toy_net, word_tokenizer


def test_text_runs_use_the_tokenizer() -> None:
    model, tok = hf_model("gpt2"), word_tokenizer()
    g = iv.Graph()
    g.run("a", text=["w5 w6 w7", "w9 w8 w7"]).read("logits", pos=-1, name="last")
    res = iv.run(g, model, tokenizer=tok)
    ids = torch.tensor([[5, 6, 7], [9, 8, 7]])
    torch.testing.assert_close(res["last"], model(ids).logits[:, -1])


def test_text_prompts_of_different_lengths_are_each_their_own_forward() -> None:
    model, tok = hf_model("gpt2"), word_tokenizer()
    g = iv.Graph()
    g.run("a", text=["w5 w6", "w5 w6 w7"]).read("logits", name="all")
    res = iv.run(g, model, tokenizer=tok)
    assert res["all"].shape[:2] == (2, 3)
    torch.testing.assert_close(res["all"][0, :2], model(torch.tensor([[5, 6]])).logits[0])
    torch.testing.assert_close(res["all"][1], model(torch.tensor([[5, 6, 7]])).logits[0])
    assert res.mask("all").tolist() == [[True, True, False], [True, True, True]]
    assert not res["all"][0, 2].any()  # padding is zero


def test_model_by_path(tmp_path: Path) -> None:
    model = hf_model("llama")
    model.save_pretrained(tmp_path / "m")
    word_tokenizer().save_pretrained(tmp_path / "m")
    g = iv.Graph()
    g.run("a", text="w4 w5 w6").read("logits", name="y")
    res = iv.run(g, str(tmp_path / "m"))
    torch.testing.assert_close(res["y"], model(torch.tensor([[4, 5, 6]])).logits)


def test_unloadable_model_name_is_a_clear_error(tmp_path: Path) -> None:
    g = iv.Graph()
    g.run("a", tokens=[1, 2]).read("logits")
    with pytest.raises(iv.InterventionError, match="cannot load model"):
        iv.run(g, str(tmp_path / "missing"))


def test_plain_module_with_raw_sites() -> None:
    model = toy_net()
    ids = torch.tensor([[1, 2, 3, 4]])
    g = iv.Graph()
    a = g.run("a", tokens=ids)
    a.scale("blocks.0.output", factor=0.0)
    a.read("blocks.1.input", name="into_block1")
    a.read("output", name="out")
    res = iv.run(g, model)
    # by hand: with block 0's output zeroed, x after block 0 is the embedding itself
    x = model.embed(ids)
    torch.testing.assert_close(res["into_block1"], x)
    torch.testing.assert_close(res["out"], model.unembed(x + model.blocks[1](x)))


def test_register_a_new_family_in_a_few_lines() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    class Renamed(GPT2LMHeadModel):
        pass

    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=32, n_positions=16)
    config.model_type = "renamed_gpt"
    model = Renamed(config).eval()
    g = iv.Graph()
    g.run("a", tokens=[[1, 2, 3]]).read("mlp_out", layer=1, name="m")
    with pytest.raises(iv.UnknownArchitecture, match="renamed_gpt"):
        iv.run(g, model)
    iv.register_architecture(
        iv.ArchitectureMap(
            name="renamed",
            model_types=("renamed_gpt",),
            layers="transformer.h",
            embed="transformer.wte",
            final_norm="transformer.ln_f",
            attn="attn",
            attn_out_proj="attn.c_proj",
            mlp="mlp",
            mlp_down_proj="mlp.c_proj",
        )
    )
    captured = {}
    handle = model.transformer.h[1].mlp.register_forward_hook(lambda m, i, o: captured.update(o=o))
    try:
        res = iv.run(g, model)
    finally:
        handle.remove()
    torch.testing.assert_close(res["m"], captured["o"])


def test_builtin_family_map_needs_override() -> None:
    arch = iv.architectures()["gpt2"]
    with pytest.raises(ValueError, match="override=True"):
        iv.register_architecture(arch)


def test_model_must_be_a_module() -> None:
    g = iv.Graph()
    g.run("a", tokens=[1]).read("logits")
    with pytest.raises(iv.InterventionError, match=r"nn\.Module"):
        iv.run(g, 42)  # type: ignore[arg-type]


def test_results_save_and_load(tmp_path: Path) -> None:
    g = iv.Graph()
    g.run("a", tokens=[[1, 2, 3]]).read("logits", name="y")
    res = iv.run(g, hf_model("gpt2"))
    res.save(tmp_path / "out")
    back = iv.Results.load(tmp_path / "out")
    assert back.provenance == res.provenance
    torch.testing.assert_close(back["y"], res["y"])
    with pytest.raises(KeyError, match="did you mean 'y'"):
        res["yy"]


def test_provenance_names_graph_model_backend_and_versions() -> None:
    g = iv.Graph()
    g.run("a", tokens=[[1, 2, 3]]).read("logits", name="y")
    res = iv.run(g, hf_model("gpt2"))
    p = res.provenance
    assert p.graph == g.fingerprint() and len(p.graph) == 64
    assert p.model_class == "GPT2LMHeadModel" and len(p.model_config) == 64
    versions = dict(p.versions)
    assert p.backend == "torch" and {"torch", "transformers", "interventions"} <= set(versions)
    assert versions["torch"] == torch.__version__


def test_linear_module_output_is_its_own_site() -> None:
    lin = nn.Linear(3, 2)
    g = iv.Graph()
    r = g.run("a", inputs=torch.ones(1, 4, 3))
    r.patch("output", value=torch.zeros(2), pos=1)
    r.read("output", name="y")
    y = iv.run(g, lin)["y"]
    expected = lin(torch.ones(1, 4, 3)).detach().clone()
    expected[:, 1] = 0
    torch.testing.assert_close(y, expected)


def test_progress_bar_option_on_every_backend(capsys: pytest.CaptureFixture[str]) -> None:
    g = iv.Graph()
    g.run("a", tokens=[[1, 2, 3]]).read("logits", name="y")
    g.run("b", tokens=[[1, 2]]).read("logits", name="z")
    for backend in ("torch", "nnsight", "pyvene"):
        quiet = iv.run(g, hf_model("gpt2"), backend=backend, progress=False)
        shown = iv.run(g, hf_model("gpt2"), backend=backend, progress=True)
        torch.testing.assert_close(quiet["y"], shown["y"])
    with pytest.raises(iv.InterventionError, match="unknown options"):
        iv.run(g, hf_model("gpt2"), backend="torch", bogus=1)
