"""Grouped matmul, Pallas TPU (Mosaic) kernel: megablox-style work items by scalar prefetch.

Grid ``(N/bn, W, K/bk)`` with ``W`` the static bound on work items (:mod:`.metadata`); the items' tile,
weight group, row range and compute flag are computed on device and passed by scalar prefetch, so the
index maps pick the lhs tile ``(tile[w], k)``, the expert's weight block ``(group[w], k, n)`` and the output
block ``(tile[w], n)``. K is innermost with a VMEM accumulator ``(bm, bn)`` in float32 (int32 for
int8 x int8). At the last K step the item writes only its rows ``[lo, hi)`` of the output block: a tile
that straddles groups is visited by consecutive items, and since its output block index does not change
between them the block stays in VMEM and each item fills in its rows (the first item of a tile zeroes the
others, so padding rows come out zero). Padding and dead items compute nothing and pin their K block
index to the last one, so they fetch no new weights.

Quantized experts (a :class:`QArray` of logical shape ``[G, K, N]``) are dequantized in the kernel as in
the quantized matmul (:mod:`pallas_kernels.quantized_matmul.tpu`): per-channel scales in the epilogue,
group-wise int8 / int4 tiles dequantized group by group into a VMEM tile, W8A8 on int8 (fp8) dots with
per-row activation scales. K and N blocks divide K and N (see :mod:`.tuning`); M may end in an edge block.
Compiled with Mosaic for TPU v5e / v5p / v6e in ``tests/kernels/test_aot_kernels.py``; never run on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul.metadata import work_items
from pallas_kernels.grouped_matmul.tuning import check_tpu_blocks, tpu_blocks
from pallas_kernels.quantized_matmul.config import QuantConfig
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.quantizer import kernel_activations
from pallas_kernels.quantized_matmul.reference import compute_precision
from pallas_kernels.quantized_matmul.tpu import dequant_tile
from pallas_kernels.quantized_matmul.tuning import Blocks


@dataclasses.dataclass(frozen=True)
class _Spec:
    cfg: QuantConfig | None  # None: dense expert weights
    blocks: Blocks  # .bk and .cfg are what quantized_matmul.tpu.dequant_tile reads
    cdt: jnp.dtype  # dot operand dtype
    nk: int

    @property
    def grouped(self) -> bool:
        return self.cfg is not None and self.cfg.group_size is not None

    @property
    def acc_dtype(self):
        return jnp.int32 if self.cfg is not None and self.cfg.act == "int8" else jnp.float32


def _kernel(tile_ref, group_ref, lo_ref, hi_ref, compute_ref, *refs, spec: _Spec):
    del group_ref  # used by the index maps only
    cfg = spec.cfg
    refs = list(refs)
    x_ref = refs.pop(0)
    xs_ref = refs.pop(0) if cfg is not None and cfg.act is not None else None
    q_ref = refs.pop(0)
    s_ref = refs.pop(0) if cfg is not None else None
    m_ref = refs.pop(0) if cfg is not None and not cfg.symmetric else None
    o_ref = refs.pop(0)
    acc_ref = refs.pop(0)
    w_ref = refs.pop(0) if spec.grouped else None

    w = pl.program_id(1)
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    @pl.when(compute_ref[w] == 1)
    def _dot():
        if spec.grouped:
            dequant_tile(q_ref, s_ref, m_ref, w_ref, spec)
            wt = w_ref[...]
        elif cfg is not None and cfg.act is not None:
            wt = q_ref[...]
        else:
            wt = q_ref[...].astype(spec.cdt)
        acc_ref[...] += jnp.dot(
            x_ref[...], wt, preferred_element_type=spec.acc_dtype, precision=compute_precision(spec.cdt)
        )

    @pl.when(kk == spec.nk - 1)
    def _write():
        acc = acc_ref[...].astype(jnp.float32)
        if xs_ref is not None:
            acc = acc * xs_ref[...]
        if cfg is not None and not spec.grouped:
            acc = acc * s_ref[...].astype(jnp.float32)
        bm = acc.shape[0]
        rows = tile_ref[w] * bm + jax.lax.broadcasted_iota(jnp.int32, acc.shape, 0)
        keep = (rows >= lo_ref[w]) & (rows < hi_ref[w])
        y = acc.astype(o_ref.dtype)
        first = (w == 0) | (tile_ref[w] != tile_ref[jnp.maximum(w - 1, 0)])

        @pl.when(first)
        def _fresh():
            o_ref[...] = jnp.where(keep, y, jnp.zeros_like(y))

        @pl.when(jnp.logical_not(first))
        def _merge():
            o_ref[...] = jnp.where(keep, y, o_ref[...])


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "blocks"))
def grouped_matmul_tpu(
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
    blocks = blocks or tpu_blocks(m, k, n, num_groups, cfg, x.dtype)
    check_tpu_blocks(blocks, m, k, n, cfg, x.dtype)
    bm, bn, bk = blocks.bm, blocks.bn, blocks.bk
    nk = k // bk
    spec = _Spec(cfg, blocks, jnp.dtype(x.dtype), nk)
    items = work_items(group_sizes, m, bm)
    num_w = items.tile.shape[0]

    def kidx(kk, w, compute):  # padding / dead items stay on the last K block: no new DMA
        return jnp.where(compute[w] == 1, kk, nk - 1)

    sq = pl.squeezed
    operands = [x]
    in_specs = [pl.BlockSpec((bm, bk), lambda j, w, kk, t, g, lo, hi, c: (t[w], kidx(kk, w, c)))]
    if xs is not None:
        operands.append(xs)
        in_specs.append(pl.BlockSpec((bm, 1), lambda j, w, kk, t, g, lo, hi, c: (t[w], 0)))
    if cfg is None:
        operands.append(rhs)
        in_specs.append(pl.BlockSpec((sq, bk, bn), lambda j, w, kk, t, g, lo, hi, c: (g[w], kidx(kk, w, c), j)))
    else:
        rows_per_k = bk // 2 if cfg.weight == "int4" else bk
        operands.append(rhs.value)
        in_specs.append(pl.BlockSpec((sq, rows_per_k, bn), lambda j, w, kk, t, g, lo, hi, c: (g[w], kidx(kk, w, c), j)))
        if spec.grouped:
            pspec = pl.BlockSpec(
                (sq, bk // cfg.group_size, bn), lambda j, w, kk, t, g, lo, hi, c: (g[w], kidx(kk, w, c), j)
            )
        else:
            pspec = pl.BlockSpec((sq, 1, bn), lambda j, w, kk, t, g, lo, hi, c: (g[w], 0, j))
        operands.append(rhs.scale)
        in_specs.append(pspec)
        if rhs.offset is not None:
            operands.append(rhs.offset)
            in_specs.append(pspec)

    scratch = [pltpu.VMEM((bm, bn), spec.acc_dtype)]
    if spec.grouped:
        scratch.append(pltpu.VMEM((bk, bn), spec.cdt))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(n // bn, num_w, nk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda j, w, kk, t, g, lo, hi, c: (t[w], j)),
        scratch_shapes=scratch,
    )
    name = "gmm_" + ("dense" if cfg is None else cfg.name.replace("-", "_"))
    return pl.pallas_call(
        functools.partial(_kernel, spec=spec),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=(pltpu.PARALLEL, pltpu.ARBITRARY, pltpu.ARBITRARY)),
        interpret=interpret,
        name=name,
    )(items.tile, items.group, items.lo, items.hi, items.compute, *operands)
