"""Errors the servers answer with, and their OpenAI-style bodies.

Every error a client can cause maps to one :class:`APIError` with an HTTP status, an OpenAI error
``type``, the offending ``param`` (when one is to blame) and a machine-readable ``code``. The gRPC
server maps the same errors to gRPC status codes.
"""

from __future__ import annotations

from jaxinfer.errors import InvalidRequestError, JaxinferError, PromptTooLongError


class APIError(Exception):
    """An error answered to the client.

    Attributes:
      status: HTTP status code.
      type: OpenAI error type (``invalid_request_error``, ``not_found_error``, ...).
      param: the request field to blame, or ``None``.
      code: short machine-readable code, or ``None``.
    """

    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}`` as OpenAI answers."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(APIError):
    """400: the request is malformed or a field has a bad value."""

    status = 400
    type = "invalid_request_error"


class ModelNotFound(APIError):
    """404: the ``model`` field names a model this server does not serve (OpenAI answers the same)."""

    status = 404
    type = "invalid_request_error"

    def __init__(self, model: str):
        super().__init__(f"The model `{model}` does not exist.", param="model", code="model_not_found")


class NotFound(APIError):
    """404: no such route."""

    status = 404
    type = "not_found_error"


class MethodNotAllowed(APIError):
    """405: the route exists but not for this method."""

    status = 405
    type = "invalid_request_error"


class PayloadTooLarge(APIError):
    """413: the request body exceeds the server's limit."""

    status = 413
    type = "invalid_request_error"


class Unauthorized(APIError):
    """401: the API key is missing or wrong."""

    status = 401
    type = "invalid_request_error"

    def __init__(self, message: str = "A valid API key is required (header 'Authorization: Bearer <key>')."):
        super().__init__(message, code="invalid_api_key")


class RequestTimeout(APIError):
    """408: the client did not send the request body in time."""

    status = 408
    type = "invalid_request_error"


class UnsupportedMediaType(APIError):
    """415: the body of a JSON endpoint is not declared as JSON."""

    status = 415
    type = "invalid_request_error"


class Overloaded(APIError):
    """429: the waiting queue is full; retry later."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str = "The server is at capacity (waiting queue full); retry later."):
        super().__init__(message, code="queue_full")


class ShuttingDown(APIError):
    """503: the server is shutting down and accepts no new requests."""

    status = 503
    type = "service_unavailable"

    def __init__(self, message: str = "The server is shutting down."):
        super().__init__(message, code="shutting_down")


class EngineFailure(APIError):
    """500: the engine failed while running this request."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str = "The engine failed while running this request."):
        super().__init__(message, code="engine_error")


def bad_param(message: str, param: str | None, code: str | None = "invalid_value") -> BadRequest:
    """A 400 naming ``param``."""
    return BadRequest(message, param=param, code=code)


def from_exception(exc: BaseException) -> APIError:
    """The API error for an exception raised while handling a request (unknown ones become 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return BadRequest(str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return BadRequest(str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, JaxinferError):
        return BadRequest(str(exc), code="invalid_value")
    return APIError("Internal server error.", code="internal_error")
