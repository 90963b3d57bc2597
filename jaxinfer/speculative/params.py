"""Per-request number of speculative tokens (pure Python, no jax)."""

from __future__ import annotations

from jaxinfer.errors import InvalidRequestError
from jaxinfer.sampling_params import SamplingParams


def uses_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1 or params.presence_penalty != 0 or params.frequency_penalty != 0


def resolve_num_speculative_tokens(requested: int | None, params: SamplingParams, method: str | None,
                                   max_tokens: int) -> int:
    """The ``k`` a request speculates with.

    Args:
      requested: the request's ``num_speculative_tokens`` (``None``: the engine default).
      params: its sampling parameters.
      method: the engine's ``speculative_method`` (``None``: off).
      max_tokens: the engine's ``num_speculative_tokens`` (``K``), also the default.
    Returns:
      ``0 <= k <= K``. Requests with penalties get 0 by default: their on-device token counts follow the
      tokens each step feeds in, which a rollback would have to undo. Structured-output requests get 0 too:
      their grammar matcher advances on accepted tokens only and masks one position per step.
    Raises:
      InvalidRequestError: not an integer in ``[0, K]``, speculation off, or asked for with penalties or
        structured output.
    """
    name = "num_speculative_tokens"
    if requested is None:
        off = method is None or uses_penalties(params) or params.structured_outputs is not None
        return 0 if off else max_tokens
    if not isinstance(requested, int) or isinstance(requested, bool) or requested < 0:
        raise InvalidRequestError(f"{name} must be an integer >= 0, got {requested!r}", name)
    if requested == 0:
        return 0
    if method is None:
        raise InvalidRequestError(f"{name}={requested} but speculative decoding is off for this engine", name)
    if requested > max_tokens:
        raise InvalidRequestError(f"{name} must be <= {max_tokens} (the engine's limit), got {requested}", name)
    if uses_penalties(params):
        raise InvalidRequestError(
            f"{name}={requested}: speculative decoding is not available with repetition / presence / "
            "frequency penalties", name)
    if params.structured_outputs is not None:
        raise InvalidRequestError(
            f"{name}={requested}: speculative decoding is not available with structured outputs", name)
    return requested
