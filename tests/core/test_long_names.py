"""Very long names fail fast with a short message (issue: 50 MB names took 45 s, 1.6 GB).

Budget: every case below raises a typed error within 2 s of wall time (before the fix
each took tens of seconds: ``difflib`` on the whole string) and the message quotes at most
an excerpt: under 400 characters, for a 20 MB name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import torch

import interventions as iv
from interventions.errors import MAX_NAME, InterventionError, excerpt, suggest
from interventions.ops import Read
from interventions.sites import Select, Site
from tests.tiny_models import hf_model

HUGE = "r" * 20_000_000
SECONDS = 2.0
MESSAGE = 400


def _graph() -> tuple[iv.Graph, iv.RunHandle]:
    g = iv.Graph()
    return g, g.run("a", tokens=[[1, 2, 3]])


def _op_run() -> None:
    g, _ = _graph()
    g.add(Read(HUGE, Site("logits"), Select(), "x"))


def _patch_ref() -> None:
    _g, h = _graph()
    h.patch("logits", value=iv.Ref(HUGE))


def _ablate_source() -> None:
    _g, h = _graph()
    h.ablate("resid_pre", 0, method="mean", source=HUGE)


def _site_name() -> None:
    _graph()[1].read(HUGE)


def _raw_module_path() -> None:
    g, h = _graph()
    h.read("transformer." + HUGE + ".output")
    iv.validate(g, hf_model("gpt2"))


def _raw_path_under_the_cap() -> None:  # short enough to build, then unknown to the model
    g, h = _graph()
    h.read("transformer." + "h" * (MAX_NAME - 20) + ".output")
    iv.validate(g, hf_model("gpt2"))


def _read_name() -> None:
    _graph()[1].read("logits", name=HUGE)


def _run_name() -> None:
    iv.Graph().run(HUGE, tokens=[[1]])


def _json_op_run() -> None:
    g, h = _graph()
    h.read("logits", name="y")
    doc = json.loads(g.to_json())
    doc["ops"][0]["run"] = HUGE
    iv.Graph.from_json(json.dumps(doc))


def _json_tensor_key() -> None:
    g, _ = _graph()
    doc = json.loads(g.to_json())
    doc["tensors"][HUGE] = doc["tensors"].pop("t0")
    iv.Graph.from_json(json.dumps(doc))


CASES: dict[str, Callable[[], None]] = {
    "op.run": _op_run,
    "patch ref": _patch_ref,
    "ablate source": _ablate_source,
    "site name": _site_name,
    "raw module path": _raw_module_path,
    "raw path under the cap": _raw_path_under_the_cap,
    "read name": _read_name,
    "run name": _run_name,
    "json op.run": _json_op_run,
    "json tensor key": _json_tensor_key,
}


@pytest.mark.parametrize("case", list(CASES))
def test_long_names_fail_fast_with_a_short_message(case: str) -> None:
    start = time.perf_counter()
    with pytest.raises(InterventionError) as info:
        CASES[case]()
    elapsed = time.perf_counter() - start
    assert elapsed < SECONDS, f"{case}: {elapsed:.1f} s"
    assert len(str(info.value)) < MESSAGE, f"{case}: {len(str(info.value))} characters"


def test_suggest_skips_long_words_and_excerpt_is_bounded() -> None:
    assert suggest("resid_post" + "x" * 300, ["resid_post"]) == ""
    assert suggest("resid_psot", ["resid_post"]) == "; did you mean 'resid_post'?"
    assert len(excerpt(HUGE)) < 120 and "20000000 characters" in excerpt(HUGE)
    assert excerpt("short") == "'short'"


def test_names_at_the_cap_still_work() -> None:
    g = iv.Graph()
    g.run("a", tokens=torch.tensor([[1, 2]])).read("logits", name="n" * 200)
    assert iv.Graph.from_json(g.to_json()) == g
