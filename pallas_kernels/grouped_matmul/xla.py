"""XLA path of the grouped matmul: a loop over work items, one expert's weights dequantized per item.

For each computing work item (:mod:`.metadata`) the loop slices its M tile ``x[bm, K]`` and its expert's
weights ``w[g]`` (``[K, N]``, dense or a :class:`QArray` slice), computes ``x @ w[g]`` with the quantized
matmul's reference math (:func:`quantized_matmul_reference`: per-channel scales in the epilogue, group-wise
weights dequantized in float32, W8A8 with per-row activation scales; int4 as two half-K dots, see
:func:`~pallas_kernels.quantized_matmul.reference.int4_matmul`), and writes the item's
rows into a float32 output. Only one expert is dequantized at a time, and only the experts that have
rows are read: the loop runs ``num computing items`` times (a while loop with a traced trip count; the
shapes are fixed, so one compilation serves every routing). Padding rows stay zero.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.metadata import work_items
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.reference import compute_precision, int4_matmul, quantized_matmul_reference


def varying_like(x: jax.Array, *refs) -> jax.Array:
    """``x`` marked device-varying over every mesh axis any of ``refs`` varies over (under ``shard_map``).

    A loop carry that starts as a constant (unvarying) but is updated with varying values fails
    ``shard_map``'s varying-axes check; casting the initial value makes the carry's type match the body's.
    Outside ``shard_map`` (no varying axes) ``x`` is returned as is. ``jax.lax.pcast(..., to="varying")``
    on current jax, ``jax.lax.pvary`` on releases that have only that.
    """
    axes: set = set()
    for r in refs:
        axes |= _varying_axes(r)
    axes -= _varying_axes(x)
    if not axes:
        return x
    axes = tuple(sorted(axes))
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)  # pragma: no cover - older jax


def _varying_axes(x) -> set:
    """Mesh axes ``x`` varies over inside ``shard_map`` (``aval.manual_axis_type.varying`` on jax 0.10,
    ``aval.vma`` before it); empty outside."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return set(mat.varying)
    return set(getattr(aval, "vma", ()) or ())


def expert(rhs: jax.Array | QArray, g) -> jax.Array | QArray:
    """Weights ``[K, N]`` of expert ``g`` (traced index) from stacked ``[G, K, N]`` weights."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, g, 0, keepdims=False), rhs)


def _expert_matmul(x: jax.Array, w: jax.Array | QArray) -> jax.Array:
    """``x[bm, K] @ w[K, N]`` in float32."""
    if isinstance(w, QArray):
        if w.config.weight == "int4":
            return int4_matmul(x, w)
        return quantized_matmul_reference(x, w, jnp.float32)
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32, precision=compute_precision(x.dtype))


@functools.partial(jax.jit, static_argnames=("out_dtype", "bm"))
def grouped_matmul_xla(
    lhs: jax.Array, rhs: jax.Array | QArray, group_sizes: jax.Array, *, out_dtype, bm: int
) -> jax.Array:
    """``lhs[M, K]`` (rows sorted by group) times ``rhs[G, K, N]`` per group -> ``[M, N]`` in ``out_dtype``."""
    m, k = lhs.shape
    n = rhs.shape[-1]
    items = work_items(group_sizes, m, bm)
    mp = -(-m // bm) * bm
    x = jnp.pad(lhs, ((0, mp - m), (0, 0)))
    num_compute = jnp.sum(items.compute)  # computing items come first (padding rows are the last group)

    def body(i, out):
        t0 = items.tile[i] * bm
        y = _expert_matmul(jax.lax.dynamic_slice(x, (t0, 0), (bm, k)), expert(rhs, items.group[i]))
        rows = t0 + jnp.arange(bm)[:, None]
        keep = (rows >= items.lo[i]) & (rows < items.hi[i])
        old = jax.lax.dynamic_slice(out, (t0, 0), (bm, n))
        return jax.lax.dynamic_update_slice(out, jnp.where(keep, y, old), (t0, 0))

    init = varying_like(jnp.zeros((mp, n), jnp.float32), lhs, group_sizes, *jax.tree.leaves(rhs))
    out = jax.lax.fori_loop(0, num_compute, body, init)
    return out[:m].astype(out_dtype)
