"""Shared test settings: hypothesis profiles and hook-hygiene helpers.

Profiles: ``default`` (fast, CI) and ``slow`` (``pytest --hypothesis-profile=slow -m slow``).
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# The default profile (CI) draws the same examples on every run, so a landing never
# depends on luck; the slow profile explores new ones each time.
settings.register_profile(
    "default",
    max_examples=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "slow",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("default")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _shared_models_stay_clean() -> object:
    """Law 4 across tests: no test may leave hooks on the shared tiny models."""
    yield
    from tests import tiny_models

    leaked = []
    for name, model in list(tiny_models.BUILT.items()):
        if tiny_models.hook_count(model):
            leaked.append(name)
            for module in model.modules():
                for table in (module._forward_hooks, module._forward_pre_hooks):
                    for key in [k for k, h in table.items() if tiny_models._ours(h)]:
                        del table[key]
    assert not leaked, f"hooks left on the shared tiny models: {leaked}"
