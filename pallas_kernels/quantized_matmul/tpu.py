"""Quantized matmul, Pallas TPU (Mosaic) kernel with dequantization fused in the kernel.

Grid ``(M/bm, N/bn, K/bk)``, K innermost ("arbitrary"), a VMEM accumulator ``(bm, bn)`` in float32
(int32 for int8 x int8). Per format, each grid step:

* per-channel W8A16 (int8 / fp8): ``acc += x @ q.astype(x.dtype)``; epilogue ``acc * scale``;
* group-wise (int8 / int4): each group of ``g`` rows of the weight tile is dequantized
  (``scale * q (+ offset)`` in f32, int4 unpacked by two shifts, see :mod:`.packing`) into a
  VMEM tile ``(bk, bn)`` of ``x.dtype`` at tile-aligned row offsets, then one ``x @ tile`` dot;
* W8A8: ``acc += xq @ q`` (int8 x int8 -> int32, or fp8 x fp8 -> f32); epilogue ``acc * xs * scale``
  with the per-token activation scale ``xs`` computed by the caller.

M and N tails are edge blocks (out-of-bounds rows/columns are dropped on write); a K tail (K not a
multiple of bk): the activations are zero-padded to whole K blocks by the wrapper and the weight
tile's rows past K are masked to zero in the kernel. Hardware notes: TPU v4 cannot lower int8 x int8
dots in Mosaic (use a W8A16 format there); v5e/v6e have int8 MXUs but no fp8 one (TPU v7 adds it): fp8
x fp8 dots still compile for them, how Mosaic lowers them and how fast that runs is unmeasured. Every format
compiles with Mosaic for TPU v5e and v6e (``tests/kernels/test_aot_kernels.py``, compile-only: never run
on a TPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.quantized_matmul.config import QuantConfig
from pallas_kernels.quantized_matmul.packing import unpack_int4_halves
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.quantizer import kernel_activations
from pallas_kernels.quantized_matmul.reference import compute_precision
from pallas_kernels.quantized_matmul.tuning import Blocks, check_tpu_blocks, tpu_blocks


@dataclasses.dataclass(frozen=True)
class _Spec:
    cfg: QuantConfig
    k: int
    blocks: Blocks
    cdt: jnp.dtype  # dtype of the dot operands (x.dtype, or the activation quant type)

    @property
    def grouped(self) -> bool:
        return self.cfg.group_size is not None

    @property
    def acc_dtype(self):
        return jnp.int32 if self.cfg.act == "int8" else jnp.float32

    @property
    def k_tail(self) -> bool:
        return self.k % self.blocks.bk != 0


def dequant_tile(q_ref, s_ref, m_ref, w_ref, spec: _Spec) -> None:
    """Write the dequantized weight tile ``(bk, bn)`` into ``w_ref``, one group at a time."""
    g = spec.cfg.group_size
    ng = spec.blocks.bk // g

    def finish(levels, i):
        # one (1, bn) row of scales/offsets, read from the ref and broadcast over the group's rows
        w = levels.astype(jnp.float32) * s_ref[i : i + 1, :].astype(jnp.float32)
        if m_ref is not None:
            w = w + m_ref[i : i + 1, :].astype(jnp.float32)
        return w.astype(w_ref.dtype)

    if spec.cfg.weight == "int4":
        h = g // 2
        lo, hi = unpack_int4_halves(q_ref[...], signed=spec.cfg.symmetric)  # (bk/2, bn) int32 each
        for i in range(ng):
            w_ref[i * g : i * g + h, :] = finish(lo[i * h : (i + 1) * h, :], i)
            w_ref[i * g + h : (i + 1) * g, :] = finish(hi[i * h : (i + 1) * h, :], i)
    else:
        for i in range(ng):
            w_ref[i * g : (i + 1) * g, :] = finish(q_ref[i * g : (i + 1) * g, :], i)


def _kernel(*refs, spec: _Spec):
    refs = list(refs)
    x_ref = refs.pop(0)
    xs_ref = refs.pop(0) if spec.cfg.act is not None else None
    q_ref = refs.pop(0)
    s_ref = refs.pop(0)
    m_ref = refs.pop(0) if not spec.cfg.symmetric else None
    o_ref = refs.pop(0)
    acc_ref = refs.pop(0)
    w_ref = refs.pop(0) if spec.grouped else None

    kk = pl.program_id(2)
    nk = pl.num_programs(2)

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    x = x_ref[...]
    if spec.grouped:
        dequant_tile(q_ref, s_ref, m_ref, w_ref, spec)
        w = w_ref[...]
    else:
        w = q_ref[...]
        if spec.cfg.act is None:
            w = w.astype(spec.cdt)
    if spec.k_tail:
        # x arrives zero-padded to whole K blocks (see quantized_matmul_tpu); the weight's edge block
        # reads past K (unspecified values, possibly NaN after scaling), so its tail rows are zeroed.
        # Masking x here instead would broadcast a (1, bk) row mask over sublanes, which Mosaic rejects
        # for a one-row bf16 x ("Not implemented: Sublane broadcast").
        valid = spec.k - kk * spec.blocks.bk
        row = jax.lax.broadcasted_iota(jnp.int32, w.shape, 0)
        w = jnp.where(row < valid, w, jnp.zeros_like(w))
    acc_ref[...] += jnp.dot(
        x, w, preferred_element_type=spec.acc_dtype, precision=compute_precision(spec.cdt)
    )

    @pl.when(kk == nk - 1)
    def _epilogue():
        acc = acc_ref[...].astype(jnp.float32)
        if xs_ref is not None:
            acc = acc * xs_ref[...]
        if not spec.grouped:
            acc = acc * s_ref[...].astype(jnp.float32)
        o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "blocks"))
def quantized_matmul_tpu(
    x: jax.Array, w: QArray, *, out_dtype, interpret: bool = False, blocks: Blocks | None = None
) -> jax.Array:
    """``x[M, K] @ w[K, N] -> [M, N]`` (``out_dtype``) with the Mosaic kernel."""
    cfg = w.config
    m, k = x.shape
    n = w.shape[-1]
    lhs, xs = kernel_activations(x, cfg)
    blocks = blocks or tpu_blocks(m, k, n, cfg)
    check_tpu_blocks(blocks, m, k, n, cfg, lhs.dtype)
    bm, bn, bk = blocks.bm, blocks.bn, blocks.bk
    spec = _Spec(cfg, k, blocks, jnp.dtype(lhs.dtype))
    if spec.k_tail:  # zero-pad the activations (cheap: M x K) so the K tail multiplies zeros
        lhs = jnp.pad(lhs, ((0, 0), (0, pl.cdiv(k, bk) * bk - k)))

    operands = [lhs]
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk))]
    if xs is not None:
        operands.append(xs)
        in_specs.append(pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)))
    rows_per_k = bk // 2 if cfg.weight == "int4" else bk
    operands.append(w.value)
    in_specs.append(pl.BlockSpec((rows_per_k, bn), lambda i, j, kk: (kk, j)))
    if spec.grouped:
        param_spec = pl.BlockSpec((bk // cfg.group_size, bn), lambda i, j, kk: (kk, j))
    else:
        param_spec = pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))
    operands.append(w.scale)
    in_specs.append(param_spec)
    if w.offset is not None:
        operands.append(w.offset)
        in_specs.append(param_spec)

    scratch = [pltpu.VMEM((bm, bn), spec.acc_dtype)]
    if spec.grouped:
        scratch.append(pltpu.VMEM((bk, bn), spec.cdt))
    return pl.pallas_call(
        functools.partial(_kernel, spec=spec),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn), pl.cdiv(k, bk)),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY)
        ),
        interpret=interpret,
        name=f"qmm_{cfg.name.replace('-', '_')}",
    )(*operands)
