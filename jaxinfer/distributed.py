"""Multi-host start-up: ``jax.distributed.initialize()`` for TPU pod slices and multi-GPU hosts.

On Cloud TPU VMs the coordinator, process count and process id are discovered automatically; elsewhere
set ``JAXINFER_COORDINATOR`` (``host:port`` of process 0), ``JAXINFER_NUM_PROCESSES`` and
``JAXINFER_PROCESS_ID`` (the usual ``JAX_COORDINATOR_ADDRESS`` style variables work too).

JAX multi-host programs are multi-controller: every process runs the same Python and issues the same
jitted steps. The engine's schedule is a deterministic function of its requests, so offline generation
with identical inputs on every host (``jaxinfer generate`` / ``LLM.generate``) stays in lock-step. Serving
HTTP traffic across hosts would need process 0 to broadcast each step's batch; that is not implemented.
"""

from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger(__name__)


def initialize() -> None:
    """Join the multi-process JAX runtime (idempotent)."""
    if jax.process_count() > 1:
        return
    coordinator = os.environ.get("JAXINFER_COORDINATOR")
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=int(os.environ["JAXINFER_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAXINFER_PROCESS_ID"]))
    else:
        jax.distributed.initialize()  # Cloud TPU / SLURM / env-configured clusters
    logger.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count())
