"""Pack a :class:`~jaxinfer.scheduler.SchedulerOutput` into fixed-shape numpy arrays (numpy only, no jax).

The jitted step sees one ragged batch: the scheduled tokens of all sequences flattened, decode rows
first. Shapes are padded to a bucket ``(T, S)`` from a small fixed set (:meth:`StepBuckets.shapes`) so the
runner compiles each bucket once at warm-up and never again. ``P = pages_per_seq = ceil(max_model_len /
page_size)`` is fixed.

Semantics expected by the attention op: query row ``i`` (0-based) of sequence ``s`` sits at position
``kv_lens[s] - q_len(s) + i`` with ``q_len(s) = cu_q_lens[s + 1] - cu_q_lens[s]``; the new tokens' K/V are
written to ``slot_mapping`` before attention, and sequence ``s`` attends causally to its first
``kv_lens[s]`` slots, read through ``page_indices[s]`` (slot ``j`` lives in page
``page_indices[s, j // page_size]`` at offset ``j % page_size``).
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass

import numpy as np

from jaxinfer.scheduler import ScheduledSeq, SchedulerOutput
from jaxinfer.sequence import Sequence


def _bucket_list(low: int, high: int) -> tuple[int, ...]:
    """Powers of two from ``low`` (rounded up to one) below ``high``, then ``high`` itself."""
    out = []
    b = 1
    while b < low:
        b *= 2
    while b < high:
        out.append(b)
        b *= 2
    out.append(high)
    return tuple(out)


def _pick(buckets: tuple[int, ...], n: int, what: str) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} {what} exceed the largest bucket {buckets[-1]}")


@dataclass(frozen=True)
class StepBuckets:
    """The fixed set of step shapes.

    Attributes:
      token_buckets: allowed ``T`` (padded token count), ascending; the last is ``max_num_batched_tokens``.
      seq_buckets: allowed ``S`` (padded sequence count), ascending; the last is ``max_num_seqs``.
      pages_per_seq: ``P``, columns of ``page_indices``.
      page_size: tokens per KV page.
      coupled: ``S`` follows ``T`` (``S = seq_bucket(min(T, max_num_seqs))``): one shape per token bucket,
        so warm-up compiles ``len(token_buckets)`` programs instead of every ``(T, S)`` pair, at the cost of
        a few padded logit rows in prefill-heavy steps.
    """

    token_buckets: tuple[int, ...]
    seq_buckets: tuple[int, ...]
    pages_per_seq: int
    page_size: int
    coupled: bool = False

    @classmethod
    def from_limits(
        cls,
        *,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        page_size: int,
        min_token_bucket: int = 16,
        min_seq_bucket: int = 1,
        coupled: bool = False,
    ) -> StepBuckets:
        """Powers of two from ``min_token_bucket`` / ``min_seq_bucket`` up to the scheduler's limits."""
        return cls(
            token_buckets=_bucket_list(min(min_token_bucket, max_num_batched_tokens), max_num_batched_tokens),
            seq_buckets=_bucket_list(min(min_seq_bucket, max_num_seqs), max_num_seqs),
            pages_per_seq=-(-max_model_len // page_size),
            page_size=page_size,
            coupled=coupled,
        )

    @classmethod
    def from_scheduler_config(cls, config, **kwargs) -> StepBuckets:
        """Buckets for a :class:`~jaxinfer.scheduler.SchedulerConfig` (``kwargs`` as in ``from_limits``)."""
        return cls.from_limits(
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len,
            page_size=config.page_size,
            **kwargs,
        )

    def token_bucket(self, num_tokens: int) -> int:
        return _pick(self.token_buckets, num_tokens, "tokens")

    def seq_bucket(self, num_seqs: int) -> int:
        return _pick(self.seq_buckets, num_seqs, "sequences")

    def bucket(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        """The ``(T, S)`` a step of ``num_tokens`` tokens over ``num_seqs`` sequences is padded to."""
        t = self.token_bucket(num_tokens)
        if self.coupled:
            return t, self.seq_bucket(max(num_seqs, min(t, self.seq_buckets[-1])))
        return t, self.seq_bucket(num_seqs)

    def shapes(self) -> list[tuple[int, int]]:
        """Every ``(T, S)`` :func:`pack_step_inputs` can return (a step has ``1 <= num_seqs <= num_tokens``):
        compile each one at warm-up."""
        if self.coupled:
            return [self.bucket(t, 1) for t in self.token_buckets]
        out = []
        for t in self.token_buckets:
            top = self.seq_bucket(min(t, self.seq_buckets[-1]))
            out.extend((t, s) for s in self.seq_buckets if s <= top)
        return out


@dataclass
class StepInputs:
    """One step's inputs, padded to the bucket ``(T, S)``; ``P = pages_per_seq``. All arrays int32 unless
    noted.

    Attributes:
      tokens: ``[T]`` token ids; padding 0.
      positions: ``[T]`` position of each token; padding 0.
      slot_mapping: ``[T]`` KV slot to write: ``page_id * page_size + position % page_size``; padding -1.
      cu_q_lens: ``[S + 1]`` cumulative query lengths, ``cu_q_lens[0] = 0``; padding sequences add 0.
      kv_lens: ``[S]`` K/V length of each sequence including this step's tokens; padding 0.
      page_indices: ``[S, P]`` each sequence's block table; unused entries 0.
      num_seqs: ``[1]`` real sequences in the batch.
      logits_indices: ``[S]`` row (into ``tokens``) of each sequence's last scheduled token; padding 0.
      sample_mask: ``bool[S]`` True where the sequence samples a token this step (its chunk ends its known
        tokens); False for partial prefill chunks and padding.
      rows: ``ScheduledSeq`` per real sequence row (length ``num_seqs[0]``), same order as the arrays.
      num_tokens: real (unpadded) token count.
    """

    tokens: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    cu_q_lens: np.ndarray
    kv_lens: np.ndarray
    page_indices: np.ndarray
    num_seqs: np.ndarray
    logits_indices: np.ndarray
    sample_mask: np.ndarray
    rows: list[ScheduledSeq]
    num_tokens: int

    @property
    def seqs(self) -> list[Sequence]:
        return [r.seq for r in self.rows]

    @property
    def bucket(self) -> tuple[int, int]:
        """``(T, S)``."""
        return int(self.tokens.shape[0]), int(self.kv_lens.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays the jitted step takes, by name."""
        names = (
            "tokens",
            "positions",
            "slot_mapping",
            "cu_q_lens",
            "kv_lens",
            "page_indices",
            "num_seqs",
            "logits_indices",
            "sample_mask",
        )
        return {n: getattr(self, n) for n in names}


def pack_step_inputs(output: SchedulerOutput, buckets: StepBuckets) -> StepInputs:
    """Build the padded step arrays for ``output`` (call before ``Scheduler.update``, which moves the
    sequences on). Raises ``ValueError`` for an empty output or one beyond the largest bucket."""
    return pack_rows(output.scheduled, buckets)


def pack_rows(rows: list[ScheduledSeq], buckets: StepBuckets,
              token_ids: list[SequenceABC[int] | None] | None = None) -> StepInputs:
    """Pack arbitrary rows: row ``i`` feeds ``rows[i].num_new_tokens`` tokens at positions
    ``rows[i].start ...``, taken from ``seq.all_token_ids`` or, when ``token_ids[i]`` is given, from it
    (tokens the sequence does not hold yet, e.g. speculative drafts; their slots must already be in the
    block table)."""
    if not rows:
        raise ValueError("nothing scheduled: skip the step instead of packing it")
    num_tokens = sum(r.num_new_tokens for r in rows)
    T, S = buckets.bucket(num_tokens, len(rows))
    P = buckets.pages_per_seq
    ps = buckets.page_size
    shift = ps.bit_length() - 1

    tokens = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slot_mapping = np.full(T, -1, np.int32)
    cu_q_lens = np.zeros(S + 1, np.int32)
    kv_lens = np.zeros(S, np.int32)
    page_indices = np.zeros((S, P), np.int32)
    logits_indices = np.zeros(S, np.int32)
    sample_mask = np.zeros(S, np.bool_)

    off = 0
    for i, r in enumerate(rows):
        seq, start, q = r.seq, r.start, r.num_new_tokens
        given = None if token_ids is None else token_ids[i]
        table = seq.block_table
        kv_len = start + q
        if q < 1 or (given is None and kv_len > seq.num_tokens) or (given is not None and len(given) != q):
            raise ValueError(f"row {i}: bad chunk start={start} q_len={q} for {seq!r}")
        if len(table) > P or len(table) * ps < kv_len:
            raise ValueError(
                f"row {i}: block table of {len(table)} pages cannot hold {kv_len} tokens (P={P})"
            )
        if q == 1:  # decode: plain ints are faster than numpy for one token
            tokens[off] = seq.all_token_ids[start] if given is None else given[0]
            positions[off] = start
            slot_mapping[off] = (table[start >> shift] << shift) | (start & (ps - 1))
        else:
            pos = np.arange(start, kv_len, dtype=np.int32)
            tokens[off : off + q] = seq.all_token_ids[start:kv_len] if given is None else given
            positions[off : off + q] = pos
            pages = np.asarray(table, np.int32)[pos >> shift]
            slot_mapping[off : off + q] = (pages << shift) | (pos & (ps - 1))
        page_indices[i, : len(table)] = table
        off += q
        cu_q_lens[i + 1] = off
        kv_lens[i] = kv_len
        logits_indices[i] = off - 1
        sample_mask[i] = r.samples
    cu_q_lens[len(rows) + 1 :] = off
    return StepInputs(
        tokens=tokens,
        positions=positions,
        slot_mapping=slot_mapping,
        cu_q_lens=cu_q_lens,
        kv_lens=kv_lens,
        page_indices=page_indices,
        num_seqs=np.array([len(rows)], np.int32),
        logits_indices=logits_indices,
        sample_mask=sample_mask,
        rows=list(rows),
        num_tokens=num_tokens,
    )
