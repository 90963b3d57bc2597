"""Work items of the grouped matmul: which M tile meets which group, computed on device.

Rows ``[0, M)`` are sorted by group: group ``g`` owns rows ``[start_g, end_g)`` with ``start`` the exclusive
cumulative sum of ``group_sizes``; rows ``[total, M)`` past ``total = sum(group_sizes)`` are padding. M is
cut into tiles of ``tm`` rows. A *work item* is one (tile, group) pair whose rows intersect: a tile that
straddles a group boundary gets one item per group it touches, and each item writes only its group's rows
of the tile. The padding rows form one more pseudo-group whose items compute nothing and write zeros.

Items are ordered by group, then tile, so the tiles of consecutive items never decrease and the items of
one tile are consecutive. Their number is at most ``cdiv(M, tm) + G`` (each of the ``G + 1`` groups adds at
most one tile shared with its predecessor): that static bound sizes the kernels' grids, and items past
the real count (``num_items``) are *dead*: they repeat the last item's tile and group (so a TPU pipeline
fetches nothing new for them), have an empty row range and compute nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class WorkItems(NamedTuple):
    """Per-item int32 arrays ``[W]`` (``W = max_items(M, tm, G)``) and the live count.

    Attributes:
      tile: M tile of the item (rows ``[tile * tm, tile * tm + tm)``).
      group: expert whose weights the item reads: its own group, or for padding and dead items the
        group of the last computing item before it (0 if none), so no new weight block is needed.
      lo, hi: the item's rows are ``[lo, hi)`` intersected with its tile (empty for dead items).
      compute: 1 where the item multiplies (a real group), 0 for padding and dead items.
      num_items: ``int32[1]``, the number of live items (real and padding).
    """

    tile: jax.Array
    group: jax.Array
    lo: jax.Array
    hi: jax.Array
    compute: jax.Array
    num_items: jax.Array


def max_items(m: int, tm: int, num_groups: int) -> int:
    """Static upper bound on the number of work items: ``cdiv(M, tm) + G``."""
    return -(-m // tm) + num_groups


def work_items(group_sizes: jax.Array, m: int, tm: int) -> WorkItems:
    """Work items for rows ``[0, m)`` in tiles of ``tm`` rows, grouped by ``group_sizes``.

    Args:
      group_sizes: ``int32[G]`` rows per group. Negative sizes count as 0; groups reaching past ``m`` are
        cut at ``m`` (rows past ``m`` do not exist).
      m: number of rows (static).
      tm: rows per tile (static).

    Returns:
      :class:`WorkItems` with ``W = max_items(m, tm, G)`` entries; traceable (fixed shapes whatever the
      sizes are, so one compilation serves every routing).
    """
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    g = sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(sizes), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    total = ends[-1] if g else jnp.int32(0)
    # the padding rows as group G
    starts = jnp.concatenate([starts, total[None]])
    ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
    nonempty = ends > starts
    first_tile = starts // tm
    counts = jnp.where(nonempty, (ends - 1) // tm - first_tile + 1, 0)
    cum = jnp.cumsum(counts)
    num_items = cum[-1]

    w_max = max_items(m, tm, g)
    idx = jnp.arange(w_max, dtype=jnp.int32)
    last = jnp.maximum(num_items - 1, 0)
    live = idx < num_items
    item = jnp.minimum(idx, last)  # dead items copy the last live one
    grp = jnp.searchsorted(cum, item, side="right").astype(jnp.int32)
    grp = jnp.minimum(grp, g)
    tile = first_tile[grp] + item - (cum[grp] - counts[grp])
    compute = live & (grp < g)
    # weight group: the last computing item's group at or before this one (groups never decrease)
    group = jax.lax.cummax(jnp.where(grp < g, grp, 0), axis=0)
    lo = jnp.where(live, starts[grp], 0)
    hi = jnp.where(live, ends[grp], 0)
    i32 = lambda a: a.astype(jnp.int32)
    return WorkItems(i32(tile), i32(group), i32(lo), i32(hi), i32(compute), i32(num_items)[None])


def group_of_rows(group_sizes: jax.Array, m: int) -> jax.Array:
    """``int32[m]``: the group of each row, ``G`` for padding rows past ``sum(group_sizes)``."""
    ends = jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)
