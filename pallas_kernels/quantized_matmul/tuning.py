"""Block sizes for the quantized matmul kernels.

Heuristics, not measurements (no TPU or GPU was available when they were written): decode shapes
(small M) are memory bound, so blocks aim at long contiguous weight reads and few grid steps; the
constraints below are what each compiler requires.

TPU (Mosaic): a block's last two dims must be multiples of the dtype's (sublane, 128) tile or equal
the array dims. Hence ``bm = M`` for M <= 512, ``bn = N`` for N <= 512 else 512, and ``bk`` a multiple
of 128 lanes and, for group-wise scales ``[K/g, N]``, of ``g * sublane_tile(scale dtype)`` so each scale
block is tile aligned; ``bk = K`` when K is small. A K that no candidate divides gets a masked tail.

GPU (Triton): every block dim a power of two and >= 16 for ``tl.dot``; M/N/K tails are masked loads.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from pallas_kernels.quantized_matmul.config import QuantConfig


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes ``(bm, bn, bk)`` for the grid over ``(M, N, K)``."""

    bm: int
    bn: int
    bk: int


def sublane_tile(dtype) -> int:
    """TPU sublane tiling of a dtype: 8 rows for 32-bit, 16 for 16-bit, 32 for 8-bit types."""
    return {4: 8, 2: 16, 1: 32}[jnp.dtype(dtype).itemsize]


def _largest_divisor_block(k: int, unit: int, max_block: int) -> tuple[int, bool]:
    """Largest multiple of ``unit`` <= ``max_block`` dividing ``k``; else the largest one (tail masked)."""
    top = max(1, max_block // unit)
    for mult in range(top, 0, -1):
        if k % (unit * mult) == 0:
            return unit * mult, False
    return unit * top, True


def tpu_k_unit(cfg: QuantConfig) -> int:
    """The K-block granularity the TPU kernel needs for this format."""
    unit = 128
    if cfg.group_size is not None:
        unit = math.lcm(unit, cfg.group_size * sublane_tile(cfg.scale_dtype))
    return unit


def tpu_blocks(m: int, k: int, n: int, cfg: QuantConfig) -> Blocks:
    """Default TPU blocks for ``x[M, K] @ w[K, N]``."""
    bm = m if m <= 512 else 256
    bn = n if n <= 512 else 512
    max_bk = 1024 if cfg.group_size is not None else 2048
    if k <= max_bk:
        return Blocks(bm, bn, k)
    bk, _ = _largest_divisor_block(k, tpu_k_unit(cfg), max_bk)
    return Blocks(bm, bn, bk)


def check_tpu_blocks(blocks: Blocks, m: int, k: int, n: int, cfg: QuantConfig, lhs_dtype) -> None:
    """Raise ``ValueError`` if ``blocks`` break a Mosaic tiling rule for these shapes."""
    bm, bn, bk = blocks.bm, blocks.bn, blocks.bk
    if bm != m and bm % sublane_tile(lhs_dtype):
        raise ValueError(f"bm={bm} must equal M={m} or be a multiple of {sublane_tile(lhs_dtype)}")
    if bn != n and bn % 128:
        raise ValueError(f"bn={bn} must equal N={n} or be a multiple of 128")
    if bk != k:
        unit = tpu_k_unit(cfg)
        if bk % unit:
            raise ValueError(f"bk={bk} must equal K={k} or be a multiple of {unit} for {cfg.name}")
    elif cfg.group_size is not None and k % cfg.group_size:
        raise ValueError(f"K={k} is not divisible by group_size={cfg.group_size}")


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def gpu_blocks(m: int, k: int, n: int, cfg: QuantConfig) -> Blocks:
    """Default Triton blocks: small-M decode tiles, power-of-two dims >= 16.

    int4 keeps ``bn = 64`` at every M: its dequantization holds two f32 half tiles ``(bk/2, bn)``, and
    at ``(bm, bn, bk) = (64, 128, 128)`` with 4 warps ptxas (sm_90a, CUDA 12.9) hit the 255-register cap
    and spilled (g32: 24 B, g64: 40 B, g128-asym: 8 B per thread); ``bn = 64`` compiles to 152-154
    registers without spills (measured on the deviceless H100 compile, not on a GPU).
    """
    bm = min(max(16, _pow2_at_least(m)), 64)
    bn = 64 if m <= 16 or cfg.weight == "int4" else 128
    bk = max(128, cfg.group_size or 0)
    return Blocks(bm, bn, bk)


def check_gpu_blocks(blocks: Blocks, cfg: QuantConfig) -> None:
    """Raise ``ValueError`` if ``blocks`` break a Triton rule (powers of two, dot dims >= 16, groups)."""
    for name in ("bm", "bn", "bk"):
        v = getattr(blocks, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two >= 16 on the GPU")
    if cfg.group_size is not None and blocks.bk % cfg.group_size:
        raise ValueError(f"bk={blocks.bk} must be a multiple of group_size={cfg.group_size}")
    if cfg.weight == "int4" and blocks.bk < 32:
        raise ValueError("int4 needs bk >= 32 (each half-tile dot is bk/2 deep)")


def gpu_num_warps(blocks: Blocks) -> int:
    """Warps per program: 4 for small tiles, 8 for large ones."""
    return 8 if blocks.bm * blocks.bn >= 128 * 128 else 4
