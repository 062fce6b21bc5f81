"""A graph of edits at every attention-internal site, shared by the nnsight and pyvene
agreement tests (each holds its backend to the torch reference on it)."""

from __future__ import annotations

import torch

import interventions as iv
from tests.adapters.torch.hand import IDS


def edits_graph() -> iv.Graph:
    """q, k, v, resid_mid and per-head-input ops, some interleaved at one projection."""
    g = iv.Graph()
    clean = g.run("clean", tokens=IDS)
    clean.read("k_input", layer=1, name="clean.k_input")
    other = g.run("other", tokens=IDS.flip(-1))
    src = other.read("v_input", layer=0)
    e = g.run("edit", tokens=IDS)
    e.ablate("q", layer=1, head=1, pos=-1)
    e.patch("k", layer=1, head=1, value=torch.ones(8))
    e.add("v", layer=0, head=0, direction=torch.ones(8), scale=0.5)
    e.ablate("resid_mid", layer=0, pos=2)
    e.patch("q_input", layer=1, head=2, pos=-1, value=torch.ones(32))
    e.read("q", layer=1, name="edit.q")  # between two ops at the same projection
    e.add("q_input", layer=1, head=0, direction=torch.ones(32), scale=0.1)
    e.patch("v_input", layer=0, head=1, value=src)
    e.ablate("k_input", layer=1, head=0, method="mean", source="clean")
    for part in ("k", "v", "resid_mid", "q_input", "k_input"):
        e.read(part, layer=1, name=f"edit.{part}")
    e.read("logits", name="edit.logits")
    return g


def generating_graph() -> iv.Graph:
    """A greedy 3-token generation with a per-head-input add and a k patch, reading the
    per-head inputs and q at every fed position."""
    g = iv.Graph()
    r = g.run("gen", tokens=IDS, max_new_tokens=3)
    r.add("q_input", layer=1, head=1, direction=torch.ones(32), scale=3.0)
    r.patch("k", layer=0, head=0, pos=2, value=torch.ones(8))
    r.read("q_input", layer=1, name="qi")
    r.read("q", layer=1, name="q")
    return g
