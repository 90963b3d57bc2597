"""One request cannot break or starve the others (issue 25): a request whose inputs make the engine step
fail fails alone; every numeric field is validated against what the engine represents; stop strings and
``n`` are bounded and cheap; scheduling is fair across requests."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import httpx
import pytest

from jaxinfer.detokenizer import IncrementalDetokenizer
from jaxinfer.sampling import SamplingTensors
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import Scheduler, SchedulerConfig
from jaxinfer.sequence import Sequence
from serve.protos import jaxinfer_pb2 as pb
from serve.protos import jaxinfer_pb2_grpc as pb_grpc
from tests.serve.conftest import scrape, wait_for
from tests.serve.fake_engine import FakeEngine, FakeTokenizer, fake_completion


def _stream(url: str, body: dict, out: dict) -> None:
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        out["status"] = r.status_code
        out["events"] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def _text(events: list[str]) -> str:
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])


class BuildsSamplingTensors(FakeEngine):
    """A fake whose step packs its batch's SamplingParams into the engine's int32 / float32 sampling
    arrays, as the real engine does: a parameter the arrays cannot hold raises inside the step."""

    def step(self, exclude=()):
        batch = [r for r in self._running + self._waiting[: max(self.max_num_seqs - len(self._running), 0)]
                 if r.rid not in exclude]
        if batch:
            SamplingTensors.build([r.sp for r in batch], seeds=[0] * len(batch), steps=[0] * len(batch),
                                  num_rows=len(batch))
        return super().step(exclude)


def _smuggled(**fields) -> SamplingParams:
    """SamplingParams with values validation now refuses (what passed validation before issue 25)."""
    sp = SamplingParams(max_tokens=8, temperature=0)
    for k, v in fields.items():
        object.__setattr__(sp, k, v)
    return sp


@pytest.mark.parametrize("fields", [{"top_k": 2**31}, {"stop_token_ids": (2**31,), "min_tokens": 2}],
                         ids=["top_k", "stop_token_ids"])
def test_a_request_that_breaks_the_step_fails_alone(make_server, fields):
    srv = make_server(engine=BuildsSamplingTensors(step_delay=0.004, max_num_seqs=8))
    others = [{} for _ in range(2)]
    threads = [threading.Thread(target=_stream, args=(srv.http_url, {"prompt": f"other {i}", "max_tokens": 120,
                                                                     "temperature": 0}, others[i]))
               for i in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: srv.async_engine.in_flight == 2)
    for _ in range(3):  # three in a row used to turn /health to 503 and end every other stream
        async def bad():
            stream = srv.async_engine.submit([104, 105], _smuggled(**fields))
            await stream.wait_accepted()
            with pytest.raises(Exception) as err:
                async for _ in stream:
                    pass
            return err.value

        err = asyncio.run_coroutine_threadsafe(bad(), srv._loop).result(30)
        assert err.status == 400 and err.code == "request_failed" and "OverflowError" in err.message
        assert httpx.get(srv.http_url + "/health").status_code == 200
    for t in threads:
        t.join(60)
    for i, out in enumerate(others):
        assert out["status"] == 200 and out["events"][-1] == "[DONE]"
        assert _text(out["events"]) == fake_completion(FakeTokenizer()(f"other {i}")["input_ids"], 120)
    assert srv.async_engine._loop_thread.isolated_failures == 3
    wait_for(lambda: srv.async_engine.in_flight == 0)


def test_monkeypatched_step_failing_for_one_request(make_server):
    srv = make_server({"step_delay": 0.003})
    out: dict = {}
    t = threading.Thread(target=_stream, args=(srv.http_url, {"prompt": "steady", "max_tokens": 150,
                                                              "temperature": 0}, out))
    t.start()
    wait_for(lambda: srv.async_engine.in_flight == 1)
    for _ in range(3):
        r = httpx.post(srv.http_url + "/v1/completions", json={"prompt": "[fail] me", "max_tokens": 4}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "request_failed"
        assert httpx.get(srv.http_url + "/health").json()["status"] == "ok"
    t.join(60)
    assert out["events"][-1] == "[DONE]"
    assert _text(out["events"]) == fake_completion(FakeTokenizer()("steady")["input_ids"], 150)
    assert "jaxinfer:request_errors_total{status=500}" not in scrape(srv.http_url)


def test_grpc_fields_validated_like_http(make_server):
    srv = make_server({"step_delay": 0.001}, grpc=True)
    cases = [
        (pb.SamplingParameters(max_tokens=4, stop_token_ids=[-1]), "stop_token_ids"),
        (pb.SamplingParameters(max_tokens=4, min_tokens=2**31), "min_tokens"),
        (pb.SamplingParameters(max_tokens=4, min_tokens=5), "min_tokens"),
        (pb.SamplingParameters(max_tokens=4, n=1000), "n"),
        (pb.SamplingParameters(max_tokens=4, top_k=-2), "top_k"),
        (pb.SamplingParameters(max_tokens=4, temperature=1e39), "temperature"),
        (pb.SamplingParameters(max_tokens=4, stop=["x"] * 10_000), "stop"),
        (pb.SamplingParameters(max_tokens=4, stop=["y" * 300] * 20), "stop"),
    ]
    with grpc.insecure_channel(srv.grpc_target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        for sp, field in cases:
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(pb.GenerateRequest(text="hi", sampling=sp), timeout=10))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, e.value.details())
            assert field in e.value.details(), (field, e.value.details())
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, -5])), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A malformed message is INVALID_ARGUMENT, without a Python exception class in the message.
        raw = ch.unary_stream("/jaxinfer.v1.Inference/Generate", request_serializer=lambda b: b,
                              response_deserializer=pb.GenerateResponse.FromString)
        for junk in (b"\xff\xff\xff", b"\x12\x05ab"):  # bad tag; truncated string
            with pytest.raises(grpc.RpcError) as e:
                list(raw(junk, timeout=10))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert "Error" not in e.value.details()
        health = ch.unary_unary("/jaxinfer.v1.Inference/Health", request_serializer=lambda b: b,
                                response_deserializer=pb.HealthResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            health(b"\xff\xff\xff", timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ok = list(stub.Generate(pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(max_tokens=3)),
                                timeout=10))
        assert ok[-1].finish_reason == "length"


def test_worst_allowed_stop_strings_cost_per_new_text():
    """64 stop strings totalling 4096 bytes (the server's limits) over a 7950-token output: matching costs
    time per new character, not output length x stop strings x stop length (seconds before)."""
    stops = ["q" * 3900 + "!"] + [f"{chr(0x400 + i)}zz" for i in range(63)]
    tok = FakeTokenizer()
    detok = IncrementalDetokenizer(tok, stop=stops)
    t = time.perf_counter()
    for _ in range(4000):  # text no stop string starts with: shown at once
        assert detok.update([ord("a")]).text == "a"
    shown = []
    for _ in range(3950):
        shown.append(detok.update([ord("q")]).text)
    elapsed = time.perf_counter() - t
    assert "".join(shown) == "q" * 50, "the last 3900 'q' may still become the first stop string: held back"
    last = detok.update([ord("!")])
    assert last.stop_string == stops[0] and last.text == "" and detok.output_text == "a" * 4000 + "q" * 50
    assert elapsed < 0.6, f"{elapsed:.2f} s for 7950 steps (the old matcher: ~3 s)"


def test_admission_counts_sequences(make_server):
    srv = make_server({"step_delay": 0.005, "max_num_seqs": 2}, max_num_seqs=2, max_waiting_requests=2)
    r = httpx.post(srv.http_url + "/v1/completions", json={"prompt": "x", "n": 5, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # more than the server ever admits
    out: dict = {}
    t = threading.Thread(target=_stream, args=(srv.http_url, {"prompt": "x", "n": 3, "max_tokens": 100}, out))
    t.start()
    wait_for(lambda: srv.async_engine.seqs_in_flight == 3)
    r = httpx.post(srv.http_url + "/v1/completions", json={"prompt": "y", "n": 2, "max_tokens": 2})
    assert r.status_code == 429  # 3 + 2 sequences > 2 + 2 (it counted 1 + 1 requests before)
    assert httpx.post(srv.http_url + "/v1/completions", json={"prompt": "y", "max_tokens": 2}).status_code == 200
    t.join(60)


def _run(sched: Scheduler, steps: int, watch: str) -> int | None:
    """Step the scheduler (every row samples token 5); the step at which ``watch`` first ran."""
    for step in range(steps):
        out = sched.schedule()
        if any(r.seq.group == watch for r in out.scheduled):
            return step
        sched.update(out, [5] * len(out.scheduled))
    return None


@pytest.mark.parametrize("n", [32, 64])
def test_n_samples_do_not_starve_a_concurrent_request(n):
    """A request with n=32 (or 64) samples on an engine with 32 slots: a normal request that arrives
    next runs at once instead of waiting for all of them to finish (max_tokens steps: ~100 s in the issue)."""
    cfg = SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=32, max_model_len=2048, num_pages=4096,
                          page_size=16)
    sched = Scheduler(cfg)
    big = SamplingParams(n=n, max_tokens=1000, ignore_eos=True)
    for i in range(n):
        sched.add(Sequence(f"{i}:big", [1, 2, 3, 4], big, group="big"))
    sched.update(sched.schedule(), [5] * 32)  # the big request is running
    assert sum(s.group == "big" for s in sched.running) == 16  # default cap: half of max_num_seqs
    sched.add(Sequence("0:small", [7, 8, 9], SamplingParams(max_tokens=10), group="small"))
    assert _run(sched, 3, "small") == 0
    # With nobody else waiting, the big request is still held to its cap (configurable) ...
    solo = Scheduler(SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=32, max_model_len=2048,
                                     num_pages=4096, page_size=16, max_running_seqs_per_request=32))
    for i in range(n):
        solo.add(Sequence(f"{i}:big", [1, 2, 3, 4], big, group="big"))
    solo.update(solo.schedule(), [5] * 32)
    assert len(solo.running) == 32  # ... which an operator may raise to every slot


def test_fair_share_between_big_requests():
    cfg = SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=32, max_model_len=2048, num_pages=4096,
                          page_size=16)
    sched = Scheduler(cfg)
    for g in ("a", "b", "c"):
        for i in range(32):
            sched.add(Sequence(f"{i}:{g}", [1, 2, 3], SamplingParams(n=32, max_tokens=1000), group=g))
    sched.schedule()
    counts = {g: sum(s.group == g for s in sched.running) for g in "abc"}
    assert counts == {"a": 11, "b": 11, "c": 10}, counts
