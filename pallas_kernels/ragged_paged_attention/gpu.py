"""Ragged paged attention as a Pallas GPU kernel in the Triton dialect.

Cache layout: token-major ``[num_pages, page_size, num_kv_heads, head_dim]``, viewed (for free) as
key rows ``[num_pages * page_size, num_kv_heads, head_dim]``.

Work decomposition. The wrapper lists *work items* (a sequence and up to ``block_q`` of its query
rows, :mod:`.metadata`) in a static-length table; the grid is ``(items, num_kv_heads, num_splits)``
and programs of unused table entries return at once. Queries are laid out per KV head as
``[Hkv, T' * Gp, D]`` with the GQA group padded to ``Gp = next_power_of_2(G)`` (row ``t * Gp + g``),
so an item's queries are one contiguous ``[block_q * Gp, D]`` tile and every ``tl.dot`` has
power-of-two shapes. A program loops over the item's KV blocks (causal end, sliding-window start)
with an online softmax; each step gathers ``block_kv`` key / value rows through the page table
(masked loads skip positions past ``kv_len``). With ``num_splits > 1`` (flash-decoding) the KV range
is cut into splits whose partial results (``o``, ``m``, ``l``) are merged by the wrapper.

Quantized caches (int8 / fp8, f32 scales ``[num_pages, page_size, Hkv]``): tiles are converted to the
query dtype for ``tl.dot``; key scales multiply score columns and value scales probability columns.

Triton needs power-of-two tile sizes: ``head_dim`` must be a power of two (>= 16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ragged_paged_attention import metadata, tuning
from pallas_kernels.ragged_paged_attention.pages import KVLayout, KVPages


def _kernel(
    item_seq_ref,  # i32[N]; -1 for unused entries
    item_tok_ref,  # i32[N] first query row
    item_end_ref,  # i32[N] one past the sequence's last query row
    item_off_ref,  # i32[N] key position of row t is t + off
    item_kvlen_ref,  # i32[N]
    item_blo_ref,  # i32[N] first KV block
    item_bhi_ref,  # i32[N] one past the last KV block
    pages_ref,  # i32[S, pages_per_seq]
    q_ref,  # [Hkv, T' * Gp, D]
    k_ref,  # [num_pages * page_size, Hkv, D]
    v_ref,
    *refs,  # (k_scale, v_scale f32[num_pages * page_size, Hkv] if quantized), out, (m, l if split)
    quantized: bool,
    block_q: int,
    group_p2: int,
    block_kv: int,
    page_size: int,
    pages_per_seq: int,
    num_splits: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    if quantized:
        ks_ref, vs_ref, *refs = refs
    o_ref, *stat_refs = refs  # o: [Hkv, T' * Gp, D] (one split) or f32[splits, Hkv, T' * Gp, D]
    i, h = pl.program_id(0), pl.program_id(1)
    sp = pl.program_id(2) if num_splits > 1 else 0
    seq = item_seq_ref[i]
    rows = block_q * group_p2
    d = q_ref.shape[-1]

    @pl.when(seq >= 0)
    def _():
        tok0, tok_end, off, kv_len = item_tok_ref[i], item_end_ref[i], item_off_ref[i], item_kvlen_ref[i]
        blo, bhi = item_blo_ref[i], item_bhi_ref[i]
        if num_splits > 1:
            per = lax.div(bhi - blo + num_splits - 1, num_splits)
            blo, bhi = blo + sp * per, jnp.minimum(bhi, blo + (sp + 1) * per)
        r = jnp.arange(rows, dtype=jnp.int32)
        tok = tok0 + lax.div(r, group_p2)
        row_ok = tok < tok_end
        row_pos = jnp.where(row_ok, tok + off, -1)
        row_slice = pl.ds(tok0 * group_p2, rows)
        q = q_ref[h, row_slice, :]
        dims = jnp.arange(d, dtype=jnp.int32)

        def body(j, carry):
            acc, m, denom = carry
            kpos = j * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
            key_ok = kpos < kv_len
            slot = jnp.minimum(lax.div(kpos, page_size), pages_per_seq - 1)
            key_rows = pages_ref[seq, slot] * page_size + lax.rem(kpos, page_size)
            # Index every axis with (broadcasting) arrays: a pure gather, which both the Triton
            # lowering and the interpreter accept.
            gather = (key_rows[:, None], h, dims[None, :])
            if quantized:  # tiles go to tl.dot in the query dtype; scales hit score / prob columns
                # (no `other`: Triton cannot splat a fill value into fp8; zero after converting).
                k = plgpu.load(k_ref.at[gather], mask=key_ok[:, None])
                v = plgpu.load(v_ref.at[gather], mask=key_ok[:, None])
                k = jnp.where(key_ok[:, None], k.astype(q.dtype), 0.0)
                v = jnp.where(key_ok[:, None], v.astype(q.dtype), 0.0)
                k_sc = plgpu.load(ks_ref.at[key_rows, h], mask=key_ok, other=0.0)
                v_sc = plgpu.load(vs_ref.at[key_rows, h], mask=key_ok, other=0.0)
            else:
                k = plgpu.load(k_ref.at[gather], mask=key_ok[:, None], other=0.0)
                v = plgpu.load(v_ref.at[gather], mask=key_ok[:, None], other=0.0)
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            if quantized:
                s = s * k_sc[None, :]
            s = s * sm_scale
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            mask = kpos[None, :] <= row_pos[:, None]
            if sliding_window is not None:
                mask = mask & (kpos[None, :] > row_pos[:, None] - sliding_window)
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[:, None])
            alpha = jnp.exp(m - m_safe)
            denom = alpha * denom + jnp.sum(p, axis=1)
            if quantized:
                p = p * v_sc[None, :]
            pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
            return alpha[:, None] * acc + pv, m_new, denom

        init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
                jnp.zeros((rows,), jnp.float32))
        acc, m, denom = lax.fori_loop(blo, bhi, body, init)
        o = acc / jnp.where(denom > 0, denom, 1.0)[:, None]
        if num_splits == 1:
            plgpu.store(o_ref.at[h, row_slice, :], o.astype(o_ref.dtype), mask=row_ok[:, None])
        else:
            m_ref, l_ref = stat_refs
            plgpu.store(o_ref.at[sp, h, row_slice, :], o, mask=row_ok[:, None])
            plgpu.store(m_ref.at[sp, h, row_slice], m, mask=row_ok)
            plgpu.store(l_ref.at[sp, h, row_slice], denom, mask=row_ok)


def _merge_splits(o, m, denom):
    """Merge per-split normalised outputs ``o [splits, ...rows, D]`` with their ``m``, ``l`` statistics."""
    m_max = jnp.max(m, axis=0)
    m_safe = jnp.where(m_max == -jnp.inf, 0.0, m_max)
    w = denom * jnp.exp(m - m_safe)
    total = jnp.sum(w, axis=0)
    return jnp.sum(w[..., None] * o, axis=0) / jnp.where(total > 0, total, 1.0)[..., None]


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "interpret", "block_sizes"))
def ragged_paged_attention_gpu(
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
    interpret: bool = False,
    block_sizes: tuning.GpuBlockSizes | None = None,
) -> jax.Array:
    """Pallas GPU (Triton) ragged paged attention (arguments as in :func:`.api.ragged_paged_attention`).

    ``q [T, Hq, D]``; ``kv`` token-major ``[P, ps, Hkv, D]``; ``kv_lens i32[S]``;
    ``page_indices i32[S, pages_per_seq]``; ``cu_q_lens i32[S+1]``; ``num_seqs i32[1]`` ->
    ``[T, Hq, D]`` in ``q.dtype``.
    """
    if kv.layout is not KVLayout.TOKEN_MAJOR:
        raise ValueError("the Pallas GPU kernel needs a token-major KV cache")
    t, hq, d = q.shape
    num_pages, ps, hkv, _ = kv.k.shape
    s_max, pps = page_indices.shape
    if d < 16 or d & (d - 1):
        raise ValueError(f"the Pallas GPU kernel needs a power-of-two head_dim >= 16, got {d}")
    group = hq // hkv
    gp = tuning.next_power_of_2(group)
    bs = block_sizes or tuning.gpu_block_sizes(t, s_max, hq, hkv, d, ps, pps)
    bq, bkv, splits = bs.block_q, bs.block_kv, bs.num_splits
    rows = bq * gp
    if rows < 16 or rows & (rows - 1) or bkv < 16 or bkv & (bkv - 1):
        raise ValueError(f"block_q * next_power_of_2(G) ({rows}) and block_kv ({bkv}) must be powers "
                         "of two >= 16")
    tq = t + bq  # room for the last item's full row tile

    qp = jnp.pad(q.reshape(t, hkv, group, d), ((0, tq - t), (0, 0), (0, gp - group), (0, 0)))
    qp = qp.transpose(1, 0, 2, 3).reshape(hkv, tq * gp, d)
    table = metadata.seq_table(kv_lens, cu_q_lens, num_seqs)
    counts = -(-table.q_len // bq)
    n_items = -(-t // bq) + min(s_max, t)
    items = metadata.work_items(table, counts, bq, n_items)
    lo, hi = metadata.item_key_range(items, bq, sliding_window)
    blk_lo = lo // bkv
    blk_hi = jnp.where(items.valid, -(-hi // bkv), blk_lo)
    item_args = (jnp.where(items.valid, items.seq, -1), items.tok_start, items.tok_end, items.pos_offset,
                 table.kv_len[items.seq], blk_lo, blk_hi)

    caches = [kv.k.reshape(num_pages * ps, hkv, d), kv.v.reshape(num_pages * ps, hkv, d)]
    if kv.quantized:
        caches += [kv.k_scale.reshape(num_pages * ps, hkv), kv.v_scale.reshape(num_pages * ps, hkv)]
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((hkv, tq * gp, d), q.dtype)
    else:
        out_shape = (jax.ShapeDtypeStruct((splits, hkv, tq * gp, d), jnp.float32),
                     jax.ShapeDtypeStruct((splits, hkv, tq * gp), jnp.float32),
                     jax.ShapeDtypeStruct((splits, hkv, tq * gp), jnp.float32))
    kernel = functools.partial(
        _kernel, quantized=kv.quantized, block_q=bq, group_p2=gp, block_kv=bkv, page_size=ps,
        pages_per_seq=pps, num_splits=splits, sm_scale=sm_scale, sliding_window=sliding_window,
        soft_cap=soft_cap)
    res = pl.pallas_call(
        kernel,
        grid=(n_items, hkv, splits) if splits > 1 else (n_items, hkv),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="ragged_paged_attention_gpu",
    )(*item_args, page_indices.astype(jnp.int32), qp, *caches)
    out = res if splits == 1 else _merge_splits(*res)
    out = out.reshape(hkv, tq, gp, d).transpose(1, 0, 2, 3)[:t, :, :group].reshape(t, hq, d)
    row_valid = jnp.arange(t) < cu_q_lens[jnp.clip(num_seqs[0], 0, s_max)]
    return jnp.where(row_valid[:, None, None], out, 0).astype(q.dtype)
