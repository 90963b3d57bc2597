"""Grouped matmul, Pallas GPU (Triton dialect) kernel over the same work items as the TPU kernel.

Grid ``(N/bn, W)``: program ``(j, w)`` computes work item ``w`` (:mod:`.metadata`: an M tile, its expert
and its row range ``[lo, hi)``, read from small int32 arrays computed on device) for output columns
``[j * bn, (j + 1) * bn)``, looping over ``K/bk`` tiles with a float32 accumulator (int32 for int8 x int8),
then stores only its rows with a masked store: items that share a straddling tile write disjoint rows, so
concurrent programs never race. Padding items store zeros without multiplying (their K loop has no
trips); dead items store nothing. Column axis first, so the programs of one item run together and share
its lhs tile in L2.

Quantized experts (a :class:`QArray` of logical shape ``[G, K, N]``) are dequantized per K tile exactly
as in the quantized matmul's Triton kernel (:mod:`pallas_kernels.quantized_matmul.gpu`): per-channel
scales in the epilogue, group-wise int8 scaled per group, int4 as two nibble-half dots against the lhs
viewed as ``[M, K/g, g]``, W8A8 on int8 (fp8 converted to bf16) dots. M / N / K tails are masked loads.
Compiled for an H100 (sm_90a) in ``tests/kernels/test_aot_kernels.py``; never run on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.grouped_matmul.metadata import work_items
from pallas_kernels.grouped_matmul.tuning import gpu_group_blocks
from pallas_kernels.quantized_matmul.config import QuantConfig
from pallas_kernels.quantized_matmul.gpu import GpuSpec, group_scale, masked_load
from pallas_kernels.quantized_matmul.packing import unpack_int4_halves
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.quantizer import kernel_activations
from pallas_kernels.quantized_matmul.tuning import Blocks, check_gpu_blocks, gpu_num_warps


def _kernel(tile_ref, group_ref, lo_ref, hi_ref, compute_ref, *refs, spec: GpuSpec):
    cfg = spec.cfg
    refs = list(refs)
    x_ref = refs.pop(0)
    xs_ref = refs.pop(0) if cfg is not None and cfg.act is not None else None
    q_ref = refs.pop(0)
    s_ref = refs.pop(0) if cfg is not None else None
    m_ref = refs.pop(0) if cfg is not None and not cfg.symmetric else None
    (o_ref,) = refs

    bm, bn, bk = spec.blocks.bm, spec.blocks.bn, spec.blocks.bk
    w = pl.program_id(1)
    grp = group_ref[w]
    lo, hi = lo_ref[w], hi_ref[w]
    m0 = tile_ref[w] * bm
    n0 = pl.program_id(0) * bn
    rows = m0 + jnp.arange(bm)
    row_ok = (rows >= lo) & (rows < hi)  # hi <= M, so also in bounds
    col_ok = (n0 + jnp.arange(bn)) < spec.n
    g = cfg.group_size if cfg is not None else None
    ng = bk // g if g else 0

    def load_params(kk):
        gidx = kk * ng
        grp_ok = (gidx + jnp.arange(ng)) < spec.k // g
        mask = grp_ok[:, None] & col_ok[None, :]
        idx = (grp, pl.ds(gidx, ng), pl.ds(n0, bn))
        scales = masked_load(s_ref, idx, mask).astype(jnp.float32)
        offsets = None if m_ref is None else masked_load(m_ref, idx, mask).astype(jnp.float32)
        return scales, offsets, grp_ok

    def int4_step(kk, acc):
        h = g // 2
        scales, offsets, grp_ok = load_params(kk)
        xmask = jnp.broadcast_to(row_ok[:, None, None] & grp_ok[None, :, None], (bm, ng, h))
        x_lo = masked_load(x_ref, (pl.ds(m0, bm), pl.ds(kk * ng, ng), pl.ds(0, h)), xmask).reshape(bm, bk // 2)
        x_hi = masked_load(x_ref, (pl.ds(m0, bm), pl.ds(kk * ng, ng), pl.ds(h, h)), xmask).reshape(bm, bk // 2)
        prow_ok = (kk * (bk // 2) + jnp.arange(bk // 2)) < spec.k // 2
        pidx = (grp, pl.ds(kk * (bk // 2), bk // 2), pl.ds(n0, bn))
        lo_q, hi_q = unpack_int4_halves(masked_load(q_ref, pidx, prow_ok[:, None] & col_ok[None, :]), cfg.symmetric)
        acc = acc + jnp.dot(x_lo, group_scale(lo_q, scales, offsets, spec.cdt), preferred_element_type=jnp.float32)
        return acc + jnp.dot(x_hi, group_scale(hi_q, scales, offsets, spec.cdt), preferred_element_type=jnp.float32)

    def dense_step(kk, acc):
        k_ok = (kk * bk + jnp.arange(bk)) < spec.k
        x = masked_load(x_ref, (pl.ds(m0, bm), pl.ds(kk * bk, bk)), row_ok[:, None] & k_ok[None, :])
        q = masked_load(q_ref, (grp, pl.ds(kk * bk, bk), pl.ds(n0, bn)), k_ok[:, None] & col_ok[None, :])
        if g:
            scales, offsets, _ = load_params(kk)
            wt = group_scale(q, scales, offsets, spec.cdt)
        elif cfg is not None and cfg.act is not None:
            wt = q
        else:
            wt = q.astype(spec.cdt)
        if cfg is not None and cfg.act == "fp8":  # exact; wgmma instead of mma.sync (see quantized_matmul.gpu)
            x, wt = x.astype(jnp.bfloat16), wt.astype(jnp.bfloat16)
        return acc + jnp.dot(x, wt, preferred_element_type=spec.acc_dtype)

    step = int4_step if cfg is not None and cfg.weight == "int4" else dense_step
    trips = compute_ref[w] * pl.cdiv(spec.k, bk)  # int32 0 or K/bk (the loop bounds must share a type)
    acc = jax.lax.fori_loop(jnp.int32(0), trips, step, jnp.zeros((bm, bn), spec.acc_dtype))
    out = acc.astype(jnp.float32)
    if xs_ref is not None:
        out = out * masked_load(xs_ref, (pl.ds(m0, bm), pl.ds(0, 1)), row_ok[:, None])
    if cfg is not None and not g:
        out = out * masked_load(s_ref, (grp, pl.ds(0, 1), pl.ds(n0, bn)), col_ok[None, :]).astype(jnp.float32)
    plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], out.astype(o_ref.dtype), mask=row_ok[:, None] & col_ok[None, :])


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "blocks"))
def grouped_matmul_gpu(
    lhs: jax.Array,
    rhs: jax.Array | QArray,
    group_sizes: jax.Array,
    *,
    out_dtype,
    interpret: bool = False,
    blocks: Blocks | None = None,
) -> jax.Array:
    """``lhs[M, K]`` (rows sorted by group) times ``rhs[G, K, N]`` per group -> ``[M, N]`` (``out_dtype``)."""
    cfg = rhs.config if isinstance(rhs, QArray) else None
    m, k = lhs.shape
    num_groups, _, n = rhs.shape
    x, xs = kernel_activations(lhs, cfg)
    blocks = blocks or gpu_group_blocks(m, k, n, num_groups, cfg)
    check_gpu_blocks(blocks, cfg or QuantConfig("int8"))
    spec = GpuSpec(cfg, m, k, n, blocks, jnp.dtype(x.dtype))
    items = work_items(group_sizes, m, blocks.bm)
    if cfg is not None and cfg.weight == "int4":
        x = x.reshape(m, k // cfg.group_size, cfg.group_size)  # free view: halves of each group
    operands = [x] + ([xs] if xs is not None else [])
    if cfg is None:
        operands.append(rhs)
    else:
        operands += [rhs.value, rhs.scale] + ([rhs.offset] if rhs.offset is not None else [])
    name = "gmm_" + ("dense" if cfg is None else cfg.name.replace("-", "_"))
    return pl.pallas_call(
        functools.partial(_kernel, spec=spec),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(pl.cdiv(n, blocks.bn), items.tile.shape[0]),
        compiler_params=plgpu.CompilerParams(num_warps=gpu_num_warps(blocks), num_stages=3),
        interpret=interpret,
        name=name,
    )(items.tile, items.group, items.lo, items.hi, items.compute, *operands)
