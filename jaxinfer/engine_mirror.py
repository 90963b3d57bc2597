"""One engine over several processes: process 0 decides, every other process repeats its operations.

A multi-controller JAX program needs every process to issue the same jitted step with the same inputs.
A server has one front end (process 0); the other processes must learn what it does. What is
broadcast is the engine's *operations*, not each step's packed batch:

* ``add`` (request id, prompt, sampling parameters with an explicit seed), ``abort``, ``flush`` (prefix
  cache) and ``step`` (with the request ids a failure-isolating step leaves out), in the order process 0
  applied them. The engine (scheduler, block manager, speculative proposer, slot and seed assignment) is
  a deterministic function of that sequence, so every process schedules and packs the same batch and
  issues the same step.
* Why not the packed batch: it is built from host state (the scheduler's page tables, penalty slots,
  n-gram drafts, detokenizer state) that every process must keep anyway to build the next one and to
  free pages; broadcasting it would mean the followers keep no state, but then a step is several
  arrays per step (tokens, positions, page tables, sampling tensors) instead of a few bytes, and every
  batch-building path (plain, verify, draft) would need a second, "apply a received batch" code path.
  Operations are small (a step message without new requests is ~60 bytes), and a request's prompt is
  sent once, not at every prefill chunk.
* Seeds: a request without a seed gets one drawn by process 0 before it is broadcast, so a follower
  never draws from its own generator (a request process 0 refuses is never broadcast).

Transport: the distributed runtime's key-value store (the coordination service in process 0). Message
``n`` (key ``<ns>/ops/<n // 64>/<n>``) holds the operations since the previous step and ends with a
``step``, ``stop`` or ``fail``; it also carries a digest of process 0's previous step outputs (request
ids, token ids, finish reasons), and a follower whose own digest differs stops with a clear error
(:class:`DivergenceError`) instead of computing garbage. Followers acknowledge every 64th message;
process 0 deletes a block of 64 messages once every follower acknowledged it, so the store stays small.

Idle and failures: a follower waits for the next message with a blocking get of ``poll_s`` seconds
(default 10) in a loop, so an idle server neither spins nor times out; the runtime's heartbeats
(``JAXINFER_HEARTBEAT_TIMEOUT``) end every process when one dies or stalls. In a serving group any
failed step is fatal: process 0 broadcasts ``fail`` and exits (:func:`jaxinfer.distributed.abort_on_failure`)
instead of isolating the request as one host does (the likely cause is a lost process, and a step that
failed on one process only cannot be retried in lock-step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pickle
import time
from collections.abc import Callable, Collection

import numpy as np

from jaxinfer.errors import JaxinferError
from jaxinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

BLOCK = 64  # messages per key-value directory; acknowledged and deleted together
NAMESPACE = "jaxinfer/serve"


class DivergenceError(RuntimeError):
    """A follower's engine no longer matches process 0's (different outputs, or a request it refused)."""


class OpChannel:
    """Numbered messages from process 0 to the others over the runtime's key-value store.

    Args:
      client: the store (``jaxinfer.distributed.kv_client()``; tests pass an in-memory double).
      process_id, num_processes: this process and the group size.
    """

    def __init__(self, client, process_id: int, num_processes: int, namespace: str = NAMESPACE):
        self.client = client
        self.process_id = process_id
        self.num_processes = num_processes
        self.ns = namespace
        self._oldest_block = 0  # process 0: the oldest block not deleted yet

    def _key(self, n: int) -> str:
        return f"{self.ns}/ops/{n // BLOCK}/{n}"

    def publish(self, n: int, data: bytes) -> None:
        """Process 0: store message ``n``; drop fully acknowledged blocks."""
        self.client.key_value_set_bytes(self._key(n), data)
        if n % BLOCK == 0 and n:
            self._collect(n // BLOCK)

    def receive(self, n: int, timeout_s: float) -> bytes | None:
        """Message ``n``, or None when it did not arrive within ``timeout_s``."""
        try:
            return self.client.blocking_key_value_get_bytes(self._key(n), max(1, int(timeout_s * 1000)))
        except Exception as e:  # the runtime raises one error type; a timeout is named in the message
            if "DEADLINE_EXCEEDED" in str(e):
                return None
            raise

    def ack(self, n: int) -> None:
        """A follower applied message ``n`` (recorded at the end of each block)."""
        if (n + 1) % BLOCK == 0:
            self.client.key_value_set(f"{self.ns}/ack/{self.process_id}", str(n), allow_overwrite=True)

    def _acked(self, pid: int) -> int:
        try:
            return int(self.client.key_value_try_get(f"{self.ns}/ack/{pid}"))
        except Exception:  # NOT_FOUND before the first acknowledgement
            return -1

    def _collect(self, current_block: int) -> None:
        done = min((self._acked(p) for p in range(1, self.num_processes)), default=10**18)
        while self._oldest_block < current_block and (self._oldest_block + 1) * BLOCK - 1 <= done:
            self.client.key_value_delete(f"{self.ns}/ops/{self._oldest_block}")
            self._oldest_block += 1


def outputs_digest(outputs) -> bytes:
    """8 bytes identifying one step's outputs (request ids, token ids, finish reasons)."""
    h = hashlib.blake2b(digest_size=8)
    for o in outputs:
        h.update(
            repr(
                (o.request_id, o.finished, [(c.index, list(c.token_ids), c.finish_reason) for c in o.outputs])
            ).encode()
        )
    return h.digest()


def _default_fatal(exc: BaseException) -> None:
    from jaxinfer.distributed import abort_on_failure

    abort_on_failure(exc)


class LeaderEngine:
    """Process 0's engine: applies every state-changing call locally and broadcasts it.

    It has the ``Engine`` interface (front ends use it as the engine); reads (``stats``,
    ``has_unfinished_requests``, ``tokenizer``, ...) go to the local engine.

    Args:
      engine: process 0's ``Engine``.
      channel: the :class:`OpChannel` to the other processes.
      seed: seed of the generator that draws seeds for requests without one.
      fatal: called with the exception of a failed step after ``fail`` was broadcast; the default exits
        the process (:func:`jaxinfer.distributed.abort_on_failure`).
    """

    def __init__(
        self,
        engine,
        channel: OpChannel,
        *,
        seed: int | None = 0,
        fatal: Callable[[BaseException], None] = _default_fatal,
    ):
        self.engine = engine
        self._channel = channel
        self._fatal = fatal
        self._rng = np.random.default_rng(seed)
        self._ops: list[tuple] = []
        self._n = 0
        self._digest = b""
        self._closed = False
        self.publish_s = 0.0  # time spent storing messages, since start
        self.num_messages = 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def add_request(
        self,
        request_id: str,
        prompt,
        sampling_params: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
        num_speculative_tokens: int | None = None,
        client: str | None = None,
    ) -> None:
        """``Engine.add_request``; a request without a seed gets one here, so every process uses it."""
        params = SamplingParams() if sampling_params is None else sampling_params
        if isinstance(params, SamplingParams) and params.seed is None:
            params = dataclasses.replace(params, seed=int(self._rng.integers(0, 2**31 - 1)))
        self.engine.add_request(
            request_id, prompt, params, arrival_time=arrival_time, num_speculative_tokens=num_speculative_tokens,
            client=client,
        )
        self._ops.append(("add", request_id, prompt, params, num_speculative_tokens, client))

    def abort_request(self, request_id: str) -> bool:
        aborted = self.engine.abort_request(request_id)
        if aborted:
            self._ops.append(("abort", request_id))
        return aborted

    def flush_prefix_cache(self) -> int:
        self._ops.append(("flush",))
        return self.engine.flush_prefix_cache()

    def step(self, exclude: Collection[str] = ()):
        """Broadcast the pending operations and this step, then run it here (the others run it too)."""
        self._publish(("step", tuple(sorted(exclude))))
        try:
            outputs = self.engine.step(exclude=exclude)
        except Exception as e:
            self._fail(e)
            raise
        self._digest = outputs_digest(outputs)
        return outputs

    def close(self) -> None:
        """Tell the other processes to stop (after the last step)."""
        if not self._closed:
            self._publish(("stop",))

    def _fail(self, exc: BaseException) -> None:
        try:
            self._publish(("fail", f"{type(exc).__name__}: {exc}"[:2000]))
        except Exception:  # the store may be what failed; the runtime's heartbeats then end the others
            logger.exception("could not tell the other processes that process 0 failed")
        self._fatal(exc)

    def _publish(self, last: tuple) -> None:
        if self._closed:
            raise RuntimeError("the serving group was stopped")
        ops, self._ops = [*self._ops, last], []
        t = time.perf_counter()
        self._channel.publish(self._n, pickle.dumps((self._digest, ops), protocol=pickle.HIGHEST_PROTOCOL))
        self.publish_s += time.perf_counter() - t
        self.num_messages += 1
        self._n += 1
        self._closed = last[0] in ("stop", "fail")


def follow(engine, channel: OpChannel, *, poll_s: float = 10.0) -> int:
    """Repeat process 0's operations on ``engine`` until it stops; return the number of steps run.

    Raises:
      DivergenceError: this engine's outputs or admissions differ from process 0's.
      RuntimeError: process 0 reported a failed step.
      Whatever the runtime raises when the store or a collective fails (another process died).
    """
    n, digest, steps = 0, b"", 0
    while True:
        data = channel.receive(n, poll_s)
        if data is None:
            logger.debug("idle: no message %d after %.0f s", n, poll_s)
            continue
        prev, ops = pickle.loads(data)
        if ops and ops[-1][0] == "fail":  # process 0's step failed (so its digest is not of that step)
            raise RuntimeError(f"process 0's engine step failed ({ops[-1][1]}); the serving group stops")
        if prev != digest:
            raise DivergenceError(
                f"process {channel.process_id}'s step {steps} outputs differ from process 0's "
                "(the processes' engines diverged)"
            )
        for op in ops:
            kind = op[0]
            if kind == "add":
                _, rid, prompt, params, k, client = op
                try:
                    engine.add_request(rid, prompt, params, num_speculative_tokens=k, client=client)
                except JaxinferError as e:
                    raise DivergenceError(f"request {rid} was accepted by process 0 but refused here: {e}") from e
            elif kind == "abort":
                engine.abort_request(op[1])
            elif kind == "flush":
                engine.flush_prefix_cache()
            elif kind == "step":
                digest = outputs_digest(engine.step(exclude=op[1]))
                steps += 1
            elif kind == "stop":
                return steps
            else:
                raise DivergenceError(f"unknown operation {kind!r} from process 0")
        channel.ack(n)
        n += 1
