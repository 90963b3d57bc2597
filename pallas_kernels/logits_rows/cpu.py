"""The sampler's row reductions on the CPU: a C++ kernel (``cpu_kernel.cc``) called through ``jax.ffi``.

On XLA:CPU the jnp argmax (a max, then the smallest index holding it) and log-sum-exp of ``f32[S, V]``
logits take several passes over the matrix and write a broadcast of the row maxima back to memory: the
whole greedy sampler at 64 rows of the default model's 49,152 logits took 22 ms on a 2-core Xeon, 7 ms with
this kernel (``bench/sampler.py``). It reads each row once for the argmax and twice (the second time from
the cache) for the log-sum-exp. Two FFI targets from one
source, built and registered like the other CPU kernels (:mod:`pallas_kernels.cpu_build`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_build

_SOURCE = Path(__file__).with_name("cpu_kernel.cc")
ARGMAX = cpu_build.CpuKernel(_SOURCE, prefix="logits_rows_cpu", symbol="JaxinferRowArgmaxCpu",
                             target="jaxinfer_row_argmax_cpu", what="CPU logits argmax kernel")
LOGSUMEXP = cpu_build.CpuKernel(_SOURCE, prefix="logits_rows_cpu", symbol="JaxinferRowLogsumexpCpu",
                                target="jaxinfer_row_logsumexp_cpu", what="CPU logits log-sum-exp kernel")


def buildable() -> bool:
    """Whether both targets are built, or not tried yet and a compiler exists (builds nothing)."""
    return ARGMAX.buildable() and LOGSUMEXP.buildable()


def available() -> bool:
    """Whether both targets are built and registered (building on the first call)."""
    return ARGMAX.available() and LOGSUMEXP.available()


def _call(kernel: cpu_build.CpuKernel, x: jax.Array, dtype) -> jax.Array:
    kernel.require()
    if x.ndim != 2 or x.shape[-1] == 0:
        raise ValueError(f"expected logits [S, V] with V > 0, got shape {x.shape}")
    call = jax.ffi.ffi_call(kernel.target, jax.ShapeDtypeStruct(x.shape[:1], dtype), vmap_method="sequential")
    return call(jnp.asarray(x, jnp.float32))


def row_argmax_cpu(x: jax.Array) -> jax.Array:
    """``i32[S]``: the first index of each row's largest value of ``x f32[S, V]`` (a NaN counts as the
    largest, as in ``jnp.argmax``).

    Raises:
      KernelUnavailableError: the kernel could not be built here.
      ValueError: ``x`` is not a non-empty matrix.
    """
    return _call(ARGMAX, x, jnp.int32)


def row_logsumexp_cpu(x: jax.Array) -> jax.Array:
    """``f32[S]``: ``jax.nn.logsumexp(x, axis=-1)`` of ``x f32[S, V]`` (same conventions for rows of -inf,
    +inf and NaN; float32 sums in another order).

    Raises:
      KernelUnavailableError: the kernel could not be built here.
      ValueError: ``x`` is not a non-empty matrix.
    """
    return _call(LOGSUMEXP, x, jnp.float32)
