"""The tuned lens on the IOI reference model: on held-out prompts its KL to the final
distribution is at most the logit lens's at every layer, its translators load back
bit-identical, and applying it through the graph agrees with translating by hand."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from interventions.recipes import TunedLens, lens_kl, logit_lens, train_tuned_lens, tuned_lens
from interventions.reference_models import ioi
from interventions.tensor_bytes import bitwise_equal


@cache
def _setup() -> tuple[torch.nn.Module, TunedLens, torch.Tensor]:
    model, _ = ioi.load_ioi_model()
    g = torch.Generator().manual_seed(0)
    train = ioi.ioi_batch(128, g, 0)[0]
    test = ioi.ioi_batch(64, g, 0)[0]
    lens = train_tuned_lens(model, train, steps=60, lr=1e-3, tokens_per_step=512)
    return model, lens, test


def test_tuned_lens_kl_is_at_most_the_logit_lens_on_every_layer() -> None:
    model, lens, test = _setup()
    table = lens_kl(model, test, lens)
    assert table.labels == ("resid_post[0]", "resid_post[1]", "resid_post[2]")
    assert (table.tuned[:-1] < table.logit[:-1]).all(), table.table()
    assert float(table.tuned[-1]) == 0.0 and float(table.logit[-1]) == 0.0  # the output itself
    # the oracle for the logit lens column: the logit_lens recipe's own decoding
    lens0 = logit_lens(model, test[:8])
    p = lens0.logits[-1].log_softmax(-1)
    kl = (p.exp() * (p - lens0.logits[0].log_softmax(-1))).sum(-1).mean()
    small = lens_kl(model, test[:8], lens)
    assert abs(float(small.logit[0]) - float(kl)) < 1e-5


def test_translators_load_back_bit_identical(tmp_path) -> None:
    _, lens, _ = _setup()
    path = lens.save(tmp_path / "lens.safetensors")
    back = TunedLens.load(path)
    assert len(back.weights) == len(lens.weights) == 3
    for a, b in zip(lens.weights + lens.biases, back.weights + back.biases, strict=True):
        assert bitwise_equal(a, b) and a.dtype == b.dtype


def test_applying_the_lens_equals_translating_by_hand() -> None:
    model, lens, test = _setup()
    ids = test[:2]
    out = tuned_lens(model, ids, lens, k=3)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # [embed, L0, L1, L2]
        h0 = lens.translate(0, hidden[1])
        expected = model.lm_head(model.transformer.ln_f(h0))
    torch.testing.assert_close(out.logits[0], expected, atol=1e-4, rtol=1e-4)
    assert out.top_tokens.shape == (3, ids.shape[1], 3)


def test_an_untrained_lens_is_the_logit_lens() -> None:
    model, _, test = _setup()
    table = lens_kl(model, test[:8], TunedLens.identity(3, model.config.n_embd))
    torch.testing.assert_close(table.tuned, table.logit)


def test_load_refuses_other_files(tmp_path) -> None:
    from safetensors.torch import save_file

    from interventions.errors import SpecError

    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(SpecError, match="not a tuned lens file"):
        TunedLens.load(tmp_path / "x.safetensors")
