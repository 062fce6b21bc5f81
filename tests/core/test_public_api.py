"""The public surface is small and pinned; importing it has no side effects."""

from __future__ import annotations

import subprocess
import sys

import interventions as iv

EXPECTED = {
    "acdc",
    "Circuit",
    "completeness",
    "faithfulness",
    "SAE",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUTranscoder",
    "SAEFit",
    "SAEInfo",
    "Sampling",
    "SkipTranscoder",
    "Transcoder",
    "check_graph_saes",
    "check_sae",
    "FeatureDashboard",
    "harvest_features",
    "train_sae",
    "ArchitectureCheck",
    "ArchitectureMap",
    "Backend",
    "BackendVersionError",
    "Budget",
    "Capabilities",
    "Comparison",
    "ExecutionError",
    "FeatureEdit",
    "Graph",
    "InterventionError",
    "Job",
    "JobLost",
    "JumpReLUSAE",
    "MalformedResponse",
    "ModelNotDeployed",
    "OutputError",
    "Provenance",
    "Ref",
    "RemoteAuthError",
    "RemoteConnectionError",
    "RemoteError",
    "RemoteExecutionError",
    "RemoteTimeout",
    "ResultTooLarge",
    "Results",
    "ResultsError",
    "RoutingRule",
    "RunHandle",
    "SAEError",
    "SAEErrorGradientWarning",
    "PerPrompt",
    "Select",
    "Site",
    "SpecError",
    "StandardSAE",
    "TopKSAE",
    "UnknownArchitecture",
    "UnknownBackend",
    "UnknownOp",
    "UnknownSite",
    "UnsupportedOp",
    "ValidationError",
    "__version__",
    "architectures",
    "check_architecture",
    "propose_architecture",
    "backend_capabilities",
    "compare",
    "per_prompt",
    "token_positions",
    "list_backends",
    "load_model",
    "load_sae",
    "register_architecture",
    "register_backend",
    "run",
    "save_sae",
    "submit",
    "validate",
}


def test_all_is_pinned() -> None:
    assert set(iv.__all__) == EXPECTED
    for name in iv.__all__:
        assert hasattr(iv, name), name


def test_public_callables_have_docstrings() -> None:
    for name in iv.__all__:
        obj = getattr(iv, name)
        if callable(obj):
            assert obj.__doc__, f"{name} has no docstring"


def test_every_error_derives_from_the_base() -> None:
    errors = [
        getattr(iv, n)
        for n in iv.__all__
        if n.endswith(("Error", "Site", "Op", "Backend", "Architecture"))
    ]
    errors = [e for e in errors if isinstance(e, type) and issubclass(e, Exception)]
    assert len(errors) >= 10
    assert all(issubclass(e, iv.InterventionError) for e in errors)


def test_import_loads_no_backend_and_patches_nothing() -> None:
    code = (
        "import sys, torch, torch.nn as nn\n"
        "before = (nn.Module.__call__, nn.Module.register_forward_hook, torch.Tensor.__getitem__)\n"
        "import interventions\n"
        "after = (nn.Module.__call__, nn.Module.register_forward_hook, torch.Tensor.__getitem__)\n"
        "bad = [m for m in ('nnsight', 'pyvene', 'transformers', 'interventions.adapters.torch_hooks')"
        " if m in sys.modules]\n"
        "assert before == after, 'import patched torch'\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_backends_are_listed_with_capabilities() -> None:
    assert {"torch", "nnsight", "pyvene"} <= set(iv.list_backends())
    caps = iv.backend_capabilities()["torch"]
    assert isinstance(caps, iv.Capabilities)
    assert "sae_splice" in caps.ops and caps.generation


def test_unknown_backend_names_the_choices() -> None:
    import pytest

    with pytest.raises(iv.UnknownBackend, match=r"'torhc'.*did you mean 'torch'.*nnsight"):
        from interventions.backends import get_backend

        get_backend("torhc")


def test_builtin_backend_cannot_be_replaced() -> None:
    import pytest

    with pytest.raises(ValueError, match="built-in"):
        iv.register_backend("torch", "x:Y")


RECIPES = {
    "AttributionResult", "HeadScores", "InputAttribution", "LensKL", "LogitAttribution",
    "LogitLens", "Metric", "PatchingResult", "ProbeResult", "ProbeSweep", "SteeringResult",
    "TunedLens", "ablate_components", "activation_patching", "attribution_patching",
    "contrastive_direction", "direct_logit_attribution", "feature_ablation",
    "feature_activations", "feature_attribution", "head_scores", "input_attribution",
    "lens_kl", "logit_lens", "normalized", "path_patching", "probe", "probe_sweep",
    "repeated_random_tokens", "sae_feature_direction", "steer", "top_activating",
    "train_tuned_lens", "tuned_lens",
}  # fmt: skip


def test_recipes_all_is_pinned() -> None:
    import interventions.recipes as recipes

    assert set(recipes.__all__) == RECIPES
    for name in recipes.__all__:
        assert getattr(recipes, name).__doc__, f"{name} has no docstring"
