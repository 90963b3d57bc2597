"""Scalar quantization math shared by RTN, GPTQ, AWQ, SmoothQuant, QArray and the kernels.

Weights ``w[K, N]`` are viewed as groups ``[G, g, N]`` (``g`` = group size, or ``K`` per channel);
one scale (and offset, if asymmetric) per group and output column. All math is float32.

Grids:

* symmetric integer: ``scale = amax / (qmax + 0.5)``, ``q = clip(round(w / scale), -qmax-1, qmax)``
  (``qmax`` = 127 or 7): every level is used and the rounding error is at most ``scale / 2``;
* asymmetric int4: ``scale = (max - min) / 15``, ``offset = min``,
  ``q = clip(round((w - min) / scale), 0, 15)``;
* fp8 (e4m3): ``scale = amax / 448``, ``q = float8_e4m3fn(w / scale)`` (3 mantissa bits).

Activations (W8A8) are quantized per token (row) with ``scale = amax / 127`` (int8) or ``amax / 448`` (fp8).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.quantized_matmul.config import FP8_MAX, QuantConfig


def group_size_of(cfg: QuantConfig, k: int) -> int:
    """Rows per scale group: ``cfg.group_size`` or ``K`` for per-channel formats."""
    return cfg.group_size if cfg.group_size is not None else k


def to_groups(w: jnp.ndarray, g: int) -> jnp.ndarray:
    """``[..., K, N] -> [..., K/g, g, N]``."""
    *lead, k, n = w.shape
    return w.reshape(*lead, k // g, g, n)


def from_groups(wg: jnp.ndarray) -> jnp.ndarray:
    """``[..., G, g, N] -> [..., G*g, N]``."""
    *lead, ng, g, n = wg.shape
    return wg.reshape(*lead, ng * g, n)


def _round_to_storage(x: jnp.ndarray, cfg: QuantConfig) -> jnp.ndarray:
    """Round scales/offsets to their storage dtype, so quantization uses the stored values."""
    return x.astype(cfg.scale_dtype).astype(jnp.float32)


def compute_qparams(
    w: jnp.ndarray, cfg: QuantConfig, clip: jnp.ndarray | float | None = None
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Min/max quantization parameters of ``w[..., K, N]``.

    Args:
      w: float weight ``[..., K, N]``.
      cfg: the format.
      clip: optional range shrink factor in (0, 1], a scalar or ``[..., G, N]``; the range
        (``amax``, or ``min``/``max`` when asymmetric) is multiplied by it before the scale is taken.

    Returns:
      ``(scale, offset)``, each float32 ``[..., G, N]`` (``offset`` is ``None`` when symmetric), already
      rounded to ``cfg.scale_dtype``.
    """
    k = w.shape[-2]
    wg = to_groups(jnp.asarray(w, jnp.float32), group_size_of(cfg, k))
    if cfg.symmetric:
        amax = jnp.max(jnp.abs(wg), axis=-2)
        if clip is not None:
            amax = amax * clip
        denom = FP8_MAX if cfg.weight == "fp8" else cfg.qmax + 0.5
        scale = amax / denom
        scale = _round_to_storage(jnp.where(scale > 0, scale, 1.0), cfg)
        return scale, None
    lo = jnp.min(wg, axis=-2)
    hi = jnp.max(wg, axis=-2)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scale = (hi - lo) / (2**cfg.bits - 1)
    scale = _round_to_storage(jnp.where(scale > 0, scale, 1.0), cfg)
    return scale, _round_to_storage(lo, cfg)


def quantize_values(
    w: jnp.ndarray, scale: jnp.ndarray, offset: jnp.ndarray | None, cfg: QuantConfig
) -> jnp.ndarray:
    """Quantize ``w[..., K, N]`` on a given grid (``scale``/``offset`` ``[..., G, N]``).

    Returns:
      int32 levels ``[..., K, N]`` (integer formats) or float8_e4m3fn values (fp8).
    """
    k = w.shape[-2]
    g = k // scale.shape[-2]
    wg = to_groups(jnp.asarray(w, jnp.float32), g)
    s = scale.astype(jnp.float32)[..., None, :]
    if cfg.weight == "fp8":
        return from_groups(jnp.clip(wg / s, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn))
    if cfg.symmetric:
        q = jnp.clip(jnp.round(wg / s), -cfg.qmax - 1, cfg.qmax)
    else:
        m = offset.astype(jnp.float32)[..., None, :]
        q = jnp.clip(jnp.round((wg - m) / s), 0, 2**cfg.bits - 1)
    return from_groups(q.astype(jnp.int32))


def dequantize_values(q: jnp.ndarray, scale: jnp.ndarray, offset: jnp.ndarray | None) -> jnp.ndarray:
    """float32 ``scale * q (+ offset)`` for levels ``q[..., K, N]`` and params ``[..., G, N]``."""
    k = q.shape[-2]
    g = k // scale.shape[-2]
    w = to_groups(q.astype(jnp.float32), g) * scale.astype(jnp.float32)[..., None, :]
    if offset is not None:
        w = w + offset.astype(jnp.float32)[..., None, :]
    return from_groups(w)


def fake_quantize(w: jnp.ndarray, cfg: QuantConfig, clip: jnp.ndarray | float | None = None) -> jnp.ndarray:
    """Quantize then dequantize ``w[..., K, N]`` with min/max (optionally clipped) params; float32."""
    scale, offset = compute_qparams(w, cfg, clip)
    return dequantize_values(quantize_values(w, scale, offset, cfg), scale, offset)


def kernel_activations(x: jnp.ndarray, cfg) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """The left operand a kernel multiplies: ``(xq, scale[M, 1])`` for W8A8 formats (``cfg.act`` set), else
    ``(x, None)`` (weight-only formats and dense weights, ``cfg`` ``None``)."""
    if cfg is not None and cfg.act is not None:
        return quantize_activations(x, cfg.act)
    return x, None


def quantize_activations(x: jnp.ndarray, act: str) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Dynamic per-token (per-row) symmetric quantization of ``x[M, K]``.

    Returns:
      ``(xq[M, K], scale[M, 1])``: int8 (levels in [-127, 127]) or float8_e4m3fn values, and float32
      scales with ``x ~= xq * scale``.
    """
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    if act == "int8":
        scale = jnp.where(amax > 0, amax / 127.0, 1.0)
        return jnp.clip(jnp.round(xf / scale), -127, 127).astype(jnp.int8), scale
    if act == "fp8":
        scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
        return jnp.clip(xf / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn), scale
    raise ValueError(f"unsupported activation quantization {act!r}; expected 'int8' or 'fp8'")
