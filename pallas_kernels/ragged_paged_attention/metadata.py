"""Traced-metadata helpers shared by the XLA path and the GPU kernel wrapper (pure jnp, jittable).

A *work item* is a (sequence, chunk of up to ``block_q`` query rows) pair. Items are listed densely:
the first ``n_items`` entries of the static-length tables are real, in sequence order.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SeqTable(NamedTuple):
    """Per-sequence metadata with garbage entries (``s >= num_seqs``) neutralised. All ``i32[S]``."""

    q_start: jax.Array  # first query row
    q_len: jax.Array  # query rows (0 for s >= num_seqs)
    kv_len: jax.Array  # keys including this step's (0 for s >= num_seqs)


def seq_table(kv_lens: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array) -> SeqTable:
    """Per-sequence table from ``kv_lens i32[S]``, ``cu_q_lens i32[S+1]``, ``num_seqs i32[1]``."""
    s = kv_lens.shape[0]
    n = jnp.clip(num_seqs[0], 0, s)
    real = jnp.arange(s, dtype=jnp.int32) < n
    q_start = jnp.where(real, cu_q_lens[:-1], 0)
    q_len = jnp.where(real, jnp.maximum(cu_q_lens[1:] - cu_q_lens[:-1], 0), 0)
    kv_len = jnp.where(real, kv_lens, 0)
    return SeqTable(q_start.astype(jnp.int32), q_len.astype(jnp.int32), kv_len.astype(jnp.int32))


class WorkItems(NamedTuple):
    """Static-length table of work items; entries ``>= n_items`` have ``valid == False``."""

    seq: jax.Array  # i32[N] sequence of the item (clamped into range for invalid items)
    tok_start: jax.Array  # i32[N] first query row (global token index)
    tok_end: jax.Array  # i32[N] one past the sequence's last query row (rows >= this are not the item's)
    pos_offset: jax.Array  # i32[N] key position of row t is t + pos_offset
    valid: jax.Array  # bool[N]
    n_items: jax.Array  # i32[] number of real items


def work_items(table: SeqTable, counts: jax.Array, block_q: int, num_items: int) -> WorkItems:
    """List ``counts[s]`` items of ``block_q`` rows for each sequence ``s``, densely, in order.

    Args:
      table: from :func:`seq_table`.
      counts: ``i32[S]`` items per sequence (e.g. ``cdiv(q_len, block_q)``, or 0 to skip it).
      block_q: query rows per item.
      num_items: static table length (an upper bound of ``sum(counts)``).
    """
    ends = jnp.cumsum(counts)
    n_items = ends[-1] if counts.shape[0] else jnp.int32(0)
    idx = jnp.arange(num_items, dtype=jnp.int32)
    seq = jnp.searchsorted(ends, idx, side="right", method="compare_all").astype(jnp.int32)
    seq = jnp.minimum(seq, counts.shape[0] - 1)
    within = idx - (ends[seq] - counts[seq])
    valid = idx < n_items
    q_start = table.q_start[seq]
    tok_start = q_start + within * block_q
    tok_end = q_start + table.q_len[seq]
    pos_offset = table.kv_len[seq] - table.q_len[seq] - q_start
    return WorkItems(seq, tok_start, tok_end, pos_offset, valid, n_items.astype(jnp.int32))


def item_key_range(items: WorkItems, block_q: int, sliding_window: int | None):
    """Key positions ``[lo, hi)`` an item's rows can attend to (``hi = lo = 0`` for invalid items)."""
    last_tok = jnp.minimum(items.tok_start + block_q, items.tok_end) - 1
    hi = jnp.maximum(last_tok + items.pos_offset + 1, 0)
    if sliding_window is None:
        lo = jnp.zeros_like(hi)
    else:
        lo = jnp.maximum(items.tok_start + items.pos_offset - sliding_window + 1, 0)
    hi = jnp.where(items.valid, hi, 0)
    lo = jnp.where(items.valid, jnp.minimum(lo, hi), 0)
    return lo, hi
