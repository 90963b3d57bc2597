"""Every device batch is built here: plain steps, speculative verify steps, draft-model steps and the
all-padding batches that compile a bucket.

The scheduler decides which tokens run (:mod:`jaxinfer.scheduler`), :mod:`jaxinfer.step_inputs` packs them
into host arrays at a fixed ``(T, S)`` bucket, and :class:`BatchBuilder` adds what the device step needs
on top (per-token penalty slots and kinds, per-row sampling settings, the attention metadata) and returns
a :class:`StepBatch` (or a :class:`VerifyBatch`). Nothing here touches the device or chooses a kernel: the
runner carries the kernel choice (:mod:`jaxinfer.target`) and applies it when the step is traced.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.struct
import jax
import numpy as np

from jaxinfer.attention import AttentionMetadata
from jaxinfer.prompt_logprobs import PromptLogprobInputs, build_inputs, empty_inputs, prompt_spans
from jaxinfer.sampling import TOKEN_OUTPUT, TOKEN_PAD, TOKEN_PROMPT, SamplingTensors
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import ScheduledSeq
from jaxinfer.speculative.rejection import POINT_MASS, VerifyInputs
from jaxinfer.step_inputs import StepBuckets, StepInputs, pack_rows


@flax.struct.dataclass
class StepBatch:
    """Device inputs of one step (``T`` tokens, ``S`` sequence rows, ``P`` pages per sequence, ``L`` logits
    rows: ``S`` for plain and draft steps, more for verify steps).

    Attributes:
      tokens, positions, token_slot, token_kind: ``i32[T]``.
      md: :class:`AttentionMetadata` (``cu_q_lens[S+1]``, ``kv_lens[S]``, ``num_seqs[1]``,
        ``slot_mapping[T]``, ``page_indices[S, P]``).
      logits_indices: ``i32[L]`` token row of each logits row.
      sampling: :class:`SamplingTensors` of ``L`` rows.
      prompt: :class:`~jaxinfer.prompt_logprobs.PromptLogprobInputs` (``R`` rows, fixed by ``T``): the prompt
        positions scored this step (``SamplingParams.prompt_logprobs``).
    """

    tokens: jax.Array
    positions: jax.Array
    token_slot: jax.Array
    token_kind: jax.Array
    md: AttentionMetadata
    logits_indices: jax.Array
    sampling: SamplingTensors
    prompt: PromptLogprobInputs


@dataclass(frozen=True)
class RowInfo:
    """Per scheduled row: its penalty-state ``slot``, request ``seed``, ``step`` (tokens it generated so
    far), ``params``, whether its slot is cleared this step (``reset``), its structured-output token
    bitmask ``i32[W]`` (``None``: unconstrained, or the row does not sample) and the first prompt position
    whose logits it scores for prompt logprobs (``score_from``; ``None``: none)."""

    slot: int
    seed: int
    step: int
    params: SamplingParams
    reset: bool
    mask: np.ndarray | None = None
    score_from: int | None = None


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
    """``L`` of the verify bucket ``(T, S)`` with ``K = k``: ``min(T, S * (K + 1))``."""
    return min(num_tokens, num_seqs * (k + 1))


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


def _prompt_inputs(rows: list[ScheduledSeq], infos: list[RowInfo], x: StepInputs) -> PromptLogprobInputs:
    spans = prompt_spans(rows, [i.score_from for i in infos])
    return build_inputs(spans, x.cu_q_lens, [r.start for r in rows], int(x.tokens.shape[0]))


def _metadata(x: StepInputs) -> AttentionMetadata:
    return AttentionMetadata(x.cu_q_lens, x.kv_lens, x.num_seqs, x.slot_mapping, x.page_indices)


def _zeros(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.int32)


@dataclass(frozen=True)
class BatchBuilder:
    """Builds the engine's device batches.

    Attributes:
      buckets: the engine's step buckets.
      trash_slot: penalty-state row of padding rows and tokens.
      eos_token_ids: suppressed while a row is below its ``min_tokens``.
      num_speculative_tokens: ``K`` of verify batches (0 without speculation).
    """

    buckets: StepBuckets
    trash_slot: int
    eos_token_ids: tuple[int, ...] = ()
    num_speculative_tokens: int = 0

    def _sampling(self, params, seeds, steps, num_rows, slots=None, resets=None, masks=None) -> SamplingTensors:
        return SamplingTensors.build(params, seeds=seeds, steps=steps, num_rows=num_rows, slots=slots,
                                     resets=resets, eos_token_ids=self.eos_token_ids, trash_slot=self.trash_slot,
                                     masks=masks)

    def plain(self, x: StepInputs, infos: list[RowInfo]) -> StepBatch:
        """The step for the scheduler's packed rows ``x``: logits at each row's last scheduled token."""
        _, s = x.bucket
        token_slot, token_kind = token_slots_kinds(x, infos, [r.num_new_tokens for r in x.rows], self.trash_slot)
        st = self._sampling([i.params for i in infos], [i.seed for i in infos], [i.step for i in infos], s,
                            [i.slot for i in infos], [i.reset for i in infos], [i.mask for i in infos])
        prompt = _prompt_inputs(x.rows, infos, x)
        return StepBatch(x.tokens, x.positions, token_slot, token_kind, _metadata(x), x.logits_indices, st, prompt)

    def verify(self, rows: list[ScheduledSeq], drafts: list[list[int]], infos: list[RowInfo],
               point_mass: list[bool] | None = None) -> VerifyBatch:
        """The verify step: scheduled ``rows`` with ``drafts[i]`` appended to row ``i``
        (``len <= num_lookahead``); logits at every position of a speculating row. ``point_mass[i]``: row
        ``i``'s drafts are point masses (n-gram) in a step whose other rows have draft probabilities (their
        ``q_index`` is :data:`~jaxinfer.speculative.rejection.POINT_MASS`)."""
        k = self.num_speculative_tokens
        point_mass = point_mass or []
        packed, given = [], []
        for r, d, info in zip(rows, drafts, infos):
            if d:
                if len(d) > min(r.num_lookahead, k) or not r.samples or info.mask is not None:
                    raise ValueError(f"{len(d)} drafts for a row with {r.num_lookahead} lookahead slots")
                packed.append(ScheduledSeq(r.seq, r.start, r.num_new_tokens + len(d), True, r.num_lookahead))
                given.append(list(r.seq.all_token_ids[r.start : r.start + r.num_new_tokens]) + list(d))
            else:
                packed.append(r)
                given.append(None)
        x = pack_rows(packed, self.buckets, given)
        t, s = x.bucket
        n_rows = num_logits_rows(t, s, k)
        logits_indices = np.zeros(n_rows, np.int32)
        row_map = np.zeros((s, k + 1), np.int32)
        num_drafts = np.zeros(s, np.int32)
        draft_tokens = np.zeros(n_rows, np.int32)
        has_draft = np.zeros(n_rows, np.bool_)
        q_index = np.zeros(n_rows, np.int32)
        params, seeds, steps, slots, resets, masks = [], [], [], [], [], []
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
                    q_index[n] = POINT_MASS if i < len(point_mass) and point_mass[i] else info.slot * k + j
                params.append(info.params)
                seeds.append(info.seed)
                steps.append(info.step + j)
                slots.append(info.slot)
                resets.append(info.reset)
                masks.append(info.mask)  # constrained rows have no drafts: their one row is the sampled one
                n += 1
            num_drafts[i] = m
        st = self._sampling(params, seeds, steps, n_rows, slots, resets, masks)
        token_slot, token_kind = token_slots_kinds(x, infos, [r.num_new_tokens for r in rows], self.trash_slot)
        batch = StepBatch(x.tokens, x.positions, token_slot, token_kind, _metadata(x), logits_indices, st,
                          _prompt_inputs(rows, infos, x))
        return VerifyBatch(batch, VerifyInputs(draft_tokens, has_draft, q_index, row_map, num_drafts), row_map,
                           num_drafts)

    def draft(self, rows: list[ScheduledSeq], infos: list[RowInfo], steps: list[int],
              given: list[list[int] | None] | None = None) -> StepBatch:
        """A draft-model step over ``rows`` (``given``: tokens fed instead of the sequences' own); rows that
        do not sample get no sampling settings; no penalty bookkeeping (the draft has none)."""
        x = pack_rows(rows, self.buckets, given)
        _, s = x.bucket
        params = [info.params if r.samples else None for r, info in zip(rows, infos)]
        st = SamplingTensors.build(params, seeds=[i.seed for i in infos], steps=steps, num_rows=s,
                                   eos_token_ids=self.eos_token_ids)
        z = np.zeros_like(x.tokens)
        return StepBatch(x.tokens, x.positions, z, z, _metadata(x), x.logits_indices, st, empty_inputs(len(z)))

    def padding(self, num_tokens: int, num_seqs: int) -> StepBatch:
        """An all-padding batch of bucket ``(T, S)`` (nothing written, nothing attended; penalty rows point
        at the trash slot): what warm-up runs to compile a bucket."""
        md = AttentionMetadata(cu_q_lens=_zeros(num_seqs + 1), kv_lens=_zeros(num_seqs), num_seqs=_zeros(1),
                               slot_mapping=np.full(num_tokens, -1, np.int32),
                               page_indices=_zeros(num_seqs, self.buckets.pages_per_seq))
        st = SamplingTensors.build([], seeds=[], steps=[], num_rows=num_seqs, trash_slot=self.trash_slot)
        return StepBatch(_zeros(num_tokens), _zeros(num_tokens), np.full(num_tokens, self.trash_slot, np.int32),
                         _zeros(num_tokens), md, _zeros(num_seqs), st, empty_inputs(num_tokens))

    def padding_verify(self, num_tokens: int, num_seqs: int) -> VerifyBatch:
        """An all-padding verify batch of bucket ``(T, S)``."""
        k = self.num_speculative_tokens
        n_rows = num_logits_rows(num_tokens, num_seqs, k)
        st = SamplingTensors.build([], seeds=[], steps=[], num_rows=n_rows, trash_slot=self.trash_slot)
        batch = self.padding(num_tokens, num_seqs).replace(logits_indices=_zeros(n_rows), sampling=st)
        vin = VerifyInputs(_zeros(n_rows), np.zeros(n_rows, np.bool_), _zeros(n_rows), _zeros(num_seqs, k + 1),
                           _zeros(num_seqs))
        return VerifyBatch(batch, vin, vin.row_map, vin.num_drafts)
