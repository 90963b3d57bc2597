"""Ragged paged attention in pure jnp: the oracle for the kernels and the CPU production path.

Work is split into *work items* (a sequence and up to ``block_q`` of its query rows). Decode sequences
(one query row) get one-row items, short multi-token sequences (speculative verify rows, up to
``short_q`` tokens) one ``short_q``-row item each, and longer ones (prefill chunks) ``block_q``-row items,
so neither decode nor verify rows do much padded query work. Items are sorted by key range (longest
first) and processed a group at a time in an outer ``while`` loop that stops after the last real item;
each group runs a flash-style online-softmax loop over KV blocks gathered from the pages, up to the
longest key range in the group, so sorting keeps short sequences out of long sequences' groups.
Decode rows that share leading pages (a cached common prefix) are grouped (:mod:`.shared_prefix`):
their own pass starts after the shared keys, a second pass attends each group's rows to the shared
pages together, and the two are merged by log-sum-exp.
All shapes are static; lengths, ``num_seqs`` and trip counts are traced. Everything is computed in
float32 at ``HIGHEST`` matmul precision and cast to ``q.dtype`` at the end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.ragged_paged_attention import metadata, shared_prefix, tuning
from pallas_kernels.ragged_paged_attention.pages import FUSED_HALF, KVLayout, KVPages

_HIGHEST = lax.Precision.HIGHEST


def gather_kv_block(kv: KVPages, which: str, pages: jax.Array, head_dim: int) -> jax.Array:
    """Gather pages of K or V into float32 key rows (dequantized for a quantized cache).

    Args:
      kv: the cache (any layout).
      which: ``"k"`` or ``"v"``.
      pages: ``i32[N, nb]`` page ids.
      head_dim: logical head dim (head-major caches are lane-padded).

    Returns:
      f32 ``[N, nb * page_size, num_kv_heads, head_dim]``.
    """
    n, nb = pages.shape
    if kv.layout is KVLayout.HEAD_MAJOR_FUSED:  # K in lanes [0, 64), V in [64, 128)
        lo = 0 if which == "k" else FUSED_HALF
        blk = kv.k[pages][..., lo:lo + head_dim]
    else:
        blk = getattr(kv, which)[pages]
    scale = getattr(kv, which + "_scale")
    if scale is not None and kv.layout.head_major:  # rows of G pages [P / G, Hkv * G * ps] -> [N, nb, Hkv, ps]
        g, hkv, ps = kv.scale_pages_per_row, kv.num_kv_heads, kv.page_size
        rows = scale[pages // g].reshape(n, nb, hkv, g, ps)
        scale = jnp.take_along_axis(rows, (pages % g)[:, :, None, None, None], axis=3)[:, :, :, 0]
    elif scale is not None:
        scale = scale[pages]
    if kv.layout.head_major:
        # [N, nb, Hkv, ps, Dp] -> [N, nb, ps, Hkv, D]; scales [N, nb, Hkv, ps] -> [N, nb, ps, Hkv].
        blk = jnp.swapaxes(blk, 2, 3)[..., :head_dim]
        scale = None if scale is None else jnp.swapaxes(scale, 2, 3)
    rows = nb * blk.shape[2]
    blk = blk.reshape(n, rows, blk.shape[3], head_dim).astype(jnp.float32)
    if scale is not None:
        blk = blk * scale.reshape(n, rows, blk.shape[2], 1)
    return blk


def _attend_items(out, lse_out, q, kv: KVPages, page_indices, table, counts, *, block_q, num_items, group,
                  kv_pages_per_block, sm_scale, sliding_window, soft_cap, key_start=None, causal=True):
    """Attention for one class of work items; writes their rows into ``out`` (f32 ``[T, Hq, D]``) and
    the log-sum-exp of their scores into ``lse_out`` (f32 ``[T, Hq]``; ``None`` skips it).

    ``key_start`` (``i32[S]``, optional): sequence ``s`` attends only to keys ``>= key_start[s]``.
    ``causal=False``: every row of sequence ``s`` attends to all of its ``kv_len[s]`` keys (the prefix
    pass of :mod:`.shared_prefix`, whose rows all sit after the shared keys).
    """
    t, hq, d = q.shape
    hkv = kv.num_kv_heads
    g_heads = hq // hkv
    _, pps = page_indices.shape
    ps = kv.page_size
    nb = kv_pages_per_block
    bkv = nb * ps
    n_static = tuning.round_up(max(num_items, 1), group)
    items = metadata.work_items(table, counts, block_q, n_static)
    lo, hi = metadata.item_key_range(items, block_q, sliding_window)
    if not causal:
        hi = jnp.where(items.valid, table.kv_len[items.seq], 0)
    if key_start is not None:
        lo = jnp.where(items.valid, jnp.minimum(jnp.maximum(lo, key_start[items.seq]), hi), 0)
    blk_lo = lo // bkv
    n_blocks = jnp.where(items.valid, -(-hi // bkv) - blk_lo, 0)
    # Longest key ranges first: a group loops to its longest item, so grouping items of similar length
    # keeps short sequences from paying for long ones (invalid items, with no blocks, sort last).
    order = jnp.argsort(jnp.where(items.valid, -n_blocks, 1), stable=True)
    items = jax.tree.map(lambda a: a if a.ndim == 0 else a[order], items)
    blk_lo, n_blocks, lo = blk_lo[order], n_blocks[order], lo[order]

    def group_body(gi, carry):
        out, lse_out = carry

        def take(a):
            return lax.dynamic_slice_in_dim(a, gi * group, group)

        seq, tok0, tok_end, pos_off = take(items.seq), take(items.tok_start), take(items.tok_end), take(
            items.pos_offset)
        valid, first_blk, nblk, key_lo = take(items.valid), take(blk_lo), take(n_blocks), take(lo)
        kv_len = table.kv_len[seq]
        tok = tok0[:, None] + jnp.arange(block_q, dtype=jnp.int32)  # [n, bq]
        row_ok = valid[:, None] & (tok < tok_end[:, None])
        row_pos = tok + pos_off[:, None] if causal else jnp.broadcast_to(kv_len[:, None] - 1, tok.shape)
        pos = jnp.where(row_ok, row_pos, -1)
        qg = q[jnp.clip(tok, 0, t - 1)].astype(jnp.float32).reshape(group, block_q, hkv, g_heads, d)
        qg = qg * sm_scale  # scores are q.k * sm_scale; scaling q once is cheaper than every block

        def kv_body(r, carry):
            m, denom, acc = carry
            blk = first_blk + r
            page_slot = jnp.minimum(blk[:, None] * nb + jnp.arange(nb, dtype=jnp.int32), pps - 1)
            pages = page_indices[seq[:, None], page_slot]
            kpos = blk[:, None] * bkv + jnp.arange(bkv, dtype=jnp.int32)  # [n, bkv]
            key_ok = (kpos < kv_len[:, None])[:, :, None, None]
            # Scores of keys past kv_len are masked below; values are zeroed so that garbage (even NaN)
            # in unused page slots cannot leak through 0 * v.
            k = gather_kv_block(kv, "k", pages, d)
            v = jnp.where(key_ok, gather_kv_block(kv, "v", pages, d), 0.0)
            s = jnp.einsum("nqhgd,nkhd->nhgqk", qg, k, precision=_HIGHEST)
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            kp = kpos[:, None, None, None, :]
            rp = pos[:, None, None, :, None]
            mask = kp <= rp
            if key_start is not None:  # keys before the row's start were attended elsewhere
                mask &= kp >= key_lo[:, None, None, None, None]
            if sliding_window is not None:
                mask &= kp > rp - sliding_window
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            denom = alpha * denom + p.sum(axis=-1)
            acc = alpha[..., None] * acc + jnp.einsum("nhgqk,nkhd->nhgqd", p, v, precision=_HIGHEST)
            return m_new, denom, acc

        shape = (group, hkv, g_heads, block_q)
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros((*shape, d), jnp.float32))
        m, denom, acc = lax.fori_loop(0, jnp.max(nblk), kv_body, init)
        o = jnp.where(denom[..., None] > 0, acc / jnp.where(denom > 0, denom, 1.0)[..., None], 0.0)
        o = o.transpose(0, 3, 1, 2, 4).reshape(group, block_q, hq, d)
        rows = jnp.where(row_ok, tok, t)
        out = out.at[rows].set(o, mode="drop")
        if lse_out is None:
            return out, lse_out
        lse = jnp.where(denom > 0, m + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
        lse = lse.transpose(0, 3, 1, 2).reshape(group, block_q, hq)
        return out, lse_out.at[rows].set(lse, mode="drop")

    return lax.fori_loop(0, -(-items.n_items // group), group_body, (out, lse_out))


def _shared_prefix_pass(out, lse, q, kv, page_indices, groups, bs: tuning.XlaBlockSizes, common):
    """Attend each shared-prefix group's decode rows to the group's prefix pages together and merge the
    result into the per-sequence pass (``out`` / ``lse``, which skipped those keys)."""
    t, hq, d = q.shape
    s_max = page_indices.shape[0]
    qv = q[jnp.minimum(groups.rows, t - 1)]  # [S, Hq, D]: grouped rows, sorted by group
    bq = min(bs.shared_prefix_rows, s_max)
    counts = -(-groups.table.q_len // bq)
    n_items = -(-s_max // bq) + s_max // 2  # sum of ceil(members / bq) over groups of >= 2 members
    pout, plse = _attend_items(jnp.zeros((s_max, hq, d), jnp.float32), jnp.full((s_max, hq), -jnp.inf),
                               qv, kv, page_indices, groups.table, counts, block_q=bq, num_items=n_items,
                               group=min(bs.shared_prefix_group, n_items), causal=False, **common)
    return shared_prefix.merge(out, lse, groups.rows, pout, plse)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_sizes"))
def ragged_paged_attention_xla(
    q: jax.Array,
    kv: KVPages,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_sizes: tuning.XlaBlockSizes | None = None,
) -> jax.Array:
    """Pure-jnp ragged paged attention (arguments as in :func:`.api.ragged_paged_attention`).

    ``q [T, Hq, D]``, ``kv`` in any layout, ``kv_lens i32[S]``, ``page_indices i32[S, P]``,
    ``cu_q_lens i32[S+1]``, ``num_seqs i32[1]`` -> ``[T, Hq, D]`` in ``q.dtype``.
    """
    t, hq, d = q.shape
    s_max, pps = page_indices.shape
    bs = block_sizes or tuning.xla_block_sizes(t, s_max, kv.page_size, pps)
    table = metadata.seq_table(kv_lens, cu_q_lens, num_seqs)
    out = jnp.zeros((t, hq, d), jnp.float32)
    common = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  kv_pages_per_block=min(bs.kv_pages_per_block, pps))
    decode_counts = (table.q_len == 1).astype(jnp.int32)
    cascade = bs.shared_prefix_min_pages > 0 and sliding_window is None and s_max >= 2
    groups = None
    if cascade:
        groups = shared_prefix.find_groups(table, page_indices, kv.page_size, bs.shared_prefix_min_pages, t)
    lse = jnp.full((t, hq), -jnp.inf, jnp.float32) if cascade else None
    out, lse = _attend_items(out, lse, q, kv, page_indices, table, decode_counts, block_q=1,
                             num_items=min(s_max, t), group=min(bs.decode_group, s_max, t),
                             key_start=None if groups is None else groups.key_start, **common)
    if cascade:
        out = lax.cond(groups.num_rows > 0,
                       lambda o: _shared_prefix_pass(o, lse, q, kv, page_indices, groups, bs, common),
                       lambda o: o, out)
    if t >= 2:
        # multi-token sequences: short ones (verify rows) one short_q-row item each, long ones
        # (prefill chunks) in block_q-row items
        sq = max(2, min(bs.short_q, t))
        short = (table.q_len >= 2) & (table.q_len <= sq)
        n_short = min(s_max, t // 2)
        out, _ = _attend_items(out, None, q, kv, page_indices, table, short.astype(jnp.int32), block_q=sq,
                               num_items=n_short, group=min(bs.short_group, n_short), **common)
        if t > sq:
            bq = bs.block_q
            long_counts = jnp.where(table.q_len > sq, -(-table.q_len // bq), 0)
            n_long = -(-t // bq) + min(s_max, t // (sq + 1))
            out, _ = _attend_items(out, None, q, kv, page_indices, table, long_counts, block_q=bq,
                                   num_items=n_long, group=min(bs.prefill_group, n_long), **common)
    return out.astype(q.dtype)
