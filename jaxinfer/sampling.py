"""Batched on-device sampling with per-row parameters as arrays (never static jit arguments).

Per row, in order (as in vLLM): ``logit_bias`` (up to ``MAX_LOGIT_BIAS`` tokens per row, as arrays) ->
``min_tokens`` suppression of stop ids -> penalties (repetition over
prompt + output tokens; presence / frequency over output tokens) -> the structured-output token mask
(a packed bitmask per row, all ones for unconstrained rows) -> temperature -> min-p -> top-k ->
top-p (each filter on the distribution the previous one left) -> a Gumbel-max draw keyed only by the
row's ``(seed, step)``, so a request samples the same tokens whatever batch it runs in. Temperature 0
takes the argmax. The expensive parts (the filters' threshold searches, gathering penalty counts, top-n
log-probabilities) run only when some row in the batch needs them.

Penalty counts live on the device in :class:`PenaltyState`, one row per engine *slot* (a running
sequence owns a slot); each step folds its input tokens in before sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.sampling_filter import filter_logits
from jaxinfer.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams
from pallas_kernels.logits_rows import row_argmax, row_logsumexp

MAX_SUPPRESSED_IDS = 8  # EOS + stop token ids held back until min_tokens (per row)
TOKEN_PAD, TOKEN_PROMPT, TOKEN_OUTPUT = 0, 1, 2


@flax.struct.dataclass
class SamplingTensors:
    """Per-row sampling parameters, ``[S]`` each unless noted.

    Attributes:
      temperature: f32; 0 = greedy.  top_k: i32; 0 = disabled.  top_p: f32.  min_p: f32.
      repetition_penalty, presence_penalty, frequency_penalty: f32 (1, 0, 0 = disabled).
      seed: u32 per-request seed.  step: i32 tokens the sequence sampled before this one.
      suppress_ids: i32 ``[S, MAX_SUPPRESSED_IDS]`` ids masked while ``suppress`` (padding -1).
      suppress: bool, True while the sequence has fewer than ``min_tokens`` outputs.
      num_logprobs: i32 top log-probabilities wanted (0 = none).
      slot: i32 penalty-state row of the sequence.  reset: bool, clear that row before this step.
      bias_ids: i32 ``[S, MAX_LOGIT_BIAS]`` token ids of the row's ``logit_bias`` (padding -1).
      bias_values: f32 ``[S, MAX_LOGIT_BIAS]`` their biases (padding 0).
      constrained: bool, the row has a structured-output token mask.
      token_mask: i32 ``[S, W]`` packed allowed-token bits (``W = ceil(V / 32)``; bit ``t % 32`` of word
        ``t // 32`` for token ``t``); ``None`` on the host when no row is constrained: the runner then passes
        an all-ones array it keeps on the device (no transfer), so the step's signature never changes.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    seed: jax.Array
    step: jax.Array
    suppress_ids: jax.Array
    suppress: jax.Array
    num_logprobs: jax.Array
    slot: jax.Array
    reset: jax.Array
    bias_ids: jax.Array
    bias_values: jax.Array
    constrained: jax.Array
    token_mask: jax.Array | None = None

    @staticmethod
    def build(params: Sequence[SamplingParams | None], *, seeds: Sequence[int], steps: Sequence[int],
              num_rows: int, slots: Sequence[int] | None = None, resets: Sequence[bool] | None = None,
              eos_token_ids: Sequence[int] = (), trash_slot: int = 0,
              masks: Sequence[np.ndarray | None] | None = None) -> SamplingTensors:
        """Pack per-row settings into numpy arrays of length ``num_rows``; padding rows are greedy and
        point at ``trash_slot``. ``masks``: per row, its packed token bitmask ``i32[W]`` or ``None``."""
        n = num_rows
        f = lambda v: np.full(n, v, np.float32)  # noqa: E731
        t = SamplingTensors(
            temperature=f(0.0), top_k=np.zeros(n, np.int32), top_p=f(1.0), min_p=f(0.0),
            repetition_penalty=f(1.0), presence_penalty=f(0.0), frequency_penalty=f(0.0),
            seed=np.zeros(n, np.uint32), step=np.zeros(n, np.int32),
            suppress_ids=np.full((n, MAX_SUPPRESSED_IDS), -1, np.int32), suppress=np.zeros(n, np.bool_),
            num_logprobs=np.zeros(n, np.int32), slot=np.full(n, trash_slot, np.int32),
            reset=np.zeros(n, np.bool_), bias_ids=np.full((n, MAX_LOGIT_BIAS), -1, np.int32),
            bias_values=np.zeros((n, MAX_LOGIT_BIAS), np.float32), constrained=np.zeros(n, np.bool_),
        )
        for i, sp in enumerate(params):
            if sp is None:
                continue
            t.temperature[i] = sp.temperature
            t.top_k[i] = sp.effective_top_k
            t.top_p[i] = sp.top_p
            t.min_p[i] = sp.min_p
            t.repetition_penalty[i] = sp.repetition_penalty
            t.presence_penalty[i] = sp.presence_penalty
            t.frequency_penalty[i] = sp.frequency_penalty
            t.seed[i] = seeds[i] & 0xFFFFFFFF
            t.step[i] = steps[i]
            t.num_logprobs[i] = sp.logprobs or 0
            if sp.min_tokens and steps[i] < sp.min_tokens:
                ids = [*(() if sp.ignore_eos else eos_token_ids), *sp.stop_token_ids][:MAX_SUPPRESSED_IDS]
                t.suppress_ids[i, : len(ids)] = ids
                t.suppress[i] = True
            if sp.logit_bias:
                ids, values = zip(*sp.logit_bias)
                t.bias_ids[i, : len(ids)] = ids
                t.bias_values[i, : len(ids)] = values
            if slots is not None:
                t.slot[i] = slots[i]
            if resets is not None:
                t.reset[i] = resets[i]
        rows = [(i, m) for i, m in enumerate(masks or ()) if m is not None]
        if rows:
            token_mask = np.full((n, len(rows[0][1])), -1, np.int32)
            for i, m in rows:
                token_mask[i] = m
                t.constrained[i] = True
            t = t.replace(token_mask=token_mask)
        return t

    @staticmethod
    def from_params(params: Sequence[SamplingParams | None], seeds: Sequence[int], steps: Sequence[int],
                    num_rows: int | None = None) -> SamplingTensors:
        """Rows without penalty state (slot 0, no reset): for callers that never use penalties."""
        n = len(params) if num_rows is None else num_rows
        return SamplingTensors.build(params, seeds=seeds, steps=steps, num_rows=n)


@flax.struct.dataclass
class PenaltyState:
    """Token statistics per slot: ``output_counts i32[slots, V]``, ``prompt_mask bool[slots, V]``."""

    output_counts: jax.Array
    prompt_mask: jax.Array

    @staticmethod
    def zeros(num_slots: int, vocab_size: int) -> PenaltyState:
        return PenaltyState(jnp.zeros((num_slots, vocab_size), jnp.int32),
                            jnp.zeros((num_slots, vocab_size), jnp.bool_))


def update_penalty_state(state: PenaltyState, st: SamplingTensors, tokens: jax.Array, token_slot: jax.Array,
                         token_kind: jax.Array) -> PenaltyState:
    """Clear the rows of sequences with ``reset`` and fold this step's input tokens in.

    Args:
      tokens, token_slot, token_kind: ``i32[T]``: each input token, its sequence's slot and whether it
        is a prompt token (``TOKEN_PROMPT``), an already generated token fed back (``TOKEN_OUTPUT``) or
        padding (``TOKEN_PAD``).
    """
    num_slots = state.output_counts.shape[0]

    def clear(s):
        rows = jnp.where(st.reset, st.slot, num_slots)  # out of range -> dropped
        return PenaltyState(s.output_counts.at[rows].set(0, mode="drop"),
                            s.prompt_mask.at[rows].set(False, mode="drop"))

    state = jax.lax.cond(jnp.any(st.reset), clear, lambda s: s, state)
    out_rows = jnp.where(token_kind == TOKEN_OUTPUT, token_slot, num_slots)
    prm_rows = jnp.where(token_kind == TOKEN_PROMPT, token_slot, num_slots)
    return PenaltyState(state.output_counts.at[out_rows, tokens].add(1, mode="drop"),
                        state.prompt_mask.at[prm_rows, tokens].set(True, mode="drop"))


def _apply_penalties(logits: jax.Array, st: SamplingTensors, state: PenaltyState) -> jax.Array:
    counts = state.output_counts[st.slot]  # [S, V]
    seen = state.prompt_mask[st.slot] | (counts > 0)
    rep = st.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - st.frequency_penalty[:, None] * counts
    return logits - st.presence_penalty[:, None] * (counts > 0)


def _row_noise(seed: jax.Array, step: jax.Array, vocab: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.gumbel(key, (vocab,), jnp.float32)


def gumbel_draw(y: jax.Array, st: SamplingTensors, impl: str = "xla") -> jax.Array:
    """``i32[S]``: one draw per row from ``softmax(y[S, V])`` (Gumbel-max keyed by ``(seed, step)`` only).

    The plain sampler and the speculative verifier both draw through here, so a point-mass draft is
    accepted exactly when the plain sampler would have drawn it.
    """
    noise = jax.vmap(_row_noise, in_axes=(0, 0, None))(st.seed, st.step, y.shape[-1])
    return row_argmax(y + noise, impl)


def _apply_logit_bias(x: jax.Array, st: SamplingTensors) -> jax.Array:
    s, v = x.shape
    rows = jnp.arange(s)[:, None]
    ids = jnp.where(st.bias_ids >= 0, st.bias_ids, v)  # padding (and ids past the vocabulary) dropped
    return x.at[rows, ids].add(st.bias_values, mode="drop")


def apply_token_mask(x: jax.Array, token_mask: jax.Array) -> jax.Array:
    """Tokens whose bit is clear in ``token_mask i32[S, W]`` get ``-inf`` in ``x f32[S, V]``."""
    v = x.shape[-1]
    ids = jnp.arange(v, dtype=jnp.int32)
    words = token_mask[:, ids // 32]  # [S, V]
    bits = jax.lax.shift_right_logical(words, jnp.broadcast_to(ids % 32, words.shape)) & 1
    return jnp.where(bits != 0, x, -jnp.inf)


def process_logits(logits: jax.Array, st: SamplingTensors, penalty_state: PenaltyState | None = None) -> jax.Array:
    """``logit_bias``, ``min_tokens`` suppression, penalties (when ``penalty_state`` is given), then the
    structured-output mask (when some row is constrained): ``f32[S, V]`` -> ``f32[S, V]``. Greedy rows take
    the argmax of this."""
    logits = jnp.asarray(logits, jnp.float32)
    s, v = logits.shape
    rows = jnp.arange(s)[:, None]
    # unconditional: a scatter of S x MAX_LOGIT_BIAS entries updates the logits in place, where a cond with an
    # identity branch made XLA:CPU copy the whole f32[S, V] matrix (~2 ms at 64 rows of 49,152)
    logits = _apply_logit_bias(logits, st)
    sup = jnp.where(st.suppress[:, None] & (st.suppress_ids >= 0), st.suppress_ids, v)
    x = logits.at[rows, sup].set(-jnp.inf, mode="drop")
    if penalty_state is not None:
        active = (st.repetition_penalty != 1) | (st.presence_penalty != 0) | (st.frequency_penalty != 0)
        x = jax.lax.cond(jnp.any(active), lambda y: _apply_penalties(y, st, penalty_state), lambda y: y, x)
    if st.token_mask is not None:
        x = jax.lax.cond(jnp.any(st.constrained), lambda y: apply_token_mask(y, st.token_mask), lambda y: y, x)
    return x


def warp_logits(x: jax.Array, st: SamplingTensors) -> jax.Array:
    """Temperature, then min-p / top-k / top-p (only traced work when some sampled row needs a filter):
    ``f32[S, V]`` -> ``f32[S, V]`` whose softmax is each sampled row's distribution (greedy rows get
    temperature 1)."""
    is_greedy = st.temperature <= 0
    temp = jnp.where(is_greedy, 1.0, st.temperature)
    y = x / temp[:, None]
    needs_filter = jnp.any(((st.top_k > 0) | (st.top_p < 1) | (st.min_p > 0)) & ~is_greedy)
    return jax.lax.cond(needs_filter, lambda z: filter_logits(z, st.top_k, st.top_p, st.min_p), lambda z: z, y)


def token_logprobs(logits: jax.Array, tokens: jax.Array, num_logprobs: jax.Array,
                   impl: str = "xla") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Raw-distribution log-probabilities of ``tokens i32[S]`` under ``logits f32[S, V]``, and the
    top-``MAX_LOGPROBS`` ``(top_ids i32[S, K], top_logprobs f32[S, K])`` when some row wants them
    (``num_logprobs i32[S] > 0``; zeros otherwise): ``(chosen f32[S], top_ids, top_logprobs)``.

    Only the per-row log-normaliser is computed unless top log-probabilities are asked for: a whole
    ``log_softmax`` costs about as much as the rest of a greedy sampler step on XLA:CPU.
    """
    s, v = logits.shape
    k = min(MAX_LOGPROBS, v)
    lse = row_logsumexp(logits, impl)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse

    def top():
        vals, ids = jax.lax.top_k(logits, k)
        pad = ((0, 0), (0, MAX_LOGPROBS - k))
        return jnp.pad(ids.astype(jnp.int32), pad), jnp.pad(vals - lse[:, None], pad, constant_values=-jnp.inf)

    def none():
        return jnp.zeros((s, MAX_LOGPROBS), jnp.int32), jnp.zeros((s, MAX_LOGPROBS), jnp.float32)

    return (chosen, *jax.lax.cond(jnp.any(num_logprobs > 0), top, none))


@flax.struct.dataclass
class SamplerOutput:
    """``tokens i32[S]``, their ``logprobs f32[S]`` under the raw logits, and the top-``MAX_LOGPROBS``
    raw log-probabilities ``top_ids i32[S, K]`` / ``top_logprobs f32[S, K]`` (zeros unless some row
    asked for them); ``prompt``: the step's :class:`~jaxinfer.prompt_logprobs.PromptLogprobs` (set by the
    runner)."""

    tokens: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array
    prompt: object = None


def logprob_entry(out, row: int, k: int) -> dict[int, float]:
    """``{token: logprob}`` of row ``row`` of a host copy of a sampler (or verify) output: the sampled token
    first, then the top ``k`` alternatives."""
    entry = {int(out.tokens[row]): float(out.logprobs[row])}
    for j in range(k):
        entry.setdefault(int(out.top_ids[row, j]), float(out.top_logprobs[row, j]))
    return entry


def sample(logits: jax.Array, st: SamplingTensors, penalty_state: PenaltyState | None = None,
           impl: str = "xla") -> SamplerOutput:
    """Sample one token per row.

    Args:
      logits: ``f32[S, V]`` raw model logits.
      st: per-row :class:`SamplingTensors`.
      penalty_state: token statistics (already updated with this step's inputs); ``None`` disables
        penalties.
      impl: how the row argmax and log-normaliser run (``Kernels.sampler``: ``"xla"`` or ``"cpu"``).
    Returns:
      :class:`SamplerOutput`. Log-probabilities are those of the raw model distribution.
    """
    logits = jnp.asarray(logits, jnp.float32)
    x = process_logits(logits, st, penalty_state)
    greedy_tokens = row_argmax(x, impl)
    is_greedy = st.temperature <= 0

    def random_path():
        return jnp.where(is_greedy, greedy_tokens, gumbel_draw(warp_logits(x, st), st, impl))

    tokens = jax.lax.cond(jnp.all(is_greedy), lambda: greedy_tokens, random_path)
    chosen, top_ids, top_lps = token_logprobs(logits, tokens, st.num_logprobs, impl)
    return SamplerOutput(tokens, chosen, top_ids, top_lps)
