"""QArray: the runtime quantized-weight pytree.

A QArray stands for a float weight ``w[K, N]`` (applied as ``y = x @ w``). Its leaves are arrays, its
format (:class:`.config.QuantConfig`) and logical float dtype are static aux data, so QArrays
pass through ``jit``, ``scan`` (stacked leaves ``[L, ...]``), ``device_put`` and sharding like any pytree.

Leaves (``G = K / group_size``, or 1 for per-channel formats):

* ``value``: ``int8[K, N]`` (int8), ``int8[K/2, N]`` (int4, two per byte, see :mod:`.packing`),
  or ``float8_e4m3fn[K, N]`` (fp8);
* ``scale``: ``[G, N]`` in ``config.scale_dtype``;
* ``offset``: ``[G, N]`` (asymmetric int4 only, else ``None``).

Dequantized weight: ``scale[k // g, n] * q[k, n] (+ offset[k // g, n])``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quantized_matmul.config import QuantConfig, as_config
from pallas_kernels.quantized_matmul.packing import pack_int4, unpack_int4
from pallas_kernels.quantized_matmul.quantizer import compute_qparams, dequantize_values, quantize_values

_SAME = object()


@jax.tree_util.register_pytree_with_keys_class
class QArray:
    """Quantized ``[..., K, N]`` weight. Build with :meth:`quantize` or :meth:`from_quantized`."""

    __slots__ = ("value", "scale", "offset", "config", "dtype")

    def __init__(self, value, scale, offset, config: QuantConfig, dtype: Any = jnp.bfloat16):
        config = as_config(config)
        if (offset is None) != config.symmetric:
            raise ValueError("offset must be given exactly for asymmetric formats")
        self.value = value
        self.scale = scale
        self.offset = offset
        self.config = config
        self.dtype = np.dtype(dtype)

    # -- pytree -------------------------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        keys = jax.tree_util.GetAttrKey
        children = ((keys("value"), self.value), (keys("scale"), self.scale), (keys("offset"), self.offset))
        return children, (self.config, self.dtype)

    def tree_flatten(self):
        return (self.value, self.scale, self.offset), (self.config, self.dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.value, obj.scale, obj.offset = children
        obj.config, obj.dtype = aux
        return obj

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def quantize(
        cls,
        w: jax.Array,
        config: QuantConfig | str,
        *,
        dtype: Any = None,
        clip: jax.Array | float | None = None,
    ) -> QArray:
        """Round-to-nearest quantization of a float weight ``w[K, N]`` with min/max ranges.

        Args:
          w: float weight ``[K, N]`` (leading stacked dims allowed).
          config: a :class:`QuantConfig` or preset name (``"int8"``, ``"int4"``, ``"fp8"``, ...).
          dtype: logical float dtype of the weight (default ``w.dtype``), returned by :meth:`dequantize`.
          clip: optional range shrink factor, scalar or ``[G, N]`` (see :func:`compute_qparams`).
        """
        config = as_config(config)
        w = jnp.asarray(w)
        _check_float(w, "w")
        config.validate_shape(*w.shape[-2:])
        q, scale, offset = _rtn_levels(w, clip, cfg=config)
        return cls.from_quantized(q, scale, offset, config, dtype=dtype or w.dtype)

    @classmethod
    def from_quantized(
        cls,
        q: jax.Array,
        scale: jax.Array,
        offset: jax.Array | None,
        config: QuantConfig | str,
        *,
        dtype: Any = jnp.bfloat16,
    ) -> QArray:
        """Build from unpacked levels (e.g. computed by GPTQ).

        Args:
          q: ``[..., K, N]`` integer levels (int4: [-8, 7] symmetric or [0, 15] asymmetric; int8:
            [-128, 127]) or float8_e4m3fn values.
          scale: ``[..., G, N]`` scales; offset: ``[..., G, N]`` (asymmetric) or ``None``.
        """
        config = as_config(config)
        k, n = q.shape[-2:]
        config.validate_shape(k, n)
        g = config.group_size or k
        want = (*q.shape[:-2], k // g, n)
        if tuple(scale.shape) != want:
            raise ValueError(f"scale shape {tuple(scale.shape)} does not match {want} for q {tuple(q.shape)}")
        if offset is not None and tuple(offset.shape) != want:
            raise ValueError(f"offset shape {tuple(offset.shape)} does not match {want}")
        if config.weight == "int4":
            value = pack_int4(q, config.group_size)
        elif config.weight == "int8":
            value = jnp.asarray(q).astype(jnp.int8)
        else:
            value = jnp.asarray(q).astype(jnp.float8_e4m3fn)
        scale = jnp.asarray(scale).astype(config.scale_dtype)
        if offset is not None:
            offset = jnp.asarray(offset).astype(config.scale_dtype)
        return cls(value, scale, offset, config, dtype)

    # -- properties ---------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape ``(..., K, N)`` of the float weight."""
        *lead, k, n = self.value.shape
        return (*lead, k * 2 if self.config.weight == "int4" else k, n)

    @property
    def ndim(self) -> int:
        return len(self.value.shape)

    @property
    def group_size(self) -> int:
        """Rows per scale (``K`` for per-channel formats)."""
        return self.config.group_size or self.shape[-2]

    @property
    def nbytes(self) -> int:
        """Bytes of all leaves."""
        leaves = [self.value, self.scale] + ([] if self.offset is None else [self.offset])
        return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves))

    @property
    def bytes_per_param(self) -> float:
        return self.nbytes / float(np.prod(self.shape))

    def __repr__(self) -> str:
        return f"QArray({self.config.name}, shape={self.shape}, dtype={self.dtype.name})"

    # -- conversion ---------------------------------------------------------------------------------
    def levels(self) -> jax.Array:
        """Unpacked quantized values ``[..., K, N]`` (int32 levels, or float8 for fp8)."""
        if self.config.weight == "int4":
            return unpack_int4(self.value, self.config.group_size, signed=self.config.symmetric)
        return self.value

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """Float weight ``[..., K, N]`` in ``dtype`` (default ``self.dtype``), computed in float32."""
        return _dequantize(self, jnp.dtype(dtype or self.dtype))

    def take_columns(self, index) -> QArray:
        """Select / permute output columns (``N`` axis): ``w[:, index]`` for any format."""
        take = lambda a: None if a is None else a[..., index]
        return QArray.tree_unflatten(
            (self.config, self.dtype), (take(self.value), take(self.scale), take(self.offset))
        )

    def logical_axes(self, axes: Sequence[str | None], group_axis: Any = _SAME) -> QArray:
        """Logical axis names of every leaf, as a QArray whose leaves are tuples.

        Args:
          axes: names of the weight's dims, e.g. ``("embed", "mlp")`` (or ``("layers", "embed", "mlp")``
            for stacked leaves).
          group_axis: name for the scale's group dim. Default: the K name for group-wise formats (so
            scales shard with their rows) and ``None`` for per-channel scales (one row).

        Returns:
          QArray with ``value``: ``axes``; ``scale``/``offset``: ``(*lead, group_axis, N-name)``. Map it
          with ``jax.tree.map(f, axes_tree, is_leaf=lambda x: isinstance(x, tuple))``.
        """
        axes = tuple(axes)
        if len(axes) != self.ndim:
            raise ValueError(f"got {len(axes)} axis names for a {self.ndim}-d weight")
        if group_axis is _SAME:
            group_axis = axes[-2] if self.config.group_size is not None else None
        scale_axes = (*axes[:-2], group_axis, axes[-1])
        return QArray.tree_unflatten(
            (self.config, self.dtype), (axes, scale_axes, None if self.offset is None else scale_axes)
        )


@functools.partial(jax.jit, static_argnames=("cfg",))
def _rtn_levels(w, clip, *, cfg: QuantConfig):
    scale, offset = compute_qparams(w, cfg, clip)
    return quantize_values(w, scale, offset, cfg), scale, offset


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(w: QArray, dtype) -> jax.Array:
    return dequantize_values(w.levels(), w.scale, w.offset).astype(dtype)


def _check_float(x, name: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")


def quantize(w: jax.Array, config: QuantConfig | str, **kwargs) -> QArray:
    """Round-to-nearest quantization; same as :meth:`QArray.quantize`."""
    return QArray.quantize(w, config, **kwargs)


def dequantize(w: jax.Array | QArray, dtype: Any = None) -> jax.Array:
    """Float weight of a QArray, or a plain array unchanged (cast to ``dtype`` if given)."""
    if isinstance(w, QArray):
        return w.dequantize(dtype)
    return w if dtype is None else w.astype(dtype)


def logical_axes(w: jax.Array | QArray, axes: Sequence[str | None], **kwargs):
    """Axis names for a weight leaf: ``tuple(axes)`` for a plain array, a QArray of tuples otherwise."""
    if isinstance(w, QArray):
        return w.logical_axes(axes, **kwargs)
    return tuple(axes)


def concat_columns(ws: Sequence[QArray]) -> QArray:
    """Concatenate QArrays of one format along N (e.g. fuse q/k/v projections)."""
    first = ws[0]
    for w in ws[1:]:
        if w.config != first.config or w.shape[:-1] != first.shape[:-1]:
            raise ValueError("concat_columns needs QArrays of one format and K")
    cat = lambda xs: None if xs[0] is None else jnp.concatenate(xs, axis=-1)
    return QArray.tree_unflatten(
        (first.config, first.dtype),
        (cat([w.value for w in ws]), cat([w.scale for w in ws]), cat([w.offset for w in ws])),
    )


def abstract_qarray(k: int, n: int, config: QuantConfig | str, dtype: Any = jnp.bfloat16) -> QArray:
    """QArray of ``jax.ShapeDtypeStruct`` leaves for a ``[K, N]`` weight (for sharding / loading plans)."""
    config = as_config(config)
    config.validate_shape(k, n)
    return jax.eval_shape(lambda: QArray.quantize(jnp.zeros((k, n), dtype), config))
