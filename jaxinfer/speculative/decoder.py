"""What the engine calls each step when speculative decoding is on.

Per step, on the scheduler's rows (decode rows carry ``num_lookahead`` granted slots):

1. ``k_i`` per row: the granted slots, cut (last rows first) so the verify step fits the largest verify
   bucket (``K + 1`` tokens per running sequence at most); a step over it (prefill-heavy) does not speculate.
2. Proposals. n-gram: host lookup. Draft model: draft step 1 mirrors the target's prefill chunks (so
   the draft cache follows the target), feeds each speculating sequence's tokens the draft has not seen
   (its last token, and the last accepted draft after a fully accepted run) and drafts ``d_1``; draft steps
   ``2 .. max k_i`` feed ``d_{j-1}`` and draft ``d_j`` (one token per row, decode buckets).
3. Verify (only when some row has drafts; otherwise the engine runs its ordinary step): one target step,
   rejection sampling on device; each row gets ``num_accepted + 1`` tokens.

Rollback: ``Scheduler.update`` counts only accepted drafts in ``num_computed_tokens`` and releases pages
past the known tokens; the draft's valid length per sequence is ``min(draft length, num_computed_tokens)``
at the next step (the shared page ids make the page bookkeeping one).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from jaxinfer.attention import AttentionMetadata
from jaxinfer.outputs import acceptance_length
from jaxinfer.runner import ModelRunner, StepBatch
from jaxinfer.sampling import SamplingTensors
from jaxinfer.scheduler import ScheduledSeq
from jaxinfer.speculative.draft import DraftRunner
from jaxinfer.speculative.ngram import NgramProposer
from jaxinfer.speculative.verify import RowInfo, Verifier, VerifyBatch, pack_verify
from jaxinfer.step_inputs import StepBuckets, pack_rows


@dataclass
class SpecStepResult:
    """A verify step's outcome per scheduled row: ``tokens`` (accepted drafts + one more; empty for rows
    that do not sample), ``logprobs`` (one ``{token: logprob}`` per token when the request asked, else
    ``None``), ``num_drafts`` and ``num_accepted``."""

    tokens: list[list[int]]
    logprobs: list[list[dict[int, float]] | None]
    num_drafts: list[int]
    num_accepted: list[int]


@dataclass
class PendingVerify:
    """A launched verify step: its rows, drafts, row infos, packed batch and on-device output."""

    rows: list[ScheduledSeq]
    drafts: list[list[int]]
    infos: list[RowInfo]
    batch: VerifyBatch
    output: object


@dataclass
class SpecStats:
    """Totals since construction: ``num_draft_tokens`` proposed and verified, ``num_accepted_tokens``,
    ``num_verified`` sequence-steps that verified at least one draft."""

    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_verified: int = 0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per speculating sequence-step (accepted drafts + 1); 0 before any."""
        return acceptance_length(self.num_accepted_tokens, self.num_verified) or 0.0


class SpeculativeDecoder:
    """Proposes and verifies drafts for the engine.

    Args:
      method: "ngram" or "draft".
      num_speculative_tokens: ``K``.
      buckets: the engine's step buckets (verify buckets are those up to the verify cap).
      runner: the target runner.
      draft: the draft runner (method "draft").
      ngram_min / ngram_max: n-gram lengths (method "ngram").
      max_num_seqs: running sequences at most.
      trash_slot: penalty-state slot of padding rows.
      eos_token_ids: for ``min_tokens`` suppression.
      impl: attention implementation.
    """

    def __init__(self, method: str, num_speculative_tokens: int, buckets: StepBuckets, runner: ModelRunner, *,
                 draft: DraftRunner | None = None, ngram_min: int = 1, ngram_max: int = 4, max_num_seqs: int,
                 trash_slot: int, eos_token_ids=(), impl: str | None = None):
        if method not in ("ngram", "draft"):
            raise ValueError(f"speculative method must be 'ngram' or 'draft', got {method!r}")
        if method == "draft" and draft is None:
            raise ValueError("the draft method needs a draft model")
        self.method = method
        self.k = num_speculative_tokens
        self.buckets = buckets
        self.draft = draft
        self.ngram = NgramProposer(ngram_min, ngram_max) if method == "ngram" else None
        self.verifier = Verifier(runner, num_speculative_tokens, use_draft_probs=method == "draft")
        self.trash_slot = trash_slot
        self.eos_token_ids = tuple(eos_token_ids)
        self.impl = impl
        cap = min(buckets.token_buckets[-1], max_num_seqs * (num_speculative_tokens + 1))
        self.verify_token_cap = buckets.token_bucket(cap)
        self.stats = SpecStats()
        self._draft_done: dict[str, int] = {}  # tokens of each sequence whose draft K/V is valid

    # ---- shapes ------------------------------------------------------------------------------------
    def verify_shapes(self, token_counts=None) -> list[tuple[int, int]]:
        """Verify buckets: every token bucket up to the cap, or those of ``n * (K + 1)`` tokens."""
        if token_counts is not None:
            ts = {self.buckets.token_bucket(min(n * (self.k + 1), self.verify_token_cap)) for n in token_counts}
        else:
            ts = {t for t in self.buckets.token_buckets if t <= self.verify_token_cap}
        return sorted(self.buckets.bucket(t, 1) for t in ts)

    def draft_shapes(self, token_counts=None) -> list[tuple[int, int]]:
        """Draft-step buckets: every step bucket, or those of ``n`` and ``2 n`` tokens."""
        if self.draft is None:
            return []
        if token_counts is None:
            return self.buckets.shapes()
        return sorted({self.buckets.bucket(m, 1) for n in token_counts for m in (n, 2 * n)})

    def warmup(self, token_counts=None) -> float:
        p = self.buckets.pages_per_seq
        probs = self.draft.probs if self.draft is not None else None
        seconds = self.verifier.compile_all(self.verify_shapes(token_counts), p, probs)
        if self.draft is not None:
            seconds += self.draft.compile_all(self.draft_shapes(token_counts), p)
        return seconds

    def forget(self, seq_id: str) -> None:
        """A sequence finished or was preempted: drop its proposer state."""
        if self.ngram is not None:
            self.ngram.forget(seq_id)
        self._draft_done.pop(seq_id, None)

    # ---- one step ----------------------------------------------------------------------------------
    def _plan(self, rows: list[ScheduledSeq]) -> list[int]:
        ks = [min(r.num_lookahead, self.k) if r.samples else 0 for r in rows]
        room = self.verify_token_cap - sum(r.num_new_tokens for r in rows)
        for i in range(len(ks) - 1, -1, -1):
            if sum(ks) <= room:
                break
            ks[i] = max(min(ks[i], room - (sum(ks) - ks[i])), 0)
        return ks

    def propose(self, rows: list[ScheduledSeq], infos: list[RowInfo]) -> list[list[int]]:
        """Draft tokens per row (possibly none); with a draft model this also runs its mirror steps."""
        ks = self._plan(rows)
        if self.ngram is not None:
            return [self.ngram.propose(r.seq.request_id, r.seq.all_token_ids, k) if k else []
                    for r, k in zip(rows, ks)]
        return self._draft_propose(rows, infos, ks)

    def _draft_batch(self, rows, infos, steps, given=None) -> StepBatch:
        x = pack_rows(rows, self.buckets, given)
        _, s = x.bucket
        params = [info.params if r.samples else None for r, info in zip(rows, infos)]
        st = SamplingTensors.build(params, seeds=[i.seed for i in infos], steps=steps, num_rows=s,
                                   eos_token_ids=self.eos_token_ids)
        md = AttentionMetadata(x.cu_q_lens, x.kv_lens, x.num_seqs, x.slot_mapping, x.page_indices, impl=self.impl)
        z = np.zeros_like(x.tokens)
        return StepBatch(x.tokens, x.positions, z, z, md, x.logits_indices, st)

    def _q_rows(self, slots_js, s: int) -> np.ndarray:
        out = np.full(s, self.draft.num_slots * self.k, np.int32)  # out of range: not stored
        for i, (slot, j) in enumerate(slots_js):
            if j is not None:
                out[i] = slot * self.k + j
        return out

    def _draft_propose(self, rows, infos, ks) -> list[list[int]]:
        done = self._draft_done
        drafts: list[list[int]] = [[] for _ in rows]
        # step 1: mirror prefill chunks, catch up and draft d_1
        sel, rows1 = [], []
        for i, r in enumerate(rows):
            seq = r.seq
            if seq.num_lookahead == 0 and r.start >= seq.num_prompt_tokens:
                continue  # a decode of a request that does not speculate
            start = min(done.get(seq.request_id, r.start), r.start)
            sel.append(i)
            rows1.append(ScheduledSeq(seq, start, r.start + r.num_new_tokens - start, r.samples))
        largest = self.buckets.token_buckets[-1]
        while sum(r.num_new_tokens for r in rows1) > largest:  # catch-up beyond the step: skip speculators
            j = max(n for n, i in enumerate(sel) if rows[i].start >= rows[i].seq.num_prompt_tokens)
            ks[sel[j]] = 0
            del sel[j], rows1[j]
        if not rows1:
            return drafts
        infos1 = [infos[i] for i in sel]
        b1 = self._draft_batch(rows1, infos1, [info.step for info in infos1])
        q1 = self._q_rows([(info.slot, 0 if ks[i] else None) for i, info in zip(sel, infos1)],
                          b1.logits_indices.shape[0])
        tokens = self.draft.run(b1, q1)
        for n, (i, r1) in enumerate(zip(sel, rows1)):
            done[r1.seq.request_id] = r1.kv_len
            if ks[i]:
                drafts[i].append(int(tokens[n]))
        # steps 2 .. max k: one token per speculating row
        for j in range(1, max(ks, default=0)):
            idx = [i for i in range(len(rows)) if ks[i] > j]
            rows_j = [ScheduledSeq(rows[i].seq, rows[i].start + j, 1, True) for i in idx]
            infos_j = [infos[i] for i in idx]
            b = self._draft_batch(rows_j, infos_j, [info.step + j for info in infos_j],
                                  [[drafts[i][-1]] for i in idx])
            tokens = self.draft.run(b, self._q_rows([(info.slot, j) for info in infos_j], b.logits_indices.shape[0]))
            for n, i in enumerate(idx):
                drafts[i].append(int(tokens[n]))
                done[rows[i].seq.request_id] = rows[i].start + j + 1
        return drafts

    def verify(self, rows: list[ScheduledSeq], drafts: list[list[int]], infos: list[RowInfo]) -> SpecStepResult:
        """Run the verify step for ``rows`` with ``drafts``; updates :attr:`stats`."""
        return self.collect(self.dispatch_verify(rows, drafts, infos))

    def dispatch_verify(self, rows: list[ScheduledSeq], drafts: list[list[int]], infos: list[RowInfo]
                        ) -> PendingVerify:
        """Launch the verify step without waiting for it (:meth:`collect` finishes it)."""
        vb = pack_verify(rows, drafts, infos, self.buckets, self.k, trash_slot=self.trash_slot,
                         eos_token_ids=self.eos_token_ids, impl=self.impl)
        probs = self.draft.probs if self.draft is not None else None
        return PendingVerify(rows, drafts, infos, vb, self.verifier.dispatch(vb, probs))

    @staticmethod
    def is_verify(launched) -> bool:
        return isinstance(launched, PendingVerify)

    def collect(self, pending: PendingVerify) -> SpecStepResult:
        """Wait for a verify step; per-row accepted tokens and log-probabilities; updates :attr:`stats`."""
        rows, drafts, infos, vb = pending.rows, pending.drafts, pending.infos, pending.batch
        out = jax.device_get(pending.output)
        res = SpecStepResult([], [], [], [])
        for i, (r, d, info) in enumerate(zip(rows, drafts, infos)):
            if not r.samples:
                res.tokens.append([])
                res.logprobs.append(None)
                res.num_drafts.append(0)
                res.num_accepted.append(0)
                continue
            acc = int(out.num_accepted[i])
            ids = [int(vb.row_map[i, j]) for j in range(acc + 1)]
            res.tokens.append([int(out.tokens[n]) for n in ids])
            nlp = info.params.logprobs
            res.logprobs.append(None if nlp is None else [_entry(out, n, nlp) for n in ids])
            res.num_drafts.append(len(d))
            res.num_accepted.append(acc)
            if d:
                self.stats.num_draft_tokens += len(d)
                self.stats.num_accepted_tokens += acc
                self.stats.num_verified += 1
        return res


def _entry(out, row: int, k: int) -> dict[int, float]:
    entry = {int(out.tokens[row]): float(out.logprobs[row])}
    for j in range(k):
        entry.setdefault(int(out.top_ids[row, j]), float(out.top_logprobs[row, j]))
    return entry
