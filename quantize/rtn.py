"""Round-to-nearest (RTN) weight quantization: min/max ranges, optional percentile clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quantized_matmul.config import QuantConfig, as_config
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.quantizer import (
    compute_qparams,
    from_groups,
    group_size_of,
    quantize_values,
    to_groups,
)


def rtn_quantize(
    w: jax.Array, config: QuantConfig | str, *, percentile: float | None = None, dtype=None
) -> QArray:
    """Quantize ``w[K, N]`` by rounding to the nearest level.

    Args:
      w: float weight ``[K, N]``.
      config: format or preset name.
      percentile: if given (in (50, 100]), each group's range is taken from this percentile of ``|w|``
        (symmetric) or the ``(100 - p, p)`` percentiles of ``w`` (asymmetric) instead of the min/max;
        values outside saturate at the extreme levels.
      dtype: logical float dtype (default ``w.dtype``).
    """
    config = as_config(config)
    w = jnp.asarray(w)
    if percentile is None:
        return QArray.quantize(w, config, dtype=dtype)
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"w must be a float array, got dtype {w.dtype}")
    config.validate_shape(*w.shape[-2:])
    wf = w.astype(jnp.float32)
    wg = to_groups(wf, group_size_of(config, w.shape[-2]))
    if config.symmetric:
        bound = jnp.percentile(jnp.abs(wg), percentile, axis=-2, keepdims=True)
        lo, hi = -bound, bound
    else:
        lo = jnp.percentile(wg, 100.0 - percentile, axis=-2, keepdims=True)
        hi = jnp.percentile(wg, percentile, axis=-2, keepdims=True)
    clipped = from_groups(jnp.clip(wg, lo, hi))
    scale, offset = compute_qparams(clipped, config)
    q = quantize_values(wf, scale, offset, config)
    return QArray.from_quantized(q, scale, offset, config, dtype=dtype or w.dtype)
