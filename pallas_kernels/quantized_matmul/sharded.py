"""Quantized matmul under tensor parallelism: the kernel once per shard, inside ``shard_map``.

XLA cannot partition a Mosaic / Triton custom call ("Mosaic kernels cannot be automatically
partitioned"), so a sharded weight must reach the kernel through ``shard_map``, each device multiplying
its own slice (as attention does for heads):

* ``split="n"`` (column parallel: q/k/v, gate/up, LM head): ``w`` and its scales / offsets split along N;
  ``x`` replicated; the output comes out split along N.
* ``split="k"`` (row parallel: o_proj, down_proj): ``w`` split along K with its group scales / offsets
  (per-channel scales replicated, applied per shard: they are per column, so they commute with the sum);
  ``x`` split along K; the per-shard partial products are summed with ``psum``; the output is replicated.
  Needs whole quantization groups per shard and, for int4, whole packed groups (``K / tp`` a multiple of
  the group size). W8A8 formats quantize each shard's slice of the activations with its own per-token
  scales (as tensor-parallel ranks do in vLLM), so the result is the sum of per-shard W8A8 products, not
  bit-equal to one W8A8 product over all of K.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pallas_kernels.quantized_matmul.api import quantized_matmul
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.tuning import Blocks


def weight_specs(w: QArray, split: str, axis: str) -> QArray:
    """``PartitionSpec`` of each leaf of a 2-D ``w`` split along N (``split="n"``) or K (``"k"``) over ``axis``."""
    if split == "n":
        value = scale = P(None, axis)
    elif split == "k":
        value = P(axis, None)
        scale = P(axis, None) if w.config.group_size is not None else P(None, None)
    else:
        raise ValueError(f"split must be 'n' or 'k', got {split!r}")
    return QArray.tree_unflatten((w.config, w.dtype), (value, scale, None if w.offset is None else scale))


def quantized_matmul_sharded(
    x: jax.Array,
    w: QArray,
    mesh: Mesh,
    *,
    split: str,
    axis: str = "model",
    impl: str | None = None,
    interpret: bool | None = None,
    out_dtype=None,
    blocks: Blocks | None = None,
) -> jax.Array:
    """:func:`~.api.quantized_matmul` with ``w`` split over ``mesh`` axis ``axis`` (see the module docstring).

    Args:
      x: ``[M, K]`` activations (replicated for ``split="n"``; split along K for ``split="k"``).
      w: ``QArray`` of logical shape ``[K, N]``.
      mesh: the device mesh; ``axis`` names the tensor-parallel axis (size ``tp``).
      split: ``"n"`` or ``"k"``.
      impl, interpret, out_dtype, blocks: as for :func:`~.api.quantized_matmul`, per shard (``blocks``
        are the local tiles).

    Returns:
      ``[M, N]``: split along N over ``axis`` (``split="n"``) or replicated (``split="k"``).
    """
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"quantized_matmul_sharded needs x [M, K] and a 2-D weight, got {x.shape}, {w.shape}")
    tp = int(mesh.shape[axis])
    k, n = w.shape
    if split == "n" and n % tp:
        raise ValueError(f"N={n} is not divisible by the {axis!r} axis size {tp}")
    if split == "k":
        if k % (tp * w.group_size if w.config.group_size else tp):
            raise ValueError(f"K={k} must split over {tp} shards in whole groups of {w.group_size}")
    fn = functools.partial(quantized_matmul, impl=impl, interpret=interpret, out_dtype=out_dtype, blocks=blocks)
    if split == "k":
        def local(xs, ws):
            return jax.lax.psum(fn(xs, ws), axis)

        x_spec, out_spec = P(None, axis), P()
    else:
        local, x_spec, out_spec = fn, P(), P(None, axis)
    return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, weight_specs(w, split, axis)), out_specs=out_spec,
                         check_vma=False)(x, w)
