"""The draft model's cache geometry and its sampling (the draft step itself is the runner's).

The draft cache has the target's page count, page size, layout and storage dtype, with the draft model's
layers and heads, so the one block manager (and every block table) serves both caches: a page id names
the same token slots in each. Rolling the target back (``num_computed_tokens`` / ``BlockManager.truncate``)
rolls the draft back too; the decoder tracks how far the draft's K/V is valid per sequence.

A draft step runs the draft model over a ragged batch (prefill chunks mirrored from the target, catch-up
tokens, one draft token per speculating sequence), samples one token per row with the row's sampling
settings from the draft's own noise stream, and stores the warped draft distribution ``q`` of each
proposed token in a device buffer ``f32[num_slots * K, V]`` (row ``slot * K + j`` for draft ``j``) that the
verify step reads; the buffer never leaves the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.kv_cache import KV_CACHE_DTYPES, KVCacheSpec
from jaxinfer.sampling import SamplingTensors, process_logits, warp_logits
from jaxinfer.speculative.rejection import DRAFT_STREAM, stream_gumbel
from pallas_kernels.ragged_paged_attention.pages import default_layout


def probs_rows(slots_js, k: int, num_rows: int, size: int) -> np.ndarray:
    """Where a draft step stores the draft distributions of its logits rows: ``i32[size]``, row ``n`` is
    ``slot * k + j`` for the ``n``-th ``(slot, j)`` of ``slots_js``, and ``num_rows`` (out of the buffer's
    range: not stored) where ``j`` is ``None`` and for the padding rows past ``slots_js``."""
    out = np.full(size, num_rows, np.int32)
    for n, (slot, j) in enumerate(slots_js):
        if j is not None:
            out[n] = slot * k + j
    return out


def draft_kv_spec(draft_config, target_spec: KVCacheSpec) -> KVCacheSpec:
    """The draft cache geometry: the target's pages with the draft model's layers and heads."""
    return KVCacheSpec(draft_config.num_layers, target_spec.num_pages, target_spec.page_size,
                       draft_config.num_kv_heads, draft_config.head_dim, target_spec.dtype,
                       target_spec.quant_dtype, target_spec.layout)


def draft_bytes_per_token(draft_config, page_size: int, dtype, kv_cache_dtype: str, impl: str | None) -> int:
    """Cache bytes per token of the draft model (to share the KV memory budget with the target)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    spec = KVCacheSpec(draft_config.num_layers, 1, page_size, draft_config.num_kv_heads, draft_config.head_dim,
                       jnp.dtype(dtype), KV_CACHE_DTYPES[kv_cache_dtype], default_layout(impl))
    return spec.bytes_per_token


def fit_vocab(logits: jax.Array, vocab: int) -> jax.Array:
    """Draft logits ``[S, Vd]`` on the target's vocabulary ``[S, vocab]`` (extra ids dropped, missing
    ids impossible)."""
    vd = logits.shape[-1]
    if vd >= vocab:
        return logits[:, :vocab]
    return jnp.pad(logits, ((0, 0), (0, vocab - vd)), constant_values=-jnp.inf)


def draft_sample(logits: jax.Array, st: SamplingTensors) -> tuple[jax.Array, jax.Array]:
    """One draft token per row and the distribution it was drawn from.

    Args:
      logits: ``f32[S, V]`` draft logits on the target vocabulary.
      st: the rows' sampling settings (``step`` = output index being drafted); penalties never apply
        (requests with penalties do not speculate).
    Returns:
      ``(tokens i32[S], q f32[S, V])``: greedy rows take the argmax (``q`` unused, zeros); sampled rows
      draw from ``q = softmax(warp(logits))`` with the draft noise stream.
    """
    x = process_logits(logits, st, None)
    greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)
    is_greedy = st.temperature <= 0
    v = logits.shape[-1]

    def sampled():
        y = warp_logits(x, st)
        drawn = jnp.argmax(y + stream_gumbel(st, DRAFT_STREAM, v), axis=-1).astype(jnp.int32)
        return jnp.where(is_greedy, greedy, drawn), jax.nn.softmax(y, axis=-1)

    return jax.lax.cond(jnp.all(is_greedy), lambda: (greedy, jnp.zeros_like(x)), sampled)
