"""The scheduler's data: its configuration, what one step schedules and what it changed (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxinfer.block_manager import BlockManagerStats
from jaxinfer.sequence import Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    """Scheduler budgets. ``num_pages`` * ``page_size`` token slots make up the KV cache."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int = 2048
    num_pages: int = 1024
    page_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_running_seqs_per_request: int | None = None  # None: max(1, max_num_seqs // 2)
    # while another request has work: most tokens (decode rows + prefill tokens) a request with several
    # sequences puts in one step; None: no limit
    max_step_tokens_per_request: int | None = None

    @property
    def request_seq_cap(self) -> int:
        """The most running sequences of one request (group)."""
        cap = self.max_running_seqs_per_request
        return max(1, self.max_num_seqs // 2) if cap is None else cap

    def __post_init__(self):
        cap = self.max_running_seqs_per_request
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise ValueError(f"max_running_seqs_per_request must be an integer >= 1 or None, got {cap!r}")
        step = self.max_step_tokens_per_request
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 1):
            raise ValueError(f"max_step_tokens_per_request must be an integer >= 1 or None, got {step!r}")
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "num_pages", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                "max_num_batched_tokens must be >= max_num_seqs so every running decode fits in a step "
                f"({self.max_num_batched_tokens} < {self.max_num_seqs})"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill max_num_batched_tokens must be >= max_model_len "
                f"({self.max_num_batched_tokens} < {self.max_model_len})"
            )


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step.

    Attributes:
      seq: the sequence.
      start: ``seq.num_computed_tokens`` when scheduled: the position of the first scheduled token.
      num_new_tokens: query tokens this step (``q_len``): ``seq.all_token_ids[start : start + q_len]``.
      samples: True when the chunk reaches the end of the known tokens, so the step samples a token for
        it (False for a prefill chunk that does not complete the prompt).
      num_lookahead: speculative slots granted to a decode row this step (KV pages reserved and the token
        budget charged): the step may verify up to this many draft tokens after the row's token.
    """

    seq: Sequence
    start: int
    num_new_tokens: int
    samples: bool
    num_lookahead: int = 0

    @property
    def kv_len(self) -> int:
        """K/V length after this step (cached + new tokens)."""
        return self.start + self.num_new_tokens


@dataclass
class SchedulerOutput:
    """What one step runs: ``scheduled`` has the decode rows first (``num_decode_seqs`` of them, one token
    each), then the prefill rows (running chunked prefills, then newly admitted sequences)."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    num_decode_seqs: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class SeqUpdate:
    """What :meth:`Scheduler.update` did to one sequence.

    Attributes:
      seq: the sequence.
      new_token_ids: tokens appended this step (the stop token included, if one stopped it).
      finished: the sequence finished this step (its pages are already freed).
      stopped_by_token: finished on EOS or a stop token id; the detokenizer must not show that token.
    """

    seq: Sequence
    new_token_ids: list[int]
    finished: bool
    stopped_by_token: bool = False


@dataclass(frozen=True)
class SchedulerStats:
    """Queue and cache figures for metrics."""

    num_waiting: int
    num_running: int
    num_preemptions: int  # since construction
    block_manager: BlockManagerStats
