"""AWQ (Lin et al., 2023): activation-aware per-input-channel weight scaling, then group quantization.

For a group of linears sharing one input ``x[T, K]`` (q/k/v, or gate/up), AWQ searches scales
``s[K] = mean|x|^alpha`` (normalised so ``sqrt(max(s) * min(s)) = 1``) over a grid of ``alpha`` in
``[0, 1)``, minimising the group's output error ``sum_i ||x W_i - (x / s) Q(diag(s) W_i)||^2``;
``alpha = 0`` is plain RTN. Optionally, a per-(group, column) clipping ratio of the quantization range
is then searched (``1 - j * max_shrink / clip_grid``) to minimise each group's partial output error.

The caller stores the returned QArrays (they hold ``Q(diag(s) W_i)``) and must make the layer's input
``x / s``: divide the preceding norm weight (or the previous linear's output columns) by ``s`` (see
:mod:`quantize.folding`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.quantized_matmul.config import QuantConfig, as_config
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.quantizer import fake_quantize, group_size_of, to_groups

_HI = jax.lax.Precision.HIGHEST


class AWQResult(NamedTuple):
    """Result of :func:`awq_search`.

    Attributes:
      scales: ``[K]`` float32; fold ``1 / scales`` into the op producing the input.
      alpha: chosen exponent.
      qarrays: one QArray per input weight, quantizing ``diag(scales) @ W_i`` (clipped if searched).
      loss: output MSE of the chosen scales (before clipping search); ``loss_rtn``: the same at
        ``alpha = 0`` (plain RTN, no scaling).
    """

    scales: jax.Array
    alpha: float
    qarrays: list[QArray]
    loss: float
    loss_rtn: float


def _check_inputs(weights, x):
    if not weights:
        raise ValueError("need at least one weight")
    k = weights[0].shape[0]
    for w in weights:
        if w.ndim != 2 or w.shape[0] != k:
            raise ValueError(f"all weights must be [K={k}, N_i], got {w.shape}")
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise TypeError(f"weights must be float arrays, got {w.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"calibration inputs have {x.shape[-1]} channels, weights have K={k}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"calibration inputs must be float, got {x.dtype}")
    return k


def awq_search(
    weights: Sequence[jax.Array],
    x: jax.Array,
    config: QuantConfig | str = "int4",
    *,
    n_grid: int = 20,
    duo_scaling: bool = False,
    clip: bool | Sequence[bool] = True,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
    clip_tokens: int = 512,
    search_tokens: int = 8192,
    dtype=None,
) -> AWQResult:
    """Search AWQ scales for linears ``W_i[K, N_i]`` that share the input ``x[..., K]``.

    Args:
      weights: the group's float weights.
      x: calibration inputs ``[..., K]`` (flattened to tokens).
      config: weight format (usually int4 group-wise).
      n_grid: number of ``alpha`` values ``0, 1/n, ..., (n-1)/n``.
      duo_scaling: use ``s = mean|x|^alpha / mean|w_normalised|^(1 - alpha)`` (weight-aware variant).
      clip: search clipping ranges (one flag for all weights, or one per weight; e.g. off for q/k).
      clip_grid, max_shrink: clipping ratios ``1 - j * max_shrink / clip_grid`` for ``j < clip_grid``.
      clip_tokens: tokens (evenly subsampled) used for the clipping search.
      search_tokens: tokens (evenly subsampled) used for the ``alpha`` search.
      dtype: logical dtype of the QArrays (default the weights' dtype).
    """
    config = as_config(config)
    weights = [jnp.asarray(w) for w in weights]
    x = jnp.asarray(x)
    k = _check_inputs(weights, x)
    for w in weights:
        config.validate_shape(*w.shape)
    if n_grid < 1 or clip_grid < 1 or not 0.0 <= max_shrink < 1.0:
        raise ValueError("need n_grid >= 1, clip_grid >= 1 and 0 <= max_shrink < 1")
    if clip_tokens < 1 or search_tokens < 1:
        raise ValueError("clip_tokens and search_tokens must be positive")
    clips = [clip] * len(weights) if isinstance(clip, bool) else list(clip)
    if len(clips) != len(weights):
        raise ValueError("clip flags must match the number of weights")

    xt = _subsample(x.reshape(-1, k).astype(jnp.float32), search_tokens)
    wcat = jnp.concatenate([w.astype(jnp.float32) for w in weights], axis=1)
    x_mean = jnp.mean(jnp.abs(xt), axis=0)
    w_mean = _weight_importance(wcat, group_size_of(config, k)) if duo_scaling else None
    alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
    losses = _grid_losses(xt, wcat, x_mean, w_mean, alphas, cfg=config)
    best = int(jnp.argmin(losses))
    alpha = float(alphas[best])
    scales = _scales_for(alpha, x_mean, w_mean)

    qarrays = []
    sub = _subsample(xt, clip_tokens) / scales
    for w, do_clip in zip(weights, clips):
        ws = w.astype(jnp.float32) * scales[:, None]
        ratio = _search_clip(sub, ws, cfg=config, grid=clip_grid, max_shrink=max_shrink) if do_clip else None
        qarrays.append(QArray.quantize(ws, config, dtype=dtype or w.dtype, clip=ratio))
    return AWQResult(scales, alpha, qarrays, float(losses[best]), float(losses[0]))


def _subsample(x: jax.Array, max_rows: int) -> jax.Array:
    """At most ``max_rows`` rows of ``x``, evenly strided."""
    return x[:: max(1, -(-x.shape[0] // max_rows))][:max_rows]


def _weight_importance(w: jax.Array, g: int) -> jax.Array:
    """Mean over output columns of ``|w|`` normalised by its group's max: ``[K]``."""
    wg = to_groups(jnp.abs(w), g)
    wn = wg / jnp.maximum(jnp.max(wg, axis=-2, keepdims=True), 1e-12)
    return jnp.mean(wn.reshape(w.shape), axis=1)


def _scales_for(alpha, x_mean, w_mean):
    s = jnp.maximum(x_mean, 1e-4) ** alpha
    if w_mean is not None:
        s = s / jnp.maximum(w_mean, 1e-4) ** (1.0 - alpha)
    s = jnp.maximum(s, 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _grid_losses(xt, wcat, x_mean, w_mean, alphas, *, cfg: QuantConfig):
    ref = jnp.dot(xt, wcat, precision=_HI)

    def loss(alpha):
        s = _scales_for(alpha, x_mean, w_mean)
        wq = fake_quantize(wcat * s[:, None], cfg) / s[:, None]
        return jnp.mean((jnp.dot(xt, wq, precision=_HI) - ref) ** 2)

    return jax.lax.map(loss, alphas)


@functools.partial(jax.jit, static_argnames=("cfg", "grid", "max_shrink", "chunk"))
def _search_clip(x, w, *, cfg: QuantConfig, grid: int, max_shrink: float, chunk: int = 256):
    """Per-(group, column) range ratio minimising ``mean_t (x_g @ (Q(w_g) - w_g))^2``: ``[G, N]``."""
    k, n = w.shape
    g = group_size_of(cfg, k)
    xg = to_groups(x.T, g)  # [G, g, T]
    ratios = 1.0 - jnp.arange(grid, dtype=jnp.float32) * (max_shrink / grid)

    def err_for(ratio, wc):
        dq = fake_quantize(wc, cfg, clip=ratio) - wc  # [K, nc]
        part = jnp.einsum("gkt,gkn->gtn", xg, to_groups(dq, g), precision=_HI)
        return jnp.mean(part**2, axis=1)  # [G, nc]

    def per_chunk(wc):
        errs = jax.lax.map(lambda r: err_for(r, wc), ratios)  # [R, G, nc]
        return ratios[jnp.argmin(errs, axis=0)]

    pad = (-n) % chunk
    wp = jnp.pad(w, ((0, 0), (0, pad)))
    chunks = wp.reshape(k, -1, chunk).transpose(1, 0, 2)  # [C, K, chunk]
    best = jax.lax.map(per_chunk, chunks)  # [C, G, chunk]
    return best.transpose(1, 0, 2).reshape(k // g, -1)[:, :n]
