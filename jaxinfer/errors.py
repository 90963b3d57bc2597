"""Typed errors raised for bad input. Front ends map them to user-facing messages / HTTP codes."""

from __future__ import annotations


class JaxinferError(Exception):
    """Base class of every error jaxinfer raises on purpose."""


class InvalidRequestError(JaxinferError, ValueError):
    """A request parameter is invalid. ``param`` names the offending field (OpenAI-style)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus requested output) does not fit the model's context window."""

    def __init__(self, message: str, param: str | None = "prompt"):
        super().__init__(message, param)


class ModelNotFoundError(JaxinferError, LookupError):
    """A model name / path / hub id could not be resolved."""


class UnsupportedModelError(JaxinferError, ValueError):
    """The model's architecture, tensor type or configuration is not supported."""


class WeightLoadError(JaxinferError, ValueError):
    """A weight file is corrupted, truncated, or its tensors do not match the configuration."""


class QuantizationError(JaxinferError, ValueError):
    """A quantization request is invalid (method / format / calibration data) or cannot be carried out."""
