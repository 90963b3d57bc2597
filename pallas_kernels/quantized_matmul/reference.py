"""Pure-jnp quantized matmul: the oracle for the Pallas kernels and the CPU path.

Math, per format (``x[M, K]`` float, ``cdt`` = ``x.dtype``, accumulation in float32 or int32):

* per-channel W8A16 (int8, fp8): ``y = (x @ q.astype(cdt)) * scale``  (scale in the epilogue);
* group-wise W8A16 / W4A16:      ``y = x @ (scale * q (+ offset)).astype(cdt)`` (dequantized in f32; int4 as
  two half-K dots over the packed nibbles, :func:`int4_matmul`);
* W8A8 (int8, fp8):              ``xq, xs = quantize_activations(x)``;  ``y = (xq @ q) * xs * scale``.

The kernels compute exactly these expressions tile by tile, so they agree with this function up to
the order of float additions in the accumulator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quantized_matmul.packing import unpack_int4_halves
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.quantizer import quantize_activations


def compute_precision(dtype) -> jax.lax.Precision:
    """Full-precision dots for float32 operands; the default (native MXU/tensor-core type) otherwise.

    Explicit, never ``None``: a global ``jax_default_matmul_precision="highest"`` would otherwise ask
    Mosaic for fp32 contraction of bf16 / int8 operands, which it refuses ("Bad lhs type").
    """
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def quantized_matmul_reference(x: jax.Array, w: QArray, out_dtype) -> jax.Array:
    """``x[M, K] @ w[K, N] -> [M, N]`` in ``out_dtype``."""
    cfg = w.config
    if cfg.act is not None:
        xq, xs = quantize_activations(x, cfg.act)
        acc_dtype = jnp.int32 if cfg.act == "int8" else jnp.float32
        acc = jnp.dot(xq, w.value, preferred_element_type=acc_dtype)
        y = acc.astype(jnp.float32) * xs * w.scale.astype(jnp.float32)
        return y.astype(out_dtype)
    cdt = x.dtype
    prec = compute_precision(cdt)
    if cfg.group_size is None:
        acc = jnp.dot(x, w.value.astype(cdt), preferred_element_type=jnp.float32, precision=prec)
        return (acc * w.scale.astype(jnp.float32)).astype(out_dtype)
    if cfg.weight == "int4":
        return int4_matmul(x, w).astype(out_dtype)
    wd = w.dequantize(jnp.float32).astype(cdt)
    return jnp.dot(x, wd, preferred_element_type=jnp.float32, precision=prec).astype(out_dtype)


def int4_matmul(x: jax.Array, w: QArray) -> jax.Array:
    """``x[M, K] @ dequantize(w) -> f32[M, N]`` for int4 ``w`` without interleaving the nibbles back into rows.

    The split-half packing (:mod:`pallas_kernels.quantized_matmul.packing`) puts the first half of each
    group's rows in the low nibbles and the second half in the high ones, so with ``x`` viewed as
    ``[bm, K/g, g]`` the product is ``x_lo @ w_lo + x_hi @ w_hi`` (as in the Triton kernel). On XLA:CPU this
    is ~4x faster than unpacking to ``[K, N]`` first (measured at K=1024, N=768, 16 rows).
    """
    g = w.config.group_size
    k, n = w.shape
    lo, hi = unpack_int4_halves(w.value, signed=w.config.symmetric)  # (K/2, N) int32 each
    scale = w.scale.astype(jnp.float32)[:, None, :]
    offset = None if w.offset is None else w.offset.astype(jnp.float32)[:, None, :]

    def dequant(q):
        q = q.reshape(k // g, g // 2, n).astype(jnp.float32) * scale
        return (q if offset is None else q + offset).reshape(k // 2, n).astype(x.dtype)

    xg = x.reshape(x.shape[0], k // g, g)
    x_lo = xg[:, :, : g // 2].reshape(x.shape[0], k // 2)
    x_hi = xg[:, :, g // 2 :].reshape(x.shape[0], k // 2)
    prec = compute_precision(x.dtype)
    y = jnp.dot(x_lo, dequant(lo), preferred_element_type=jnp.float32, precision=prec)
    return y + jnp.dot(x_hi, dequant(hi), preferred_element_type=jnp.float32, precision=prec)
