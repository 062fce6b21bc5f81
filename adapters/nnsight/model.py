"""The user's model, wrapped in nnsight for one ``execute`` and left as it was.

HuggingFace causal LMs are wrapped in nnsight's ``TransformersModel`` around the model
object the user holds (no loading, no tokenizer: runs arrive as token ids); any other
``nn.Module`` in the generic ``nnsight.NNsight`` envoy. The wrapper lives only for one
``execute``: nnsight installs a controller ``forward`` (and its state) into every
module's ``__dict__``, and those are taken out again afterwards, failed run or not.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from interventions.architectures import ModelInfo
from interventions.errors import ExecutionError, InterventionError
from interventions.plan import Plan

_STATE_KEYS = ("forward", "__nnsight__")  # what nnsight puts into a module's __dict__


class _NoTokenizer:
    """What ``TransformersModel`` needs of a tokenizer when every run is token ids.

    Runs arrive tokenized (the plan tokenizes text with the user's tokenizer), and
    invokes of one trace have equal lengths, so nothing is ever tokenized or padded.
    """

    pad_token = "<pad>"
    eos_token = "<eos>"
    pad_token_id = 0
    eos_token_id = 0
    padding_side = "left"
    model_max_length = 1 << 62

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ExecutionError("the nnsight backend passes token ids; it never tokenizes text")

    def __repr__(self) -> str:
        return "<token ids only>"


@contextlib.contextmanager
def _restore_modules(model: nn.Module) -> Iterator[None]:
    """Put back every module's ``forward`` and nnsight state slot as they were."""
    saved: list[tuple[nn.Module, dict[str, Any]]] = [
        (m, {k: m.__dict__[k] for k in _STATE_KEYS if k in m.__dict__}) for m in model.modules()
    ]
    try:
        yield
    finally:
        for module, before in saved:
            for key in _STATE_KEYS:
                if key in before:
                    module.__dict__[key] = before[key]
                else:
                    module.__dict__.pop(key, None)


def _can_batch(model: nn.Module, info: ModelInfo) -> bool:
    """Whether ``TransformersModel`` fits: a decoder-only HuggingFace model that generates.

    Anything else goes through the generic ``NNsight`` envoy, one run per trace.
    """
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    return bool(
        info.is_hf
        and callable(can_generate)
        and can_generate()
        and not getattr(config, "is_encoder_decoder", False)
    )


def _wrap(model: nn.Module, batched: bool) -> Any:
    if batched:
        from nnsight.modeling.transformers import TransformersModel

        return TransformersModel(model, task="text-generation", tokenizer=_NoTokenizer())
    from nnsight import NNsight

    return NNsight(model)


def _envoy_at(root: Any, path: str) -> Any:
    """The envoy of module ``path`` (nnsight moves children named like its own
    properties, ``output`` say, to ``E_output``)."""
    from nnsight.intervention.envoy import Envoy

    envoy = root
    for part in path.split(".") if path else []:
        if not part.startswith("_") and inspect.isdatadescriptor(getattr(Envoy, part, None)):
            part = Envoy.OVERLOAD_PREFIX + part
        envoy = getattr(envoy, part)
    return envoy


def _repo_of(model: nn.Module) -> str:
    """The name a model is known by on a host: its hub id or checkpoint directory."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    if not name:
        raise InterventionError(
            "nnsight backend: this model has no name (config._name_or_path); pass "
            "model_key= (a hub id or checkpoint directory deployed on the host)"
        )
    return str(name)


def _check_max_batch(max_batch: Any) -> None:
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
        raise InterventionError(
            f"nnsight backend: max_batch must be a positive int, got {max_batch!r}"
        )


def _check_generated(plan: Plan, store: Mapping[str, Any]) -> None:
    for run in plan.graph.runs.values():
        if run.generates and f"{run.name}.generated" not in store:
            raise ExecutionError(
                f"run {run.name!r} stopped generating before its last step on the nnsight backend"
            )
