"""Load generation for ``bench/serving.py``: a seeded random-token dataset, an async streaming client
against ``/v1/completions``, and latency / throughput statistics.

Per request (streamed, ``stream_options.include_usage``): TTFT = first content chunk - send;
ITL = gaps between content chunks; e2e = last chunk - send; TPOT = (e2e - TTFT) / (output tokens - 1),
with output tokens from the server's ``usage``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class Request:
    prompt: list[int]
    output_len: int


@dataclass
class Result:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = math.nan
    e2e: float = math.nan
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else math.nan


def random_dataset(n: int, seed: int, input_len: tuple[int, int], output_len: int,
                   vocab: tuple[int, int]) -> list[Request]:
    """``n`` prompts of uniformly random length in ``input_len`` (inclusive) made of uniformly random token
    ids in ``[vocab[0], vocab[1])``: distinct prompts, so the prefix cache finds next to nothing."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(input_len[0], input_len[1] + 1, size=n)
    return [Request(rng.integers(vocab[0], vocab[1], size=int(k)).tolist(), output_len) for k in lens]


async def _one(client: httpx.AsyncClient, model: str, req: Request) -> Result:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    res = Result(ok=False, prompt_len=len(req.prompt))
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    res.error = obj["error"]["message"]
                    return res
                if obj.get("usage"):
                    res.output_tokens = obj["usage"]["completion_tokens"]
                if any(c.get("text") for c in obj["choices"]):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        res.error = repr(e)
        return res
    if last is not None:
        res.e2e = last - start
        res.ok = res.output_tokens > 0
    return res


async def run_load(url: str, model: str, requests: list[Request], rate: float, concurrency: int,
                   seed: int) -> tuple[list[Result], float]:
    """Send ``requests`` with Poisson arrivals at ``rate`` req/s (``inf``: all at once), at most
    ``concurrency`` in flight. Returns the results and the wall time from first send to last finish."""
    rng = np.random.default_rng(seed)
    gaps = np.zeros(len(requests)) if math.isinf(rate) else rng.exponential(1.0 / rate, size=len(requests))
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600.0), limits=limits) as client:
        async def limited(req: Request) -> Result:
            async with sem:
                return await _one(client, model, req)

        start = time.perf_counter()
        tasks = []
        for req, gap in zip(requests, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.ensure_future(limited(req)))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _stats(values: list[float]) -> dict:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64) * 1000.0
    if v.size == 0:
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}


def summarize(results: list[Result], duration: float) -> dict:
    """Latencies in ms (mean / p50 / p99) and throughputs per second."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "mean_input_tokens": in_tokens / len(ok) if ok else None,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([r.tpot for r in ok]),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2e_ms": _stats([r.e2e for r in ok]),
    }
