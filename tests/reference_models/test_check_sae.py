"""iv.check_sae on the induction reference model: an SAE trained on layer 0's residual
stream passes there and is flagged, by name and number, on layer 1."""

from __future__ import annotations

import torch

import interventions as iv
import interventions.reference_models.induction as ind


def test_check_flags_the_wrong_layer_and_passes_the_right_one() -> None:
    torch.manual_seed(0)
    model = ind.load_induction_model()
    gen = torch.Generator().manual_seed(0)
    data = [ind.induction_batch(32, 32, gen) for _ in range(80)]
    sae = iv.train_sae(
        model, "resid_post", data, layer=0, kind="topk", d_sae=128, k=16, lr=1e-2,
        batch_size=256, progress=False, exclude_bos=True,
    )  # fmt: skip
    probe = ind.induction_batch(16, 32, torch.Generator().manual_seed(9))
    right = iv.check_sae(sae, model, "resid_post", probe, layer=0, exclude_bos=True)
    assert right.ok, str(right)
    assert right.explained_variance is not None and right.explained_variance > 0.5
    assert right.l0 is not None and 0 < right.l0 <= 16
    # independent oracle for the losses: the clean loss computed straight from the model
    with torch.no_grad():
        logits = model(probe).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             probe[:, 1:].reshape(-1))  # fmt: skip
    assert abs(right.loss_clean - float(want)) < 1e-4  # type: ignore[operator]
    wrong = iv.check_sae(sae, model, "resid_post", probe, layer=1, exclude_bos=True)
    assert not wrong.ok
    text = " ".join(wrong.problems)
    assert "resid_post[0]" in text and "resid_post[1]" in text  # trained at / checked at
    assert wrong.explained_variance is not None
    assert wrong.explained_variance < right.explained_variance
    assert any("explained variance" in p for p in wrong.problems), wrong.problems
