"""The engine thread: the only thread that touches the (synchronous, not thread-safe) ``Engine``.

Threads and queues::

    asyncio thread (HTTP / gRPC handlers)            engine thread (this module)
    -------------------------------------            ---------------------------
    EngineLoop.add / .abort  --> inbox (deque + Condition) --> drain: engine.add_request / abort_request
                                                               engine.step() while work exists
    RequestStream queues <-- loop.call_soon_threadsafe <---- one batch of events per iteration

The thread sleeps on the condition when the engine has no work and the inbox is empty (no busy loop).
After every iteration it publishes ``engine.stats()`` as an immutable snapshot the front end reads.

Failure isolation: a request the engine rejects (``InvalidRequestError``) fails alone. When
``engine.step()`` raises, the loop looks for the request whose inputs break the step (engines whose
``step`` takes ``exclude``, the request ids to leave out of that step): it re-runs steps on halves of
the requests in flight (each successful probe is a real step whose outputs are delivered) until one
request fails alone while the others step fine without it. That request fails alone (400
``request_failed``), the rest keep running and the failure does not count against ``/health``. A
failure no single request explains is retried once (it may have been transient); if it repeats, or
the engine cannot exclude requests, every request in flight fails with a 500 (the engine's state for
that batch is unknown), is aborted to free its pages, and the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from jaxinfer.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxinfer.sampling_params import SamplingParams
from serve.errors import APIError, BadRequest, EngineFailure, from_exception
from serve.request_stream import RequestStream

logger = logging.getLogger(__name__)

_MAX_BACKOFF_S = 1.0
_MAX_CULPRITS = 4  # requests failed alone by one isolation before the failure counts as the engine's


@dataclass
class _Add:
    stream: RequestStream
    prompt: list[int]
    params: SamplingParams
    arrival_time: float
    client: str | None = None


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
        self.isolated_failures = 0  # requests failed alone because their inputs broke a step
        self._can_exclude = _accepts_exclude(engine)
        self._probe_ok = False
        self._publish_stats()

    # -- called from any thread ----------------------------------------------------------------------
    def start(self) -> None:
        self.alive = True
        self._thread.start()

    def add(self, stream: RequestStream, prompt: list[int], params: SamplingParams, arrival_time: float,
            client: str | None = None) -> None:
        """Queue a request; ``stream`` receives ``accepted`` (or a failure), then outputs. ``client``: the
        client request it is part of (``Engine.add_request``)."""
        self._post(_Add(stream, prompt, params, arrival_time, client))

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
            kw = {} if cmd.client is None else {"client": cmd.client}
            self.engine.add_request(rid, cmd.prompt, cmd.params, arrival_time=cmd.arrival_time, **kw)
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
        except Exception as e:
            logger.exception("engine.step() failed with %d request(s) in flight", len(self._active))
            self._after_failure(e, events)
            return
        self.step_failures = 0
        if self._on_step is not None:
            self._on_step(time.perf_counter() - t)
        self._take_outputs(outputs, events)

    def _take_outputs(self, outputs, events: list) -> None:
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

    # -- failure isolation ---------------------------------------------------------------------------
    def _after_failure(self, exc: Exception, events: list) -> None:
        """A step raised: fail the requests that break steps alone, or everyone if nobody can be blamed."""
        if self._can_exclude and self._active:
            self._probe_ok = False
            outcome = self._isolate(exc, events)
            if outcome == "isolated":
                # an engine that fails every step it runs is unhealthy, whoever gets the blame
                if self._probe_ok:
                    self.step_failures = 0
                else:
                    self.step_failures += 1
                    self.total_step_failures += 1
                return
            if outcome == "transient" and not self.step_failures:
                self.step_failures += 1  # retried at the next iteration, after a short back-off
                self.total_step_failures += 1
                logger.warning("engine step failure not caused by one request; retrying")
                return
        self.step_failures += 1
        self.total_step_failures += 1
        logger.error("engine step failed; failing %d request(s) in flight", len(self._active))
        self._fail_all(EngineFailure(), events)

    def _probe(self, include: list[str], events: list) -> bool:
        """Run one step with only ``include`` among the requests in flight; deliver its outputs."""
        exclude = set(self._active).difference(include)
        try:
            outputs = self.engine.step(exclude=exclude)
        except Exception:
            return False
        self._probe_ok = True
        self._take_outputs(outputs, events)
        return True

    def _isolate(self, exc: Exception, events: list) -> str:
        """Find the requests that make a step fail on their own. Returns ``"isolated"`` (they failed alone
        and the others step fine without them), ``"transient"`` (no request fails alone; nobody failed) or
        ``"global"`` (failures no few requests explain; nobody failed yet)."""
        suspected: list[str] = []
        while len(suspected) < _MAX_CULPRITS:
            culprit = self._find_culprit([r for r in self._active if r not in suspected], events)
            if culprit is None:
                break
            suspected.append(culprit)
            if len(suspected) == len(self._active) > 1:
                break  # every request fails alone: the engine's failure, not theirs
            rest = [r for r in self._active if r not in suspected]
            if (not rest and len(suspected) == 1) or (rest and self._probe(rest, events)):
                for rid in suspected:
                    self._fail_one(rid, exc, events)
                return "isolated"
        return "global" if suspected else "transient"

    def _find_culprit(self, suspects: list[str], events: list) -> str | None:
        """Bisect: the one request of ``suspects`` whose step fails with it alone, or None."""
        while True:
            suspects = [r for r in suspects if r in self._active]  # probes may finish requests
            if not suspects:
                return None
            if len(suspects) == 1:
                return None if self._probe(suspects, events) else suspects[0]
            half = len(suspects) // 2
            for part in (suspects[:half], suspects[half:]):
                if not self._probe(part, events):
                    suspects = part
                    break
            else:
                return None  # each half steps fine alone

    def _fail_one(self, rid: str, exc: Exception, events: list) -> None:
        act = self._active.pop(rid, None)
        if act is None:
            return
        self.isolated_failures += 1
        logger.warning("request %s makes engine steps fail (%s); failing it alone", rid, type(exc).__name__)
        try:
            self.engine.abort_request(rid)
        except Exception:
            logger.exception("engine.abort_request(%s) failed", rid)
        events.append((act.stream, BadRequest(
            f"The engine could not run this request: its parameters make the engine step fail "
            f"({type(exc).__name__}). Other requests were not affected.", code="request_failed")))

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


def _accepts_exclude(engine) -> bool:
    """Whether ``engine.step`` takes ``exclude`` (request ids left out of one step)."""
    try:
        return "exclude" in inspect.signature(engine.step).parameters
    except (TypeError, ValueError):
        return False


def _deliver(events: list) -> None:
    """asyncio thread: hand each event to its stream."""
    for stream, event in events:
        stream.put(event)
