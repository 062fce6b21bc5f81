"""A slice step beyond the axis (``pos={"step": 10**20}`` in JSON) selects what Python's
slicing selects on every backend; torch used to multiply it into a stride and overflow
(issue 13, item 6). Oracle: the torch reference and Python's ``list(range(n))[slice]``."""

from __future__ import annotations

import pytest
import torch

import interventions as iv
from tests.tiny_models import hf_model, hook_count

IDS = torch.tensor([[5, 6, 7, 8, 9]])


@pytest.mark.parametrize("backend", ["torch", "nnsight", "pyvene"])
def test_huge_slice_step_agrees_with_python(backend: str) -> None:
    if backend != "torch":
        pytest.importorskip(backend)
    model = hf_model("gpt2")
    g = iv.Graph()
    a = g.run("a", tokens=IDS)
    a.read("resid_post", layer=0, name="whole")
    a.read("resid_post", layer=0, pos=slice(1, None, 10**20), name="picked")
    a.read("transformer.h.0.mlp.output", dims=slice(None, None, 10**20), name="raw")
    a.scale("resid_post", layer=1, pos=slice(2, None, 10**20), factor=0.0)
    a.read("resid_post", layer=1, name="after")
    res = iv.run(iv.Graph.from_json(g.to_json()), model, backend=backend)
    assert res["picked"].shape == (1, len(list(range(5))[1 :: 10**20]), 32)
    torch.testing.assert_close(res["picked"], res["whole"][:, 1:2])
    assert res["raw"].shape == (1, 5, 1)
    assert torch.all(res["after"][:, 2] == 0)
    assert torch.all(res["after"][:, [0, 1, 3, 4]].abs().sum(-1) > 0)
    assert hook_count(model) == 0
