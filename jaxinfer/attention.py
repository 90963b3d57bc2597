"""Attention over a KV cache for a ragged batch, behind one interface for every cache type.

A step processes ``T`` tokens flattened over ``S`` sequences (any mix of prefill chunks and decode
tokens). :class:`AttentionMetadata` describes the mix; :func:`attention` writes the step's new K/V into
the cache and attends. The cache type picks the path:

* :class:`DenseKVCache`: one contiguous ``[max_len]`` buffer per sequence slot, plain jnp attention.
  Simple and independent of the paged machinery: the reference the paged path is tested against.
* :class:`~pallas_kernels.ragged_paged_attention.pages.KVPages`: the paged cache, written with ``write_kv``
  and read by ``ragged_paged_attention`` (XLA reference, Pallas TPU or Pallas GPU kernel, chosen by
  ``AttentionMetadata.impl``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.ragged_paged_attention.api import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.pages import KVPages, write_kv


@flax.struct.dataclass
class AttentionMetadata:
    """Description of one ragged step. Static shapes per compiled bucket.

    Attributes:
      cu_q_lens: ``i32[S+1]``; sequence s owns token rows ``cu_q_lens[s]:cu_q_lens[s+1]``.
      kv_lens: ``i32[S]``; keys of sequence s after this step (its new tokens included).
      num_seqs: ``i32[1]``; sequences ``>= num_seqs[0]`` are padding.
      slot_mapping: ``i32[T]``; cache slot each token's K/V is written to; negative = padding token.
        Paged: ``page_id * page_size + offset``. Dense: ``seq_slot * max_len + position``.
      page_indices: ``i32[S, pages_per_seq]`` page table (paged caches only).
      max_q_len: static bound on any sequence's query count in this step (dense path only).
      impl: static kernel choice for the paged path ("xla", "cpu", "pallas_tpu", "pallas_gpu"; None = backend
        default).
      interpret: static; run a Pallas kernel in interpret mode (None: the kernel decides).
    """

    cu_q_lens: jax.Array
    kv_lens: jax.Array
    num_seqs: jax.Array
    slot_mapping: jax.Array
    page_indices: jax.Array | None = None
    max_q_len: int = flax.struct.field(pytree_node=False, default=1)
    impl: str | None = flax.struct.field(pytree_node=False, default=None)
    interpret: bool | None = flax.struct.field(pytree_node=False, default=None)


class DenseKVCache(NamedTuple):
    """One layer's dense KV cache: ``k, v [num_slots, max_len, num_kv_heads, head_dim]``."""

    k: jax.Array
    v: jax.Array


def init_dense_cache(num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                     dtype) -> tuple[DenseKVCache, ...]:
    """Zero-filled dense caches for every layer."""
    shape = (num_slots, max_len, num_kv_heads, head_dim)
    return tuple(DenseKVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers))


def _write_dense(cache: DenseKVCache, k: jax.Array, v: jax.Array, slots: jax.Array) -> DenseKVCache:
    n, length, hkv, d = cache.k.shape
    flat = n * length
    idx = jnp.where(slots < 0, flat, slots)  # out of range -> dropped
    kf = cache.k.reshape(flat, hkv, d).at[idx].set(k.astype(cache.k.dtype), mode="drop")
    vf = cache.v.reshape(flat, hkv, d).at[idx].set(v.astype(cache.v.dtype), mode="drop")
    return DenseKVCache(kf.reshape(cache.k.shape), vf.reshape(cache.v.shape))


def dense_attention(q: jax.Array, cache: DenseKVCache, md: AttentionMetadata, *, sm_scale: float,
                    sliding_window: int | None = None) -> jax.Array:
    """Causal attention of the ragged queries against each sequence's dense cache row.

    Sequence slot s of the cache belongs to sequence s of the step. ``q[T, Hq, D]`` -> ``[T, Hq, D]``;
    padding rows give zeros.
    """
    t, hq, d = q.shape
    s, length, hkv, _ = cache.k.shape
    g = hq // hkv
    mq = md.max_q_len
    q_lens = md.cu_q_lens[1:] - md.cu_q_lens[:-1]
    offs = jnp.arange(mq)
    rows = md.cu_q_lens[:-1, None] + offs[None, :]  # [S, mq]
    valid = (offs[None, :] < q_lens[:, None]) & (jnp.arange(s) < md.num_seqs[0])[:, None]
    qg = q[jnp.clip(rows, 0, t - 1)].astype(jnp.float32).reshape(s, mq, hkv, g, d)
    q_pos = md.kv_lens[:, None] - q_lens[:, None] + offs[None, :]  # [S, mq]
    k_pos = jnp.arange(length)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [S, mq, L]
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    scores = jnp.einsum("sqhgd,skhd->shgqk", qg, cache.k.astype(jnp.float32)) * sm_scale
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(valid[:, None, None, :, None], probs, 0.0)  # fully masked rows -> 0, not NaN
    out = jnp.einsum("shgqk,skhd->sqhgd", probs, cache.v.astype(jnp.float32)).reshape(s, mq, hq, d)
    dest = jnp.where(valid, rows, t).reshape(-1)
    res = jnp.zeros((t, hq, d), jnp.float32).at[dest].set(out.reshape(-1, hq, d), mode="drop")
    return res.astype(q.dtype)


def _paged(q, k, v, cache: KVPages, md: AttentionMetadata, *, sm_scale, sliding_window):
    cache = write_kv(cache, k, v, md.slot_mapping, impl=md.impl, interpret=md.interpret)
    out = ragged_paged_attention(q, cache, md.kv_lens, md.page_indices, md.cu_q_lens, md.num_seqs,
                                 sm_scale=sm_scale, sliding_window=sliding_window, impl=md.impl,
                                 interpret=md.interpret)
    return out, cache


def kv_pages_specs(cache: KVPages, axis: str | None = "model") -> KVPages:
    """``PartitionSpec`` of each ``KVPages`` leaf with the KV-head dimension split over ``axis``."""
    if cache.layout.head_major:
        values, scales = P(None, axis, None, None), P(None, axis)  # scale rows: heads-major lanes
    else:
        values, scales = P(None, None, axis, None), P(None, None, axis)
    scales = scales if cache.quantized else None
    return KVPages(values, None if cache.v is None else values, scales, scales, layout=cache.layout)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, cache, md: AttentionMetadata, *, sm_scale: float,
              sliding_window: int | None = None, mesh=None):
    """Write this step's K/V and attend.

    Args:
      q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]`` (RoPE already applied).
      cache: one layer's cache (``DenseKVCache`` or paged ``KVPages``).
      mesh: when given, the heads (of q, k, v and the paged cache) are split over its "model" axis and
        the paged attention kernel runs once per shard (``shard_map``) on its local heads.
    Returns:
      ``(out[T, Hq, D], new_cache)``.
    """
    if isinstance(cache, KVPages):
        fn = functools.partial(_paged, sm_scale=sm_scale, sliding_window=sliding_window)
        if mesh is None:
            return fn(q, k, v, cache, md)
        heads = P(None, "model", None)
        cache_spec = kv_pages_specs(cache)
        md_spec = jax.tree.map(lambda _: P(), md)
        sharded = jax.shard_map(fn, mesh=mesh, in_specs=(heads, heads, heads, cache_spec, md_spec),
                                out_specs=(heads, cache_spec), check_vma=False)
        return sharded(q, k, v, cache, md)
    if isinstance(cache, DenseKVCache):
        cache = _write_dense(cache, k, v, md.slot_mapping)
        return dense_attention(q, cache, md, sm_scale=sm_scale, sliding_window=sliding_window), cache
    raise TypeError(f"unsupported KV cache type {type(cache).__name__}")
