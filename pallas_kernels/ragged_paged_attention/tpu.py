"""Ragged paged attention as a Pallas TPU (Mosaic) kernel.

Cache layout: head-major pages ``[num_pages, num_kv_heads, page_size, Dp]`` with ``Dp`` a multiple of 128
(see :mod:`.pages` for why). One DMA per page and K/V moves all heads; each (page, head) is a dense
``[page_size, Dp]`` tile. Fused pages (``head_dim <= 64``) are one array of the same shape with
``Dp = 128``, K in lanes 0-63 and V in lanes 64-127: one DMA per page moves both, the scores are
``q . tile`` with ``q`` zero past lane 64 (so only K lanes count), the output is ``p . tile`` whose lanes
64-127 are ``p . V`` (lanes 0-63, ``p . K``, are dropped by the wrapper). Same MXU work as a
head-major 64-wide head padded to 128, half the HBM and VMEM bytes.

Work decomposition. The flattened token axis is cut into blocks of ``block_q`` tokens; grid step ``b``
owns block ``b``. Queries are laid out per KV head as ``[Hkv, T * G, Dp]`` (row ``t * G + g`` is
token ``t``, query head ``h * G + g``), so a block is one ``[Hkv, block_q * G, Dp]`` VMEM tile and every
matmul is a plain 2D ``[block_q * G, Dp] x [Dp, block_kv]``. A grid step walks the sequences that
intersect its block (``seq_lo[b] .. seq_hi[b]``, scalar-prefetched) and, per sequence, the KV blocks its
rows can see (causal end, sliding-window start), as one flat loop over (sequence, KV block) pairs. Rows
of the block that belong to other sequences are masked out (their position is -1), so state never
needs resetting between sequences; padding rows stay at zero.

Memory. K/V stay in HBM (``pl.ANY``, pinned to HBM when compiled). KV blocks of ``kv_pages_per_block``
pages are copied with ``pltpu.make_async_copy`` into a 2-slot VMEM buffer: while one (sequence, KV
block) is computed, the next one (possibly the next sequence's first block) is already in flight. Pages
past a sequence's ``kv_len`` are not fetched (their slots are masked). Online-softmax state (``m``,
``l`` lane-replicated to 128, ``acc`` in f32) lives in VMEM scratch for all KV heads; the output block
is written once per grid step. Grid steps are independent (all DMAs are waited within a step), so the
grid dimension is ``PARALLEL`` (megacore-shardable).

Quantized caches (int8 / fp8 with f32 scale rows ``[P / G, Hkv * G * ps]`` of ``G`` pages, see
:mod:`.pages`): the row holding a page's scales is DMA'd next to its value pages (whole: a DMA moves
512-byte words) and, when ``G > 1``, rotated in VMEM so that the page's scales of head ``h`` start at lane
``h * G * ps``; tiles go to the MXU in the query dtype and the scales multiply score / probability
columns.

Mosaic constraints as far as they can be checked off-TPU (the jax-side lowering to the Mosaic dialect
is tested; Mosaic's own layout passes only run on a TPU): ``block_q * G`` rows are a multiple of 16
(bf16 sublane tile), ``Dp`` a multiple of 128, page windows in the KV buffers start at multiples of
``page_size`` sublanes, so ``page_size >= 16`` keeps bf16 page DMAs tile-aligned (8 is enough for
f32). A head's scales are read at lane offsets that are multiples of ``page_size``.

Metadata in SMEM: ``kv_lens [S]``, ``page_indices`` flattened to ``[S * pages_per_seq]``, ``cu_q_lens``
cleaned past ``num_seqs``, ``seq_lo / seq_hi [num_q_blocks]``. Very large ``S * pages_per_seq`` may
exceed SMEM; chunk the batch in that case.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention import tpu_scales, tuning
from pallas_kernels.ragged_paged_attention.pages import KVLayout, KVPages

LANES = 128


def _lanes(x: jax.Array, n: int) -> jax.Array:
    """Lane-replicated ``[rows, 128]`` -> ``[rows, n]``."""
    if n == LANES:
        return x
    if n % LANES == 0:
        return jnp.concatenate([x] * (n // LANES), axis=1)
    return x[:, :n]


def _precision(dtype) -> lax.Precision:
    """Explicit dot precision (HIGHEST for f32, else DEFAULT): with ``None`` a global
    ``jax_default_matmul_precision="highest"`` makes Mosaic refuse bf16 dots ("Bad lhs type")."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _scale_row(buf, slot, h, ps, group):
    """Scales of head ``h`` for the KV block in ``slot``: ``[nb, Hkv * G * ps]`` -> ``[1, nb * ps]`` (each
    page's row already rotated so that its page's scales start at lane ``h * G * ps``)."""
    nb = buf.shape[1]
    return buf[slot, :, pl.ds(h * group * ps, ps)].reshape(1, nb * ps)


def _kernel(
    # Scalar prefetch (SMEM).
    kv_lens_ref,  # i32[S]
    pages_ref,  # i32[S * pages_per_seq]
    cu_ref,  # i32[S + 1], constant past num_seqs
    seq_lo_ref,  # i32[num_q_blocks]
    seq_hi_ref,  # i32[num_q_blocks]
    # Inputs.
    q_ref,  # [Hkv, R, Dp] VMEM block, R = block_q * G
    *refs,
    quantized: bool,
    fused: bool,
    scale_group: int,
    block_q: int,
    group: int,
    pages_per_block: int,
    page_size: int,
    pages_per_seq: int,
    max_seqs: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    # refs: k_hbm, v_hbm [P, Hkv, ps, Dp] (HBM; no v_hbm when fused); (ks_hbm, vs_hbm f32[P / G, Hkv * G * ps]
    # if quantized, G = scale_group pages per row); o_ref [Hkv, R, Dp]; scratch: k_buf, v_buf [2, Hkv, bkv, Dp]
    # (no v_buf when fused); (ks_buf, vs_buf f32[2, nb, Hkv * G * ps]);
    # sems DMA[2 or 4, 2 slots]; m_ref, l_ref f32[Hkv, R, 128]; acc_ref f32[Hkv, R, Dp].
    # A fused cache has no separate V array: V is read from the K tile (its upper lanes).
    refs = list(refs)
    k_hbm = refs.pop(0)
    v_hbm = None if fused else refs.pop(0)
    ks_hbm, vs_hbm = (refs.pop(0), refs.pop(0)) if quantized else (None, None)
    o_ref, k_buf = refs.pop(0), refs.pop(0)
    v_buf = k_buf if fused else refs.pop(0)
    ks_buf, vs_buf = (refs.pop(0), refs.pop(0)) if quantized else (None, None)
    sems, m_ref, l_ref, acc_ref = refs
    hkv, rows, dp = q_ref.shape
    nb, ps = pages_per_block, page_size
    bkv = nb * ps
    b = pl.program_id(0)
    blk_start = b * block_q
    blk_end = blk_start + block_q
    seq_hi = seq_hi_ref[b]

    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def seq_info(s):
        q_start, q_end, kv_len = cu_ref[s], cu_ref[s + 1], kv_lens_ref[s]
        pos_offset = kv_len - (q_end - q_start) - q_start  # key position of token t is t + pos_offset
        return q_start, q_end, kv_len, pos_offset

    def kv_block_range(s):
        """KV blocks [first, end) that rows of sequence ``s`` inside this q block can attend to."""
        q_start, q_end, _, off = seq_info(s)
        lo_tok = jnp.maximum(q_start, blk_start)
        hi_tok = jnp.minimum(q_end, blk_end)
        key_hi = jnp.maximum(hi_tok + off, 0)
        if sliding_window is None:
            key_lo = jnp.int32(0)
        else:
            key_lo = jnp.maximum(lo_tok + off - sliding_window + 1, 0)
        first = lax.div(key_lo, bkv)
        end = jnp.where(hi_tok > lo_tok, lax.div(key_hi + bkv - 1, bkv), first)
        return first, end

    def page_id(s, j, i):
        return pages_ref[s * pages_per_seq + jnp.minimum(j * nb + i, pages_per_seq - 1)]

    def page_copies(s, j, slot):
        kv_len = kv_lens_ref[s]
        n_pages = lax.div(kv_len + ps - 1, ps)
        out = []
        for i in range(nb):
            p = j * nb + i
            page = page_id(s, j, i)
            dst = pl.ds(i * ps, ps)
            copies = [pltpu.make_async_copy(k_hbm.at[page], k_buf.at[slot, :, dst, :], sems.at[0, slot])]
            if not fused:
                copies.append(pltpu.make_async_copy(v_hbm.at[page], v_buf.at[slot, :, dst, :], sems.at[1, slot]))
            if quantized:
                # the [1, Hkv * G * ps] scale row holding the page (a whole row: a DMA moves 512-byte words)
                row, brow = pl.ds(lax.div(page, scale_group), 1), pl.ds(i, 1)
                copies += [
                    pltpu.make_async_copy(ks_hbm.at[row], ks_buf.at[slot, brow], sems.at[2, slot]),
                    pltpu.make_async_copy(vs_hbm.at[row], vs_buf.at[slot, brow], sems.at[3, slot]),
                ]
            out.append((p < n_pages, copies))
        return out

    def start_fetch(s, j, slot):
        for needed, copies in page_copies(s, j, slot):
            @pl.when(needed)
            def _(copies=copies):
                for c in copies:
                    c.start()

    def wait_fetch(s, j, slot):
        for needed, copies in page_copies(s, j, slot):
            @pl.when(needed)
            def _(copies=copies):
                for c in copies:
                    c.wait()

    def align_scales(s, j, slot):
        """Rotate each fetched row so that its page's scales of head h start at lane h * G * ps."""
        width = ks_buf.shape[2]
        for i in range(nb):
            shift = lax.rem(width - lax.rem(page_id(s, j, i), scale_group) * ps, width)
            for buf in (ks_buf, vs_buf):
                buf[slot, pl.ds(i, 1), :] = pltpu.roll(buf[slot, pl.ds(i, 1), :], shift, 1)

    def compute(s, j, slot):
        q_start, q_end, kv_len, off = seq_info(s)
        if quantized and scale_group > 1:
            align_scales(s, j, slot)
        tok = blk_start + lax.div(lax.broadcasted_iota(jnp.int32, (rows, bkv), 0), group)
        in_seq = (tok >= q_start) & (tok < q_end)
        row_pos = jnp.where(in_seq, tok + off, -1)
        key_pos = j * bkv + lax.broadcasted_iota(jnp.int32, (rows, bkv), 1)
        mask = key_pos <= row_pos
        if sliding_window is not None:
            mask = mask & (key_pos > row_pos - sliding_window)
        key_ok = (j * bkv + lax.broadcasted_iota(jnp.int32, (bkv, dp), 0)) < kv_len
        key_ok_row = (j * bkv + lax.broadcasted_iota(jnp.int32, (1, bkv), 1)) < kv_len
        # Quantized tiles are converted to the query dtype for the MXU; their scales multiply the
        # score columns (K) and the probability columns (V) instead of the tiles.
        mxu_dtype = q_ref.dtype if quantized else v_buf.dtype
        for h in range(hkv):
            q = q_ref[h]
            k = k_buf[slot, h].astype(q.dtype) if quantized else k_buf[slot, h]
            v = jnp.where(key_ok, v_buf[slot, h].astype(jnp.float32), 0.0).astype(mxu_dtype)
            sc = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                 precision=_precision(q.dtype))
            if quantized:
                sc = sc * _scale_row(ks_buf, slot, h, ps, scale_group)
            sc = sc * sm_scale
            if soft_cap is not None:
                sc = soft_cap * jnp.tanh(sc / soft_cap)
            sc = jnp.where(mask, sc, -jnp.inf)
            m_prev = m_ref[h]
            m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(sc - _lanes(m_safe, bkv))
            alpha = jnp.exp(m_prev - m_safe)
            l_ref[h] = alpha * l_ref[h] + jnp.sum(p, axis=1, keepdims=True)
            m_ref[h] = m_new
            if quantized:
                p = p * jnp.where(key_ok_row, _scale_row(vs_buf, slot, h, ps, scale_group), 0.0)
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=_precision(v.dtype))
            acc_ref[h] = _lanes(alpha, dp) * acc_ref[h] + pv

    def cond(state):
        return state[0] < seq_hi

    def body(state):
        s, j, slot, pending = state
        _, end = kv_block_range(s)
        active = j < end
        more = j + 1 < end
        nxt_first, nxt_end = kv_block_range(jnp.minimum(s + 1, max_seqs - 1))
        next_s = jnp.where(more, s, s + 1)
        next_j = jnp.where(more, j + 1, nxt_first)
        next_active = more | ((s + 1 < seq_hi) & (nxt_first < nxt_end))

        @pl.when(active & (pending == 0))
        def _():
            start_fetch(s, j, slot)

        @pl.when(active & next_active)
        def _():
            start_fetch(next_s, next_j, 1 - slot)

        @pl.when(active)
        def _():
            wait_fetch(s, j, slot)
            compute(s, j, slot)

        new_slot = jnp.where(active, 1 - slot, slot)
        new_pending = (active & next_active).astype(jnp.int32)
        return next_s, next_j, new_slot, new_pending

    s0 = seq_lo_ref[b]
    first0, _ = kv_block_range(jnp.minimum(s0, max_seqs - 1))
    lax.while_loop(cond, body, (s0, first0, jnp.int32(0), jnp.int32(0)))

    for h in range(hkv):
        denom = l_ref[h]
        inv = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
        o_ref[h] = (acc_ref[h] * _lanes(inv, dp)).astype(o_ref.dtype)


def _block_metadata(cu_q_lens, num_seqs, block_q: int, num_blocks: int):
    """Cleaned ``cu_q_lens`` and, per q block, the sequences ``[seq_lo, seq_hi)`` intersecting it."""
    s = cu_q_lens.shape[0] - 1
    n = jnp.clip(num_seqs[0], 0, s)
    idx = jnp.arange(s + 1, dtype=jnp.int32)
    cu = jnp.where(idx <= n, cu_q_lens, cu_q_lens[n]).astype(jnp.int32)
    starts = jnp.arange(num_blocks, dtype=jnp.int32) * block_q
    seq_lo = jnp.searchsorted(cu[1:], starts, side="right")
    seq_hi = jnp.searchsorted(cu[:-1], starts + block_q, side="left")
    return cu, jnp.minimum(seq_lo, n).astype(jnp.int32), jnp.minimum(seq_hi, n).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "interpret", "block_sizes"))
def ragged_paged_attention_tpu(
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
    interpret=False,
    block_sizes: tuning.TpuBlockSizes | None = None,
) -> jax.Array:
    """Pallas TPU ragged paged attention (arguments as in :func:`.api.ragged_paged_attention`).

    ``q [T, Hq, D]``; ``kv`` head-major ``[P, Hkv, ps, Dp]`` or fused ``[P, Hkv, ps, 128]``; ``kv_lens i32[S]``;
    ``page_indices i32[S, pages_per_seq]``; ``cu_q_lens i32[S+1]``; ``num_seqs i32[1]`` ->
    ``[T, Hq, D]`` in ``q.dtype``. ``interpret``: ``False``, ``True`` or a ``pltpu.InterpretParams``.
    """
    if not kv.layout.head_major:
        raise ValueError("the Pallas TPU kernel needs a head-major or fused KV cache")
    fused = kv.layout is KVLayout.HEAD_MAJOR_FUSED
    t, hq, d = q.shape
    _, hkv, ps, dp = kv.k.shape
    s_max, pps = page_indices.shape
    group = hq // hkv
    bs = block_sizes or tuning.tpu_block_sizes(t, hq, hkv, ps, pps)
    bq, nb = bs.block_q, min(bs.kv_pages_per_block, pps)
    if (bq * group) % 8:
        raise ValueError(f"block_q * (num_q_heads // num_kv_heads) must be a multiple of 8, got {bq * group}")
    num_blocks = -(-t // bq)
    tp = num_blocks * bq
    rows = bq * group

    qp = jnp.pad(q, ((0, tp - t), (0, 0), (0, dp - d)))
    qp = qp.reshape(tp, hkv, group, dp).transpose(1, 0, 2, 3).reshape(hkv, tp * group, dp)
    cu, seq_lo, seq_hi = _block_metadata(cu_q_lens, num_seqs, bq, num_blocks)
    prefetch = (kv_lens.astype(jnp.int32), page_indices.astype(jnp.int32).reshape(-1), cu, seq_lo, seq_hi)

    quantized = kv.quantized
    kernel = functools.partial(
        _kernel, quantized=quantized, fused=fused, scale_group=kv.scale_pages_per_row, block_q=bq, group=group,
        pages_per_block=nb, page_size=ps, pages_per_seq=pps, max_seqs=s_max, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap)
    q_spec = pl.BlockSpec((hkv, rows, dp), lambda b, *_: (0, b, 0))
    kv_buf = pltpu.VMEM((2, hkv, nb * ps, dp), kv.k.dtype)
    scale_buf = [pltpu.VMEM((2, nb, kv.k_scale.shape[1]), jnp.float32)] * 2 if quantized else []
    scratch = [
        kv_buf,
        *([] if fused else [kv_buf]),
        *scale_buf,
        pltpu.SemaphoreType.DMA((4 if quantized else 2, 2)),
        pltpu.VMEM((hkv, rows, LANES), jnp.float32),
        pltpu.VMEM((hkv, rows, LANES), jnp.float32),
        pltpu.VMEM((hkv, rows, dp), jnp.float32),
    ]
    caches = (kv.k,) if fused else (kv.k, kv.v)
    if not interpret:
        # The pages stay in HBM: left to the compiler, it may stage a layer's whole cache in VMEM around the
        # cache write when it fits (an int8 layer's 32 MiB per v5e chip under TP 8), i.e. read and write all
        # of it every step for the few pages the kernel reads.
        caches = tuple(pltpu.with_memory_space_constraint(c, pltpu.HBM) for c in caches)
    scales = (kv.k_scale, kv.v_scale) if quantized else ()
    if not interpret and quantized and tpu_scales.supported(kv.k_scale.shape[1]):
        # Rows of a multiple of 128 lanes are laid out row-major; pinned like the pages, and written in place
        # by tpu_scales (an XLA scatter into them had the compiler stage the whole arrays in VMEM). A narrower
        # row (scale_pages_per_row 1 with fewer than 128 lanes per device) stays unpinned: it is laid out
        # pages-minor, and pinning it turns the kernel's relayout into an HBM copy.
        scales = tuple(pltpu.with_memory_space_constraint(c, pltpu.HBM) for c in scales)
    caches += scales
    itemsize = jnp.dtype(kv.k.dtype).itemsize
    vmem_bytes = ((2 if fused else 4) * hkv * nb * ps * dp * itemsize  # K/V double buffers
                  + 4 * hkv * rows * dp * q.dtype.itemsize  # q / out blocks, double-buffered
                  + hkv * rows * (2 * LANES + dp) * 4)  # m, l, acc
    params = pltpu.CompilerParams(
        dimension_semantics=(pltpu.PARALLEL,),
        vmem_limit_bytes=int(vmem_bytes * 1.5) if vmem_bytes > 12 * 2**20 else None,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(num_blocks,),
            in_specs=[q_spec] + [pl.BlockSpec(memory_space=pl.ANY)] * len(caches),
            out_specs=q_spec,
            scratch_shapes=scratch,
        ),
        out_shape=jax.ShapeDtypeStruct((hkv, tp * group, dp), q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="ragged_paged_attention_tpu",
    )(*prefetch, qp, *caches)
    out = out.reshape(hkv, tp, group, dp).transpose(1, 0, 2, 3).reshape(tp, hq, dp)
    lo = dp // 2 if fused else 0  # fused: lanes [64, 128) hold p . V
    return out[:t, :, lo:lo + d]
