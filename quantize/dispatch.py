"""``linear(x, w)``: the one call model code makes for every projection, quantized or not."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quantized_matmul.api import quantized_matmul
from quantize.qarray import QArray


def linear(x: jax.Array, w: jax.Array | QArray, bias: jax.Array | None = None, *, impl: str | None = None):
    """``x @ w (+ bias)``, dispatching on the weight's type.

    Args:
      x: ``[..., K]`` activations.
      w: ``[K, N]`` plain float array, or a :class:`QArray` of logical shape ``[K, N]`` (any format).
      bias: optional unquantized ``[N]``.
      impl: kernel implementation for QArray weights (``None``: backend default).

    Returns:
      ``[..., N]`` in ``x.dtype``.
    """
    if isinstance(w, QArray):
        y = quantized_matmul(x, w, impl=impl)
    else:
        if w.ndim != 2 or x.shape[-1] != w.shape[0]:
            raise ValueError(f"linear: x {x.shape} and w {w.shape} do not match as [..., K] @ [K, N]")
        y = jnp.matmul(x, w.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y
