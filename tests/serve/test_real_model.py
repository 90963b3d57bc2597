"""The servers on the real engine and the default model (SmolLM2-135M-Instruct), loaded once.

Greedy outputs through the official ``openai`` client (streaming and not) and gRPC equal
``LLM.generate`` / ``LLM.chat``; 64 concurrent streams each equal their solo output; a cancelled gRPC
call frees its pages; bad input is answered with 400 and the server keeps serving.
"""

from __future__ import annotations

import asyncio

import grpc
import httpx
import openai
import pytest

from jaxinfer.sampling_params import SamplingParams
from serve.protos import jaxinfer_pb2 as pb
from serve.protos import jaxinfer_pb2_grpc as pb_grpc
from serve.server import ServerOptions, ServerThread
from tests.serve.conftest import scrape, wait_for
from tests.serve.sse_client import stream_request

MAX_TOKENS = 8
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "My favourite programming language is",
    "The quick brown fox",
    "In machine learning, a neural network",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of Italy?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a fruit."}],
]
# Few step shapes (token buckets 16/32/64) keep compilation short; 16 sequences run at once.
ENGINE = dict(max_model_len=512, max_num_seqs=16, max_num_batched_tokens=64, min_token_bucket=16)


@pytest.fixture(scope="module")
def real():
    """References from ``LLM`` first, then a server (HTTP + gRPC) on the same engine (used in turn)."""
    from jaxinfer import LLM

    llm = LLM(**ENGINE)
    llm.engine.warmup()  # compile the three step shapes up front (persistent compilation cache)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    solo = {p: llm.generate(p, greedy)[0].outputs[0].text for p in PROMPTS}  # one at a time
    chat = [o.outputs[0].text for o in llm.chat(CHATS, greedy)]
    srv = ServerThread(llm.engine, ServerOptions(port=0, grpc_port=0), max_num_seqs=16,
                       max_waiting_requests=128).start()
    srv.solo, srv.chat, srv.llm = solo, chat, llm
    yield srv
    srv.stop()


def _client(srv) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=srv.http_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_completions_equal_llm_generate(real):
    async def main():
        c = _client(real)
        kw = dict(model="smollm2-135m-instruct", max_tokens=MAX_TOKENS, temperature=0)

        async def streamed(p):
            return "".join([ch.choices[0].text async for ch in await c.completions.create(prompt=p, stream=True,
                                                                                          **kw)])

        plain = [c.completions.create(prompt=p, **kw) for p in PROMPTS[:3]]
        return await asyncio.gather(*plain), await asyncio.gather(*[streamed(p) for p in PROMPTS[:3]])

    plain, streamed = asyncio.run(main())
    for p, r, s in zip(PROMPTS, plain, streamed):
        assert r.choices[0].text == real.solo[p] == s
        assert r.usage.completion_tokens == MAX_TOKENS or r.choices[0].finish_reason == "stop"


def test_chat_equals_llm_chat(real):
    async def main():
        c = _client(real)
        kw = dict(model="smollm2-135m-instruct", max_tokens=MAX_TOKENS, temperature=0)

        async def streamed(m):
            chunks = [ch async for ch in await c.chat.completions.create(messages=m, stream=True, **kw)]
            return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

        plain = await asyncio.gather(*[c.chat.completions.create(messages=m, **kw) for m in CHATS])
        return plain, await asyncio.gather(*[streamed(m) for m in CHATS])

    plain, streamed = asyncio.run(main())
    assert [r.choices[0].message.content for r in plain] == real.chat == streamed


def test_64_concurrent_streams_equal_solo(real):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(64)]

    async def main():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=real.http_url, timeout=300, limits=limits) as client:
            return await asyncio.gather(*[
                stream_request(client, "/v1/completions", {"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0})
                for p in prompts])

    results = asyncio.run(main())
    for p, r in zip(prompts, results):
        assert r["status"] == 200 and r["done"] and r["error"] is None
        assert r["text"] == real.solo[p]
    assert real.async_engine.in_flight == 0


def test_grpc_stream_and_cancel_frees_pages(real):
    with grpc.insecure_channel(real.grpc_target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        msgs = list(stub.Generate(pb.GenerateRequest(text=PROMPTS[0], sampling=pb.SamplingParameters(
            max_tokens=MAX_TOKENS)), timeout=300))
        assert "".join(m.text for m in msgs) == real.solo[PROMPTS[0]]
        assert msgs[-1].usage.completion_tokens == sum(len(m.token_ids) for m in msgs)
        call = stub.Generate(pb.GenerateRequest(text="Tell me a very long story about dragons.",
                                                sampling=pb.SamplingParameters(max_tokens=400, ignore_eos=True)),
                            timeout=300)
        next(call), next(call)
        assert scrape(real.http_url)["jaxinfer:kv_cache_pages_used"] > 0
        call.cancel()

        def freed():
            m = scrape(real.http_url)
            return m["jaxinfer:kv_cache_pages_used"] == 0 and m["jaxinfer:num_requests_running"] == 0
        wait_for(freed, timeout=30)
        assert real.llm.engine.stats().num_pages_used == 0 or not real.async_engine.in_flight


def test_bad_input_on_the_real_engine(real):
    url = real.http_url + "/v1/completions"
    r = httpx.post(url, json={"prompt": "word " * 600, "max_tokens": 4}, timeout=300)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(url, json={"prompt": [1, 10**6], "max_tokens": 4}, timeout=300)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(url, json={"prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 0},
                   timeout=300)  # a real generation on a loaded 2-core machine: not a speed test
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == real.solo[PROMPTS[1]]


def test_metrics_on_the_real_engine(real):
    """Counter deltas over this test's own requests (the module's server is shared, and xdist may run
    the module's tests on different workers, so absolute values would depend on what ran before)."""
    prompt = "word " * 40  # longer than a page, so the second identical request hits the prefix cache
    before = scrape(real.http_url)
    completion_tokens = 0
    for _ in range(2):
        r = httpx.post(real.http_url + "/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS,
                                                                "temperature": 0}, timeout=300)
        assert r.status_code == 200
        completion_tokens += r.json()["usage"]["completion_tokens"]
    m = scrape(real.http_url)

    def delta(name):
        return m[name] - before.get(name, 0.0)

    assert delta("jaxinfer:prompt_tokens_total") > 0
    assert delta("jaxinfer:generation_tokens_total") == completion_tokens > 0
    assert delta("jaxinfer:prefix_cache_queries_total") > 0
    assert delta("jaxinfer:prefix_cache_hits_total") > 0
    assert 0 < m["jaxinfer:prefix_cache_hit_rate"] <= 1
    assert delta("jaxinfer:time_to_first_token_seconds_count") == 2
    assert m["jaxinfer:kv_cache_pages_total"] == real.llm.engine.stats().num_pages_total
