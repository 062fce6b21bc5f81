"""Bad ragged input gets a typed error naming the run, the prompt and what is valid, and
nothing runs (the model holds no hooks afterwards)."""

from __future__ import annotations

import pytest
import torch

import interventions as iv
from tests.tiny_models import hf_model, hook_count, word_tokenizer


def run(g: iv.Graph) -> None:
    model = hf_model("gpt2")
    try:
        iv.run(g, model)
    finally:
        assert hook_count(model) == 0


def test_an_empty_prompt_is_refused_when_the_run_is_made() -> None:
    with pytest.raises(iv.SpecError, match=r"run 'a': prompt 1 is empty"):
        iv.Graph().run("a", tokens=[[1, 2], []])
    with pytest.raises(iv.SpecError, match=r"prompt 0 is empty"):
        iv.Graph().run("a", tokens=torch.tensor([[0, 0]]), attention_mask=[[0, 0]])


def test_an_empty_text_prompt_names_its_index() -> None:
    g = iv.Graph()
    g.run("a", text=["w5 w6", "   "]).read("logits", pos=-1)
    with pytest.raises(iv.ValidationError, match=r"run 'a': prompt 1 .* tokenizes to nothing"):
        iv.run(g, hf_model("gpt2"), tokenizer=word_tokenizer())


def test_a_position_past_a_prompts_end_names_the_prompt_and_the_valid_range() -> None:
    g = iv.Graph()
    g.run("a", tokens=[[1, 2, 3, 4, 5], [6, 7]]).read("logits", pos=3)
    with pytest.raises(
        iv.ValidationError,
        match=r"pos=3 is past the end of prompt 1 of run 'a', which has 2 tokens \(valid: -2\.\.1\)",
    ):
        run(g)
    g = iv.Graph()
    g.run("a", tokens=[[1, 2, 3, 4, 5], [6, 7]]).read("logits", pos=iv.per_prompt([4, 2]))
    with pytest.raises(iv.ValidationError, match=r"pos=2 is past the end of prompt 1"):
        run(g)


def test_a_per_prompt_selector_of_the_wrong_length_is_refused() -> None:
    g = iv.Graph()
    g.run("a", tokens=[[1, 2, 3], [4, 5]]).read("logits", pos=iv.per_prompt([0, 1, 1]))
    with pytest.raises(
        iv.ValidationError, match=r"positions are given for 3 prompts but run 'a' has 2"
    ):
        run(g)


def test_per_prompt_positions_only_on_pos_and_rows_of_one_count() -> None:
    with pytest.raises(iv.SpecError, match=r"only pos= can be chosen prompt by prompt"):
        iv.Select.make(head=[[0], [1]])
    with pytest.raises(iv.SpecError, match=r"same number of positions"):
        iv.per_prompt([[0, 1], [2]])


def test_a_whole_value_patch_between_prompts_of_different_lengths_says_how_to_select() -> None:
    g = iv.Graph()
    clean = g.run("clean", tokens=[[1, 2, 3], [4, 5]])
    corrupt = g.run("corrupt", tokens=[[1, 2, 3], [4, 5, 6]])
    corrupt.patch("resid_pre", layer=1, value=clean.read("resid_pre", layer=1))
    with pytest.raises(
        iv.ValidationError,
        match=r"whole site of run 'clean'.*prompt 1 has 2 tokens.*has 3; select positions with pos=",
    ):
        run(g)


def test_a_value_of_the_wrong_prompt_count_is_refused() -> None:
    g = iv.Graph()
    clean = g.run("clean", tokens=[[1, 2, 3], [4, 5], [6, 7]])
    corrupt = g.run("corrupt", tokens=[[1, 2, 3], [4, 5, 6]])
    corrupt.patch("resid_pre", layer=1, pos=-1, value=clean.read("resid_pre", layer=1, pos=-1))
    with pytest.raises(iv.ValidationError, match=r"holds 3 prompts but the patch selects 2"):
        run(g)


def test_an_attention_mask_with_a_gap_is_refused() -> None:
    with pytest.raises(iv.SpecError, match=r"prompt 0: attention_mask has a gap"):
        iv.Graph().run("a", tokens=torch.tensor([[1, 2, 3]]), attention_mask=[[1, 0, 1]])


def test_json_round_trips_ragged_runs_per_prompt_positions_and_sampling() -> None:
    g = iv.Graph()
    r = g.run("r", tokens=[[1, 2, 3], [4, 5]], padding_side="left", max_new_tokens=2, seed=4)
    r.read("logits", pos=iv.per_prompt([1, 0]), name="x")
    r.read("logits", pos=[[0, 1], [1, 0]], name="y")
    back = iv.Graph.from_json(g.to_json())
    assert back == g
    assert back.runs["r"].sampling == iv.Sampling(seed=4)
    assert "lengths=2..3" in str(g) and "sample temperature=1 seed=4" in str(g)


def test_prompts_past_the_models_learned_positions_are_refused_before_running() -> None:
    model = hf_model("gpt2")  # 32 learned positions
    g = iv.Graph()
    g.run("a", tokens=[[4, 5], list(range(4, 44))]).read("logits", pos=-1)
    with pytest.raises(iv.ValidationError, match=r"run 'a': 40 positions but .* for 32 only"):
        run(g)
    g = iv.Graph()
    g.run("a", tokens=[list(range(4, 34))], max_new_tokens=5).read("logits", pos=-1)
    with pytest.raises(
        iv.ValidationError, match=r"34 positions \(30 of prompt and 4 generated\).*max_new_tokens"
    ):
        run(g)
    g = iv.Graph()  # exactly at the limit is fine
    g.run("a", tokens=[list(range(4, 34))], max_new_tokens=3).read("logits", pos=-1)
    assert iv.run(g, model)["a.generated"].shape == (1, 3)
