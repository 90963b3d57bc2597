"""ASGI helpers that notice a client going away, whatever the ASGI server's spec version.

Disconnects are detected by reading ``receive()`` for ``http.disconnect`` concurrently with the work;
the work is cancelled when it arrives, and ``on_close`` (the abort) always runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from serve.errors import PayloadTooLarge, RequestTimeout, UnsupportedMediaType

logger = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def check_json_content_type(request: Request) -> None:
    """415 unless the body is declared JSON (``application/json`` or ``application/*+json``): browsers
    send cross-origin ``text/plain`` / form posts without a CORS preflight, JSON only after one."""
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {ctype[:60]!r}.",
                                   code="unsupported_media_type")


async def read_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes and (408) a body that takes more than
    ``timeout`` seconds to arrive."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body exceeds {limit} bytes.", code="body_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"The request body exceeds {limit} bytes.", code="body_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {timeout:g} s.",
                             code="body_timeout") from None
    return b"".join(chunks)


async def until_disconnect(request: Request, work: Awaitable):
    """Await ``work``; if the client disconnects first, cancel it and raise ``ClientGone``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone()
    finally:
        for t in (task, watcher):
            t.cancel()
        with contextlib.suppress(BaseException):
            await task


class EventStreamResponse(Response):
    """``text/event-stream`` from an async iterator of strings; stops (and runs ``on_close``) when the
    client disconnects, the iterator ends, or the server cancels the request."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        self.events = events
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            producer = asyncio.ensure_future(self._produce(send))
            watcher = asyncio.ensure_future(_wait_disconnect(receive))
            try:
                done, _ = await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if producer in done:
                    producer.result()
                else:
                    logger.info("client disconnected mid-stream; aborting")
            finally:
                for t in (producer, watcher):
                    t.cancel()
                with contextlib.suppress(BaseException):
                    await producer
        except OSError:  # the transport broke while sending
            logger.info("client connection lost mid-stream; aborting")
        finally:
            self.on_close()

    async def _produce(self, send) -> None:
        agen = self.events
        try:
            async for text in agen:
                await send({"type": "http.response.body", "body": text.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()
