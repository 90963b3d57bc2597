"""The peer for ``bench/serving.py``: the same requests through the engine in-process (no HTTP, no
threads), with the same concurrency limit, so the served numbers can be read as a ratio to what the
engine alone delivers on this machine."""

from __future__ import annotations

import time

from serving_load import Request, Result


def run_offline(requests: list[Request], concurrency: int, engine_options: dict, model: str | None = None
                ) -> tuple[list[Result], float]:
    """Run ``requests`` (all arrived at t=0) keeping at most ``concurrency`` in the engine.

    Returns per-request results (TTFT / e2e from the engine's own timings; ITL from step boundaries)
    and the wall time.
    """
    from jaxinfer.config import EngineConfig
    from jaxinfer.engine_factory import create_engine
    from jaxinfer.sampling_params import SamplingParams

    engine = create_engine(model, EngineConfig(**engine_options))
    engine.warmup()
    pending = list(enumerate(requests))
    results = [Result(ok=False, prompt_len=len(r.prompt)) for r in requests]
    last: dict[int, float] = {}
    start = time.perf_counter()
    running = 0
    while pending or engine.has_unfinished_requests():
        while pending and running < concurrency:
            i, req = pending.pop(0)
            sp = SamplingParams(max_tokens=req.output_len, temperature=0, ignore_eos=True)
            engine.add_request(str(i), req.prompt, sp, arrival_time=time.perf_counter())
            running += 1
        for out in engine.step():
            i = int(out.request_id)
            res = results[i]
            now = time.perf_counter()
            if out.outputs and out.outputs[0].token_ids:
                if i in last:
                    res.itl.append(now - last[i])
                last[i] = now
            if out.finished:
                running -= 1
                m = out.metrics
                res.ok = True
                res.output_tokens = m.num_generated_tokens
                res.ttft = m.first_token_time - m.arrival_time
                res.e2e = m.finish_time - m.arrival_time
    return results, time.perf_counter() - start
