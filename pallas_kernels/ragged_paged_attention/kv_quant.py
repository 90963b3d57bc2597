"""Quantized KV storage: int8 / fp8 values with one float32 absmax scale per (token, KV head).

``x ~= q * scale`` with ``scale = max(|x|) / qmax`` over ``head_dim`` (``qmax`` = 127 for int8, the
largest finite value for fp8). Zero vectors get scale 0 and decode to 0. Every implementation keeps
the quantized tiles as they are and applies the scales to the attention scores (keys) and to the
probabilities (values), which equals dequantizing K and V first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QUANT_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


def check_quant_dtype(dtype) -> jnp.dtype:
    """``dtype`` as a numpy dtype if it is a supported KV quantization dtype, else ``ValueError``."""
    dt = jnp.dtype(dtype)
    if dt not in QUANT_DTYPES:
        names = [str(d) for d in QUANT_DTYPES]
        raise ValueError(f"unsupported KV quantization dtype {dt}; expected one of {names}")
    return dt


def qmax(dtype) -> float:
    """Largest representable magnitude used by the quantizer."""
    dt = jnp.dtype(dtype)
    return 127.0 if dt == jnp.int8 else float(jnp.finfo(dt).max)


def quantize(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Absmax-quantize the last axis.

    Args:
      x: ``[..., head_dim]`` float.
      dtype: int8 or an fp8 dtype.

    Returns:
      ``(values [..., head_dim] in dtype, scale f32[...])``.
    """
    dt = check_quant_dtype(dtype)
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / qmax(dt)
    y = x / jnp.where(scale > 0, scale, 1.0)[..., None]
    if dt == jnp.int8:
        y = jnp.clip(jnp.round(y), -127, 127)
    else:
        y = jnp.clip(y, -qmax(dt), qmax(dt))
    return y.astype(dt), scale


def dequantize(values: jax.Array, scale: jax.Array) -> jax.Array:
    """``values [..., head_dim]`` times ``scale [...]`` in float32."""
    return values.astype(jnp.float32) * scale[..., None]
