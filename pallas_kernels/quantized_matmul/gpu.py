"""Quantized matmul, Pallas GPU (Triton dialect) kernel with dequantization fused in the kernel.

Grid ``(M/bm, N/bn)``; each program loops over ``K/bk`` tiles (Triton programs run concurrently, so the
K reduction is a loop carrying the accumulator rather than a grid axis), accumulating in float32
(int32 for int8 x int8). Per K tile:

* per-channel W8A16 (int8 / fp8): ``acc += x @ q.astype(x.dtype)``; epilogue ``acc * scale``;
* group-wise int8: the tile ``(bk, bn)`` is viewed as ``(bk/g, g, bn)``, scaled per group in f32,
  cast to ``x.dtype``, then one dot;
* int4 (split-half per group, :mod:`.packing`): the packed tile ``(bk/2, bn)`` gives low and
  high nibble tiles by two shifts; ``x`` is read through a ``[M, K/g, g]`` view as its first-half and
  second-half columns of each group, so ``acc += x_lo @ w_lo + x_hi @ w_hi`` (two dots, no shuffles);
* W8A8: ``acc += xq @ q`` (int8 -> int32; fp8 tiles are converted to bf16, exactly, then -> f32);
  epilogue ``acc * xs * scale``.

All M / N / K tails are masked loads (``other=0``) and masked stores. Every format compiles for an H100
(sm_90a, deviceless XLA compile through Triton and ptxas: ``tests/kernels/test_aot_kernels.py``), without
register spills at the default blocks and with wgmma at 64-row tiles; it has not been run on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.quantized_matmul.config import QuantConfig
from pallas_kernels.quantized_matmul.packing import unpack_int4_halves
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.quantizer import kernel_activations
from pallas_kernels.quantized_matmul.tuning import Blocks, check_gpu_blocks, gpu_blocks, gpu_num_warps


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """A GPU matmul's static shape: its format (``None``: dense weights, grouped matmul only), sizes,
    blocks and the dtype the tiles are multiplied in."""

    cfg: QuantConfig | None
    m: int
    k: int
    n: int
    blocks: Blocks
    cdt: jnp.dtype

    @property
    def acc_dtype(self):
        return jnp.int32 if self.cfg is not None and self.cfg.act == "int8" else jnp.float32


def masked_load(ref, idx, mask):
    """Masked load; masked-off elements read as zero (a typed zero: Triton cannot cast int to fp8)."""
    return plgpu.load(ref.at[idx], mask=mask, other=jnp.zeros((), ref.dtype))


def group_scale(levels, scales, offsets, cdt):
    """``levels (ng*r, bn)`` scaled per group of ``r`` rows by ``scales (ng, bn)``; cast to ``cdt``."""
    ng, bn = scales.shape
    rows = levels.shape[0]
    w = levels.astype(jnp.float32).reshape(ng, rows // ng, bn) * scales[:, None, :]
    if offsets is not None:
        w = w + offsets[:, None, :]
    return w.reshape(rows, bn).astype(cdt)


def _kernel(*refs, spec: GpuSpec):
    refs = list(refs)
    x_ref = refs.pop(0)
    xs_ref = refs.pop(0) if spec.cfg.act is not None else None
    q_ref = refs.pop(0)
    s_ref = refs.pop(0)
    m_ref = refs.pop(0) if not spec.cfg.symmetric else None
    (o_ref,) = refs

    cfg, (bm, bn, bk) = spec.cfg, (spec.blocks.bm, spec.blocks.bn, spec.blocks.bk)
    m0 = pl.program_id(0) * bm
    n0 = pl.program_id(1) * bn
    row_ok = (m0 + jnp.arange(bm)) < spec.m
    col_ok = (n0 + jnp.arange(bn)) < spec.n
    g = cfg.group_size
    ng = bk // g if g else 0

    def load_params(kk):
        gidx = kk * ng
        grp_ok = (gidx + jnp.arange(ng)) < spec.k // g
        mask = grp_ok[:, None] & col_ok[None, :]
        idx = (pl.ds(gidx, ng), pl.ds(n0, bn))
        scales = masked_load(s_ref, idx, mask).astype(jnp.float32)
        offsets = None if m_ref is None else masked_load(m_ref, idx, mask).astype(jnp.float32)
        return scales, offsets, grp_ok

    def int4_step(kk, acc):
        h = g // 2
        scales, offsets, grp_ok = load_params(kk)
        xmask = row_ok[:, None, None] & grp_ok[None, :, None]
        xmask = jnp.broadcast_to(xmask, (bm, ng, h))
        x_lo = masked_load(x_ref, (pl.ds(m0, bm), pl.ds(kk * ng, ng), pl.ds(0, h)), xmask).reshape(bm, bk // 2)
        x_hi = masked_load(x_ref, (pl.ds(m0, bm), pl.ds(kk * ng, ng), pl.ds(h, h)), xmask).reshape(bm, bk // 2)
        prow_ok = (kk * (bk // 2) + jnp.arange(bk // 2)) < spec.k // 2
        pidx = (pl.ds(kk * (bk // 2), bk // 2), pl.ds(n0, bn))
        packed = masked_load(q_ref, pidx, prow_ok[:, None] & col_ok[None, :])
        lo, hi = unpack_int4_halves(packed, signed=cfg.symmetric)
        w_lo = group_scale(lo, scales, offsets, spec.cdt)
        w_hi = group_scale(hi, scales, offsets, spec.cdt)
        acc = acc + jnp.dot(x_lo, w_lo, preferred_element_type=jnp.float32)
        return acc + jnp.dot(x_hi, w_hi, preferred_element_type=jnp.float32)

    def dense_step(kk, acc):
        k_ok = (kk * bk + jnp.arange(bk)) < spec.k
        x = masked_load(x_ref, (pl.ds(m0, bm), pl.ds(kk * bk, bk)), row_ok[:, None] & k_ok[None, :])
        q = masked_load(q_ref, (pl.ds(kk * bk, bk), pl.ds(n0, bn)), k_ok[:, None] & col_ok[None, :])
        if g:
            scales, offsets, _ = load_params(kk)
            w = group_scale(q, scales, offsets, spec.cdt)
        elif cfg.act is not None:
            w = q
        else:
            w = q.astype(spec.cdt)
        if cfg.act == "fp8":
            # fp8 -> bf16 is exact, so this dot equals an fp8 x fp8 dot with f32 accumulation. On
            # Hopper it turns mma.sync into wgmma: Triton only uses wgmma for fp8 operands with an f32
            # accumulator when the dot allows imprecise accumulation (maxNumImpreciseAcc >= 32), which
            # Pallas' Triton lowering never sets. The cost: bf16 instead of fp8 tensor-core rate.
            x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        return acc + jnp.dot(x, w, preferred_element_type=spec.acc_dtype)

    step = int4_step if cfg.weight == "int4" else dense_step
    acc = jax.lax.fori_loop(0, pl.cdiv(spec.k, bk), step, jnp.zeros((bm, bn), spec.acc_dtype))
    out = acc.astype(jnp.float32)
    if xs_ref is not None:
        out = out * masked_load(xs_ref, (pl.ds(m0, bm), pl.ds(0, 1)), row_ok[:, None])
    if not g:
        out = out * masked_load(s_ref, (pl.ds(0, 1), pl.ds(n0, bn)), col_ok[None, :]).astype(jnp.float32)
    plgpu.store(
        o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)],
        out.astype(o_ref.dtype),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "blocks"))
def quantized_matmul_gpu(
    x: jax.Array, w: QArray, *, out_dtype, interpret: bool = False, blocks: Blocks | None = None
) -> jax.Array:
    """``x[M, K] @ w[K, N] -> [M, N]`` (``out_dtype``) with the Triton kernel."""
    cfg = w.config
    m, k = x.shape
    n = w.shape[-1]
    lhs, xs = kernel_activations(x, cfg)
    blocks = blocks or gpu_blocks(m, k, n, cfg)
    check_gpu_blocks(blocks, cfg)
    spec = GpuSpec(cfg, m, k, n, blocks, jnp.dtype(lhs.dtype))
    if cfg.weight == "int4":
        lhs = lhs.reshape(m, k // cfg.group_size, cfg.group_size)  # free view: halves of each group
    operands = [lhs] + ([xs] if xs is not None else []) + [w.value, w.scale]
    if w.offset is not None:
        operands.append(w.offset)
    return pl.pallas_call(
        functools.partial(_kernel, spec=spec),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(pl.cdiv(m, blocks.bm), pl.cdiv(n, blocks.bn)),
        compiler_params=plgpu.CompilerParams(num_warps=gpu_num_warps(blocks), num_stages=3),
        interpret=interpret,
        name=f"qmm_{cfg.name.replace('-', '_')}",
    )(*operands)
