"""EAGLE proposals in the engine: the head's catch-up over the last target step, then ``k`` draft tokens.

Per sequence the proposer tracks ``valid``: the head's entries ``0 .. valid - 1`` were computed from the
target's own hidden states (entry ``t`` = ``(x_{t+1}, h_t)``, see :mod:`jaxinfer.speculative.eagle`). The
target's hidden states are those of the last target step (plain or verify) only, so the head runs one step
behind the target:

1. Step 1 (catch-up) feeds, for each scheduled row with entries to catch up, the entries ``valid .. c - 1``
   (``c``: the tokens the target has computed, = the row's start) with ``h_t`` from the last target step:
   the previous prefill chunk (the mirror of the target's chunks), the last decode token, or the accepted
   positions of the last verify step. The last entry ``c - 1`` predicts ``x_{c+1}``: the first draft of a
   decode row.
2. Steps ``2 .. k`` feed ``(d_{j-1}, f)`` with the head's own output feature ``f`` of the row's previous
   entry (entries at ``c .. c + k - 2``, slots the scheduler granted as lookahead); they are overwritten by
   the next catch-up (rollback needs nothing else).

Entries whose hidden states were never seen (a sequence not scheduled in the step after one of its
chunks, or the prefix-cache pages another sequence filled, whose last entry saw that sequence's next
token) keep whatever the cache holds: proposals get worse there, outputs never change (verification is
exact). A row with no entry to catch up proposes nothing this step.
"""

from __future__ import annotations

import numpy as np

from jaxinfer.device_batch import BatchBuilder, RowInfo
from jaxinfer.runner import ModelRunner
from jaxinfer.scheduler import ScheduledSeq
from jaxinfer.speculative.draft import probs_rows


class EagleProposer:
    """Runs the runner's EAGLE steps for the speculative decoder.

    Args:
      runner: the target runner with an EAGLE head attached.
      batches: the engine's batch builder.
      k: ``K`` (rows of the draft-probability buffer per slot).
    """

    def __init__(self, runner: ModelRunner, batches: BatchBuilder, k: int):
        self.runner = runner
        self.batches = batches
        self.k = k
        self._valid: dict[str, int] = {}
        self._last: dict[str, tuple[int, int, int]] = {}  # seq -> (token row, start, count) in the last step

    def forget(self, seq_id: str) -> None:
        self._valid.pop(seq_id, None)
        self._last.pop(seq_id, None)

    def target_step(self, rows: list[ScheduledSeq], cu_q_lens: np.ndarray) -> None:
        """A target step over ``rows`` (token rows from ``cu_q_lens``) was launched: its hidden states are
        the next catch-up's."""
        self._last = {r.seq.request_id: (int(cu_q_lens[i]), r.start, int(cu_q_lens[i + 1] - cu_q_lens[i]))
                      for i, r in enumerate(rows)}

    def _q_rows(self, infos, js, s: int) -> np.ndarray:
        return probs_rows([(info.slot, j) for info, j in zip(infos, js)], self.k, self.runner.num_draft_rows, s)

    def propose(self, rows: list[ScheduledSeq], infos: list[RowInfo], ks: list[int]) -> list[list[int]]:
        """Catch up and draft ``ks[i]`` tokens for row ``i`` (``0``: catch-up only); returns the drafts (a row
        whose last entry cannot be computed this step gets none)."""
        drafts: list[list[int]] = [[] for _ in rows]
        sel, rows1, given, src = [], [], [], []
        for i, r in enumerate(rows):
            seq, c = r.seq, r.start
            sid = seq.request_id
            valid = self._valid.setdefault(sid, c)  # new, resumed or prefix-cache hit: trust the cache
            last = self._last.get(sid)
            lo, hi = valid, valid
            if last is not None and seq.num_lookahead + (c < seq.num_prompt_tokens) > 0:
                off, p0, cnt = last
                lo, hi = max(valid, p0), min(c, p0 + cnt)
            if hi < c or lo >= hi:  # nothing to catch up, or entries lost: no drafts this step
                self._valid[sid] = max(valid, c) if hi < c else valid
                ks[i] = 0
                continue
            sel.append(i)
            rows1.append(ScheduledSeq(seq, lo, hi - lo, ks[i] > 0))
            given.append(seq.all_token_ids[lo + 1 : hi + 1])
            src.append(np.arange(off + lo - p0, off + hi - p0, dtype=np.int32))
        if not sel:
            return drafts
        infos1 = [infos[i] for i in sel]
        b1 = self.batches.draft(rows1, infos1, [info.step for info in infos1], given)
        source = np.zeros(b1.tokens.shape[0], np.int32)
        cat = np.concatenate(src)
        source[: len(cat)] = cat
        tokens = self.runner.run_eagle(b1, source, self._q_rows(infos1, [0 if ks[i] else None for i in sel],
                                                                 b1.logits_indices.shape[0]), True)
        feat_row = {}  # row i -> its last token row in the latest EAGLE batch
        for n, (i, r1) in enumerate(zip(sel, rows1)):
            self._valid[r1.seq.request_id] = r1.kv_len
            feat_row[i] = int(b1.logits_indices[n])
            if ks[i]:
                drafts[i].append(int(tokens[n]))
        for j in range(1, max(ks, default=0)):
            idx = [i for i in range(len(rows)) if ks[i] > j and drafts[i]]
            if not idx:
                break
            rows_j = [ScheduledSeq(rows[i].seq, rows[i].start + j - 1, 1, True) for i in idx]
            infos_j = [infos[i] for i in idx]
            b = self.batches.draft(rows_j, infos_j, [info.step + j for info in infos_j],
                                   [[drafts[i][-1]] for i in idx])
            source = np.zeros(b.tokens.shape[0], np.int32)
            source[: len(idx)] = [feat_row[i] for i in idx]
            tokens = self.runner.run_eagle(b, source, self._q_rows(infos_j, [j] * len(idx),
                                                                   b.logits_indices.shape[0]), False)
            for n, i in enumerate(idx):
                drafts[i].append(int(tokens[n]))
                feat_row[i] = int(b.logits_indices[n])
        return drafts
