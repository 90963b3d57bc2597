"""Row argmax and log-sum-exp of ``f32[S, V]`` logits, by implementation: ``"xla"`` (jnp) or ``"cpu"``
(the C++ kernel, :mod:`.cpu`; falls back to ``"xla"`` when it cannot be built). Other implementation names
(the Pallas ones of the attention and matmul kernels) run the jnp path, which XLA compiles well on TPUs and
GPUs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.logits_rows import cpu


def _cpu(impl: str, x: jax.Array) -> bool:
    return impl == "cpu" and x.ndim == 2 and x.shape[-1] > 0 and cpu.available()


def row_argmax(x: jax.Array, impl: str = "xla") -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` as ``i32[...]``: the first index on ties; a NaN counts as the largest.

    The jnp path is a max followed by the smallest index holding it: XLA:CPU runs ``jnp.argmax``'s (value,
    index) reduction about 4x slower.
    """
    if _cpu(impl, x):
        return cpu.row_argmax_cpu(x)
    v = x.shape[-1]
    m = jnp.max(x, axis=-1, keepdims=True)
    nan = jnp.isnan(x)
    # a row with a NaN gives its first NaN (XLA:CPU's max does not always propagate NaN, so test for it)
    hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, x == m)
    if v <= 1 << 24:  # float32 holds every index exactly
        iota = jax.lax.broadcasted_iota(jnp.float32, x.shape, x.ndim - 1)
        return jnp.min(jnp.where(hit, iota, jnp.inf), axis=-1).astype(jnp.int32)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(hit, iota, v), axis=-1)


def row_logsumexp(x: jax.Array, impl: str = "xla") -> jax.Array:
    """``jax.nn.logsumexp(x, axis=-1)``."""
    if _cpu(impl, x):
        return cpu.row_logsumexp_cpu(x)
    return jax.nn.logsumexp(x, axis=-1)
