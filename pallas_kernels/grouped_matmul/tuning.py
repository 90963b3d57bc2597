"""Tile sizes of the grouped matmul paths (heuristics: no TPU or GPU has run these kernels).

``bm`` is the M tile of the work items (:mod:`.metadata`): rows of a tile that belong to another group
are computed and discarded, so small groups (decode: a few rows per expert) want a small ``bm`` and large
groups (prefill) a large one. The heuristics below aim ``bm`` at the mean group size ``M / G``.

* XLA path: ``bm`` a power of two in [8, 128]; K and N whole.
* TPU (Mosaic): ``bm`` a multiple of the lhs dtype's sublane tile (or ``M``); ``bk`` and ``bn`` divide
  K and N (multiples of the format's K unit / 128 lanes) or are the whole dim, so only M has an edge tile.
* GPU (Triton): powers of two >= 16 (``bm`` 16, 32 or 64, see :func:`gpu_group_blocks`), the quantized
  matmul's ``bn`` / ``bk`` choice; K and N tails are masked loads.
"""

from __future__ import annotations

from pallas_kernels.quantized_matmul.config import QuantConfig
from pallas_kernels.quantized_matmul.tuning import Blocks, gpu_blocks, sublane_tile, tpu_k_unit


def _pow2_floor(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def mean_rows(m: int, num_groups: int) -> int:
    """Mean rows per group, at least 1."""
    return max(1, m // max(1, num_groups))


def xla_block_m(m: int, num_groups: int) -> int:
    """M tile of the XLA path: the mean group size rounded down to a power of two, in [8, 128]."""
    return min(128, max(8, _pow2_floor(mean_rows(m, num_groups))))


def _divisor_block(dim: int, unit: int, max_block: int) -> int:
    """Largest multiple of ``unit`` <= ``max_block`` dividing ``dim``; ``dim`` itself if none does."""
    if dim <= max_block:
        return dim
    for mult in range(max_block // unit, 0, -1):
        if dim % (unit * mult) == 0:
            return unit * mult
    return dim


def tpu_blocks(m: int, k: int, n: int, num_groups: int, cfg: QuantConfig | None, lhs_dtype) -> Blocks:
    """Default Mosaic tiles: ``bm`` from the mean group size (multiple of the sublane tile, <= 256)."""
    sub = sublane_tile(lhs_dtype)
    bm = min(256, max(sub, _pow2_floor(mean_rows(m, num_groups))))
    bm = (bm // sub) * sub
    if bm >= m:
        bm = m
    k_unit = 128 if cfg is None else tpu_k_unit(cfg)
    bk = _divisor_block(k, k_unit, 2048 if cfg is None or cfg.group_size is None else 1024)
    bn = _divisor_block(n, 128, 512)
    return Blocks(bm, bn, bk)


def check_tpu_blocks(blocks: Blocks, m: int, k: int, n: int, cfg: QuantConfig | None, lhs_dtype) -> None:
    """Raise ``ValueError`` unless ``blocks`` satisfy Mosaic's tiling and this kernel's whole-K/N blocks."""
    sub = sublane_tile(lhs_dtype)
    if blocks.bm != m and (blocks.bm <= 0 or blocks.bm % sub):
        raise ValueError(f"bm={blocks.bm} must equal M={m} or be a positive multiple of {sub}")
    if n % blocks.bn or (blocks.bn != n and blocks.bn % 128):
        raise ValueError(f"bn={blocks.bn} must divide N={n} and be a multiple of 128 (or equal N)")
    k_unit = 128 if cfg is None else tpu_k_unit(cfg)
    if k % blocks.bk or (blocks.bk != k and blocks.bk % k_unit):
        raise ValueError(f"bk={blocks.bk} must divide K={k} and be a multiple of {k_unit} (or equal K)")


def gpu_group_blocks(m: int, k: int, n: int, num_groups: int, cfg: QuantConfig | None) -> Blocks:
    """Default Triton tiles: the quantized matmul's choice at the mean group size (dense: as int8).

    From a mean of 32 rows per group ``bm`` jumps to 64: on the H100 (deviceless compile, sm_90a) Triton
    emits wgmma only for 64-row tiles and mma.sync below; that matters where the experts' matmuls are
    compute bound (prefill), while decode (a few rows per expert) is memory bound and keeps small tiles.
    """
    mean = mean_rows(m, num_groups)
    return gpu_blocks(64 if mean >= 32 else mean, k, n, cfg or QuantConfig("int8"))
