"""``AsyncEngine``: the asyncio front end's handle on the engine thread (admission, abort, shutdown).

Backpressure: the server admits at most ``max_num_seqs + max_waiting_requests`` *sequences* at once
(a request with ``n`` samples counts ``n``; running in the engine plus waiting in the inbox or the
engine's queue). Beyond that ``submit`` raises ``Overloaded`` (HTTP 429, gRPC RESOURCE_EXHAUSTED) at
once instead of queueing without limit. ``limits`` (:class:`serve.limits.RequestLimits`) bound what one
request may ask for.
While shutting down it raises ``ShuttingDown`` (HTTP 503, gRPC UNAVAILABLE).

Abort path: a handler whose client went away leaves ``AsyncEngine.open``'s ``async with`` block
(cancellation included); the block's exit calls ``RequestStream.abort`` -> ``EngineLoop.abort`` ->
the engine thread calls ``engine.abort_request`` (pages freed) before its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from jaxinfer.errors import InvalidRequestError
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams
from serve.engine_loop import EngineLoop
from serve.errors import Overloaded, ShuttingDown, bad_param
from serve.limits import RequestLimits
from serve.metrics import ServerMetrics
from serve.request_stream import RequestStream
from serve.structured_request import build_structured

logger = logging.getLogger(__name__)

UNHEALTHY_AFTER = 3  # consecutive failed engine steps before /health reports unhealthy


class AsyncEngine:
    """Owns the engine thread; every method is called on the asyncio loop.

    Args:
      engine: an ``Engine`` (or a test double with the same interface).
      max_num_seqs: requests the engine runs at once (admission counts them as running).
      max_waiting_requests: sequences admitted beyond ``max_num_seqs`` before answering 429.
      served_model_name: the name clients pass as ``model`` (defaults to ``engine.model_name``).
      limits: per-request limits (``n``, prompts, ``n`` x prompts, stop strings).
    """

    def __init__(self, engine, *, max_num_seqs: int = 64, max_waiting_requests: int = 256,
                 served_model_name: str | None = None, limits: RequestLimits | None = None):
        if max_num_seqs < 1 or max_waiting_requests < 0:
            raise ValueError("max_num_seqs must be >= 1 and max_waiting_requests >= 0")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = int(engine.max_model_len)
        self.model_name = served_model_name or str(engine.model_name)
        self.model_aliases = {self.model_name, str(engine.model_name)}
        self.capacity = max_num_seqs + max_waiting_requests  # sequences
        self.limits = limits or RequestLimits()
        self.created = int(time.time())
        self.in_flight = 0  # engine requests (one per prompt)
        self.seqs_in_flight = 0  # their sequences (n each)
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop_thread: EngineLoop | None = None
        self._streams: dict[str, RequestStream] = {}
        # One thread tokenizes (HF fast tokenizers must not be reconfigured concurrently); the engine
        # thread only decodes.
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="jaxinfer-tokenize")
        # Output constraints are validated and compiled here (seconds for a large schema), never on the
        # engine thread: one thread, so a slow constraint delays only other constrained requests.
        self._grammar_pool = ThreadPoolExecutor(1, thread_name_prefix="jaxinfer-grammar")
        self.metrics = ServerMetrics(lambda: self._loop_thread.stats if self._loop_thread else None,
                                     lambda: self.in_flight)

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine thread on the running loop."""
        if self._loop_thread is None:
            self._loop_thread = EngineLoop(self.engine, asyncio.get_running_loop(),
                                           on_step=self.metrics.engine_step.observe)
            self._loop_thread.start()

    @property
    def healthy(self) -> bool:
        """The engine thread runs and its last ``UNHEALTHY_AFTER`` steps did not all fail."""
        t = self._loop_thread
        return t is not None and t.alive and t.step_failures < UNHEALTHY_AFTER

    @property
    def stats(self):
        """The engine's latest stats snapshot (``None`` before the thread published one)."""
        return self._loop_thread.stats if self._loop_thread else None

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Refuse new requests (503), let in-flight ones finish for ``grace_s``, abort the rest, stop."""
        self.draining = True
        if self._loop_thread is None:
            return
        if self.in_flight:
            logger.info("shutting down: waiting up to %.1f s for %d request(s)", grace_s, self.in_flight)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)
        if self.in_flight:
            logger.warning("shutting down: aborting %d request(s)", self.in_flight)
            for stream in list(self._streams.values()):
                stream.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 10.0)
        thread, self._loop_thread = self._loop_thread, None
        await asyncio.get_running_loop().run_in_executor(None, thread.stop, 30.0)
        self._tokenize_pool.shutdown(wait=False)
        self._grammar_pool.shutdown(wait=False, cancel_futures=True)

    # -- requests ------------------------------------------------------------------------------------
    async def run_tokenizer(self, fn, *args):
        """Run ``fn(*args)`` (tokenization, chat template) off the event loop, serialized."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    async def prepare_structured(self, spec: dict, param: str):
        """The ``StructuredOutputsParams`` of ``spec`` (from request field ``param``), validated and, when
        the engine has llguidance matchers (``engine.grammars``), compiled: in the grammar thread, within
        ``limits.grammar_timeout_s`` (400 naming ``param`` beyond; the compile then finishes in the
        background, bounded by llguidance's own limits)."""
        grammars = getattr(self.engine, "grammars", None)

        def build():
            so = build_structured(spec, param)
            if grammars is None or not hasattr(grammars, "compile"):
                return so
            try:
                return so.with_compiled(grammars.compile(so))
            except InvalidRequestError as e:
                raise bad_param(f"'{param}': {e}", param) from None

        limit = self.limits.grammar_timeout_s
        fut = asyncio.get_running_loop().run_in_executor(self._grammar_pool, build)
        try:
            return await asyncio.wait_for(fut, limit)
        except TimeoutError:
            raise bad_param(f"'{param}': the output constraint took longer than {limit:g} s to compile (this "
                            "server's limit); simplify the schema or grammar", param, "grammar_timeout") from None

    def check_admission(self, count: int = 1) -> None:
        """Raise ``ShuttingDown`` / ``Overloaded`` if ``count`` more sequences cannot be admitted now
        (``BadRequest`` naming ``n`` if they never could)."""
        if self.draining or self._loop_thread is None:
            self.metrics.request_rejected.labels(reason="shutting_down").inc(count)
            raise ShuttingDown()
        if not self._loop_thread.alive:
            self.metrics.request_rejected.labels(reason="engine_stopped").inc(count)
            raise ShuttingDown("The engine thread stopped; the server cannot take requests.")
        if count > self.capacity:
            raise bad_param(f"this request needs {count} sequences (n x prompts) but the server admits at most "
                            f"{self.capacity} at once", "n")
        if self.seqs_in_flight + count > self.capacity:
            self.metrics.request_rejected.labels(reason="queue_full").inc(count)
            raise Overloaded()

    def submit(self, prompt: list[int], params: SamplingParams, *, request_id: str | None = None,
               arrival_time: float | None = None, client: str | None = None) -> RequestStream:
        """Hand a tokenized request to the engine thread; the caller must read or abort the stream.
        ``client``: the client request it is part of (every prompt of a batch shares one)."""
        self.check_admission(params.n)
        rid = request_id or uuid.uuid4().hex
        stream = RequestStream(rid, params.n, self._loop_thread.abort, self._on_done)
        self._streams[rid] = stream
        self.in_flight += 1
        self.seqs_in_flight += params.n
        self._idle.clear()
        self._loop_thread.add(stream, prompt, params, arrival_time or time.perf_counter(), client)
        return stream

    @contextlib.asynccontextmanager
    async def open(self, prompt: list[int], params: SamplingParams, **kw):
        """``async with engine.open(ids, params) as stream:``; leaving the block early aborts it."""
        stream = self.submit(prompt, params, **kw)
        try:
            yield stream
        finally:
            stream.abort()

    def _on_done(self, stream: RequestStream, final: RequestOutput | None) -> None:
        self._streams.pop(stream.request_id, None)
        self.in_flight -= 1
        self.seqs_in_flight -= stream.n
        if self.in_flight == 0:
            self._idle.set()
        if final is not None:
            self.metrics.observe_finished(final, stream.n)
