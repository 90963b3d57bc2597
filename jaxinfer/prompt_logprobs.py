"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``), scored in the ragged step itself.

For prompt position ``p`` of a sequence that asked, the logits at ``p`` score the prompt token ``p + 1``
(vLLM's semantics: every prompt token after the first gets its log-probability given its prefix plus the
top-k alternatives; the first gets ``None``). A step gathers the last hidden states of those token rows
into a buffer of ``R`` rows (``R`` fixed by the token bucket ``T``, so no new shapes), packed first, and
runs the LM head over it block by block under ``lax.cond``: blocks past the real rows are skipped, so a
step without such rows pays nothing but a ``[R, hidden]`` gather, and one with ``m`` rows pays the LM
head over ``ceil(m / block)`` blocks, never the full ``[T, vocab]``.

The host side (:func:`prompt_spans`, :func:`build_inputs`, :func:`entries`) is numpy only: which rows
score which positions, and the ``{token: logprob}`` entries from a host copy of the results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.sampling_params import MAX_LOGPROBS

BLOCK_ROWS = 64  # LM-head rows per block: [64, vocab] logits live at once


def buffer_rows(num_tokens: int) -> int:
    """``R`` of token bucket ``T``: ``T`` rounded up to a multiple of :func:`block_rows`."""
    b = min(BLOCK_ROWS, num_tokens)
    return -(-num_tokens // b) * b


def block_rows(num_rows: int) -> int:
    """Rows per LM-head block of a buffer of ``R`` rows (divides ``R`` for ``R`` from :func:`buffer_rows`)."""
    return min(BLOCK_ROWS, num_rows)


@flax.struct.dataclass
class PromptLogprobInputs:
    """``indices i32[R]``: token row (into the step's ``tokens``) of each scored position, real rows first
    (padding 0); ``targets i32[R]``: the prompt token each row scores; ``num_rows i32[1]``: real rows."""

    indices: jax.Array
    targets: jax.Array
    num_rows: jax.Array


@flax.struct.dataclass
class PromptLogprobs:
    """``logprobs f32[R]``: log-probability of each row's target; ``ranks i32[R]``: its rank in the vocabulary
    (1 + the tokens more likely than it); ``top_ids i32[R, MAX_LOGPROBS]`` / ``top_logprobs f32[R,
    MAX_LOGPROBS]``: the most likely tokens (raw model distribution). Rows of skipped blocks are zeros."""

    logprobs: jax.Array
    ranks: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def score(head: Callable[[jax.Array], jax.Array], hidden: jax.Array, inp: PromptLogprobInputs) -> PromptLogprobs:
    """Score the gathered rows: ``head`` maps ``hidden[B, H]`` to logits ``[B, V]``; ``hidden[R, H]``."""
    r = hidden.shape[0]
    b = block_rows(r)
    targets = inp.targets.reshape(r // b, b)
    blocks = hidden.reshape(r // b, b, hidden.shape[-1])

    def one(args):
        i, h, tgt = args

        def compute():
            lp = jax.nn.log_softmax(head(h).astype(jnp.float32), axis=-1)
            chosen = jnp.take_along_axis(lp, tgt[:, None], axis=-1)[:, 0]
            rank = 1 + jnp.sum(lp > chosen[:, None], axis=-1, dtype=jnp.int32)
            k = min(MAX_LOGPROBS, lp.shape[-1])
            vals, ids = jax.lax.top_k(lp, k)
            pad = ((0, 0), (0, MAX_LOGPROBS - k))
            return chosen, rank, jnp.pad(ids.astype(jnp.int32), pad), jnp.pad(vals, pad, constant_values=-jnp.inf)

        def skip():
            return (
                jnp.zeros(b, jnp.float32),
                jnp.zeros(b, jnp.int32),
                jnp.zeros((b, MAX_LOGPROBS), jnp.int32),
                jnp.zeros((b, MAX_LOGPROBS), jnp.float32),
            )

        return jax.lax.cond(i * b < inp.num_rows[0], compute, skip)

    chosen, rank, ids, vals = jax.lax.map(one, (jnp.arange(r // b), blocks, targets))
    return PromptLogprobs(chosen.reshape(r), rank.reshape(r), ids.reshape(r, MAX_LOGPROBS),
                          vals.reshape(r, MAX_LOGPROBS))


# ---- host side ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSpan:
    """Scheduled row ``row`` scores prompt positions ``first .. first + count - 1`` of ``seq`` into buffer
    rows ``offset .. offset + count - 1``."""

    row: int
    seq: object
    offset: int
    first: int
    count: int


def prompt_spans(rows: Sequence, score_from: Sequence[int | None]) -> list[PromptSpan]:
    """The positions each scheduled row scores this step: row ``i`` (a ``ScheduledSeq``) covering positions
    ``[start, start + num_new_tokens)`` scores ``[max(start, score_from[i]), min(end, num_prompt - 1))``;
    ``score_from[i] = None``: nothing."""
    spans, off = [], 0
    for i, (r, f) in enumerate(zip(rows, score_from)):
        if f is None:
            continue
        first = max(r.start, f)
        last = min(r.start + r.num_new_tokens, r.seq.num_prompt_tokens - 1)
        if last > first:
            spans.append(PromptSpan(i, r.seq, off, first, last - first))
            off += last - first
    return spans


def build_inputs(
    spans: list[PromptSpan], cu_q_lens: np.ndarray, starts: Sequence[int], num_tokens: int
) -> PromptLogprobInputs:
    """The device inputs of a step of token bucket ``T = num_tokens`` (``cu_q_lens``: the packed rows' token
    offsets; ``starts[i]``: row ``i``'s first position)."""
    r = buffer_rows(num_tokens)
    indices = np.zeros(r, np.int32)
    targets = np.zeros(r, np.int32)
    n = 0
    for s in spans:
        row0 = int(cu_q_lens[s.row]) + s.first - starts[s.row]
        indices[s.offset : s.offset + s.count] = np.arange(row0, row0 + s.count)
        targets[s.offset : s.offset + s.count] = s.seq.all_token_ids[s.first + 1 : s.first + 1 + s.count]
        n = s.offset + s.count
    if n > num_tokens:
        raise ValueError(f"{n} prompt rows to score exceed the step's {num_tokens} tokens")
    return PromptLogprobInputs(indices, targets, np.array([n], np.int32))


def empty_inputs(num_tokens: int) -> PromptLogprobInputs:
    """Inputs that score nothing (padding, draft steps)."""
    r = buffer_rows(num_tokens)
    return PromptLogprobInputs(np.zeros(r, np.int32), np.zeros(r, np.int32), np.zeros(1, np.int32))


class PromptLogprobEntry(dict):
    """``{token: logprob}`` of one prompt position (a dict), with ``rank``: the prompt token's rank in the
    vocabulary (1 = the most likely; the alternatives' ranks are their order, 1 .. k)."""

    rank: int | None = None


def entries(out: PromptLogprobs, span: PromptSpan, k: int) -> list[dict[int, float]]:
    """``{token: logprob}`` per scored position of ``span`` from a host copy of :class:`PromptLogprobs`: the
    prompt token first, then the top ``k`` alternatives (:class:`PromptLogprobEntry`, with the token's
    ``rank``)."""
    res = []
    targets = span.seq.all_token_ids[span.first + 1 : span.first + 1 + span.count]
    for j, tid in enumerate(targets):
        b = span.offset + j
        entry = PromptLogprobEntry({int(tid): float(out.logprobs[b])})
        entry.rank = int(out.ranks[b])
        for t in range(k):
            entry.setdefault(int(out.top_ids[b, t]), float(out.top_logprobs[b, t]))
        res.append(entry)
    return res
