"""GPTQ (Frantar et al., 2022): layer-wise quantization with second-order error compensation.

For ``y = x @ W`` with ``W[K, N]`` the input channels are the rows of ``W`` (the paper's columns). With
``H = 2/n * sum x x^T`` (:class:`~quantize.calibration.HessianState`):

1. dead inputs (``H[k, k] == 0``) get ``H[k, k] = 1`` and a zero weight row;
2. optional act-order: rows are processed in decreasing ``diag(H)`` order;
3. dampening ``H += percdamp * mean(diag(H)) * I``;
4. ``U`` = upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``);
5. rows are quantized one at a time; the error ``(w_k - q_k) / U[k, k]`` is propagated to the
   not-yet-quantized rows through row ``k`` of ``U``; updates inside a block of ``blocksize`` rows
   are applied row by row, the rest of the matrix is updated once per block (lazy batch updates);
6. group scales: computed from the current (error-updated) rows when a group starts ("dynamic"), or
   up front from the original weight ("static" groups). With act-order the groups must be static so
   that the stored QArray keeps its natural layout (each group of ``g`` consecutive rows has one scale);
   the permutation is undone before packing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from tqdm.auto import tqdm

from pallas_kernels.quantized_matmul.config import QuantConfig, as_config
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.quantizer import compute_qparams, dequantize_values, group_size_of, quantize_values
from quantize.calibration import HessianState

_HI = jax.lax.Precision.HIGHEST
_PROGRESS_MIN_BLOCKS = 32  # show a progress bar for layers with at least this many row blocks


def _block_size(k: int, blocksize: int, unit: int) -> int:
    """Largest multiple of ``unit`` <= ``blocksize`` (at least ``unit``) that divides ``k``."""
    for b in range(max(unit, blocksize - blocksize % unit), 0, -unit):
        if k % b == 0:
            return b
    return unit


def gptq_quantize(
    w: jax.Array,
    hessian: HessianState | jax.Array,
    config: QuantConfig | str,
    *,
    percdamp: float = 0.01,
    blocksize: int = 128,
    act_order: bool = False,
    static_groups: bool | None = None,
    dtype=None,
) -> QArray:
    """Quantize one linear weight with GPTQ.

    Args:
      w: float weight ``[K, N]``.
      hessian: ``HessianState`` or a ``[K, K]`` array ``2/n * X^T X`` of the layer's calibration inputs.
      config: format or preset name (integer or fp8 weights; any group size).
      percdamp: dampening as a fraction of the mean Hessian diagonal.
      blocksize: rows per lazy-update block (rounded to a divisor of K that is a multiple of the group).
      act_order: quantize rows in decreasing Hessian-diagonal order.
      static_groups: compute group scales from the original weight up front (default: ``act_order``;
        required with ``act_order`` for group-wise formats).
      dtype: logical float dtype of the result (default ``w.dtype``).

    Returns:
      QArray ``[K, N]`` in the natural (unpermuted) layout.
    """
    config = as_config(config)
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"w must be a float array, got dtype {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D [K, N], got shape {w.shape}")
    k, _ = w.shape
    config.validate_shape(*w.shape)
    h = hessian.h if isinstance(hessian, HessianState) else jnp.asarray(hessian)
    if h.shape != (k, k):
        raise ValueError(f"Hessian shape {h.shape} does not match K={k}")
    if not percdamp >= 0.0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    if blocksize < 1:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if static_groups is None:
        static_groups = act_order
    if act_order and config.group_size is not None and not static_groups:
        raise ValueError("act_order with group-wise scales needs static_groups=True (natural group layout)")
    dynamic = config.group_size is not None and not static_groups
    bsize = _block_size(k, blocksize, config.group_size if dynamic else 1)
    w32, u, scale, offset, perm, ok = _prepare(
        w.astype(jnp.float32), h.astype(jnp.float32), jnp.float32(percdamp), cfg=config, act_order=act_order
    )
    if not bool(ok):
        raise ValueError("GPTQ Cholesky factorisation failed (Hessian not positive definite); raise percdamp")
    group_of = perm // (config.group_size or k)
    qs = jnp.zeros(w32.shape, jnp.float32)
    n_blocks = k // bsize
    for b in tqdm(range(n_blocks), desc="GPTQ", leave=False, disable=n_blocks < _PROGRESS_MIN_BLOCKS):
        w32, qs, scale, offset = _quantize_block(
            w32, qs, scale, offset, u, group_of, jnp.int32(b), cfg=config, bsize=bsize, dynamic=dynamic
        )
    if act_order:
        qs = qs[jnp.argsort(perm)]
    q = qs.astype(jnp.float8_e4m3fn if config.weight == "fp8" else jnp.int32)
    return QArray.from_quantized(
        q, scale, offset if not config.symmetric else None, config, dtype=dtype or w.dtype
    )


def _upper_cholesky_of_inverse(h: jax.Array) -> jax.Array:
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    lower = jnp.linalg.cholesky(h)
    hinv = jsl.cho_solve((lower, True), eye)
    return jnp.linalg.cholesky(hinv).T


@functools.partial(jax.jit, static_argnames=("cfg", "act_order"))
def _prepare(w, h, percdamp, *, cfg: QuantConfig, act_order: bool):
    """Dead inputs, initial (natural-group) params, permutation, dampening, ``U = chol(H^-1)^T``."""
    k = w.shape[0]
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    w = jnp.where(dead[:, None], 0.0, w)
    scale, offset = compute_qparams(w, cfg)  # natural groups; replaced group by group when dynamic
    if offset is None:
        offset = jnp.zeros_like(scale)
    perm = jnp.argsort(-jnp.diag(h)) if act_order else jnp.arange(k)
    w = w[perm]
    h = h[perm][:, perm]
    h = h + percdamp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=h.dtype)
    u = _upper_cholesky_of_inverse(h)
    return w, u, scale, offset, perm, jnp.all(jnp.isfinite(u))


@functools.partial(jax.jit, static_argnames=("cfg", "bsize", "dynamic"))
def _quantize_block(w, qs, scale, offset, u, group_of, b, *, cfg: QuantConfig, bsize: int, dynamic: bool):
    """Quantize rows ``[b*bsize, (b+1)*bsize)`` of the (permuted) weight and update the rows below."""
    k, n = w.shape
    g = group_size_of(cfg, k)
    asym = not cfg.symmetric
    rows_b = jnp.arange(bsize)
    i1 = b * bsize
    w1 = jax.lax.dynamic_slice(w, (i1, 0), (bsize, n))
    u1 = jax.lax.dynamic_slice(u, (i1, i1), (bsize, bsize))

    def quant_row(row, gi, scale, offset):
        s = scale[gi][None]
        m = offset[gi][None] if asym else None
        q = quantize_values(row[None], s, m, cfg)
        return q[0].astype(jnp.float32), dequantize_values(q, s, m)[0]

    def new_params(i, gi, operand):
        w1, sc, off = operand
        s_new, m_new = compute_qparams(jax.lax.dynamic_slice(w1, (i, 0), (g, n)), cfg)
        sc = jax.lax.dynamic_update_slice(sc, s_new, (gi, 0))
        if m_new is not None:
            off = jax.lax.dynamic_update_slice(off, m_new, (gi, 0))
        return sc, off

    def row_body(i, c):
        w1, q1, e1, scale, offset = c
        r = i1 + i
        gi = group_of[r]
        if dynamic:  # a group starts: its params come from its rows as updated so far
            scale, offset = jax.lax.cond(
                r % g == 0, lambda o: new_params(i, gi, o), lambda o: o[1:], (w1, scale, offset)
            )
        row = w1[i]
        q, dq = quant_row(row, gi, scale, offset)
        err = (row - dq) / u1[i, i]
        w1 = w1 - jnp.where((rows_b > i)[:, None], u1[i][:, None] * err[None, :], 0.0)
        return w1, q1.at[i].set(q), e1.at[i].set(err), scale, offset

    zeros = jnp.zeros((bsize, n), jnp.float32)
    _, q1, e1, scale, offset = jax.lax.fori_loop(0, bsize, row_body, (w1, zeros, zeros, scale, offset))
    qs = jax.lax.dynamic_update_slice(qs, q1, (i1, 0))
    # lazy batch update of every row below the block
    update = jnp.dot(jax.lax.dynamic_slice(u, (i1, 0), (bsize, k)).T, e1, precision=_HI)
    w = w - jnp.where((jnp.arange(k) >= i1 + bsize)[:, None], update, 0.0)
    return w, qs, scale, offset
