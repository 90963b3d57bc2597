"""Kept-quantized weights built shard-locally: every leaf of a QArray (``value``, ``scale``, ``offset``) is
materialised with ``jax.make_array_from_callback`` in its own sharding (the one its logical axes map to,
:meth:`QArray.logical_axes`), from a reader that returns any slice of that leaf. Each process therefore
asks its checkpoint only for the slices its own devices hold: a column-split weight's columns, a
row-split weight's rows (packed int4 rows, the groups of its scales), replicated leaves whole; each
distinct slice once.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from jaxinfer.sharding import ShardingPlan
from pallas_kernels.quantized_matmul.qarray import QArray

FIELDS = ("value", "scale", "offset")

Index = tuple[slice, ...]


def sharded_array(shape: tuple[int, ...], dtype, sharding, read: Callable[[Index], np.ndarray]) -> jax.Array:
    """A global ``jax.Array`` of ``shape`` in ``sharding``, each addressable shard ``read(index)`` (unit-step
    slices, one per axis) in ``dtype``; slices several local devices share (replicas) are read once."""
    cache = {}

    def shard(index):
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if key not in cache:
            got = np.asarray(read(index), dtype=dtype)
            want = tuple(b - a for a, b in key)
            if got.shape != want:
                raise ValueError(f"a reader returned shape {got.shape} for the slice {key} (expected {want})")
            cache[key] = got
        return cache[key]

    return jax.make_array_from_callback(tuple(shape), sharding, shard)


def qarray_shardings(abstract: QArray, axes: tuple, plan: ShardingPlan) -> QArray:
    """The ``NamedSharding`` of each leaf of ``abstract`` (a QArray of ``[K, N]`` or ``[E, K, N]``) for the
    weight's logical ``axes``: scales / offsets follow their weight's rows (groups) and columns."""
    names = abstract.logical_axes(tuple(axes))
    return jax.tree.map(plan.sharding, names, is_leaf=lambda x: isinstance(x, tuple))


def load_qarray(abstract: QArray, shardings: QArray, read: Callable[[str, Index], np.ndarray]) -> QArray:
    """A QArray of global arrays shaped like ``abstract`` (``jax.ShapeDtypeStruct`` leaves), each leaf in
    its sharding from ``shardings``, every local shard from ``read(field, index)`` (``field``: one of
    ``"value"``, ``"scale"``, ``"offset"``)."""
    leaves = []
    for f in FIELDS:
        a = getattr(abstract, f)
        leaves.append(None if a is None else
                      sharded_array(a.shape, a.dtype, getattr(shardings, f), lambda i, f=f: read(f, i)))
    return QArray.tree_unflatten((abstract.config, abstract.dtype), tuple(leaves))
