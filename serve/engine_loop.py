"""The engine thread: the only thread that touches the (synchronous, not thread-safe) ``Engine``.

Threads and queues::

    asyncio thread (HTTP / gRPC handlers)            engine thread (this module)
    -------------------------------------            ---------------------------
    EngineLoop.add / .abort  --> inbox (deque + Condition) --> drain: engine.add_request / abort_request
                                                               engine.step() while work exists
    RequestStream queues <-- loop.call_soon_threadsafe <---- one batch of events per iteration

The thread sleeps on the condition when the engine has no work and the inbox is empty (no busy loop).
After every iteration it publishes ``engine.stats()`` as an immutable snapshot the front end reads.

Failure isolation: a request the engine rejects (``InvalidRequestError``) fails alone; an exception
inside ``engine.step()`` fails every request in flight with a 500 (the engine's state for that batch
is unknown), aborts them in the engine to free their pages, and the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from jaxinfer.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxinfer.sampling_params import SamplingParams
from serve.errors import APIError, EngineFailure, from_exception
from serve.request_stream import RequestStream

logger = logging.getLogger(__name__)

_MAX_BACKOFF_S = 1.0


@dataclass
class _Add:
    stream: RequestStream
    prompt: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Active:
    """Engine-thread bookkeeping of one request the engine holds."""

    stream: RequestStream
    prompt: list[int]
    n: int
    arrival_time: float
    finished: set[int] = field(default_factory=set)
    first_token_time: float | None = None
    num_generated: int = 0


class EngineLoop:
    """Runs ``engine`` in a background thread and dispatches its outputs to asyncio streams.

    Args:
      engine: an object with the ``Engine`` interface (``add_request``, ``abort_request``, ``step``,
        ``has_unfinished_requests``, ``stats``).
      loop: the asyncio loop that owns the ``RequestStream`` objects.
      on_step: optional callback with each successful ``step()``'s duration in seconds (engine thread).
    """

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, on_step=None):
        self.engine = engine
        self._loop = loop
        self._on_step = on_step  # called with each successful step's duration in seconds (engine thread)
        self._cond = threading.Condition()
        self._inbox: deque = deque()
        self._stopping = False
        self._active: dict[str, _Active] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="jaxinfer-engine", daemon=True)
        self.stats = None  # latest engine.stats() snapshot, replaced (never mutated) by the thread
        self.step_failures = 0  # consecutive failed steps
        self.total_step_failures = 0
        self.alive = False
        self._publish_stats()

    # -- called from any thread ----------------------------------------------------------------------
    def start(self) -> None:
        self.alive = True
        self._thread.start()

    def add(self, stream: RequestStream, prompt: list[int], params: SamplingParams, arrival_time: float) -> None:
        """Queue a request; ``stream`` receives ``accepted`` (or a failure), then outputs."""
        self._post(_Add(stream, prompt, params, arrival_time))

    def abort(self, request_id: str) -> None:
        """Queue an abort; the engine frees the request's pages before its next step."""
        self._post(_Abort(request_id))

    def stop(self, timeout: float | None = None) -> None:
        """Abort whatever is left, stop the thread and wait for it."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _post(self, cmd) -> None:
        with self._cond:
            if not self.alive:  # nobody will read it: fail an add at once instead of hanging
                if isinstance(cmd, _Add):
                    self._dispatch([(cmd.stream, EngineFailure("The engine is not running."))])
                return
            self._inbox.append(cmd)
            self._cond.notify()

    # -- engine thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        events: list = []
        try:
            while True:
                cmds = self._take_commands()
                if cmds is None:
                    break
                for cmd in cmds:
                    if isinstance(cmd, _Add):
                        self._do_add(cmd, events)
                    else:
                        self._do_abort(cmd.request_id, events)
                if self._has_work():
                    self._do_step(events)
                self._publish_stats()
                self._dispatch(events)
                events = []
        except BaseException:  # never expected: keep clients from hanging, then let the thread end
            logger.exception("engine thread crashed")
            raise
        finally:
            with self._cond:
                self.alive = False
                leftover = list(self._inbox)
                self._inbox.clear()
            events += [(cmd.stream, EngineFailure("The engine stopped.")) for cmd in leftover
                       if isinstance(cmd, _Add)]
            for rid in list(self._active):
                self._do_abort(rid, events)
            self._dispatch(events)

    def _take_commands(self) -> list | None:
        """Wait (without spinning) until there is a command or engine work; None when stopping."""
        has_work = self._has_work()
        with self._cond:
            if not has_work:
                while not self._inbox and not self._stopping:
                    self._cond.wait()
            elif self.step_failures:  # a failing engine: back off, but wake for new commands
                self._cond.wait_for(lambda: self._inbox or self._stopping,
                                    min(_MAX_BACKOFF_S, 0.05 * 2**self.step_failures))
            if self._stopping:
                return None
            cmds = list(self._inbox)
            self._inbox.clear()
            return cmds

    def _has_work(self) -> bool:
        try:
            return bool(self.engine.has_unfinished_requests())
        except Exception:
            logger.exception("engine.has_unfinished_requests() failed")
            return False

    def _do_add(self, cmd: _Add, events: list) -> None:
        rid = cmd.stream.request_id
        try:
            self.engine.add_request(rid, cmd.prompt, cmd.params, arrival_time=cmd.arrival_time)
        except Exception as e:  # a bad request fails alone
            err = from_exception(e)
            if err.status >= 500:
                logger.exception("engine.add_request failed for %s", rid)
            events.append((cmd.stream, err))
            return
        self._active[rid] = _Active(cmd.stream, cmd.prompt, cmd.params.n, cmd.arrival_time)
        events.append((cmd.stream, RequestStream.ACCEPTED))

    def _do_abort(self, rid: str, events: list) -> None:
        act = self._active.pop(rid, None)
        if act is None:
            return  # finished already (or never accepted)
        try:
            self.engine.abort_request(rid)
        except Exception:
            logger.exception("engine.abort_request(%s) failed", rid)
        now = time.perf_counter()
        outs = [CompletionOutput(i, "", [], "abort") for i in range(act.n) if i not in act.finished]
        metrics = RequestMetrics(act.arrival_time, act.first_token_time, now, act.num_generated)
        events.append((act.stream, RequestOutput(rid, None, act.prompt, outs, True, metrics)))

    def _do_step(self, events: list) -> None:
        t = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception:
            self.step_failures += 1
            self.total_step_failures += 1
            logger.exception("engine.step() failed; failing %d request(s) in flight", len(self._active))
            self._fail_all(EngineFailure(), events)
            return
        self.step_failures = 0
        if self._on_step is not None:
            self._on_step(time.perf_counter() - t)
        for out in outputs:
            act = self._active.get(out.request_id)
            if act is None:
                continue  # aborted by the front end already
            act.num_generated += sum(len(c.token_ids) for c in out.outputs)
            if act.first_token_time is None and act.num_generated:
                act.first_token_time = out.metrics.first_token_time or time.perf_counter()
            act.finished.update(c.index for c in out.outputs if c.finish_reason is not None)
            if out.finished:
                del self._active[out.request_id]
            events.append((act.stream, out))

    def _fail_all(self, err: APIError, events: list) -> None:
        for rid, act in list(self._active.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:
                logger.exception("engine.abort_request(%s) failed after a failed step", rid)
            events.append((act.stream, err))
        self._active.clear()

    def _publish_stats(self) -> None:
        try:
            self.stats = self.engine.stats()
        except Exception:
            logger.exception("engine.stats() failed")

    def _dispatch(self, events: list) -> None:
        if not events:
            return
        try:
            self._loop.call_soon_threadsafe(_deliver, events)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            logger.debug("event loop closed; dropped %d event(s)", len(events))


def _deliver(events: list) -> None:
    """asyncio thread: hand each event to its stream."""
    for stream, event in events:
        stream.put(event)
