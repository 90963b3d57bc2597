"""``/metrics`` parses with prometheus_client and moves as expected; the gRPC server streams, reports
errors as status codes, and a cancelled call frees the request's pages."""

from __future__ import annotations

import grpc
import httpx
import pytest

from serve.protos import jaxinfer_pb2 as pb
from serve.protos import jaxinfer_pb2_grpc as pb_grpc
from tests.serve.conftest import scrape, wait_for
from tests.serve.fake_engine import FakeTokenizer, fake_completion

TOK = FakeTokenizer()


def _ids(text: str) -> list[int]:
    return TOK(text)["input_ids"]


def test_metrics_move(make_server):
    srv = make_server({"step_delay": 0.001})
    url = srv.http_url
    before = scrape(url)
    prompts = ["one", "three", "fifteen chars.."]
    with httpx.Client(base_url=url) as c:
        for p in prompts:
            assert c.post("/v1/completions", json={"prompt": p, "max_tokens": 5}).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": -5}).status_code == 400
    after = scrape(url)

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("jaxinfer:prompt_tokens_total") == sum(len(_ids(p)) for p in prompts)
    assert delta("jaxinfer:generation_tokens_total") == 15
    assert delta("jaxinfer:request_success_total{finished_reason=length}") == 3
    assert delta("jaxinfer:request_errors_total{status=400}") == 1
    for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert delta(f"jaxinfer:{hist}_count") == 3
        assert delta(f"jaxinfer:{hist}_sum") > 0
    assert delta("jaxinfer:request_generation_tokens_sum") == 15
    assert delta("jaxinfer:engine_step_duration_seconds_count") >= 5
    assert after["jaxinfer:num_requests_running"] == 0 and after["jaxinfer:num_requests_waiting"] == 0
    assert after["jaxinfer:kv_cache_pages_used"] == 0
    assert after["jaxinfer:kv_cache_pages_free"] == after["jaxinfer:kv_cache_pages_total"] == 1024
    assert 0 <= after["jaxinfer:prefix_cache_hit_rate"] <= 1
    assert after["jaxinfer:prefix_cache_pages"] == 0 and after["jaxinfer:prefix_cache_evictions_total"] == 0
    assert httpx.get(url + "/metrics").headers["content-type"].startswith("text/plain")


@pytest.fixture(scope="module")
def stub(fake_server):
    with grpc.insecure_channel(fake_server.grpc_target) as channel:
        yield pb_grpc.InferenceStub(channel)


def test_grpc_health(stub):
    h = stub.Health(pb.HealthRequest(), timeout=10)
    assert h.ok and h.status == "ok" and h.model == "fake-model"


def test_grpc_generate_text(stub):
    req = pb.GenerateRequest(text="grpc hello", sampling=pb.SamplingParameters(max_tokens=12))
    msgs = list(stub.Generate(req, timeout=30))
    assert "".join(m.text for m in msgs) == fake_completion(_ids("grpc hello"), 12)
    assert [t for m in msgs for t in m.token_ids] == _ids(fake_completion(_ids("grpc hello"), 12))
    assert msgs[-1].finish_reason == "length" and all(not m.finish_reason for m in msgs[:-1])
    assert (msgs[-1].usage.prompt_tokens, msgs[-1].usage.completion_tokens) == (10, 12)
    assert len({m.request_id for m in msgs}) == 1


def test_grpc_token_ids_n_and_logprobs(stub):
    sp = pb.SamplingParameters(max_tokens=4, n=2, temperature=0.9, seed=7, logprobs=2)
    msgs = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=_ids("ids")), sampling=sp), timeout=30))
    by_index = {0: [], 1: []}
    for m in msgs:
        by_index[m.index].append(m)
        assert len(m.logprobs) == len(m.token_ids)
        for lp, t in zip(m.logprobs, m.token_ids):
            assert lp.token_id == t and len(lp.top) == 2
    assert all(sum(len(m.token_ids) for m in ms) == 4 for ms in by_index.values())
    assert msgs[-1].usage.completion_tokens == 8


@pytest.mark.parametrize("req,code,needle", [
    (pb.GenerateRequest(text="x", sampling=pb.SamplingParameters(temperature=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingParameters(top_p=2)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (pb.GenerateRequest(sampling=pb.SamplingParameters()), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(text=""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (pb.GenerateRequest(text="x" * 600), grpc.StatusCode.INVALID_ARGUMENT, "context length"),
    (pb.GenerateRequest(text="x", sampling=pb.SamplingParameters(max_tokens=10**6)),
     grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 100000])), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(text="x", model="gpt-17"), grpc.StatusCode.NOT_FOUND, "gpt-17"),
])
def test_grpc_errors(stub, req, code, needle):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req, timeout=30))
    assert e.value.code() == code
    assert needle in e.value.details()


def test_grpc_cancel_frees_pages(make_server):
    srv = make_server({"step_delay": 0.01}, grpc=True)
    with grpc.insecure_channel(srv.grpc_target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        done = list(stub.Generate(pb.GenerateRequest(text="short", sampling=pb.SamplingParameters(max_tokens=3))))
        assert done[-1].finish_reason == "length"
        call = stub.Generate(pb.GenerateRequest(text="long", sampling=pb.SamplingParameters(max_tokens=400)))
        first = [next(call) for _ in range(3)]
        assert all(m.token_ids for m in first)
        assert scrape(srv.http_url)["jaxinfer:kv_cache_pages_used"] > 0
        call.cancel()
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.CANCELLED

        def freed():
            m = scrape(srv.http_url)
            return (m["jaxinfer:kv_cache_pages_used"] == 0 and m["jaxinfer:num_requests_running"] == 0
                    and srv.async_engine.in_flight == 0)

        wait_for(freed, timeout=3)
        assert scrape(srv.http_url)["jaxinfer:request_success_total{finished_reason=abort}"] == 1
        assert srv.fake.step_calls < 300


def test_grpc_queue_full(make_server):
    srv = make_server({"step_delay": 0.01, "max_num_seqs": 1}, grpc=True, max_waiting_requests=0)
    with grpc.insecure_channel(srv.grpc_target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        call = stub.Generate(pb.GenerateRequest(text="hog", sampling=pb.SamplingParameters(max_tokens=400)))
        next(call)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(text="more"), timeout=10))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        call.cancel()
