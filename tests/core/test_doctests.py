"""Docstring examples are tests: every core module's examples run as written."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import interventions

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(interventions.__path__, "interventions.")
    if not m.name.startswith(("interventions.adapters", "interventions.reference_models"))
    and m.name != "interventions.demo"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest failures in {name}"
