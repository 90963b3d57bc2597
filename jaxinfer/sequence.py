"""One request's state on the host: token ids, status, KV bookkeeping (pure Python, no jax).

A :class:`Sequence` is created by the engine for every sample of a request (``n > 1`` becomes ``n``
sequences sharing the prompt; prefix caching shares their prompt pages). The scheduler moves it through
its states; the block manager fills in its block table.

State machine::

    WAITING --schedule--> RUNNING --update / finish--> FINISHED_{STOPPED, LENGTH, ABORTED}
       ^                     |
       +------preempt--------+      (pages freed; prompt + outputs are recomputed later)
    WAITING --abort--> FINISHED_ABORTED
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence as SequenceABC

from jaxinfer.errors import InvalidRequestError
from jaxinfer.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life. A preempted sequence goes back to ``WAITING``."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH, SequenceStatus.FINISHED_ABORTED}
)

#: finish reason (OpenAI ``finish_reason``) -> final status.
FINISH_STATUS = {
    "stop": SequenceStatus.FINISHED_STOPPED,
    "length": SequenceStatus.FINISHED_LENGTH,
    "abort": SequenceStatus.FINISHED_ABORTED,
}


def _is_token_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class Sequence:
    """A request (or one of its ``n`` samples) on the host.

    Attributes:
      request_id: unique id (the engine gives each of ``n`` samples its own id).
      prompt_token_ids: tuple of prompt token ids (non-empty).
      output_token_ids: list of generated token ids (grows by ``append_token``; kept across preemption).
      sampling_params: the request's :class:`SamplingParams`.
      arrival_time: wall-clock time (``time.time()``) the request arrived.
      status: a :class:`SequenceStatus`.
      num_computed_tokens: leading tokens of ``all_token_ids`` whose K/V is in the cache.
      num_cached_tokens: tokens served from the prefix cache at the latest admission.
      block_table: KV page ids, page ``i`` holds token positions ``[i * page_size, (i + 1) * page_size)``.
      finish_reason: ``None`` or ``"stop" | "length" | "abort"``.
      stop_reason: ``None`` (EOS, length, abort), the stop token id (int) or the stop string (str).
      num_preemptions: how many times the sequence was preempted.
      num_lookahead: extra KV slots reserved beyond the scheduled tokens (speculative decoding); 0 by default.
      cache_salt: optional string mixed into the prefix-cache hashes: only sequences with the same salt share
        cached pages (e.g. per tenant or per adapter).
      use_cached_prefix: False makes admission ignore prefix-cache hits (its pages are still registered
        for others). The engine sets it for requests with penalties, whose on-device token counts are
        built from the tokens each step feeds through the model.
      page_hashes / num_registered_pages: prefix-cache bookkeeping owned by the block manager.
      group: the engine request the sequence belongs to (the engine's request id for each of its ``n``
        samples; default: ``request_id``); ``Engine.step(exclude=...)`` leaves groups out.
      client: the client request (one API call: every prompt of a batch, every sample) the sequence belongs
        to; default: ``group``. The scheduler shares slots and steps fairly between clients.
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "output_token_ids",
        "_all_token_ids",
        "sampling_params",
        "arrival_time",
        "status",
        "num_computed_tokens",
        "num_cached_tokens",
        "block_table",
        "finish_reason",
        "stop_reason",
        "num_preemptions",
        "num_lookahead",
        "cache_salt",
        "use_cached_prefix",
        "page_hashes",
        "num_registered_pages",
        "order",
        "group",
        "client",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: SequenceABC[int],
        sampling_params: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
        num_lookahead: int = 0,
        cache_salt: str | None = None,
        use_cached_prefix: bool = True,
        group: str | None = None,
        client: str | None = None,
    ):
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(
                f"request_id must be a non-empty string, got {request_id!r}", "request_id"
            )
        if isinstance(prompt_token_ids, (str, bytes)) or not isinstance(prompt_token_ids, SequenceABC):
            raise InvalidRequestError("prompt_token_ids must be a list of token ids", "prompt")
        prompt = tuple(prompt_token_ids)
        if not prompt:
            raise InvalidRequestError("the prompt is empty: at least one token is needed", "prompt")
        if not all(_is_token_id(t) for t in prompt):
            raise InvalidRequestError("prompt token ids must be non-negative integers", "prompt")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, SamplingParams):
            raise InvalidRequestError("sampling_params must be a SamplingParams", "sampling_params")
        if not isinstance(num_lookahead, int) or num_lookahead < 0:
            raise InvalidRequestError(f"num_lookahead must be an integer >= 0, got {num_lookahead!r}")
        self.request_id = request_id
        self.prompt_token_ids = prompt
        self.output_token_ids: list[int] = []
        self._all_token_ids: list[int] = list(prompt)
        self.sampling_params = sampling_params
        self.arrival_time = time.time() if arrival_time is None else float(arrival_time)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.num_lookahead = num_lookahead
        self.cache_salt = cache_salt
        self.use_cached_prefix = bool(use_cached_prefix)
        self.page_hashes: list[bytes] = []
        self.num_registered_pages = 0
        self.order = -1  # FCFS rank, set by the scheduler on ``add``
        self.group = request_id if group is None else group
        self.client = self.group if client is None else client

    # ---- token views -------------------------------------------------------------------------------
    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + output token ids. The list is the sequence's own: read it, never mutate it."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self._all_token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Known tokens whose K/V is not in the cache yet (1 for a sequence in decode)."""
        return len(self._all_token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        """Append one generated token (its K/V is computed by the next step that schedules it)."""
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def truncate_tokens(self, num_tokens: int) -> None:
        """Drop generated tokens after the first ``num_tokens`` (speculative-decoding rollback).

        Call ``BlockManager.truncate(seq, num_tokens)`` first: it shrinks the KV bookkeeping and the prefix
        hashes to at most ``num_tokens`` tokens, so nothing refers to the dropped tokens afterwards.
        """
        if not self.num_prompt_tokens <= num_tokens <= self.num_tokens:
            raise ValueError(f"num_tokens must be in [{self.num_prompt_tokens}, {self.num_tokens}]")
        if self.num_computed_tokens > num_tokens:
            raise ValueError("truncate the KV first (BlockManager.truncate), then the tokens")
        del self.output_token_ids[num_tokens - self.num_prompt_tokens :]
        del self._all_token_ids[num_tokens:]

    def set_finished(self, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark finished with ``reason`` in ``{"stop", "length", "abort"}`` (pages are the caller's job)."""
        if reason not in FINISH_STATUS:
            raise ValueError(f"finish reason must be one of {sorted(FINISH_STATUS)}, got {reason!r}")
        self.status = FINISH_STATUS[reason]
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
            f"output={self.num_output_tokens}, computed={self.num_computed_tokens}, "
            f"pages={len(self.block_table)})"
        )
