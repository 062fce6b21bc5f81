"""NaN and Inf inside graph tensors are refused at build and at load, unless opted in.

Before, JSON scalars had to be finite but tensors were not checked: a NaN direction ran
and turned every result into NaN with no word.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import interventions as iv
from interventions.errors import SpecError

BAD = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("where", ["direction", "patch", "project_out", "inputs"])
def test_building_with_nonfinite_values_is_refused(where: str, value: float) -> None:
    t = torch.ones(32)
    t[7] = value
    g = iv.Graph()
    with pytest.raises(
        SpecError, match=r"tensor t\d holds 1 NaN/Inf value\(s\), first at \[(0, 0, )?7\]"
    ):
        if where == "inputs":
            g.run("a", inputs=t.reshape(1, 1, 32))
        else:
            h = g.run("a", tokens=[[1, 2]])
            if where == "direction":
                h.add("resid_post", 0, direction=t)
            elif where == "patch":
                h.patch("resid_post", 0, pos=-1, value=t)
            else:
                h.project_out("resid_post", 0, direction=t)
    assert len(g.ops) == 0


def test_an_sae_with_nan_weights_is_refused() -> None:
    sae = iv.StandardSAE(torch.randn(32, 8), torch.zeros(8), torch.randn(8, 32), torch.zeros(32))
    sae.W_enc[0, 0] = float("nan")
    g = iv.Graph()
    with pytest.raises(SpecError, match="NaN/Inf"):
        g.run("a", tokens=[[1, 2]]).sae_splice("resid_post", 0, sae=sae)


def _nan_graph(opt_in: bool) -> iv.Graph:
    g = iv.Graph(allow_nonfinite=opt_in)
    t = torch.ones(32)
    t[3] = float("nan")
    g.run("a", tokens=[[1, 2]]).add("resid_post", 0, direction=t)
    return g


def test_opting_in_keeps_them_and_survives_a_round_trip(tmp_path: Path) -> None:
    g = _nan_graph(True)
    back = iv.Graph.from_json(g.to_json())
    assert back == g and back.allow_nonfinite
    assert torch.isnan(back.tensors["t1"][3])
    g.save(str(tmp_path / "g.json"))
    assert iv.Graph.load(str(tmp_path / "g.json")).allow_nonfinite
    finite = iv.Graph()
    finite.run("a", tokens=[[1, 2]]).add("resid_post", 0, direction=torch.ones(32))
    assert "allow_nonfinite" not in json.loads(finite.to_json())  # old files unchanged


def test_loading_nonfinite_tensors_without_the_opt_in_is_refused() -> None:
    doc = json.loads(_nan_graph(True).to_json())
    del doc["allow_nonfinite"]
    with pytest.raises(
        SpecError, match=r"graph.tensors.t1 holds 1 NaN/Inf value\(s\), first at \[3\]"
    ):
        iv.Graph.from_json(json.dumps(doc))
    doc["allow_nonfinite"] = "yes"
    with pytest.raises(SpecError, match="allow_nonfinite: expected true or false"):
        iv.Graph.from_json(json.dumps(doc))


def test_the_opt_in_is_policy_not_content() -> None:
    g = iv.Graph()
    g.run("a", tokens=[[1, 2]]).add("resid_post", 0, direction=torch.ones(32))
    h = iv.Graph(allow_nonfinite=True)
    h.run("a", tokens=[[1, 2]]).add("resid_post", 0, direction=torch.ones(32))
    assert g == h and g.fingerprint() == h.fingerprint()
