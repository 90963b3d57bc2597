"""Static-batch generation over a dense per-sequence KV cache.

All prompts are prefilled in one ragged step, then every row decodes one token per step until all
rows finish. Shapes are bucketed (powers of two for tokens / rows / query length, multiples of 256 for
the cache length) so repeated calls reuse compiled steps. This is the simple, independent path the
paged engine is tested against; it is not a serving engine (no continuous batching).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.attention import AttentionMetadata, init_dense_cache
from jaxinfer.models.causal_lm import CausalLM
from jaxinfer.sampling import SamplingTensors, sample
from jaxinfer.sampling_params import SamplingParams


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, (int(n) - 1).bit_length()))


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


@dataclass
class RowState:
    """One generated sequence (a prompt, or one of its ``n`` samples)."""

    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None


class DenseGenerator:
    """Compiled prefill / decode steps for a model and its parameters."""

    def __init__(self, model: CausalLM, params, eos_token_ids: Sequence[int] = ()):
        self.model = model
        self.params = params
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self._step = jax.jit(self._step_impl, donate_argnums=(1,))

    def _step_impl(self, params, caches, tokens, positions, md, logits_indices, st):
        logits, caches = self.model.forward(params, tokens, positions, caches, md, logits_indices)
        return sample(logits, st), caches

    def run(self, rows: list[RowState], max_len: int) -> Iterator[list[tuple[int, int]]]:
        """Generate for ``rows`` in place; after each step yield ``[(row index, new token)]``.

        Args:
          rows: sequences to generate (their stop checks beyond EOS / stop ids / max_tokens are the
            caller's: it may set ``finished`` between steps, e.g. on a stop string).
          max_len: cache length bound; every row must satisfy ``len(prompt) + max_tokens <= max_len``.
        """
        c = self.model.config
        n = len(rows)
        s = next_pow2(n)
        length = min(round_up(max(len(r.prompt_ids) + r.params.max_tokens for r in rows), 256), max_len)
        caches = init_dense_cache(c.num_layers, s, length, c.num_kv_heads, c.head_dim, self.model.dtype)
        lens = np.array([len(r.prompt_ids) for r in rows] + [0] * (s - n), np.int32)

        # Prefill: every prompt in one ragged step.
        total = int(lens.sum())
        t = next_pow2(total, 16)
        tokens = np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        slots = np.full(t, -1, np.int32)
        cu = np.zeros(s + 1, np.int32)
        cu[1:] = np.cumsum(lens)
        for i, r in enumerate(rows):
            a, b = cu[i], cu[i + 1]
            tokens[a:b] = r.prompt_ids
            positions[a:b] = np.arange(b - a)
            slots[a:b] = i * length + np.arange(b - a)
        logits_idx = np.where(np.arange(s) < n, np.maximum(cu[1:] - 1, 0), 0).astype(np.int32)
        md = AttentionMetadata(cu, lens.copy(), np.array([n], np.int32), slots,
                               max_q_len=min(next_pow2(int(lens.max())), t))
        caches, new = self._advance(rows, caches, tokens, positions, md, logits_idx, s)
        yield new

        arange_s = np.arange(s, dtype=np.int32)
        while not all(r.finished for r in rows):
            tokens = np.zeros(s, np.int32)
            positions = np.zeros(s, np.int32)
            slots = np.full(s, -1, np.int32)
            kv = np.ones(s, np.int32)
            for i, r in enumerate(rows):
                if r.finished:
                    continue
                pos = len(r.prompt_ids) + len(r.output_ids) - 1
                tokens[i] = r.output_ids[-1]
                positions[i] = pos
                slots[i] = i * length + pos
                kv[i] = pos + 1
            md = AttentionMetadata(np.arange(s + 1, dtype=np.int32), kv, np.array([s], np.int32), slots,
                                   max_q_len=1)
            caches, new = self._advance(rows, caches, tokens, positions, md, arange_s, s)
            yield new

    def _advance(self, rows, caches, tokens, positions, md, logits_idx, s):
        active = [r if not r.finished else None for r in rows]
        st = SamplingTensors.from_params(
            [r.params if r else None for r in active], [r.seed if r else 0 for r in active],
            [len(r.output_ids) if r else 0 for r in active], num_rows=s,
        )
        out, caches = self._step(self.params, caches, jnp.asarray(tokens), jnp.asarray(positions), md,
                                 jnp.asarray(logits_idx), st)
        toks, lps = jax.device_get((out.tokens, out.logprobs))  # the step's one device-to-host copy
        now = time.perf_counter()
        new = []
        for i, r in enumerate(rows):
            if r.finished:
                continue
            tok = int(toks[i])
            r.output_ids.append(tok)
            r.logprobs.append(float(lps[i]))
            if r.first_token_time is None:
                r.first_token_time = now
            new.append((i, tok))
            self._check_stop(r, tok, now)
        return caches, new

    def _check_stop(self, r: RowState, tok: int, now: float) -> None:
        p = r.params
        if len(r.output_ids) >= p.min_tokens:
            if tok in p.stop_token_ids:
                r.finished, r.finish_reason, r.stop_reason = True, "stop", tok
            elif not p.ignore_eos and tok in self.eos_token_ids:
                r.finished, r.finish_reason, r.stop_reason = True, "stop", None
        if not r.finished and len(r.output_ids) >= p.max_tokens:
            r.finished, r.finish_reason = True, "length"
        if r.finished:
            r.finish_time = now
