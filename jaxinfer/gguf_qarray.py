"""GGUF linear weights -> QArray (lossless for Q8_0, Q4_0, Q4_1) or float arrays.

GGUF stores a linear weight as ``N`` rows (output features), each contiguous along ``K`` in blocks of
32 values (``tensor.shape`` is ggml order ``(K, N)``; ``tensor.data`` is ``uint8[N, bytes_per_row]``):

* Q8_0 (34 bytes): f16 ``d``, 32 x int8 ``q``;              ``w = d * q``
* Q4_0 (18 bytes): f16 ``d``, 16 bytes of nibbles;           ``w = d * (q - 8)``, q in [0, 15]
* Q4_1 (20 bytes): f16 ``d``, f16 ``m``, 16 bytes of nibbles; ``w = d * q + m``
  (byte ``r`` of a block holds element ``r`` in its low nibble and ``r + 16`` in its high nibble).

These map onto QArray formats ``int8-g32``, ``int4-g32`` (symmetric: nibble ``q - 8`` as a signed
nibble, i.e. ``byte ^ 0x88``) and ``int4-g32-asym`` (``scale = d``, ``offset = m``) with float16 scales,
and the nibble order is this project's split-half-per-group packing, so import is a byte transpose.
Dequantization is bit-exact: a float16 scale times a 4- or 8-bit level has at most 19 significant
bits, so the float32 product is exact whether or not the compiler fuses the Q4_1 add into an FMA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from gguf import quants as gguf_quants

from pallas_kernels.quantized_matmul.config import QuantConfig
from pallas_kernels.quantized_matmul.qarray import QArray

_BLOCK = 32
_LOSSLESS = {
    GGMLType.Q8_0: (QuantConfig("int8", group_size=32, scale_dtype="float16"), 34),
    GGMLType.Q4_0: (QuantConfig("int4", group_size=32, scale_dtype="float16"), 18),
    GGMLType.Q4_1: (QuantConfig("int4", group_size=32, symmetric=False, scale_dtype="float16"), 20),
}
_FLOAT = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


def _kn(shape: Sequence[int]) -> tuple[int, int]:
    shape = [int(s) for s in shape]
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D GGUF tensor shape (K, N), got {shape}")
    return shape[0], shape[1]


def qarray_from_gguf(
    data: np.ndarray, tensor_type: Any, shape: Sequence[int], *, dtype=jnp.bfloat16
) -> QArray:
    """Import one Q8_0 / Q4_0 / Q4_1 GGUF linear weight without loss.

    Args:
      data: raw bytes as ``GGUFReader`` gives them (``tensor.data``), ``uint8[N, bytes_per_row]``.
      tensor_type: ``tensor.tensor_type`` (a ``GGMLQuantizationType`` or its int value).
      shape: ``tensor.shape`` in ggml order ``(K, N)`` (K = input features, contiguous).
      dtype: logical float dtype of the QArray.

    Returns:
      QArray of logical shape ``[K, N]`` whose dequantization equals ``gguf.quants.dequantize(data).T``.
    """
    cfg = lossless_config(tensor_type)
    ttype = GGMLType(int(tensor_type))
    block_bytes = _LOSSLESS[ttype][1]
    k, n = _kn(shape)
    if k % _BLOCK:
        raise ValueError(f"K={k} is not a multiple of the GGUF block size {_BLOCK}")
    nb = k // _BLOCK
    raw = np.ascontiguousarray(np.asarray(data)).view(np.uint8)
    if raw.size != n * nb * block_bytes:
        raise ValueError(
            f"{ttype.name} data has {raw.size} bytes, expected {n * nb * block_bytes} for (K, N)={(k, n)}"
        )
    value, scale, offset = block_fields(raw.reshape(n, nb, block_bytes), ttype)
    return QArray(
        jnp.asarray(value),
        jnp.asarray(scale),
        None if offset is None else jnp.asarray(offset),
        cfg,
        dtype,
    )


def lossless_config(tensor_type: Any) -> QuantConfig:
    """The QArray format of a Q8_0 / Q4_0 / Q4_1 tensor (``ValueError`` for other types)."""
    ttype = GGMLType(int(tensor_type))
    if ttype not in _LOSSLESS:
        raise ValueError(f"GGUF type {ttype.name} has no lossless QArray form; supported: Q8_0, Q4_0, Q4_1")
    return _LOSSLESS[ttype][0]


def block_fields(blocks: np.ndarray, tensor_type: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """QArray leaves of GGUF blocks: ``uint8[n, nb, block bytes]`` (``nb`` consecutive blocks of ``n`` rows)
    -> ``value`` ``[32 nb, n]`` (Q8_0) or ``[16 nb, n]`` (Q4_0 / Q4_1, packed), ``scale`` ``[nb, n]`` and
    ``offset`` ``[nb, n]`` (Q4_1) or ``None``, as numpy arrays. Blocks decode independently, so any range of
    rows and blocks gives the matching slice of every leaf."""
    ttype = GGMLType(int(tensor_type))
    n, nb, _ = blocks.shape
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]  # [n, nb]
    scale = np.ascontiguousarray(d.T)  # [nb, n]
    offset = None
    if ttype == GGMLType.Q8_0:
        q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, nb * _BLOCK)
        return np.ascontiguousarray(q.T), scale, offset
    start = 2
    if ttype == GGMLType.Q4_1:
        offset = np.ascontiguousarray(np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].T)
        start = 4
    nibbles = blocks[..., start:]  # [n, nb, 16]: byte r = (elem r, elem r + 16)
    if ttype == GGMLType.Q4_0:
        nibbles = nibbles ^ np.uint8(0x88)  # unsigned q -> signed nibble of q - 8
    value = np.ascontiguousarray(nibbles.reshape(n, nb * _BLOCK // 2).T).view(np.int8)
    return value, scale, offset


def gguf_tensor_to_weight(tensor: Any, *, dtype=jnp.bfloat16, dequantize_other: bool = False):
    """A ``GGUFReader`` tensor holding a linear weight -> ``[K, N]`` QArray or float array.

    F32 / F16 / BF16 become plain ``[K, N]`` arrays in ``dtype``; Q8_0 / Q4_0 / Q4_1 become QArrays
    (lossless); other quantized types raise ``ValueError`` unless ``dequantize_other`` (then they are
    dequantized with gguf-py into a float array).
    """
    ttype = GGMLType(int(tensor.tensor_type))
    k, n = _kn(tensor.shape)
    if ttype in _LOSSLESS:
        return qarray_from_gguf(tensor.data, ttype, (k, n), dtype=dtype)
    if ttype in _FLOAT or dequantize_other:
        if ttype == GGMLType.BF16:
            w = (np.asarray(tensor.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            w = gguf_quants.dequantize(np.asarray(tensor.data), ttype)
        return jnp.asarray(np.asarray(w, np.float32).reshape(n, k).T, dtype)
    raise ValueError(
        f"GGUF type {ttype.name} is not imported losslessly; pass dequantize_other=True to load it as floats"
    )
