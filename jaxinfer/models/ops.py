"""``linear(x, w)``, ``embed(table, tokens)`` and ``unembed(x, table)``: the calls model code makes for
every projection and for the token embedding / tied LM head, quantized or not (dispatch on the type)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.models.qembedding import QEmbedding
from jaxinfer.sharding import ShardingPlan, logical_to_mesh_spec
from pallas_kernels.quantized_matmul.api import quantized_matmul
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.sharded import quantized_matmul_sharded

_PALLAS = ("pallas_tpu", "pallas_gpu")


def linear(x: jax.Array, w: jax.Array | QArray, bias: jax.Array | None = None, *, impl: str | None = None,
           interpret: bool | None = None, plan: ShardingPlan | None = None, axes: tuple[str, str] | None = None):
    """``x @ w (+ bias)``, dispatching on the weight's type.

    Args:
      x: ``[..., K]`` activations.
      w: ``[K, N]`` plain float array, or a :class:`QArray` of logical shape ``[K, N]`` (any format).
      bias: optional unquantized ``[N]``.
      impl: kernel implementation for QArray weights (``None``: backend default).
      interpret: run a Pallas kernel in interpret mode (``None``: the kernel decides).
      plan, axes: the sharding plan and the weight's logical axis names. A compiled Pallas kernel cannot be
        partitioned by XLA, so on a multi-device plan a QArray weight runs it once per shard
        (:func:`sharded_quantized_matmul`).

    Returns:
      ``[..., N]`` in ``x.dtype``.
    """
    if isinstance(w, QArray):
        if plan is not None and axes is not None and plan.tp > 1 and impl in _PALLAS and not interpret:
            y = sharded_quantized_matmul(x, w, plan, axes, impl=impl)
        else:
            y = quantized_matmul(x, w, impl=impl, interpret=interpret)
    else:
        if w.ndim != 2 or x.shape[-1] != w.shape[0]:
            raise ValueError(f"linear: x {x.shape} and w {w.shape} do not match as [..., K] @ [K, N]")
        # 16-bit inputs: ask for a float32 result, then round. Same numbers as a 16-bit-output dot, but on
        # the CPU this is the form XLA lowers to its bf16 matrix units (AMX / AVX512-BF16); a
        # bf16 -> bf16 dot there runs several times slower.
        acc = jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else None
        y = jnp.matmul(x, w.astype(x.dtype), preferred_element_type=acc).astype(x.dtype)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def sharded_quantized_matmul(x: jax.Array, w: QArray, plan: ShardingPlan, axes: tuple[str, str], *,
                             impl: str, interpret: bool | None = None) -> jax.Array:
    """``x[..., K] @ w`` with the quantized-matmul kernel run once per shard of ``plan``'s mesh
    (:func:`pallas_kernels.quantized_matmul.sharded.quantized_matmul_sharded`): the weight's logical
    ``axes`` ``(K-name, N-name)`` say, through the plan's rules, whether it is split along N (column
    parallel) or K (row parallel, partial products summed); unsplit weights run unsharded."""
    k_axis, n_axis = logical_to_mesh_spec(axes, plan.rules)
    if k_axis is None and n_axis is None:
        return quantized_matmul(x, w, impl=impl, interpret=interpret)
    split, axis = ("k", k_axis) if k_axis is not None else ("n", n_axis)
    y = quantized_matmul_sharded(x.reshape(-1, x.shape[-1]), w, plan.mesh, split=split, axis=axis, impl=impl,
                                 interpret=interpret)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def embed(table: jax.Array | QEmbedding, tokens: jax.Array, dtype=None) -> jax.Array:
    """Token embeddings ``[T, E]`` for ``tokens i32[T]`` from a float ``table[V, E]`` or a QEmbedding."""
    if isinstance(table, QEmbedding):
        return table.lookup(tokens, dtype)
    out = jnp.take(table, tokens, axis=0)
    return out if dtype is None else out.astype(dtype)


def unembed(x: jax.Array, table: jax.Array | QEmbedding, *, impl: str | None = None,
            interpret: bool | None = None) -> jax.Array:
    """Tied LM head ``x[..., E] @ table.T -> f32[..., V]`` (a QEmbedding's QArray is already ``[E, V]``).

    A float table is contracted over its last axis as stored: with a bf16 table, ``x @ table.T`` made
    XLA:CPU convert the whole table to float32 every step.
    """
    if isinstance(table, QEmbedding):
        return linear(x, table.table, impl=impl, interpret=interpret).astype(jnp.float32)
    if table.ndim != 2 or x.shape[-1] != table.shape[1]:
        raise ValueError(f"unembed: x {x.shape} and table {table.shape} do not match as [..., E] @ [V, E].T")
    return jax.lax.dot_general(x, table.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
