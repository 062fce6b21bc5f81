"""ALiBi under padding (Falcon-RW style): HuggingFace builds ALiBi's positions from the
attention mask's cumulative sum, the classic place for left padding to shift them. Every
prompt of a ragged or padded batch must still equal that prompt run alone, unpadded (the
oracle), on both padding sides, on the merged and the split path; the pad id of padded
inputs is held not to matter in test_ragged_oracle.py, for these configurations too.
"""

from __future__ import annotations

import pytest
import torch

import interventions.ragged_layout as ragged_layout
from tests.ragged.test_merged import EXAMPLE, parts, ragged_read
from tests.ragged.test_ragged_oracle import TOL, check
from tests.tiny_models import hf_model

ALIBI = ("falcon_alibi", "falcon_alibi_par")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ALIBI)
def test_merged_forwards_equal_each_prompt_alone(family: str, side: str) -> None:
    assert hf_model(family).config.alibi
    assert parts(ragged_read(), hf_model(family)) == [(2, 4), (3, 4), (4, 4)]  # merged
    check(EXAMPLE, family, "torch", side)


@pytest.mark.parametrize("backend", ["torch", "nnsight", "pyvene"])
def test_the_split_path_equals_each_prompt_alone(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ragged_layout, "FORWARD_OVERHEAD", {"cpu": 0.0, "cuda": 0.0})
    assert parts(ragged_read(), hf_model("falcon_alibi"))[0][1] is None  # one per length
    check(EXAMPLE, "falcon_alibi", backend, "left")


def test_hugging_faces_left_padded_forward_is_exact_too() -> None:
    """Positions from the mask's cumulative sum start at 0 at each row's first real token,
    so HuggingFace's own left-padded forward equals the row alone as well (ours drops the
    padding before running, so it never depends on this)."""
    model = hf_model("falcon_alibi")
    with torch.no_grad():
        alone = model(torch.tensor([[5, 6]])).logits[0, -1]
        padded = model(
            torch.tensor([[0, 0, 5, 6]]), attention_mask=torch.tensor([[0, 0, 1, 1]])
        ).logits[0, -1]
    torch.testing.assert_close(padded, alone, **TOL)
