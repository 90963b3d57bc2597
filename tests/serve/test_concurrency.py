"""Concurrency over a FakeEngine: 64 concurrent streams stay independent; a burst over the queue limit
gets clean 429s, with no request lost or duplicated."""

from __future__ import annotations

import asyncio

import httpx

from tests.serve.conftest import scrape
from tests.serve.fake_engine import FakeTokenizer, fake_completion
from tests.serve.sse_client import stream_request

TOK = FakeTokenizer()


def _ids(text: str) -> list[int]:
    return TOK(text)["input_ids"]


def test_64_concurrent_streams_are_independent(make_server):
    srv = make_server({"max_num_seqs": 16, "step_delay": 0.002}, max_waiting_requests=64)
    prompts = [f"request {i}: " + "word " * (i % 7) for i in range(64)]
    lengths = [5 + i % 11 for i in range(64)]

    async def main():
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=srv.http_url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*[
                stream_request(client, "/v1/completions", {"prompt": p, "max_tokens": n, "temperature": 0,
                                                           "stream_options": {"include_usage": True}})
                for p, n in zip(prompts, lengths)])

    results = asyncio.run(main())
    for p, n, r in zip(prompts, lengths, results):
        assert r["status"] == 200 and r["done"] and r["error"] is None
        assert r["text"] == fake_completion(_ids(p), n)
        assert r["finish_reason"] == "length"
        assert r["usage"] == {"prompt_tokens": len(_ids(p)), "completion_tokens": n, "total_tokens": len(_ids(p)) + n}
    assert srv.fake.added == 64
    assert srv.async_engine.in_flight == 0


def test_burst_over_queue_limit_gets_429(make_server):
    srv = make_server({"max_num_seqs": 4, "step_delay": 0.01}, max_num_seqs=4, max_waiting_requests=4)
    n = 40

    async def one(client, i):
        body = {"prompt": f"burst {i}", "max_tokens": 8, "temperature": 0}
        if i % 2:
            return await stream_request(client, "/v1/completions", body)
        r = await client.post("/v1/completions", json=body)
        data = r.json()
        if r.status_code != 200:
            return {"status": r.status_code, "error": data["error"]}
        return {"status": 200, "text": data["choices"][0]["text"], "finish_reason": data["choices"][0]["finish_reason"]}

    async def main():
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=srv.http_url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*[one(client, i) for i in range(n)])

    before = scrape(srv.http_url)
    results = asyncio.run(main())
    ok = [i for i, r in enumerate(results) if r["status"] == 200]
    rejected = [i for i, r in enumerate(results) if r["status"] == 429]
    assert len(ok) + len(rejected) == n
    assert len(ok) >= 8 and rejected
    for i in ok:
        assert results[i]["text"] == fake_completion(_ids(f"burst {i}"), 8)
        assert results[i]["finish_reason"] == "length"
    for i in rejected:
        err = results[i]["error"]
        assert (err["type"], err["code"]) == ("rate_limit_error", "queue_full")
    # Every admitted request ran exactly once; rejected ones never reached the engine.
    assert srv.fake.added == len(ok)
    after = scrape(srv.http_url)
    key = "jaxinfer:request_success_total{finished_reason=length}"
    assert after[key] - before.get(key, 0) == len(ok)
    assert after["jaxinfer:request_rejected_total{reason=queue_full}"] >= len(rejected)
    assert srv.async_engine.in_flight == 0
    r = httpx.post(srv.http_url + "/v1/completions", json={"prompt": "after", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
