"""Drive ``CausalLM.forward`` over a dense cache for tests: ragged prefill and token-by-token decode."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.attention import AttentionMetadata, init_dense_cache

_JITTED = {}


def jitted_forward(model, kernels=None):
    """One ``jax.jit(model.forward)`` per model and kernel choice, so repeated steps reuse compiled executables."""
    key = (id(model), kernels)
    if key not in _JITTED:
        _JITTED[key] = (model, jax.jit(functools.partial(model.forward, kernels=kernels)))
    return _JITTED[key][1]


def ragged_prefill(model, params, seqs, max_len=64, caches=None, kernels=None):
    """All ``seqs`` in one ragged step (``kernels``: :class:`jaxinfer.target.Kernels`, ``None``: the
    defaults of ``forward``). Returns ``(per-sequence logits [len, V] list, caches)``."""
    c = model.config
    s = len(seqs)
    if caches is None:
        caches = init_dense_cache(c.num_layers, s, max_len, c.num_kv_heads, c.head_dim, model.dtype)
    lens = np.array([len(x) for x in seqs], np.int32)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    t = int(cu[-1]) + 3  # a few padding rows
    tokens = np.zeros(t, np.int32)
    pos = np.zeros(t, np.int32)
    slots = np.full(t, -1, np.int32)
    for i, x in enumerate(seqs):
        tokens[cu[i]:cu[i + 1]] = x
        pos[cu[i]:cu[i + 1]] = np.arange(len(x))
        slots[cu[i]:cu[i + 1]] = i * max_len + np.arange(len(x))
    md = AttentionMetadata(cu, lens, np.array([s], np.int32), slots, max_q_len=int(lens.max()))
    logits, caches = jitted_forward(model, kernels)(params, jnp.asarray(tokens), jnp.asarray(pos), caches, md)
    logits = np.asarray(logits)
    return [logits[cu[i]:cu[i + 1]] for i in range(s)], caches


def decode_one(model, params, caches, seq_slot_tokens, positions, max_len=64):
    """One decode step: ``seq_slot_tokens[i]`` at ``positions[i]`` for cache slot i -> logits [S, V]."""
    s = len(seq_slot_tokens)
    pos = np.asarray(positions, np.int32)
    md = AttentionMetadata(np.arange(s + 1, dtype=np.int32), pos + 1, np.array([s], np.int32),
                           (np.arange(s) * max_len + pos).astype(np.int32), max_q_len=1)
    logits, caches = jitted_forward(model)(params, jnp.asarray(seq_slot_tokens, jnp.int32),
                                            jnp.asarray(pos), caches, md)
    return np.asarray(logits), caches
