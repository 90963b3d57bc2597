"""The serving group's operation broadcast in one process: a leader engine and a follower engine joined
by an in-memory key-value store with the runtime store's semantics. The follower's steps must produce
exactly the leader's outputs (seeds drawn by the leader included), a follower that drifted must stop
with an error, and the store must not grow without bound. (tests/test_multihost_serve.py runs the same
code across real processes.)"""

from __future__ import annotations

import threading

import pytest

from jaxinfer.config import EngineConfig
from jaxinfer.engine import Engine
from jaxinfer.engine_mirror import BLOCK, DivergenceError, LeaderEngine, OpChannel, follow
from jaxinfer.loader import load_model
from jaxinfer.sampling_params import SamplingParams


class MemoryStore:
    """The runtime key-value store's calls (blocking get with a timeout, delete of a key and its subtree)."""

    def __init__(self):
        self.data: dict[str, object] = {}
        self._cond = threading.Condition()

    def key_value_set_bytes(self, key, value, allow_overwrite=False):
        self.key_value_set(key, value, allow_overwrite)

    def key_value_set(self, key, value, allow_overwrite=False):
        with self._cond:
            if key in self.data and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self.data[key] = value
            self._cond.notify_all()

    def blocking_key_value_get_bytes(self, key, timeout_in_ms):
        with self._cond:
            if not self._cond.wait_for(lambda: key in self.data, timeout_in_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
            return self.data[key]

    def key_value_try_get(self, key):
        with self._cond:
            if key not in self.data:
                raise RuntimeError(f"NOT_FOUND: {key}")
            return self.data[key]

    def key_value_delete(self, key):
        with self._cond:
            for k in [k for k in self.data if k == key or k.startswith(key + "/")]:
                del self.data[k]


class Recording:
    """An engine whose step outputs are recorded as (request id, sample, token ids, finish reason)."""

    def __init__(self, engine):
        self.engine = engine
        self.steps = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self, exclude=()):
        outs = self.engine.step(exclude=exclude)
        self.steps.append(
            sorted((o.request_id, c.index, tuple(c.token_ids), c.finish_reason) for o in outs for c in o.outputs)
        )
        return outs


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    path, _ = tiny_model_dir("llama")
    return load_model(str(path))


def _engine(loaded, **kw):
    return Engine(loaded, EngineConfig(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, page_size=8, **kw))


def _group(loaded, follower_engine=None):
    store = MemoryStore()
    leader_rec = Recording(_engine(loaded))
    follower_rec = Recording(follower_engine or _engine(loaded, seed=123))  # its own seed must not matter
    leader = LeaderEngine(leader_rec, OpChannel(store, 0, 2), seed=7, fatal=lambda e: None)
    result = {}

    def run():
        try:
            result["steps"] = follow(follower_rec, OpChannel(store, 1, 2), poll_s=0.05)
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return store, leader, leader_rec, follower_rec, thread, result


def test_follower_repeats_the_leaders_steps(loaded):
    store, leader, leader_rec, follower_rec, thread, result = _group(loaded)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    leader.add_request("a", "The capital of France", greedy)
    leader.add_request("b", [5, 6, 7, 8], SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True))  # no seed
    leader.add_request("c", "Once upon", SamplingParams(max_tokens=8, temperature=0.8, seed=3, n=2, ignore_eos=True))
    leader.add_request(
        "g", "Count:", SamplingParams(max_tokens=6, temperature=0.7, structured_outputs={"regex": "[0-9]+"})
    )  # host-side grammar matcher in lock-step too
    with pytest.raises(ValueError):  # refused by the leader: never broadcast
        leader.add_request("bad", [], greedy)
    for _ in range(3):
        leader.step()
    assert leader.abort_request("a")
    leader.add_request("d", "Paris", greedy)
    leader.step(exclude={"d"})
    while leader.has_unfinished_requests():
        leader.step()
    leader.close()
    thread.join(30)
    assert not thread.is_alive() and "error" not in result, result
    assert result["steps"] == len(leader_rec.steps) == len(follower_rec.steps)
    assert follower_rec.steps == leader_rec.steps
    produced = {rid for step in leader_rec.steps for rid, *_ in step}
    assert produced == {"a", "b", "c", "d", "g"}
    assert leader.num_messages == len(leader_rec.steps) + 1


def test_drifted_follower_stops_with_an_error(loaded):
    drifted = _engine(loaded)
    drifted.add_request("extra", "Hello", SamplingParams(max_tokens=4, temperature=0))  # not process 0's
    store, leader, _, _, thread, result = _group(loaded, drifted)
    leader.add_request("a", "The capital", SamplingParams(max_tokens=4, temperature=0))
    leader.step()
    leader.step()  # carries the digest of the first step
    thread.join(30)
    assert isinstance(result.get("error"), DivergenceError), result


def test_failed_leader_step_is_broadcast_and_fatal(loaded):
    store, leader, leader_rec, _, thread, result = _group(loaded)
    fatal = []
    leader._fatal = fatal.append
    leader.add_request("a", "The capital", SamplingParams(max_tokens=4, temperature=0))

    def broken(exclude=()):
        raise RuntimeError("gloo: connection closed by peer")

    leader_rec.step = broken
    with pytest.raises(RuntimeError):
        leader.step()
    thread.join(30)
    assert len(fatal) == 1
    assert "process 0's engine step failed" in str(result.get("error")), result
    with pytest.raises(RuntimeError, match="stopped"):
        leader.step()


def test_channel_drops_acknowledged_blocks_and_times_out():
    store = MemoryStore()
    leader, follower = OpChannel(store, 0, 2), OpChannel(store, 1, 2)
    assert follower.receive(0, 0.01) is None
    for n in range(3 * BLOCK + 1):
        leader.publish(n, b"m%d" % n)
        if n < 2 * BLOCK:  # the follower read the first two blocks only
            assert follower.receive(n, 1) == b"m%d" % n
            follower.ack(n)
    blocks = {k.split("/")[3] for k in store.data if "/ops/" in k}
    assert blocks == {"2", "3"}, sorted(blocks)  # blocks 0 and 1 acknowledged and deleted; 2 not read yet
