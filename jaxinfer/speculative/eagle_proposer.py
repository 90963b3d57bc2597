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
   the next catch-up (rollback needs nothing else). Both stages run in one device call
   (:meth:`jaxinfer.speculative.eagle.EagleHead.draft`): the host builds every step's batch up front and
   reads the drafts back once. With a ``threshold`` a row stops drafting once the product of its drafts'
   probabilities falls under it (EAGLE-2's confidence, for a chain), so its verify is shorter.

Entries whose hidden states were never seen (a sequence not scheduled in the step after one of its
chunks, or the prefix-cache pages another sequence filled, whose last entry saw that sequence's next
token) keep whatever the cache holds: proposals get worse there, outputs never change (verification is
exact). A row with no entry to catch up proposes nothing this step.
"""

from __future__ import annotations

import jax
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
      threshold: early stop: a row's drafts after the first are proposed while the product of their
        draft probabilities is at least this (0: always ``k`` drafts).
    """

    def __init__(self, runner: ModelRunner, batches: BatchBuilder, k: int, threshold: float = 0.0):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"the EAGLE draft threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)
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
        s1 = b1.logits_indices.shape[0]
        k_sel = [ks[i] for i in sel]
        chain, chain_q, active = self._chain([rows[i] for i in sel], infos1, k_sel, s1)
        out, counts = self.runner.run_eagle(b1, source, self._q_rows(infos1, [0 if k else None for k in k_sel], s1),
                                            chain, chain_q, active, max(k_sel) - 1, self.threshold)
        for n, (i, r1) in enumerate(zip(sel, rows1)):
            self._valid[r1.seq.request_id] = r1.kv_len
            if ks[i]:
                drafts[i] = [int(t) for t in out[n, : min(ks[i], int(counts[n]))]]
        return drafts

    def _chain(self, rows: list[ScheduledSeq], infos: list[RowInfo], ks: list[int], s1: int):
        """The ``K - 1`` chain steps after a catch-up of ``s1`` rows (``rows`` first, then copies of the last
        row as padding, so the bucket depends on ``s1`` only): ``(StepBatch stacked [K - 1, ...],
        q rows i32[K - 1, S2], active bool[K - 1, s1])``. Chain step ``j`` (1-based) feeds row ``n`` at
        position ``start + j - 1`` when it drafts there (``ks[n] > j + 1``); other rows feed the position before their
        start (already computed) with no slot, so they write nothing."""
        steps, q_rows, active = [], [], np.zeros((max(self.k - 1, 0), s1), bool)
        pad = rows + [rows[-1]] * (s1 - len(rows))
        pad_infos = infos + [infos[-1]] * (s1 - len(rows))
        for j in range(1, self.k):
            act = [n < len(rows) and ks[n] > j for n in range(s1)]
            active[j - 1] = act
            rows_j = [ScheduledSeq(r.seq, r.start + j - 1 if a else r.start - 1, 1, True) for r, a in zip(pad, act)]
            b = self.batches.draft(rows_j, pad_infos, [info.step + j for info in pad_infos], [[0]] * s1)
            slots = np.array(b.md.slot_mapping)
            slots[: s1][~np.asarray(act)] = -1
            steps.append(b.replace(md=b.md.replace(slot_mapping=slots)))
            q_rows.append(self._q_rows(pad_infos, [j if a else None for a in act], b.logits_indices.shape[0]))
        if not steps:
            chain = self.runner.padding_chain(s1)
            return chain, np.zeros((0, chain.logits_indices.shape[1]), np.int32), active
        return jax.tree.map(lambda *xs: np.stack(xs), *steps), np.stack(q_rows), active
