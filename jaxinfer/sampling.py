"""Batched on-device sampling with per-row parameters as arrays (never static jit arguments).

Order of operations per row (as in vLLM): temperature -> min-p -> top-k -> top-p (each on the
distribution left by the previous filter), then a Gumbel-max draw with a key derived only from the
row's ``(seed, step)``: a request samples the same tokens whatever batch it runs in. Rows with
temperature 0 take the argmax. The sorting needed by the filters runs only when some row uses one.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.sampling_params import SamplingParams


@flax.struct.dataclass
class SamplingTensors:
    """Per-row sampling parameters, ``[S]`` each.

    Attributes:
      temperature: f32; 0 = greedy.
      top_k: i32; 0 = disabled.
      top_p: f32; 1 = disabled.
      min_p: f32; 0 = disabled.
      seed: u32 per-request seed.
      step: i32 number of tokens the request has sampled before this one (part of the key).
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seed: jax.Array
    step: jax.Array

    @staticmethod
    def from_params(params: Sequence[SamplingParams | None], seeds: Sequence[int], steps: Sequence[int],
                    num_rows: int | None = None) -> SamplingTensors:
        """Pack per-row settings into numpy arrays of length ``num_rows`` (padding rows greedy)."""
        n = num_rows if num_rows is not None else len(params)
        temp = np.zeros(n, np.float32)
        top_k = np.zeros(n, np.int32)
        top_p = np.ones(n, np.float32)
        min_p = np.zeros(n, np.float32)
        seed = np.zeros(n, np.uint32)
        step = np.zeros(n, np.int32)
        for i, sp in enumerate(params):
            if sp is None:
                continue
            temp[i] = sp.temperature
            top_k[i] = sp.effective_top_k
            top_p[i] = sp.top_p
            min_p[i] = sp.min_p
            seed[i] = seeds[i] & 0xFFFFFFFF
            step[i] = steps[i]
        return SamplingTensors(temp, top_k, top_p, min_p, seed, step)


@flax.struct.dataclass
class SamplerOutput:
    """``tokens i32[S]`` and the chosen tokens' log-probabilities ``f32[S]`` under the raw logits."""

    tokens: jax.Array
    logprobs: jax.Array


def _filter(x: jax.Array, st: SamplingTensors) -> jax.Array:
    """Apply min-p, top-k and top-p to temperature-scaled logits ``x[S, V]`` (masked -> -inf)."""
    v = x.shape[-1]
    x_max = jnp.max(x, axis=-1, keepdims=True)
    # min-p: p >= min_p * p_max  <=>  x >= x_max + log(min_p)
    min_p_thresh = jnp.where(st.min_p[:, None] > 0, x_max + jnp.log(jnp.maximum(st.min_p[:, None], 1e-30)),
                             -jnp.inf)
    x = jnp.where(x < min_p_thresh, -jnp.inf, x)
    sorted_x = -jnp.sort(-x, axis=-1)  # descending
    k = jnp.where(st.top_k > 0, jnp.minimum(st.top_k, v), v)
    kth = jnp.take_along_axis(sorted_x, (k - 1)[:, None], axis=-1)
    rank = jnp.arange(v)[None, :]
    sorted_x = jnp.where(rank < k[:, None], sorted_x, -jnp.inf)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (cum_before < st.top_p[:, None]) & (rank < k[:, None])
    keep = keep.at[:, 0].set(True)
    last_kept = jnp.sum(keep, axis=-1) - 1
    p_thresh = jnp.take_along_axis(sorted_x, last_kept[:, None], axis=-1)
    thresh = jnp.maximum(kth, p_thresh)
    return jnp.where(x < thresh, -jnp.inf, x)


def _row_noise(seed: jax.Array, step: jax.Array, vocab: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.gumbel(key, (vocab,), jnp.float32)


def sample(logits: jax.Array, st: SamplingTensors) -> SamplerOutput:
    """Sample one token per row.

    Args:
      logits: ``f32[S, V]`` raw model logits.
      st: per-row :class:`SamplingTensors`.
    Returns:
      :class:`SamplerOutput` with ``tokens i32[S]`` and ``logprobs f32[S]`` (log-softmax of the raw
      logits at the chosen token).
    """
    logits = logits.astype(jnp.float32)
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    is_greedy = st.temperature <= 0

    def random_path():
        temp = jnp.where(is_greedy, 1.0, st.temperature)
        x = logits / temp[:, None]
        needs_filter = jnp.any(((st.top_k > 0) | (st.top_p < 1) | (st.min_p > 0)) & ~is_greedy)
        x = jax.lax.cond(needs_filter, lambda y: _filter(y, st), lambda y: y, x)
        noise = jax.vmap(_row_noise, in_axes=(0, 0, None))(st.seed, st.step, logits.shape[-1])
        drawn = jnp.argmax(x + noise, axis=-1).astype(jnp.int32)
        return jnp.where(is_greedy, greedy_tokens, drawn)

    tokens = jax.lax.cond(jnp.all(is_greedy), lambda: greedy_tokens, random_path)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return SamplerOutput(tokens, logprobs)
