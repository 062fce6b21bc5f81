"""A CPU model actor for a local NDIF stack (development and the ``remote`` tests).

NDIF's stock ``ModelActor`` loads weights onto the GPUs the controller assigned and
calls CUDA when it loads, parks (HOT->WARM) and cleans up. On a machine without a GPU
the Ray head declares one *logical* GPU (so the scheduler will place models at all),
and this actor does the same work on the CPU: it loads the checkpoint with nnsight's
own loader, never touches ``torch.cuda``, and otherwise inherits everything from
NDIF's base actor (request execution, timeouts, cancellation, status responses,
result upload).

Deploy with ``actor_class="ndif_cpu_actor.CPUModelActor"`` (``deploy.py`` does) or
``NDIF_DEFAULT_MODEL_ACTOR_CLASS``. ``start.sh`` puts this directory on the Ray
workers' ``PYTHONPATH``. Nothing here imports the ``interventions`` package: the
server runs in its own virtual environment, where that package is not installed.
"""

from __future__ import annotations

import gc
import logging
import time

import ray
from ndif.services.ray.deployments.modeling.base import BaseModelDeployment
from nnsight.modeling.huggingface import HuggingFaceModel

logger = logging.getLogger("ndif.modeling")


class CPUModelDeployment(BaseModelDeployment):
    """``BaseModelDeployment`` with every CUDA call taken out."""

    def load_from_disk(self) -> HuggingFaceModel:
        started = time.time()
        model = HuggingFaceModel.from_model_key(
            self.model_key, dispatch=True, dtype=self.dtype_name, **self.kwargs
        )
        model._module.requires_grad_(False)
        model._module.eval()
        logger.info(f"Loaded {self.model_key} on the CPU in {time.time() - started:.2f}s")
        return model

    async def to_cache(self) -> None:
        await self.cancel("preempted")
        self.cached = True

    def from_cache(self, gpu_mem_bytes_by_id: dict[int, int]) -> None:
        self.gpu_mem_bytes_by_id = gpu_mem_bytes_by_id
        self.cached = False

    def cleanup(self) -> None:
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()

    def restart(self) -> None:
        logger.warning(f"Restarting CPU model actor for {self.model_key}")
        ray.kill(self.runtime_context.current_actor, no_restart=False)


@ray.remote(num_cpus=1, max_restarts=-1)
class CPUModelActor(CPUModelDeployment):
    """The Ray actor class a deployment names: ``ndif_cpu_actor.CPUModelActor``."""


__all__ = ["CPUModelActor", "CPUModelDeployment"]
