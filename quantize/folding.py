"""Folding per-input-channel scales ``s[K]`` (AWQ, SmoothQuant) into neighbouring weights.

Both algorithms rewrite ``x @ W`` as ``(x / s) @ (diag(s) W)``: the layer's weights get their rows
multiplied by ``s`` (done by the algorithm before quantizing) and the op producing ``x`` must output
``x / s`` instead. That op is, e.g., the RMSNorm before q/k/v or gate/up (:func:`fold_into_norm`), v_proj
before o_proj, or up_proj before down_proj (:func:`fold_into_linear_output`, valid because attention is
linear in v and ``silu(gate) * up`` is linear in up).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def scale_rows(w: jax.Array, s: jax.Array) -> jax.Array:
    """``diag(s) @ w`` for ``w[K, N]``, ``s[K]`` (computed in float32, returned in ``w.dtype``)."""
    return (w.astype(jnp.float32) * s.astype(jnp.float32)[:, None]).astype(w.dtype)


def fold_into_norm(norm_weight: jax.Array, s: jax.Array, norm_bias: jax.Array | None = None):
    """Norm scale (and bias) ``[K]`` divided by ``s[K]``: the norm then outputs ``x / s``.

    Returns:
      the new weight, or ``(weight, bias)`` when ``norm_bias`` is given.
    """
    new_w = (norm_weight.astype(jnp.float32) / s).astype(norm_weight.dtype)
    if norm_bias is None:
        return new_w
    return new_w, (norm_bias.astype(jnp.float32) / s).astype(norm_bias.dtype)


def fold_into_linear_output(w_prev: jax.Array, s: jax.Array, bias_prev: jax.Array | None = None):
    """Previous linear ``w_prev[K', K]`` (and bias ``[K]``) with output columns divided by ``s[K]``."""
    new_w = (w_prev.astype(jnp.float32) / s[None, :]).astype(w_prev.dtype)
    if bias_prev is None:
        return new_w
    return new_w, (bias_prev.astype(jnp.float32) / s).astype(bias_prev.dtype)
