"""Requests on the output side: bookkeeping, incremental detokenization, stop strings and the
:class:`RequestOutput` deltas (the engine core only schedules and runs steps).

A request with ``n > 1`` is ``n`` sequences over the same prompt; the processor maps each sequence back
to its request and sample index, feeds its new tokens to that sample's detokenizer, ends it at a stop
string (through the ``finish_sequence`` callback, which tells the scheduler), and assembles one
:class:`RequestOutput` per changed request.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from jaxinfer.detokenizer import IncrementalDetokenizer
from jaxinfer.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.sequence import Sequence


class _Request:
    """One user request: its ``n`` sequences, their detokenizers and what was already reported."""

    def __init__(self, request_id, prompt, prompt_ids, params, seqs, detoks, seeds, arrival):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.seqs = seqs
        self.detoks = detoks
        self.seeds = seeds
        self.metrics = RequestMetrics(arrival_time=arrival)
        self.done = [False] * len(seqs)
        # prompt logprobs: entry j is token j's (None for token 0); sample 0 scores them; sent once complete
        self.prompt_lps: list | None = [None] if params.prompt_logprobs is not None else None
        self.prompt_lps_sent = False

    @property
    def prompt_lps_complete(self) -> bool:
        return self.prompt_lps is not None and len(self.prompt_lps) >= len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return all(self.done)


class OutputProcessor:
    """Turns the scheduler's per-sequence updates into per-request output deltas.

    Args:
      tokenizer: a HF tokenizer (detokenization).
      finish_sequence: ``(sequence id, reason, stop) -> None``: ends a running sequence early (stop string).
    """

    def __init__(self, tokenizer, finish_sequence: Callable[[str, str, str], None]):
        self.tokenizer = tokenizer
        self._finish = finish_sequence
        self._requests: dict[str, _Request] = {}
        self._owner: dict[str, tuple[_Request, int]] = {}
        self._pending: list[RequestOutput] = []
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self._ids = itertools.count()

    # ---- registry ----------------------------------------------------------------------------------
    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def add(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
            seqs: list[Sequence], seeds: list[int], arrival: float) -> None:
        """Track a request whose sequences the scheduler accepted."""
        detoks = [IncrementalDetokenizer.from_sampling_params(self.tokenizer, params, prompt_ids) for _ in seqs]
        req = _Request(request_id, prompt, prompt_ids, params, seqs, detoks, seeds, arrival)
        self._requests[request_id] = req
        for i, seq in enumerate(seqs):
            self._owner[seq.request_id] = (req, i)
        self.prompt_tokens += len(prompt_ids)

    def seed(self, seq_id: str) -> int:
        """The sampling seed of a sequence."""
        req, i = self._owner[seq_id]
        return req.seeds[i]

    def score_from(self, seq_id: str) -> int | None:
        """The first prompt position whose logits sequence ``seq_id`` must still score for prompt logprobs
        (the logits at ``p`` score token ``p + 1``), or ``None`` (not asked, another sample scores, done)."""
        req, i = self._owner[seq_id]
        if i != 0 or req.prompt_lps is None or req.prompt_lps_complete:
            return None
        return len(req.prompt_lps) - 1

    def add_prompt_logprobs(self, seq_id: str, first: int, entries: list[dict[int, float]]) -> None:
        """Record the entries of prompt tokens ``first + 1 ...`` (scored at positions ``first ...``); positions
        already recorded (a recomputation after preemption) are skipped."""
        owner = self._owner.get(seq_id)
        if owner is None:
            return
        lps = owner[0].prompt_lps
        have = len(lps) - 1  # positions scored so far
        if first > have:
            raise RuntimeError(f"prompt logprobs of {seq_id!r}: position {first} scored before {have}")
        lps.extend(entries[have - first :])

    def abort(self, request_id: str) -> list[str] | None:
        """End a request as aborted: returns the ids of its sequences still running (for the caller to
        release), or ``None`` when the request is unknown or finished. Its final output comes with the
        next :meth:`take_pending`."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        running, outs = [], []
        for i, seq in enumerate(req.seqs):
            if req.done[i]:
                continue
            running.append(seq.request_id)
            req.done[i] = True
            outs.append(CompletionOutput(i, "", [], "abort", None, [] if req.params.logprobs is not None else None))
        self._pending.append(self._output(req, outs))
        self._forget(req)
        return running

    def take_pending(self) -> list[RequestOutput]:
        """Outputs produced outside a step (aborts), once."""
        out, self._pending = self._pending, []
        return out

    def restore_pending(self, outputs: list[RequestOutput]) -> None:
        """Put outputs taken by :meth:`take_pending` back (the step that took them failed)."""
        self._pending[:0] = outputs

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    def new_request_id(self) -> str:
        """A fresh request id (for front ends that do not bring their own)."""
        while True:
            rid = f"req-{next(self._ids)}"
            if rid not in self._requests:
                return rid

    # ---- one step's updates ------------------------------------------------------------------------
    def process(self, updates, row_of: dict[str, int], logprobs, spec=None) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's scheduler updates.

        Args:
          updates: the scheduler's ``SequenceUpdate`` list.
          row_of: sequence id -> its row in the step.
          logprobs: per row, ``None`` or one ``{token: logprob}`` per sampled token.
          spec: the verify step's per-row draft counts (``num_drafts`` / ``num_accepted``), if it was one.
        Returns:
          ``(output deltas, ids of the sequences that finished)``.
        """
        now = time.perf_counter()
        changed: dict[str, list[CompletionOutput]] = {}
        finished_ids = []
        for u in updates:
            req, i = self._owner[u.seq.request_id]
            row = row_of[u.seq.request_id]
            if spec is not None and spec.num_drafts[row]:
                req.metrics.num_draft_tokens += spec.num_drafts[row]
                req.metrics.num_accepted_tokens += spec.num_accepted[row]
                req.metrics.num_spec_steps += 1
            new_ids, text = self._detokenize(req, i, u)
            seq = u.seq
            finished = seq.is_finished
            if new_ids and req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            self.generated_tokens += len(new_ids)
            lps = (logprobs[row] or [])[: len(new_ids)] if req.params.logprobs is not None else None
            changed.setdefault(req.request_id, []).append(CompletionOutput(
                i, text, new_ids, seq.finish_reason if finished else None,
                seq.stop_reason if finished else None, lps))
            if finished:
                req.done[i] = True
                finished_ids.append(seq.request_id)
        outputs = []
        for rid, outs in changed.items():
            req = self._requests[rid]
            if req.finished:
                req.metrics.finish_time = now
            outputs.append(self._output(req, outs))
            if req.finished:
                self._forget(req)
        return outputs, finished_ids

    def _detokenize(self, req: _Request, i: int, u) -> tuple[list[int], str]:
        """Feed an update's tokens to the detokenizer; a stop string ends the sequence at the token that
        completes it (later tokens of an accepted speculative run are dropped). Returns the tokens kept and
        the new text."""
        detok, seq, ids = req.detoks[i], u.seq, list(u.new_token_ids)
        if len(ids) <= 1:
            d = detok.update(ids, final=u.finished, drop_last_token=u.stopped_by_token)
            if d.stop_string is not None and not u.finished:
                self._finish(seq.request_id, "stop", d.stop_string)
            return ids, d.text
        text = ""
        for j, token in enumerate(ids):
            last = j == len(ids) - 1
            d = detok.update([token], final=u.finished and last, drop_last_token=u.stopped_by_token and last)
            text += d.text
            if d.stop_string is None:
                continue
            if not seq.is_finished:
                self._finish(seq.request_id, "stop", d.stop_string)
            elif not last:  # finished by a later token: the stop string came first
                seq.set_finished("stop", d.stop_string)
            if not last:
                seq.truncate_tokens(seq.num_tokens - (len(ids) - j - 1))
            return ids[: j + 1], text
        return ids, text

    def _output(self, req: _Request, outs: list[CompletionOutput]) -> RequestOutput:
        m = req.metrics
        m.num_generated_tokens = sum(s.num_output_tokens for s in req.seqs)
        if req.finished and m.finish_time is None:
            m.finish_time = time.perf_counter()
        prompt_lps = None
        if req.prompt_lps_complete and not req.prompt_lps_sent:
            prompt_lps, req.prompt_lps_sent = req.prompt_lps, True
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, req.finished, m, prompt_lps)

    def _forget(self, req: _Request) -> None:
        self._requests.pop(req.request_id, None)
        for seq in req.seqs:
            self._owner.pop(seq.request_id, None)
