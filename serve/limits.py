"""Per-request limits a server operator sets (``jaxinfer serve --max-n ...``), shared by HTTP and gRPC.

What the engine can *represent* (int32 ranges, ``MAX_LOGIT_BIAS``, ...) is checked by
``jaxinfer.sampling_params.SamplingParams``; these limits bound what one request may *cost*: sequences
(``n`` x prompts) and stop strings (count and total UTF-8 bytes; matching costs time per new character
only, but the automaton is built per request).
"""

from __future__ import annotations

from dataclasses import dataclass

from serve.errors import bad_param


@dataclass(frozen=True)
class RequestLimits:
    """Attributes:
      max_n: samples per prompt (``n``).
      max_prompts: prompts in one ``/v1/completions`` request.
      max_seqs_per_request: ``n`` x prompts, the sequences one request adds.
      max_stop: stop strings per request.
      max_stop_bytes: total UTF-8 bytes of a request's stop strings.
      grammar_timeout_s: seconds a request's output constraint (JSON schema, grammar, ...) may take to
        validate and compile (in the server's grammar thread, not the engine's); 400 beyond.
    """

    max_n: int = 128
    max_prompts: int = 256
    max_seqs_per_request: int = 256
    max_stop: int = 64
    max_stop_bytes: int = 4096
    grammar_timeout_s: float = 10.0

    def __post_init__(self):
        t = self.grammar_timeout_s
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0:
            raise ValueError(f"RequestLimits.grammar_timeout_s must be a number > 0, got {t!r}")
        for name in ("max_n", "max_prompts", "max_seqs_per_request", "max_stop", "max_stop_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"RequestLimits.{name} must be an integer >= 1, got {v!r}")

    def check_n(self, n: int) -> None:
        if n > self.max_n:
            raise bad_param(f"'n' must be at most {self.max_n} on this server, got {n}", "n")

    def check_sequences(self, n: int, num_prompts: int, param: str = "n") -> None:
        """``n`` x prompts within ``max_seqs_per_request``."""
        if n * num_prompts > self.max_seqs_per_request:
            raise bad_param(f"n x prompts = {n} x {num_prompts} exceeds this server's limit of "
                            f"{self.max_seqs_per_request} sequences per request", param)

    def check_stop(self, stop) -> None:
        if len(stop) > self.max_stop:
            raise bad_param(f"'stop' may hold at most {self.max_stop} strings on this server, got {len(stop)}",
                            "stop")
        size = sum(len(s.encode("utf-8", "surrogatepass")) for s in stop)
        if size > self.max_stop_bytes:
            raise bad_param(f"the stop strings may total at most {self.max_stop_bytes} UTF-8 bytes on this "
                            f"server, got {size}", "stop")
