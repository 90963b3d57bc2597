"""Per-request sampling settings (pure Python, no jax: the scheduler and servers import it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from jaxinfer.errors import InvalidRequestError

MAX_LOGPROBS = 20


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. Validated on construction; bad values raise ``InvalidRequestError``.

    Attributes:
      n: number of independent samples for the prompt.
      max_tokens: maximum number of generated tokens per sample.
      temperature: 0 means greedy (argmax); otherwise logits are divided by it.
      top_p: nucleus mass in (0, 1]; 1 disables.
      top_k: keep the k most likely tokens; 0 or -1 disables.
      min_p: drop tokens whose probability is below ``min_p * p_max``; 0 disables.
      repetition_penalty: > 0; 1 disables (CTRL-style, over prompt and output tokens).
      presence_penalty / frequency_penalty: in [-2, 2] (OpenAI-style, over output tokens).
      seed: per-request seed; sampling is reproducible regardless of batch composition.
      stop: strings that end generation (not included in the output text unless
        ``include_stop_str_in_output``).
      stop_token_ids: token ids that end generation (in addition to EOS unless ``ignore_eos``).
      ignore_eos: keep generating after EOS until ``max_tokens``.
      min_tokens: EOS / stop token ids are suppressed until this many tokens were generated.
      logprobs: number of top log-probabilities to return per token (0 = only the sampled token's);
        ``None`` returns none.
      skip_special_tokens: drop special tokens from the decoded text.
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        # Normalise containers so the object stays hashable and immutable.
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stop = tuple(stop)
        else:
            raise InvalidRequestError(f"stop must be a string or a list of strings, got {stop!r}", "stop")
        if any(s == "" for s in stop):
            raise InvalidRequestError("stop strings must be non-empty", "stop")
        object.__setattr__(self, "stop", stop)
        ids = self.stop_token_ids
        if ids is None:
            ids = ()
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise InvalidRequestError(
                f"stop_token_ids must be a list of non-negative integers, got {ids!r}", "stop_token_ids"
            )
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        self._validate()

    def _validate(self) -> None:
        def bad(param: str, why: str):
            raise InvalidRequestError(f"{param} {why}, got {getattr(self, param)!r}", param)

        if not _is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "must be an integer >= 0 (0 or -1 disables)")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be a finite number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                bad(name, "must be in [-2, 2]")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "must be an integer or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be a boolean")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0 or self.top_k == 1

    @property
    def effective_top_k(self) -> int:
        """top_k with the disabled values (0, -1) mapped to 0."""
        return max(self.top_k, 0)
