"""The target's verify step: one ragged step in which speculating sequences feed ``k + 1`` tokens.

A sequence with ``k`` drafts ``d_1 .. d_k`` feeds ``[t, d_1, ..., d_k]`` (``t`` its last token) at
positions ``start .. start + k`` into the slots the scheduler reserved (``ScheduledSeq.num_lookahead``);
other rows (plain decodes, prefill chunks) are packed as usual. Logits are taken at ``L`` rows: every
position of a speculating sequence and the last token of every other sampling row. A verify bucket
``(T, S)`` has ``L = min(T, S * (K + 1))`` logits rows (``L >= `` rows needed, since each needed row is a
distinct token), so ordinary buckets keep their ``S`` logits rows and only verify steps pay for more.

Penalty counts: the step folds the sequences' known input tokens as usual but never draft tokens (they
are marked padding). Requests with penalties do not speculate (:mod:`.params`), so the counts of every
request that uses them are exact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import jax
import numpy as np

from jaxinfer.attention import AttentionMetadata
from jaxinfer.runner import ModelRunner, StepBatch
from jaxinfer.sampling import TOKEN_OUTPUT, TOKEN_PAD, TOKEN_PROMPT, SamplingTensors, update_penalty_state
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import ScheduledSeq
from jaxinfer.speculative.rejection import VerifyInputs, VerifyOutput, rejection_sample
from jaxinfer.step_inputs import StepBuckets, StepInputs, pack_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowInfo:
    """Per scheduled row: its penalty-state ``slot``, request ``seed``, ``step`` (tokens it generated so
    far), ``params`` and whether its slot is cleared this step (``reset``)."""

    slot: int
    seed: int
    step: int
    params: SamplingParams
    reset: bool


def token_slots_kinds(x: StepInputs, infos: list[RowInfo], num_known: list[int], trash_slot: int):
    """``(token_slot i32[T], token_kind i32[T])``: the first ``num_known[i]`` tokens of row ``i`` are
    prompt / output tokens, the rest (drafts) padding, so penalty counts never see unverified tokens."""
    t = x.tokens.shape[0]
    token_slot = np.full(t, trash_slot, np.int32)
    token_kind = np.zeros(t, np.int32)
    for i, (r, info) in enumerate(zip(x.rows, infos)):
        off = int(x.cu_q_lens[i])
        n = num_known[i]
        token_slot[off : off + r.num_new_tokens] = info.slot
        pos = np.arange(r.start, r.start + n)
        token_kind[off : off + n] = np.where(pos < r.seq.num_prompt_tokens, TOKEN_PROMPT, TOKEN_OUTPUT)
        token_kind[off + n : off + r.num_new_tokens] = TOKEN_PAD
    return token_slot, token_kind


@dataclass
class VerifyBatch:
    """A packed verify step: device inputs plus the host's view of the logits rows.

    Attributes:
      batch: :class:`StepBatch` with ``logits_indices i32[L]`` and ``L`` sampling rows.
      vin: :class:`VerifyInputs`.
      row_map: ``i32[S, K + 1]`` (host copy), num_drafts: ``i32[S]`` (host copy).
    """

    batch: StepBatch
    vin: VerifyInputs
    row_map: np.ndarray
    num_drafts: np.ndarray


def num_logits_rows(num_tokens: int, num_seqs: int, k: int) -> int:
    """``L`` of the verify bucket ``(T, S)``."""
    return min(num_tokens, num_seqs * (k + 1))


def pack_verify(rows: list[ScheduledSeq], drafts: list[list[int]], infos: list[RowInfo], buckets: StepBuckets,
                k: int, *, trash_slot: int, eos_token_ids, impl: str | None) -> VerifyBatch:
    """Pack the scheduled ``rows`` with ``drafts[i]`` appended to row ``i`` (``len <= num_lookahead``)."""
    packed, given = [], []
    for r, d in zip(rows, drafts):
        if d:
            if len(d) > min(r.num_lookahead, k) or not r.samples:
                raise ValueError(f"{len(d)} drafts for a row with {r.num_lookahead} lookahead slots")
            packed.append(ScheduledSeq(r.seq, r.start, r.num_new_tokens + len(d), True, r.num_lookahead))
            given.append(list(r.seq.all_token_ids[r.start : r.start + r.num_new_tokens]) + list(d))
        else:
            packed.append(r)
            given.append(None)
    x = pack_rows(packed, buckets, given)
    t, s = x.bucket
    n_rows = num_logits_rows(t, s, k)
    logits_indices = np.zeros(n_rows, np.int32)
    row_map = np.zeros((s, k + 1), np.int32)
    num_drafts = np.zeros(s, np.int32)
    draft_tokens = np.zeros(n_rows, np.int32)
    has_draft = np.zeros(n_rows, np.bool_)
    q_index = np.zeros(n_rows, np.int32)
    params, seeds, steps, slots, resets = [], [], [], [], []
    n = 0
    for i, (r, d, info) in enumerate(zip(rows, drafts, infos)):
        if not r.samples:
            continue
        m = len(d)
        end = int(x.cu_q_lens[i + 1])
        for j in range(m + 1):
            logits_indices[n] = end - 1 - m + j
            row_map[i, j] = n
            if j < m:
                draft_tokens[n] = d[j]
                has_draft[n] = True
                q_index[n] = info.slot * k + j
            params.append(info.params)
            seeds.append(info.seed)
            steps.append(info.step + j)
            slots.append(info.slot)
            resets.append(info.reset)
            n += 1
        num_drafts[i] = m
    st = SamplingTensors.build(params, seeds=seeds, steps=steps, num_rows=n_rows, slots=slots, resets=resets,
                               eos_token_ids=eos_token_ids, trash_slot=trash_slot)
    token_slot, token_kind = token_slots_kinds(x, infos, [r.num_new_tokens for r in rows], trash_slot)
    md = AttentionMetadata(x.cu_q_lens, x.kv_lens, x.num_seqs, x.slot_mapping, x.page_indices, impl=impl)
    batch = StepBatch(x.tokens, x.positions, token_slot, token_kind, md, logits_indices, st)
    return VerifyBatch(batch, VerifyInputs(draft_tokens, has_draft, q_index, row_map, num_drafts), row_map,
                       num_drafts)


class Verifier:
    """Runs verify steps on the target :class:`ModelRunner`'s parameters, KV cache and penalty state.

    Args:
      runner: the target runner (its cache and penalty state are donated and replaced, as in its own step).
      num_speculative_tokens: ``K``.
      use_draft_probs: drafts come with probabilities (draft model) rather than as point masses (n-gram).
    """

    def __init__(self, runner: ModelRunner, num_speculative_tokens: int, use_draft_probs: bool):
        self.runner = runner
        self.k = num_speculative_tokens
        self.use_draft_probs = use_draft_probs
        kv_sh = jax.tree.map(lambda a: a.sharding, runner.kv_cache)
        ps_sh = jax.tree.map(lambda a: a.sharding, runner.penalty_state)
        rep = ps_sh.output_counts  # replicated on the runner's mesh: every process can read the output
        self._step = jax.jit(self._step_fn, donate_argnums=(1, 2), out_shardings=(rep, kv_sh, ps_sh))

    def _step_fn(self, params, kv_cache, penalty_state, batch: StepBatch, vin: VerifyInputs, draft_probs):
        logits, kv_cache = self.runner.model.forward(params, batch.tokens, batch.positions, kv_cache, batch.md,
                                                     batch.logits_indices)
        penalty_state = update_penalty_state(penalty_state, batch.sampling, batch.tokens, batch.token_slot,
                                             batch.token_kind)
        out = rejection_sample(logits, batch.sampling, penalty_state, vin, draft_probs)
        return out, kv_cache, penalty_state

    def dispatch(self, vb: VerifyBatch, draft_probs=None) -> VerifyOutput:
        """Launch one verify step (asynchronously); the output stays on the device."""
        r = self.runner
        probs = draft_probs if self.use_draft_probs else None
        out, r.kv_cache, r.penalty_state = self._step(r.params, r.kv_cache, r.penalty_state, vb.batch, vb.vin,
                                                      probs)
        r.num_steps += 1
        return out

    def run(self, vb: VerifyBatch, draft_probs=None) -> VerifyOutput:
        """One verify step; the output comes back to the host in one copy."""
        return jax.device_get(self.dispatch(vb, draft_probs))

    def dummy(self, num_tokens: int, num_seqs: int, pages_per_seq: int) -> VerifyBatch:
        """An all-padding verify batch of bucket ``(T, S)``."""
        base = self.runner.dummy_batch(num_tokens, num_seqs, pages_per_seq)
        n_rows = num_logits_rows(num_tokens, num_seqs, self.k)
        z = lambda *s: np.zeros(s, np.int32)  # noqa: E731
        st = SamplingTensors.build([], seeds=[], steps=[], num_rows=n_rows, trash_slot=self.runner.num_slots - 1)
        batch = base.replace(logits_indices=z(n_rows), sampling=st)
        vin = VerifyInputs(z(n_rows), np.zeros(n_rows, np.bool_), z(n_rows), z(num_seqs, self.k + 1), z(num_seqs))
        return VerifyBatch(batch, vin, vin.row_map, vin.num_drafts)

    def compile_all(self, shapes, pages_per_seq: int, draft_probs=None) -> float:
        """Compile the verify step for every ``(T, S)`` in ``shapes``."""
        start = time.perf_counter()
        for t, s in shapes:
            self.run(self.dummy(t, s, pages_per_seq), draft_probs)
        self.runner.num_steps = 0
        elapsed = time.perf_counter() - start
        logger.info("compiled %d verify step shapes in %.1f s", len(shapes), elapsed)
        return elapsed
