"""Training data for a draft head: the target's own replies and its hidden states.

1. :func:`generate_replies`: the target answers chat prompts with ``LLM.chat`` (greedy and sampled mixed).
2. :func:`record_hidden`: one teacher-forced target forward over each ``prompt + reply`` records, per
   position ``t``, the last decoder layer's output before the final norm (``h_t``) and the target's greedy
   next token (``argmax`` of its logits at ``t``).

A dataset is a list of :class:`Sequence` s, saved as one ``.npz`` (:func:`save_dataset`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Sequence:
    """One conversation: ``tokens i32[L]`` (prompt then reply), ``prompt_len``, ``greedy`` (reply decoded
    greedily), and after :func:`record_hidden` ``hidden f16[L, D]`` and ``argmax i32[L]``."""

    tokens: np.ndarray
    prompt_len: int
    greedy: bool
    hidden: np.ndarray | None = None
    argmax: np.ndarray | None = None


def generate_replies(llm, prompts: list[str], *, max_tokens: int, greedy_fraction: float,
                     temperatures: tuple[float, ...] = (0.7, 1.0), seed: int = 0,
                     start: int = 0) -> list[Sequence]:
    """The target's replies to ``prompts`` (one user message each), all submitted at once.

    A ``greedy_fraction`` of the prompts (every ``1 / greedy_fraction``-th) are answered greedily, the others
    sampled with ``top_p = 0.95`` at the ``temperatures`` in turn, each with its own seed. ``start`` is the
    index of ``prompts[0]`` in the whole prompt set (a set generated in parts gets the same choices and
    seeds as one generated at once).
    """
    from jaxinfer.sampling_params import SamplingParams
    from jaxinfer.tokenizer import encode_chat

    if not 0 <= greedy_fraction <= 1:
        raise ValueError(f"greedy_fraction must be in [0, 1], got {greedy_fraction}")
    convs = [encode_chat(llm.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    params, greedy = [], []
    for i in range(start, start + len(prompts)):
        g = int((i + 1) * greedy_fraction) > int(i * greedy_fraction)
        t = 0.0 if g else temperatures[i % len(temperatures)]
        params.append(SamplingParams(temperature=t, top_p=1.0 if g else 0.95, max_tokens=max_tokens,
                                     seed=seed * 1_000_003 + i))
        greedy.append(g)
    outs = llm.generate(convs, params)
    return [Sequence(np.asarray(c + list(o.outputs[0].token_ids), np.int32), len(c), g)
            for c, o, g in zip(convs, outs, greedy)]


def _bucket(n: int, step: int = 64) -> int:
    return -(-n // step) * step


def record_hidden(model, params, seqs: list[Sequence], *, seqs_per_step: int = 8, progress=None) -> None:
    """Fill ``hidden`` (float16, pre-final-norm last-layer output) and ``argmax`` of every sequence with
    teacher-forced target forwards (dense caches; ``seqs_per_step`` sequences of similar length per step).

    Args:
      model: the target's :class:`~jaxinfer.models.causal_lm.CausalLM`; ``params`` its parameters.
      progress: optional callable ``(n_done)`` called after each step.
    Raises:
      ValueError: a hidden state beyond float16's range.
    """
    import jax
    import jax.numpy as jnp

    from jaxinfer.attention import AttentionMetadata, init_dense_cache

    c = model.config
    s = seqs_per_step

    @jax.jit
    def step(params, tokens, lmax_arr):
        lmax = lmax_arr.shape[0]
        caches = init_dense_cache(c.num_layers, s, lmax, c.num_kv_heads, c.head_dim, model.dtype)
        t = s * lmax
        md = AttentionMetadata(cu_q_lens=jnp.arange(s + 1, dtype=jnp.int32) * lmax,
                               kv_lens=jnp.full((s,), lmax, jnp.int32), num_seqs=jnp.array([s], jnp.int32),
                               slot_mapping=jnp.arange(t, dtype=jnp.int32), max_q_len=lmax)
        positions = jnp.tile(jnp.arange(lmax, dtype=jnp.int32), s)
        _, _, hidden = model.forward(params, tokens, positions, caches, md, logits_indices=jnp.zeros(1, jnp.int32),
                                     hidden_indices=jnp.arange(t, dtype=jnp.int32))
        chunks = hidden.reshape(-1, 128, hidden.shape[-1])
        am = jax.lax.map(lambda h: jnp.argmax(model.logits(params, h), -1).astype(jnp.int32), chunks)
        return hidden.astype(jnp.float32), am.reshape(-1)

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].tokens))
    for g in range(0, len(order), s):
        group = [seqs[i] for i in order[g:g + s]]
        lmax = _bucket(max(len(q.tokens) for q in group))
        tokens = np.zeros((s, lmax), np.int32)
        for j, q in enumerate(group):
            tokens[j, :len(q.tokens)] = q.tokens
        hidden, am = step(params, jnp.asarray(tokens.reshape(-1)), jnp.zeros(lmax))
        hidden = np.asarray(hidden).reshape(s, lmax, -1)
        am = np.asarray(am).reshape(s, lmax)
        if np.abs(hidden).max() > 60000:
            raise ValueError("hidden states beyond float16 range; cannot store them as float16")
        for j, q in enumerate(group):
            q.hidden = hidden[j, :len(q.tokens)].astype(np.float16)
            q.argmax = am[j, :len(q.tokens)]
        if progress is not None:
            progress(len(group))


def token_counts(seqs: list[Sequence], vocab_size: int) -> np.ndarray:
    """How often each target token is a reply token or a target greedy prediction on a reply position."""
    counts = np.zeros(vocab_size, np.int64)
    for q in seqs:
        np.add.at(counts, q.tokens[q.prompt_len:], 1)
        if q.argmax is not None:
            np.add.at(counts, q.argmax[q.prompt_len - 1:-1], 1)
    return counts


def draft_vocabulary(counts: np.ndarray, size: int, always: tuple[int, ...] = ()) -> np.ndarray:
    """The ``size`` most frequent ids (``always`` ids, e.g. EOS, included first), sorted by id."""
    if not 1 <= size <= len(counts):
        raise ValueError(f"draft vocabulary size must be in [1, {len(counts)}], got {size}")
    score = counts.astype(np.float64).copy()
    score[list(always)] = np.inf
    top = np.argsort(-score, kind="stable")[:size]
    return np.sort(top).astype(np.int32)


def coverage(seqs: list[Sequence], d2t: np.ndarray) -> float:
    """Fraction of reply tokens inside the draft vocabulary ``d2t`` (an upper bound on draft accuracy)."""
    inside = np.zeros(int(max(d2t.max(), max(q.tokens.max() for q in seqs))) + 1, bool)
    inside[d2t] = True
    total = sum(len(q.tokens) - q.prompt_len for q in seqs)
    hit = sum(int(inside[q.tokens[q.prompt_len:]].sum()) for q in seqs)
    return hit / max(total, 1)


def save_dataset(path, seqs: list[Sequence]) -> None:
    """One ``.npz``: concatenated tokens / hidden / argmax plus per-sequence lengths, prompt lengths, flags."""
    lens = np.array([len(q.tokens) for q in seqs], np.int64)
    np.savez(path, tokens=np.concatenate([q.tokens for q in seqs]), hidden=np.concatenate([q.hidden for q in seqs]),
             argmax=np.concatenate([q.argmax for q in seqs]), lengths=lens,
             prompt_lens=np.array([q.prompt_len for q in seqs], np.int64),
             greedy=np.array([q.greedy for q in seqs], bool))


def load_dataset(path) -> list[Sequence]:
    """Inverse of :func:`save_dataset`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no dataset at {path}")
    with np.load(path) as z:  # each z[...] reads the array from the file: once each
        tokens, hidden, argmax, lengths = z["tokens"], z["hidden"], z["argmax"], z["lengths"]
        prompt_lens, greedy = z["prompt_lens"], z["greedy"]
    ends = np.cumsum(lengths)
    return [Sequence(tokens[a:b], int(p), bool(g), hidden[a:b], argmax[a:b])
            for a, b, p, g in zip(ends - lengths, ends, prompt_lens, greedy)]
