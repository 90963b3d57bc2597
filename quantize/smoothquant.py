"""SmoothQuant (Xiao et al., 2022): migrate activation outliers into the weights, then W8A8.

Per input channel ``j`` of linears sharing one input: ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``
(``max|W_j|`` over all the group's output columns). The layer computes ``(x / s) @ (diag(s) W)``, which
flattens the per-channel activation range so that dynamic per-token int8 quantization of ``x / s``
loses little. The caller folds ``1 / s`` into the op producing ``x`` (see :mod:`quantize.folding`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.quantized_matmul.config import QuantConfig, as_config
from pallas_kernels.quantized_matmul.qarray import QArray


class SmoothQuantResult(NamedTuple):
    """``scales[K]`` (fold ``1 / scales`` into the producer of ``x``) and one W8A8 QArray per weight
    (holding ``diag(scales) @ W_i``)."""

    scales: jax.Array
    qarrays: list[QArray]


def smoothing_scales(act_abs_max: jax.Array, weights: Sequence[jax.Array], alpha: float = 0.5) -> jax.Array:
    """SmoothQuant scales ``[K]`` from per-channel activation abs-max ``[K]`` and weights ``[K, N_i]``.

    Channels never active (abs-max 0) or with all-zero weights get scale 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not weights:
        raise ValueError("need at least one weight")
    a = jnp.asarray(act_abs_max, jnp.float32)
    k = a.shape[-1]
    for w in weights:
        if w.ndim != 2 or w.shape[0] != k:
            raise ValueError(f"weights must be [K={k}, N_i], got {w.shape}")
    w_max = jnp.max(jnp.concatenate([jnp.abs(w.astype(jnp.float32)) for w in weights], axis=1), axis=1)
    valid = (a > 0) & (w_max > 0)
    s = jnp.where(valid, a, 1.0) ** alpha / jnp.where(valid, w_max, 1.0) ** (1.0 - alpha)
    return jnp.where(valid, jnp.maximum(s, 1e-5), 1.0)


def smoothquant(
    weights: Sequence[jax.Array],
    act_abs_max: jax.Array,
    *,
    alpha: float = 0.5,
    config: QuantConfig | str = "int8-w8a8",
    dtype=None,
) -> SmoothQuantResult:
    """Smooth and quantize linears ``W_i[K, N_i]`` sharing an input with per-channel abs-max ``[K]``.

    Args:
      weights: the group's float weights (e.g. q/k/v, or gate/up).
      act_abs_max: ``[K]`` max ``|x|`` per input channel over calibration data
        (:attr:`~quantize.calibration.ActStats.abs_max`).
      alpha: migration strength (0.5 default; larger moves more difficulty into the weights).
      config: output format, ``"int8-w8a8"`` (or ``"fp8-w8a8"``).
      dtype: logical dtype of the QArrays (default the weights' dtype).
    """
    config = as_config(config)
    s = smoothing_scales(act_abs_max, weights, alpha)
    qarrays = [
        QArray.quantize(jnp.asarray(w).astype(jnp.float32) * s[:, None], config, dtype=dtype or w.dtype)
        for w in weights
    ]
    return SmoothQuantResult(s, qarrays)
