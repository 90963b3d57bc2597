"""Result types returned by ``LLM.generate`` / ``LLM.chat`` / streaming (vLLM-compatible field names)."""

from __future__ import annotations

from dataclasses import dataclass, field


def acceptance_length(num_accepted: int, num_steps: int) -> float | None:
    """Tokens per speculating sequence-step (accepted drafts + 1); ``None`` before any such step."""
    return 1 + num_accepted / num_steps if num_steps else None


@dataclass
class CompletionOutput:
    """One generated sample.

    Attributes:
      index: sample index within the request (``0 .. n-1``).
      text: generated text (stop string excluded unless requested).
      token_ids: generated token ids.
      finish_reason: "stop" (EOS, stop token or stop string), "length" (max_tokens) or "abort";
        ``None`` while running.
      stop_reason: the stop string or stop token id that ended it (``None`` for EOS / length).
      logprobs: log-probability of each generated token (when requested).
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[float] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timings in seconds (``time.perf_counter`` clock) and speculative-decoding counts (over the request's
    samples): ``num_draft_tokens`` proposed and verified, ``num_accepted_tokens`` of them accepted,
    ``num_spec_steps`` sequence-steps that verified drafts."""

    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_generated_tokens: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_spec_steps: int = 0

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens per speculating step (accepted drafts + 1); ``None`` when the request never speculated."""
        return acceptance_length(self.num_accepted_tokens, self.num_spec_steps)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first divided by the time after the first token."""
        if self.finish_time is None or self.first_token_time is None or self.num_generated_tokens < 2:
            return None
        dt = self.finish_time - self.first_token_time
        return (self.num_generated_tokens - 1) / dt if dt > 0 else None


@dataclass
class RequestOutput:
    """A request's state: its prompt and its ``n`` samples.

    In streaming, ``outputs[i].text`` / ``token_ids`` hold only the delta since the previous yield.
    ``prompt_logprobs`` (when ``SamplingParams.prompt_logprobs`` is set): one entry per prompt token,
    ``None`` for the first, then ``{token: logprob}`` with the prompt token first and its top alternatives;
    streamed once, with the first delta after the whole prompt was scored.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(0.0))
    prompt_logprobs: list[dict[int, float] | None] | None = None
