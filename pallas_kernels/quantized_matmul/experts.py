"""Stacked expert weights ``[G, K, N]`` (mixture-of-experts FFNs) in the QArray formats.

A QArray whose leaves carry a leading expert axis: ``value [G, K(/2), N]``, ``scale`` / ``offset``
``[G, K/g, N]``, i.e. each expert quantized exactly as a 2-D weight would be (same grids, same int4
packing), so ``expert_qarray[e]``-style slices of the leaves are ordinary ``[K, N]`` QArrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.quantized_matmul.config import QuantConfig, as_config
from pallas_kernels.quantized_matmul.qarray import QArray


def quantize_experts(w: jax.Array, config: QuantConfig | str, *, dtype: Any = None) -> QArray:
    """Round-to-nearest quantization of stacked expert weights, one expert at a time.

    Args:
      w: float ``[G, K, N]`` (expert ``e`` applied as ``x @ w[e]``).
      config: a :class:`QuantConfig` or preset name (``"int8"``, ``"int4"``, ``"fp8"``, ...).
      dtype: logical float dtype of the weights (default ``w.dtype``).

    Returns:
      QArray of logical shape ``[G, K, N]``. The experts are quantized in a ``lax.map`` so the float32
      temporaries are one expert's, not all ``G``.
    """
    config = as_config(config)
    w = jnp.asarray(w)
    if w.ndim != 3:
        raise ValueError(f"quantize_experts needs [G, K, N] weights, got shape {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"w must be a float array, got dtype {w.dtype}")
    config.validate_shape(*w.shape[-2:])
    dtype = dtype or w.dtype
    return jax.jit(lambda a: jax.lax.map(lambda e: QArray.quantize(e, config, dtype=dtype), a))(w)


def abstract_expert_qarray(g: int, k: int, n: int, config: QuantConfig | str, dtype: Any = jnp.bfloat16) -> QArray:
    """QArray of ``jax.ShapeDtypeStruct`` leaves for ``[G, K, N]`` expert weights (sharding / AOT plans)."""
    config = as_config(config)
    config.validate_shape(k, n)
    if g <= 0:
        raise ValueError(f"number of experts must be positive, got {g}")
    return jax.eval_shape(lambda: QArray.quantize(jnp.zeros((g, k, n), dtype), config))
