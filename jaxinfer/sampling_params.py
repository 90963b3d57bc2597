"""Per-request sampling settings (pure Python, no jax: the scheduler and servers import it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from jaxinfer.errors import InvalidRequestError
from jaxinfer.structured_output import StructuredOutputsParams

MAX_LOGPROBS = 20

# What the engine can represent. Per-row settings travel to the device as int32 / float32 arrays, so every
# numeric field is checked against these bounds here, once, for every front end (LLM, HTTP, gRPC).
INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # smallest normal float32
MAX_N = 4096  # samples per request (each is a Sequence; front ends set tighter limits)
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 128  # biased tokens per request: a fixed-width per-row array on the device
LOGIT_BIAS_RANGE = 100.0  # |bias| <= 100, as OpenAI
SEED_RANGE = (-(2**63), 2**64 - 1)  # int64 or uint64 bit patterns


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
      prompt_logprobs: for every prompt token after the first, its log-probability given its prefix plus
        this many top alternatives (at most ``MAX_LOGPROBS``; 0 = the prompt token's only); ``None``: none.
        The sample that scores the prompt ignores prefix-cache hits (its whole prompt is computed).
      skip_special_tokens: drop special tokens from the decoded text.
      logit_bias: ``{token_id: bias}`` (or ``(token_id, bias)`` pairs), added to the logits before sampling;
        at most ``MAX_LOGIT_BIAS`` tokens, biases in [-100, 100]. Stored as a sorted tuple of pairs.
      structured_outputs: constrain the output to a JSON schema / JSON object / regex / choice / grammar
        (:class:`~jaxinfer.structured_output.StructuredOutputsParams`, or a dict of its fields); such a
        request does not speculate.

    Numeric ranges are what the engine's int32 / float32 arrays hold: integers up to ``INT32_MAX``
    (``max_tokens``, ``top_k``, ``min_tokens``, ``stop_token_ids``, ``logit_bias`` keys), ``n`` up to
    ``MAX_N``, seeds in the int64 / uint64 range, floats finite in float32. (``min_tokens > max_tokens`` is
    allowed here, generation ends at ``max_tokens``; the servers refuse it as OpenAI-compatible servers do.)
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
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    structured_outputs: StructuredOutputsParams | None = None

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
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and 0 <= i <= INT32_MAX for i in ids):
            raise InvalidRequestError(
                f"stop_token_ids must be a list of integers in [0, {INT32_MAX}], got {_short(ids)}", "stop_token_ids"
            )
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids", "stop_token_ids")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        object.__setattr__(self, "logit_bias", _normalize_logit_bias(self.logit_bias))
        object.__setattr__(self, "structured_outputs", StructuredOutputsParams.coerce(self.structured_outputs))
        self._validate()

    def _validate(self) -> None:
        def bad(param: str, why: str):
            raise InvalidRequestError(f"{param} {why}, got {getattr(self, param)!r}", param)

        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            bad("n", f"must be an integer in [1, {MAX_N}]")
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT32_MAX:
            bad("max_tokens", f"must be an integer in [1, {INT32_MAX}]")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= FLOAT32_MAX:
            bad("temperature", "must be a finite (float32) number >= 0")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT32_MAX:
            bad("top_k", f"must be an integer in [-1, {INT32_MAX}] (0 or -1 disables)")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not _is_number(self.repetition_penalty) or not FLOAT32_TINY <= self.repetition_penalty <= FLOAT32_MAX:
            bad("repetition_penalty", "must be a finite (float32) number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                bad(name, "must be in [-2, 2]")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            bad("seed", f"must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] or None")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= INT32_MAX:
            bad("min_tokens", f"must be an integer in [0, {INT32_MAX}]")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            bad("prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be a boolean")

    @property
    def logit_bias_dict(self) -> dict[int, float]:
        return dict(self.logit_bias)

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0 or self.top_k == 1

    @property
    def effective_top_k(self) -> int:
        """top_k with the disabled values (0, -1) mapped to 0."""
        return max(self.top_k, 0)


def _short(x) -> str:
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


def _normalize_logit_bias(bias) -> tuple[tuple[int, float], ...]:
    """``{token_id: bias}`` / pairs -> a sorted tuple of ``(int, float)``; ``InvalidRequestError`` naming
    ``logit_bias`` for anything the device arrays cannot hold."""
    if bias is None:
        return ()
    if isinstance(bias, dict):
        items = list(bias.items())
    elif isinstance(bias, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in bias):
        items = [tuple(p) for p in bias]
    else:
        raise InvalidRequestError(f"logit_bias must map token ids to numbers, got {_short(bias)}", "logit_bias")
    if len(items) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(items)}",
                                  "logit_bias")
    out = {}
    for tid, value in items:
        if not _is_int(tid) or not 0 <= tid <= INT32_MAX:
            raise InvalidRequestError(f"logit_bias keys must be token ids in [0, {INT32_MAX}], got {_short(tid)}",
                                      "logit_bias")
        if not _is_number(value) or not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
            raise InvalidRequestError(
                f"logit_bias values must be numbers in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}], "
                f"got {_short(value)}", "logit_bias")
        out[tid] = float(value)
    return tuple(sorted(out.items()))
