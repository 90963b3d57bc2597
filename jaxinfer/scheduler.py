"""Continuous batching: which tokens of which sequences run in the next step (pure Python, no jax).

Each :meth:`Scheduler.schedule` call fills one step under three budgets: tokens
(``max_num_batched_tokens``), sequences (``max_num_seqs``) and KV pages (the block manager):

1. running sequences in decode (one new token each, plus ``seq.num_lookahead`` reserved slots), oldest
   first;
2. running sequences part-way through a prefill (chunked prefill), oldest first;
3. waiting sequences in FCFS order (new requests and preempted ones, which recompute prompt + outputs),
   reusing their longest cached prefix; the last one admitted is chunked to fit the token budget. Stops at
   the first sequence that does not fit (no overtaking), or whose next uncached page a sequence in this
   step is about to compute (a request arriving with others that share its prompt prefix waits for the
   shared pages to be cached instead of computing them twice).
   Skipped in a step that had to preempt. Fairness across requests: sequences of one client request (its
   ``n`` samples and every prompt of a batch share a ``Sequence.client``) hold at most
   ``max_running_seqs_per_request`` slots (default half of ``max_num_seqs``), and while several requests
   have sequences waiting or running, a request is admitted beyond ``ceil(max_num_seqs / active
   requests)`` running sequences only after the others; a waiting sequence over its request's share is
   passed over (not a stop), so one request's samples never take every slot while another request waits.

Step share (``max_step_tokens_per_request``, off by default; ``jaxinfer serve`` sets it): while more than one
client request has work, a request with several unfinished sequences puts at most that many tokens (decode
rows + prefill tokens) in a step, its sequences taking turns (the least recently scheduled first). On a
compute-bound device each row of a step costs every sequence in it time, so this keeps a request with a
large ``n`` (or many prompts) from slowing everyone else's tokens; a request alone uses the whole step
(``SHARE_GRACE_STEPS`` steps after the others' work ended), and single-sequence requests are never
limited.

When a running sequence needs a page and none is left, the newest running sequence is preempted (its
pages freed, its outputs kept, put back at the front of the waiting queue) until the page fits or the
sequence preempted itself. Waiting sequences never cause preemption. The oldest running sequence always
progresses: ``add`` rejects a request that could not fit in the whole cache on its own.

Engine loop, each step::

    out = scheduler.schedule()
    inputs = pack_step_inputs(out, buckets)          # jaxinfer.step_inputs (host arrays, one bucket)
    sampled = runner.run(device_batch(inputs))       # ModelRunner.run: one token id per scheduled row
    updates = scheduler.update(out, sampled[:len(out.scheduled)])
    # detokenize updates; on a stop string: scheduler.finish(request_id, "stop", stop_string)
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Collection, Iterable
from collections.abc import Sequence as SequenceABC

from jaxinfer.block_manager import BlockManager, cdiv
from jaxinfer.errors import InvalidRequestError, PromptTooLongError
from jaxinfer.scheduler_types import ScheduledSeq, SchedulerConfig, SchedulerOutput, SchedulerStats, SeqUpdate
from jaxinfer.sequence import Sequence, SequenceStatus

# Steps the step share stays on after the last step in which another client request had work: a client
# sending requests back to back finds the next one capped too instead of a full step of the big request's.
SHARE_GRACE_STEPS = 16


def _token_list(value) -> list[int]:
    """One sampled token (an int or numpy integer) or several (a sequence of them) -> list of ints."""
    try:
        return [operator.index(value)]
    except TypeError:
        return [operator.index(v) for v in value]


class Scheduler:
    """Continuous-batching scheduler over a :class:`BlockManager` (see the module docstring).

    Args:
      config: budgets.
      eos_token_ids: token ids that end generation unless ``SamplingParams.ignore_eos``.
    """

    def __init__(self, config: SchedulerConfig, eos_token_ids: Iterable[int] = ()):
        self.config = config
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.block_manager = BlockManager(config.num_pages, config.page_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # FCFS rank order: oldest first
        self._requests: dict[str, Sequence] = {}
        self._next_order = 0
        self._num_preemptions = 0
        self._step_no = 0
        self._shared_until = -1  # step share: on through this step (SHARE_GRACE_STEPS after sharing)
        self._last_step: dict[str, int] = {}  # request id -> the last step that scheduled it (step share)

    # ---- requests ----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. Raises ``PromptTooLongError`` when the prompt exceeds ``max_model_len``
        or the sequence could never fit in the KV cache, ``InvalidRequestError`` for a duplicate id."""
        cfg = self.config
        if not isinstance(seq, Sequence):
            raise InvalidRequestError("expected a Sequence")
        if seq.request_id in self._requests:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already in use", "request_id")
        if seq.status is not SequenceStatus.WAITING or seq.output_token_ids or seq.block_table:
            raise InvalidRequestError(f"sequence {seq.request_id!r} is not a new request")
        n = seq.num_prompt_tokens
        if n > cfg.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {n} tokens but the model's context window (max_model_len) is "
                f"{cfg.max_model_len} tokens"
            )
        # K/V slots at the longest: every token but the last sampled one (plus lookahead), capped by the
        # context window. A request that fits alone always progresses (older sequences come first).
        kv_max = min(n + seq.sampling_params.max_tokens - 1 + seq.num_lookahead, cfg.max_model_len)
        pages = cdiv(kv_max, cfg.page_size)
        if pages > cfg.num_pages:
            raise PromptTooLongError(
                f"the request needs up to {pages} KV-cache pages ({kv_max} tokens) "
                f"but the cache holds only {cfg.num_pages} pages of {cfg.page_size} tokens; "
                "shorten the prompt or max_tokens"
            )
        seq.order = self._next_order
        self._next_order += 1
        self._requests[seq.request_id] = seq
        self.waiting.append(seq)

    def get(self, request_id: str) -> Sequence | None:
        """The unfinished sequence with this id, or None."""
        return self._requests.get(request_id)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a waiting or running sequence with reason ``"abort"`` and free its pages at once.
        Returns it, or None when the id is unknown or already finished."""
        return self.finish(request_id, "abort")

    def finish(self, request_id: str, reason: str, stop_reason: int | str | None = None) -> Sequence | None:
        """Finish a sequence from outside the step (stop string found by the detokenizer: ``"stop"`` with
        the string as ``stop_reason``; client gone: ``"abort"``). Frees its pages; returns it, or None when
        the id is unknown or already finished."""
        seq = self._requests.get(request_id)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.set_finished(reason, stop_reason)
        self._release(seq)
        return seq

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_waiting=len(self.waiting),
            num_running=len(self.running),
            num_preemptions=self._num_preemptions,
            block_manager=self.block_manager.stats(),
        )

    # ---- scheduling --------------------------------------------------------------------------------
    def _lookahead(self, seq: Sequence, kv_len: int) -> int:
        # a verify step yields at most lookahead + 1 tokens: never reserve more than the sequence may still
        # generate, nor past the context window
        left = seq.sampling_params.max_tokens - seq.num_output_tokens - 1
        return max(min(seq.num_lookahead, self.config.max_model_len - kv_len, left), 0)

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        del self._requests[seq.request_id]
        self._last_step.pop(seq.request_id, None)

    def _step_shares(self) -> dict[str, int] | None:
        """Tokens left this step per limited client (``max_step_tokens_per_request``), or None: no limit
        (off, or a single client has had work for ``SHARE_GRACE_STEPS`` steps). Clients with one unfinished
        sequence are not limited."""
        limit = self.config.max_step_tokens_per_request
        if limit is None:
            return None
        sizes: dict[str, int] = {}
        for seq in self._requests.values():
            sizes[seq.client] = sizes.get(seq.client, 0) + 1
        if len(sizes) >= 2:
            self._shared_until = self._step_no + SHARE_GRACE_STEPS
        elif self._step_no > self._shared_until:
            return None
        return {g: limit for g, c in sizes.items() if c > 1} or None

    def _preempt(self, seq: Sequence) -> None:
        # Victims are the newest running sequences and admission is FCFS, so every waiting sequence is newer
        # than every running one: a preempted sequence goes to the front of the queue.
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self._num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self, exclude_groups: Collection[str] = ()) -> SchedulerOutput:
        """Pick the next step's work (see the module docstring). Never raises for a queued request.

        ``exclude_groups``: groups (request ids) none of whose sequences may run in this step; they keep
        their state (used to re-run a failed step without the request suspected of breaking it).
        """
        cfg = self.config
        bm = self.block_manager
        budget = cfg.max_num_batched_tokens
        chosen: dict[str, ScheduledSeq] = {}  # insertion order = output order within a phase
        preempted: list[Sequence] = []
        shares = self._step_shares()

        def allowed(seq: Sequence, n: int) -> int:
            return n if shares is None or seq.client not in shares else min(n, shares[seq.client])

        def charge(seq: Sequence, n: int) -> None:
            if shares is not None and seq.client in shares:
                shares[seq.client] -= n

        def grow(seq: Sequence, n: int) -> bool:
            """Pages for ``n`` new tokens of a running sequence, preempting newest-first. False: seq went."""
            nonlocal budget
            la = self._lookahead(seq, seq.num_computed_tokens + n)
            while not bm.allocate_slots(seq, n, num_lookahead=la):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                gone = chosen.pop(victim.request_id, None)
                if gone is not None:
                    budget += gone.num_new_tokens + gone.num_lookahead
                    charge(victim, -(gone.num_new_tokens + gone.num_lookahead))
                if victim is seq:
                    return False
            return True

        # 1. decodes (with step shares: the least recently scheduled sequences of a limited request first)
        order = list(self.running)
        if shares is not None:
            order.sort(key=lambda s: self._last_step.get(s.request_id, -1))
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed_tokens != 1:
                continue
            if exclude_groups and seq.group in exclude_groups:
                continue
            if allowed(seq, 1) == 0:
                continue
            if grow(seq, 1):
                chosen[seq.request_id] = ScheduledSeq(seq, seq.num_computed_tokens, 1, True)
                budget -= 1
                charge(seq, 1)
        decode_ids = list(chosen)
        # speculative slots of the decodes come before prefill tokens (their pages are already reserved)
        for rid in decode_ids:
            if budget == 0:
                break
            row = chosen[rid]
            la = allowed(row.seq, min(self._lookahead(row.seq, row.kv_len), budget))
            if la:
                chosen[rid] = ScheduledSeq(row.seq, row.start, 1, True, la)
                budget -= la
                charge(row.seq, la)
        # 2. running sequences with several tokens to compute: the chunked prefill admitted last, or one
        #    rolled back (BlockManager.truncate). Pages for an older one may preempt decodes chosen above.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.request_id in chosen:
                continue
            if exclude_groups and seq.group in exclude_groups:
                continue
            remaining = seq.num_uncomputed_tokens
            n = allowed(seq, min(remaining, budget))
            if n == 0:
                continue
            if grow(seq, n):
                chosen[seq.request_id] = ScheduledSeq(seq, seq.num_computed_tokens, n, n == remaining)
                budget -= n
                charge(seq, n)
        # 3. waiting, FCFS, only when nothing had to be preempted. Pages that sequences chosen above (or
        #    admitted below) are about to compute: a waiting sequence whose next page is one of them waits
        #    for it to be cached rather than computing it a second time in parallel. Every owner of a
        #    pending page is in this step (phase 2 took every partial prefill before budget ran out), so
        #    the wait ends after the owner's prefill at the latest.
        pending: set[bytes] = set()
        if not preempted and self.waiting and budget > 0 and bm.enable_prefix_caching:
            for seq in self.running:
                if seq.request_id in chosen and seq.num_uncomputed_tokens > 1:
                    pending.update(bm.pending_page_keys(seq))
        def admit(seq: Sequence) -> bool:
            """Admit the waiting ``seq`` (not yet removed from the queue); False when it does not fit."""
            nonlocal budget
            hits = bm.find_cached_prefix(seq) if seq.use_cached_prefix else []
            if pending and seq.use_cached_prefix and bm.next_page_key(seq, len(hits)) in pending:
                return False
            remaining = seq.num_tokens - len(hits) * cfg.page_size
            if remaining > budget and not cfg.enable_chunked_prefill:
                return False
            n = allowed(seq, min(remaining, budget))
            if n < remaining and not cfg.enable_chunked_prefill:
                return False
            la = self._lookahead(seq, len(hits) * cfg.page_size + n)
            if not bm.allocate_slots(seq, n, cached_pages=hits, num_lookahead=la):
                return False
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)  # the oldest waiting is newer than every running sequence
            chosen[seq.request_id] = ScheduledSeq(seq, seq.num_computed_tokens, n, n == remaining)
            budget -= n
            charge(seq, n)
            pending.update(bm.pending_page_keys(seq))
            return True

        def held(seq: Sequence) -> bool:
            """Passed over this step: excluded, or its request's step share is spent (or, without chunked
            prefill, too small for its prompt: never a stop for the requests behind it)."""
            if exclude_groups and seq.group in exclude_groups:
                return True
            need = 1 if cfg.enable_chunked_prefill else seq.num_tokens
            return allowed(seq, need) < need

        def room() -> bool:
            return budget > 0 and len(self.running) < cfg.max_num_seqs

        if not preempted and self.waiting and room():
            running, fair, cap = self._group_counts()
            passed: list[Sequence] = []  # over their request's fair share (or excluded): passed over
            stopped = False
            while self.waiting and room():
                seq = self.waiting[0]
                if held(seq) or running.get(seq.client, 0) >= fair:
                    passed.append(self.waiting.popleft())
                    continue
                if not admit(seq):
                    stopped = True
                    break
                self.waiting.popleft()
                running[seq.client] = running.get(seq.client, 0) + 1
            # Everyone else was served: requests over their fair share may use the slots left, up to the cap.
            keep: list[Sequence] = []
            for seq in passed:
                if stopped or not room() or held(seq) or running.get(seq.client, 0) >= cap:
                    keep.append(seq)
                elif admit(seq):
                    running[seq.client] = running.get(seq.client, 0) + 1
                else:
                    stopped = True
                    keep.append(seq)
            self.waiting.extendleft(reversed(keep))  # back at the front, in their order

        self._step_no += 1
        if cfg.max_step_tokens_per_request is not None:
            for rid in chosen:
                self._last_step[rid] = self._step_no
        decode_set = set(decode_ids)
        decodes = [chosen[r] for r in decode_ids if r in chosen]
        prefills = [s for r, s in chosen.items() if r not in decode_set]
        return SchedulerOutput(
            scheduled=decodes + prefills, num_decode_seqs=len(decodes), preempted=preempted
        )

    def _group_counts(self) -> tuple[dict[str, int], int, int]:
        """``(running sequences per client, fair share, cap)``: the fair share is ``ceil(max_num_seqs /
        clients with sequences running or waiting)``, at most the per-request cap."""
        running: dict[str, int] = {}
        for seq in self.running:
            running[seq.client] = running.get(seq.client, 0) + 1
        groups = set(running)
        groups.update(seq.client for seq in self.waiting)
        cap = self.config.request_seq_cap
        return running, min(cap, -(-self.config.max_num_seqs // max(len(groups), 1))), cap

    # ---- results -----------------------------------------------------------------------------------
    def update(self, output: SchedulerOutput, sampled_token_ids: SequenceABC) -> list[SeqUpdate]:
        """Apply a step's results.

        Args:
          output: the :class:`SchedulerOutput` the step ran.
          sampled_token_ids: one entry per ``output.scheduled`` row, in order: the sampled token id (int or
            numpy integer), or a sequence of accepted token ids; ignored for rows with ``samples=False``.
            For a verify row (``num_lookahead > 0``) an entry of ``m`` tokens means the step computed the
            K/V of the row's token and of the ``m - 1`` accepted draft tokens (the last token is new):
            ``num_computed_tokens`` counts them, the rejected drafts' slots are dropped and pages past the
            sequence's known tokens are released (``BlockManager.truncate``).

        Advances ``num_computed_tokens``, appends sampled tokens, registers newly full pages in the prefix
        cache, checks stop conditions (stop token ids and EOS once more than ``min_tokens`` tokens were
        generated; ``max_tokens``; ``max_model_len``) and frees finished sequences' pages. Rows whose
        sequence was finished meanwhile (aborted) are skipped. Returns an update for each sequence that got
        tokens or finished, in row order.
        """
        if len(sampled_token_ids) < len(output.scheduled):
            raise ValueError(
                f"got {len(sampled_token_ids)} sampled entries for {len(output.scheduled)} scheduled rows"
            )
        bm = self.block_manager
        updates: list[SeqUpdate] = []
        any_finished = False
        for row, sampled in zip(output.scheduled, sampled_token_ids):
            seq = row.seq
            if seq.status is not SequenceStatus.RUNNING or seq.num_computed_tokens != row.start:
                continue  # finished (aborted / stop string) or preempted since it was scheduled
            seq.num_computed_tokens += row.num_new_tokens
            new: list[int] = []
            by_token = False
            if row.samples:
                tokens = _token_list(sampled)
                if row.num_lookahead:
                    if len(tokens) > row.num_lookahead + 1:
                        raise ValueError(f"{len(tokens)} tokens for a row with {row.num_lookahead} lookahead slots")
                    seq.num_computed_tokens += len(tokens) - 1
                for token in tokens:
                    seq.append_token(token)
                    new.append(token)
                    by_token = self._check_stop(seq)
                    if seq.is_finished:
                        break
                if row.num_lookahead and not seq.is_finished:
                    bm.truncate(seq, seq.num_tokens)
            bm.cache_full_pages(seq)
            if seq.is_finished:
                any_finished = True
                self._release(seq)
            if new or seq.is_finished:
                updates.append(SeqUpdate(seq, new, seq.is_finished, by_token))
        if any_finished:
            self.running = [s for s in self.running if not s.is_finished]
        return updates

    def _check_stop(self, seq: Sequence) -> bool:
        """Finish ``seq`` if its last token ends it; True when it stopped on a token (EOS / stop id)."""
        params = seq.sampling_params
        token = seq.last_token_id
        if seq.num_output_tokens > params.min_tokens:
            if token in self.eos_token_ids and not params.ignore_eos:
                seq.set_finished("stop", None)
                return True
            if token in params.stop_token_ids:
                seq.set_finished("stop", token)
                return True
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.config.max_model_len:
            seq.set_finished("length")
        return False
