"""What the engine calls each step when speculative decoding is on.

Per step, on the scheduler's rows (decode rows carry ``num_lookahead`` granted slots):

1. ``k_i`` per row: the granted slots, cut (last rows first) so the verify step fits the largest verify
   bucket (``K + 1`` tokens per running sequence at most); a step over it (prefill-heavy) does not speculate.
2. Proposals. n-gram: host lookup. EAGLE head: :mod:`jaxinfer.speculative.eagle_proposer` (a catch-up step
   fed with the last target step's hidden states, then ``k - 1`` steps on the head's own features).
   "ngram+eagle": the n-gram proposal where the lookup finds one, EAGLE's otherwise (point-mass rows
   are marked for the rejection sampler). Draft model: draft step 1 mirrors the target's prefill chunks (so
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

from jaxinfer.device_batch import BatchBuilder, RowInfo, VerifyBatch
from jaxinfer.outputs import acceptance_length
from jaxinfer.runner import ModelRunner
from jaxinfer.sampling import logprob_entry
from jaxinfer.scheduler import ScheduledSeq
from jaxinfer.speculative.draft import probs_rows
from jaxinfer.speculative.ngram import NgramProposer

METHODS = ("ngram", "draft", "eagle", "ngram+eagle")


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
      method: "ngram", "draft", "eagle" or "ngram+eagle" (the engine's default; requests may choose
        another the engine can run, see :meth:`set_method`).
      num_speculative_tokens: ``K``.
      batches: the engine's batch builder (its buckets bound the verify buckets).
      runner: the target runner (with a draft model attached for method "draft", an EAGLE head for the
        EAGLE methods).
      ngram_min / ngram_max: n-gram lengths (method "ngram").
      max_num_seqs: running sequences at most.
      eagle_threshold: EAGLE early stop (:class:`~jaxinfer.speculative.eagle_proposer.EagleProposer`).
    """

    def __init__(self, method: str, num_speculative_tokens: int, batches: BatchBuilder, runner: ModelRunner, *,
                 ngram_min: int = 1, ngram_max: int = 4, max_num_seqs: int, eagle_threshold: float = 0.0):
        if method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {method!r}")
        if method == "draft" and runner.draft is None:
            raise ValueError("the draft method needs a draft model")
        if "eagle" in method and runner.eagle is None:
            raise ValueError("the EAGLE methods need an EAGLE head")
        self.method = method
        self.k = num_speculative_tokens
        self.batches = batches
        self.buckets = buckets = batches.buckets
        self.runner = runner
        self.ngram = NgramProposer(ngram_min, ngram_max)
        self.eagle = None
        if runner.eagle is not None:
            from jaxinfer.speculative.eagle_proposer import EagleProposer

            self.eagle = EagleProposer(runner, batches, num_speculative_tokens, eagle_threshold)
        self._method: dict[str, str] = {}  # sequences with a method of their own
        cap = min(buckets.token_buckets[-1], max_num_seqs * (num_speculative_tokens + 1))
        self.verify_token_cap = buckets.token_bucket(cap)
        self.stats = SpecStats()
        self._draft_done: dict[str, int] = {}  # tokens of each sequence whose draft K/V is valid
        self._point_mass: list[bool] = []  # rows of the latest proposal drafted by n-gram lookup

    # ---- shapes ------------------------------------------------------------------------------------
    def verify_shapes(self, token_counts=None) -> list[tuple[int, int]]:
        """Verify buckets: every token bucket up to the cap, or those of ``n * (K + 1)`` tokens."""
        if token_counts is not None:
            ts = {self.buckets.token_bucket(min(n * (self.k + 1), self.verify_token_cap)) for n in token_counts}
        else:
            ts = {t for t in self.buckets.token_buckets if t <= self.verify_token_cap}
        return sorted(self.buckets.bucket(t, 1) for t in ts)

    def methods(self) -> tuple[str, ...]:
        """The methods a request may choose on this engine."""
        if self.method == "draft":
            return ("draft", "ngram")
        return ("ngram", "eagle", "ngram+eagle") if self.eagle is not None else ("ngram",)

    def set_method(self, seq_id: str, method: str | None) -> None:
        """A sequence's own method (``None``: the engine's); kept until :meth:`forget` with ``finished``."""
        if method is None or method == self.method:
            self._method.pop(seq_id, None)
        else:
            self._method[seq_id] = method

    def draft_shapes(self, token_counts=None) -> list[tuple[int, int]]:
        """Draft-step (or EAGLE-step) buckets: every step bucket, or those of ``n`` and ``2 n`` tokens."""
        if self.method != "draft" and self.eagle is None:
            return []
        if token_counts is None:
            return self.buckets.shapes()
        return sorted({self.buckets.bucket(m, 1) for n in token_counts for m in (n, 2 * n)})

    def forget(self, seq_id: str, finished: bool = True) -> None:
        """A sequence finished or was preempted: drop its proposer state (its method too when finished)."""
        self.ngram.forget(seq_id)
        self._draft_done.pop(seq_id, None)
        if self.eagle is not None:
            self.eagle.forget(seq_id)
        if finished:
            self._method.pop(seq_id, None)

    def target_step(self, rows: list[ScheduledSeq], cu_q_lens) -> None:
        """The engine launched a plain target step over ``rows``: EAGLE catches up on it next step."""
        if self.eagle is not None:
            self.eagle.target_step(rows, cu_q_lens)

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
        """Draft tokens per row (possibly none); with a draft model or an EAGLE head this also runs their
        steps (mirroring / catching up the target)."""
        ks = self._plan(rows)
        methods = [self._method.get(r.seq.request_id, self.method) for r in rows]
        drafts = [[] for _ in rows]
        for i, (r, k, m) in enumerate(zip(rows, ks, methods)):
            if k and m.startswith("ngram"):
                drafts[i] = self.ngram.propose(r.seq.request_id, r.seq.all_token_ids, k)
        if self.method == "draft":
            model = self._draft_propose(rows, infos, [k if m == "draft" else 0 for k, m in zip(ks, methods)])
        elif self.eagle is not None:
            ks_e = [k if m == "eagle" or (m == "ngram+eagle" and not d) else 0 for k, m, d in zip(ks, methods, drafts)]
            ks_e = [k if r.num_new_tokens == 1 else 0 for k, r in zip(ks_e, rows)]  # drafts follow decode rows only
            model = self.eagle.propose(rows, infos, ks_e)
        else:
            return drafts
        self._point_mass = [bool(d) for d in drafts]
        return [d or e for d, e in zip(drafts, model)]

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
        b1 = self.batches.draft(rows1, infos1, [info.step for info in infos1])
        q1 = probs_rows([(info.slot, 0 if ks[i] else None) for i, info in zip(sel, infos1)], self.k,
                        self.runner.num_draft_rows, b1.logits_indices.shape[0])
        tokens = self.runner.run_draft(b1, q1)
        for n, (i, r1) in enumerate(zip(sel, rows1)):
            done[r1.seq.request_id] = r1.kv_len
            if ks[i]:
                drafts[i].append(int(tokens[n]))
        # steps 2 .. max k: one token per speculating row
        for j in range(1, max(ks, default=0)):
            idx = [i for i in range(len(rows)) if ks[i] > j]
            rows_j = [ScheduledSeq(rows[i].seq, rows[i].start + j, 1, True) for i in idx]
            infos_j = [infos[i] for i in idx]
            b = self.batches.draft(rows_j, infos_j, [info.step + j for info in infos_j],
                                   [[drafts[i][-1]] for i in idx])
            tokens = self.runner.run_draft(b, probs_rows([(info.slot, j) for info in infos_j], self.k,
                                                         self.runner.num_draft_rows, b.logits_indices.shape[0]))
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
        point_mass = self._point_mass if self.method != "ngram" else None
        vb = self.batches.verify(rows, drafts, infos, point_mass)
        if self.eagle is not None:
            self.eagle.target_step(rows, vb.batch.md.cu_q_lens)
        return PendingVerify(rows, drafts, infos, vb, self.runner.dispatch_verify(vb))

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
            res.logprobs.append(None if nlp is None else [logprob_entry(out, n, nlp) for n in ids])
            res.num_drafts.append(len(d))
            res.num_accepted.append(acc)
            if d:
                self.stats.num_draft_tokens += len(d)
                self.stats.num_accepted_tokens += acc
                self.stats.num_verified += 1
        return res

