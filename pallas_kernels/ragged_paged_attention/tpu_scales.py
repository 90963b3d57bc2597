"""Writing a step's int8 / fp8 KV scales into head-major scale rows on a TPU, in place in HBM.

Head-major and fused caches keep a page's scales as one f32 row ``[num_pages, Hkv * page_size]`` (head
``h``, token ``t`` at lane ``h * page_size + t``; see :mod:`.pages`). An XLA scatter into such an array
lets the TPU compiler stage the whole array in VMEM when it fits: it prefetches all of it, scatters the
step's few scales there and writes all of it back (1 MiB in and out per array and layer at 16,384 pages
of 16 lanes, 8 MiB at 128 lanes), every step. A Pallas call's operand pinned to HBM cannot be staged,
so here the write is a small kernel whose scale operand is pinned to HBM and aliased to its output: it
reads the rows the step writes into VMEM, merges the new scales in and writes those rows back (a
read-modify-write of whole rows: a TPU DMA moves whole 512-byte words, so a row of a multiple of 128
f32 lanes is the unit).

The merge itself is prepared by XLA on small ``[T, row]`` arrays: the step's tokens are sorted by page,
one *leader* per distinct page carries the page's new lanes (``upd``) and which lanes are new
(``mask``); the kernel reads the leaders' rows, selects ``where(mask, upd, row)`` and writes them back.
Tokens on the same page therefore never race, wherever they sit in the batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

ROW_LANES = 128  # a scale row must be a multiple of this many f32 lanes (one 512-byte DMA word)
BLOCK_TOKENS = 256  # leaders handled per grid step (VMEM: 3 x [256, row] f32)


def supported(row_lanes: int) -> bool:
    """Whether rows of ``row_lanes`` f32 lanes can be written by :func:`write_scale_rows`."""
    return row_lanes % ROW_LANES == 0


def _kernel(rows_ref, lead_ref, upd_ref, mask_ref, _scales_in, scales_hbm, buf, sem):
    # rows_ref, lead_ref: SMEM i32[Tp] (row index of sorted token i; 1 when i leads its page's tokens)
    # upd_ref f32[B, L], mask_ref i32[B, L]: VMEM blocks of the leaders' new lanes; scales_hbm f32[R, L]
    # (HBM, aliased to the input); buf f32[B, L] VMEM scratch; sem: one DMA semaphore.
    blk = upd_ref.shape[0]
    base = pl.program_id(0) * blk

    def copy(i, to_hbm: bool):
        row = pl.ds(rows_ref[base + i], 1)
        src, dst = (buf.at[pl.ds(i, 1)], scales_hbm.at[row]) if to_hbm else (scales_hbm.at[row], buf.at[pl.ds(i, 1)])
        return pltpu.make_async_copy(src, dst, sem.at[0])

    def each_leader(fn):
        def body(i, carry):
            @pl.when(lead_ref[base + i] != 0)
            def _():
                fn(i)
            return carry
        lax.fori_loop(0, blk, body, 0)

    each_leader(lambda i: copy(i, False).start())
    each_leader(lambda i: copy(i, False).wait())
    buf[...] = jnp.where(mask_ref[...] != 0, upd_ref[...], buf[...])
    each_leader(lambda i: copy(i, True).start())
    each_leader(lambda i: copy(i, True).wait())


def _leaders(row: jax.Array, lane: jax.Array, new: jax.Array, num_rows: int, row_lanes: int):
    """Sort tokens by row; per distinct row one leader with its merged update.

    Args:
      row: ``i32[T]`` scale row of each token, ``num_rows`` for a token that writes nothing.
      lane: ``i32[T, H]`` lane of each of the token's ``H`` new scales in its row.
      new: ``f32[T, H]`` the new scales.
    Returns:
      ``(rows i32[T], lead i32[T], upd f32[T, L], mask i32[T, L])`` in sorted order.
    """
    t = row.shape[0]
    order = jnp.argsort(row, stable=True)
    srow = row[order]
    idx = jnp.arange(t, dtype=jnp.int32)
    first = (idx == 0) | (srow != jnp.roll(srow, 1))
    valid = srow < num_rows
    lead = first & valid
    leader = lax.cummax(jnp.where(first, idx, 0))  # the leader of sorted token i's row
    dest = jnp.where(valid, leader, t)[:, None]  # a token that writes nothing is dropped
    sl = lane[order]
    upd = jnp.zeros((t, row_lanes), jnp.float32).at[dest, sl].set(new[order].astype(jnp.float32), mode="drop")
    mask = jnp.zeros((t, row_lanes), jnp.int32).at[dest, sl].set(1, mode="drop")
    return jnp.where(valid, srow, 0).astype(jnp.int32), lead.astype(jnp.int32), upd, mask


@functools.partial(jax.jit, static_argnames=("interpret",))
def write_scale_rows(scales: jax.Array, row: jax.Array, lane: jax.Array, new: jax.Array, *,
                     interpret: bool = False) -> jax.Array:
    """``scales.at[row[:, None], lane].set(new)`` in place in HBM (``row >= R`` drops the token).

    Args:
      scales: ``f32[R, L]`` scale rows, ``L`` a multiple of 128; donate it for an in-place update.
      row: ``i32[T]`` row of each token (``R`` or more: nothing written).
      lane: ``i32[T, H]`` lanes of the token's ``H`` scales in its row (distinct within a row).
      new: ``f32[T, H]``.
      interpret: run the kernel in Pallas interpret mode (off a TPU).
    Returns:
      The updated ``f32[R, L]`` (aliased to ``scales``).
    """
    num_rows, width = scales.shape
    if not supported(width):
        raise ValueError(f"scale rows must be a multiple of {ROW_LANES} lanes, got {width}")
    t = row.shape[0]
    rows, lead, upd, mask = _leaders(row.astype(jnp.int32), lane.astype(jnp.int32), new, num_rows, width)
    blk = min(BLOCK_TOKENS, -(-t // 8) * 8)
    tp = -(-t // blk) * blk
    if tp != t:
        rows, lead = jnp.pad(rows, (0, tp - t)), jnp.pad(lead, (0, tp - t))
        upd, mask = jnp.pad(upd, ((0, tp - t), (0, 0))), jnp.pad(mask, ((0, tp - t), (0, 0)))
    if not interpret:
        scales = pltpu.with_memory_space_constraint(scales, pltpu.HBM)
    block = pl.BlockSpec((blk, width), lambda b, *_: (b, 0))
    return pl.pallas_call(
        _kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(tp // blk,),
            in_specs=[block, block, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec(memory_space=pl.ANY),
            scratch_shapes=[pltpu.VMEM((blk, width), jnp.float32), pltpu.SemaphoreType.DMA((1,))],
        ),
        out_shape=jax.ShapeDtypeStruct(scales.shape, scales.dtype),
        input_output_aliases={4: 0},  # operands: rows, lead (scalar prefetch), upd, mask, scales
        compiler_params=pltpu.CompilerParams(dimension_semantics=(pltpu.ARBITRARY,)),
        interpret=interpret,
        name="kv_scale_rows_write",
    )(rows, lead, upd, mask, scales)
