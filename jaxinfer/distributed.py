"""Multi-process (multi-host) start-up: ``jax.distributed.initialize()`` for TPU pod slices, multi-GPU
hosts and several CPU processes.

JAX multi-host programs are multi-controller: every process runs the same Python program, sees every
device of the job (``jax.devices()``) but drives only its own (``jax.local_devices()``), and issues the
same jitted steps with the same inputs. jaxinfer builds its mesh over the global devices; each process
reads, materialises and transfers only its own devices' weight slices (``jax.make_array_from_callback``
over :meth:`jaxinfer.weights.TensorSource.read`: those regions of a safetensors file, those rows and
quantization blocks of a GGUF tensor; the quantized tensors of ``--quantization gguf`` are still read
whole); every step's sampled tokens are returned replicated, so each process reads them from a local
device. The engine's schedule is a deterministic function of its requests, so offline generation with
identical inputs on every process (``jaxinfer generate --distributed`` / ``LLM.generate`` after
:func:`initialize`) stays in lock-step and every process produces the same text. Serving (``jaxinfer
serve --distributed``) keeps the processes in lock-step by broadcasting process 0's engine operations
through the runtime's key-value store (:mod:`jaxinfer.engine_mirror`, using :func:`kv_client`).

Where the coordinator comes from (first match):

* ``JAXINFER_COORDINATOR`` (``host:port`` of process 0), ``JAXINFER_NUM_PROCESSES`` and
  ``JAXINFER_PROCESS_ID``: any machines, e.g. several CPU processes on one host (``jaxinfer launch``);
* JAX's own auto-detection: Cloud TPU VMs (pod slices), SLURM (one process per GPU), Open MPI.

:func:`initialize` must run before anything touches the XLA backend (``jax.devices()``, any
computation, ``device_put``); ``jaxinfer.cli`` calls it right after parsing the command line. On the CPU
the processes exchange collectives over gloo (TCP).

Failure detection: every process sends heartbeats to the coordination service (in process 0). A process
that dies or stalls is declared dead after ``JAXINFER_HEARTBEAT_TIMEOUT`` seconds (default 100, JAX's
default) and the others are then terminated by the runtime with an error naming the dead task; a process
whose collective loses its peer (the peer died) fails at once; ``jaxinfer.cli`` then exits through
:func:`abort_on_failure` with a clear error instead of waiting in the shutdown barrier.
``JAXINFER_INIT_TIMEOUT`` (default 300) bounds the wait for all processes to join,
``JAXINFER_SHUTDOWN_TIMEOUT`` (default 300) the wait for the others at exit.
"""

from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger(__name__)

_TIMEOUTS = {  # environment variable -> (jax.distributed.initialize argument, default seconds)
    "JAXINFER_INIT_TIMEOUT": ("initialization_timeout", 300),
    "JAXINFER_HEARTBEAT_TIMEOUT": ("heartbeat_timeout_seconds", 100),
    "JAXINFER_SHUTDOWN_TIMEOUT": ("shutdown_timeout_seconds", 300),
}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _backend_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               **timeouts) -> None:
    """Join the multi-process JAX runtime (a no-op when already joined).

    Args:
      coordinator, num_processes, process_id: ``host:port`` of process 0, process count and this process's
        index; default ``JAXINFER_COORDINATOR`` / ``JAXINFER_NUM_PROCESSES`` / ``JAXINFER_PROCESS_ID``, and
        without a coordinator JAX's auto-detection (Cloud TPU, SLURM, Open MPI).
      **timeouts: ``initialization_timeout``, ``heartbeat_timeout_seconds``, ``shutdown_timeout_seconds``
        (seconds; defaults from ``JAXINFER_INIT_TIMEOUT``, ``JAXINFER_HEARTBEAT_TIMEOUT``,
        ``JAXINFER_SHUTDOWN_TIMEOUT``, else JAX's).

    Raises:
      RuntimeError: the XLA backend was already started in this process (too late to join).
      ValueError: an incomplete or malformed ``JAXINFER_*`` environment.
    """
    if jax.distributed.is_initialized():
        return
    coordinator = coordinator or os.environ.get("JAXINFER_COORDINATOR") or None
    if num_processes is None:
        num_processes = _env_int("JAXINFER_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAXINFER_PROCESS_ID")
    if coordinator and (num_processes is None or process_id is None):
        raise ValueError("JAXINFER_COORDINATOR needs JAXINFER_NUM_PROCESSES and JAXINFER_PROCESS_ID too")
    kwargs = {}
    for env, (arg, _default) in _TIMEOUTS.items():
        value = timeouts.pop(arg, None)
        value = value if value is not None else _env_int(env)
        if value is not None:
            kwargs[arg] = int(value)
    if timeouts:
        raise TypeError(f"unknown arguments {sorted(timeouts)}")
    if _backend_started():
        raise RuntimeError("jaxinfer.distributed.initialize() must run before anything starts the XLA backend "
                           "(jax.devices(), a computation, device_put, loading a model)")
    if jax.config.jax_cpu_collectives_implementation is None:
        # CPU processes exchange collectives over TCP (JAX's default since 0.5; older versions had none).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, **kwargs)
    else:
        jax.distributed.initialize(**kwargs)  # Cloud TPU / SLURM / Open MPI
    logger.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count())


def abort_on_failure(exc: BaseException, status: int = 3) -> None:
    """Report a failed multi-process run and exit at once (``os._exit``).

    A multi-controller run cannot continue without every process; a normal interpreter exit would wait
    in the runtime's shutdown barrier for processes that will never arrive (up to the heartbeat timeout).
    The typical cause here is another process that died: its collectives then fail with "connection closed
    by peer".
    """
    import sys
    import traceback

    if not jax.distributed.is_initialized():
        raise exc
    rank = jax.process_index()
    traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.write(f"jaxinfer: error: process {rank} of {jax.process_count()}: the multi-process run failed "
                     f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); another process "
                     "probably died or stalled; see its log. Exiting without waiting for the others.\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(status)


def kv_client():
    """The distributed runtime's key-value store client (the coordination service in process 0).

    JAX 0.10 exposes no public key-value API; the client of ``jax.distributed.initialize`` is
    ``jax._src.distributed.global_state.client`` (methods ``key_value_set_bytes``,
    ``blocking_key_value_get_bytes``, ``key_value_delete``, ``key_value_set(..., allow_overwrite)``).

    Raises:
      RuntimeError: the runtime was not joined (:func:`initialize`) or this JAX has no such client.
    """
    from jax._src import distributed as jax_distributed

    client = getattr(jax_distributed.global_state, "client", None)
    if client is None:
        raise RuntimeError("the multi-process runtime is not initialized (jaxinfer.distributed.initialize())")
    for method in ("key_value_set_bytes", "blocking_key_value_get_bytes", "key_value_delete", "key_value_set",
                   "key_value_try_get"):
        if not hasattr(client, method):
            raise RuntimeError(f"this JAX ({jax.__version__}) has no key-value store method {method} (JAX 0.10 "
                               "has it); multi-process serving cannot run")
    return client
