"""Calibration statistics, accumulated over batches of a linear layer's inputs ``x[..., K]``.

Both states are pytrees (NamedTuples) with pure ``update`` methods, so they can be carried through
jitted calibration loops or updated from a host loop (:func:`accumulate` shows a progress bar).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm


def _rows(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])


class ActStats(NamedTuple):
    """Per-input-channel activation statistics.

    Attributes:
      abs_max: ``[K]`` running max of ``|x|`` (SmoothQuant).
      abs_sum: ``[K]`` running sum of ``|x|``; ``mean_abs = abs_sum / count`` (AWQ).
      count: ``[]`` number of tokens seen.
    """

    abs_max: jax.Array
    abs_sum: jax.Array
    count: jax.Array

    @classmethod
    def init(cls, k: int) -> ActStats:
        z = jnp.zeros((k,), jnp.float32)
        return cls(z, z, jnp.zeros((), jnp.float32))

    def update(self, x: jax.Array) -> ActStats:
        """Add the tokens of ``x[..., K]``."""
        return _update_act_stats(self, x)

    @property
    def mean_abs(self) -> jax.Array:
        return self.abs_sum / jnp.maximum(self.count, 1.0)


@jax.jit
def _update_act_stats(s: ActStats, x: jax.Array) -> ActStats:
    a = jnp.abs(_rows(x))
    return ActStats(jnp.maximum(s.abs_max, a.max(0)), s.abs_sum + a.sum(0), s.count + a.shape[0])


class HessianState(NamedTuple):
    """GPTQ Hessian ``H = 2/n * sum_t x_t x_t^T`` over all ``n`` tokens seen, kept as a running mean.

    Attributes:
      h: ``[K, K]`` float32.
      count: ``[]`` number of tokens seen.
    """

    h: jax.Array
    count: jax.Array

    @classmethod
    def init(cls, k: int) -> HessianState:
        return cls(jnp.zeros((k, k), jnp.float32), jnp.zeros((), jnp.float32))

    def update(self, x: jax.Array) -> HessianState:
        """Add the tokens of ``x[..., K]``."""
        return _update_hessian(self, x)


@jax.jit
def _update_hessian(s: HessianState, x: jax.Array) -> HessianState:
    x = _rows(x)
    m = x.shape[0]
    total = s.count + m
    xtx = jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST)
    return HessianState(s.h * (s.count / total) + xtx * (2.0 / total), total)


S = TypeVar("S", ActStats, HessianState)


def accumulate(
    state: S, batches: Iterable[jax.Array], *, desc: str = "calibration", total: int | None = None
) -> S:
    """Fold every batch ``x[..., K]`` of ``batches`` into ``state`` (tqdm progress bar)."""
    for x in tqdm(batches, desc=desc, total=total, leave=False):
        state = state.update(x)
    return state
