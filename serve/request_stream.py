"""The asyncio side of one request: the events the engine thread sends it, in order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from jaxinfer.outputs import RequestOutput
from serve.errors import APIError


class RequestStream:
    """Events for one request, consumed by one handler on the asyncio loop.

    The engine thread puts (via ``call_soon_threadsafe``): ``ACCEPTED`` once ``add_request``
    succeeded, then ``RequestOutput`` deltas, the last with ``finished=True``; or an ``APIError``
    at any point, which ends the stream. ``on_done`` runs once, on the asyncio loop, when the stream
    ends (finished, failed or aborted), whether or not anyone still reads it.
    """

    ACCEPTED = "accepted"

    def __init__(self, request_id: str, n: int, abort: Callable[[str], None],
                 on_done: Callable[[RequestStream, RequestOutput | None], None] | None = None):
        self.request_id = request_id
        self.n = n
        self._abort = abort
        self._on_done = on_done
        self._queue: asyncio.Queue = asyncio.Queue()  # outputs, then possibly an APIError
        self._answered = asyncio.Event()  # the engine accepted or rejected the request
        self.accepted = False
        self.done = False  # the engine side has ended this request
        self._abort_sent = False
        self._read_final = False

    def put(self, event) -> None:
        """asyncio thread only (the engine thread calls it through the loop)."""
        if self.done:
            return
        if not self.accepted:  # an output (or an error) also answers "was it accepted?"
            self.accepted = event is self.ACCEPTED or isinstance(event, RequestOutput)
            self._answered.set()
        if event is self.ACCEPTED:
            return
        terminal = isinstance(event, APIError) or event.finished
        if terminal:
            self.done = True
        self._queue.put_nowait(event)
        if terminal and self._on_done is not None:
            self._on_done(self, event if isinstance(event, RequestOutput) else None)

    async def wait_accepted(self) -> None:
        """Return once the engine holds the request; raise its ``APIError`` if it was rejected."""
        await self._answered.wait()
        if not self.accepted:
            raise self._queue.get_nowait()

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        """The next output delta; ``StopAsyncIteration`` after the finished one; raises an ``APIError``."""
        if self._read_final:
            raise StopAsyncIteration
        while True:
            event = await self._queue.get()
            if isinstance(event, APIError):
                self._read_final = True
                raise event
            if event.finished:
                self._read_final = True
            return event

    def abort(self) -> None:
        """Ask the engine to abort this request (no-op once it ended). Idempotent."""
        if not self.done and not self._abort_sent:
            self._abort_sent = True
            self._abort(self.request_id)
