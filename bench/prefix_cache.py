"""Prefix caching on vs off on the default model, one run, same shared-prefix workload.

Workload (fixed seed): ``--groups`` groups x ``--per-group`` prompts; each group shares a system prompt of
``--system-len`` tokens, each prompt adds a distinct question of ``--question-len`` tokens; ``--output-len``
output tokens (greedy, EOS ignored). All requests are submitted at once; requests of a group are adjacent.
``--max-num-seqs`` defaults to 128 so every request may join the batch at once (as under vLLM's default of
256 sequences); both settings run with the same engine settings, so without the cache the KV budget, not the
sequence limit, decides how many run together.
Reports TTFT (mean / p50 / p99), total time, output tokens/s and the prefix-cache hit rate for both
settings, and the ratios. Writes JSON to ``bench/results/``.

Usage: ``python bench/prefix_cache.py [--groups 16 --per-group 8 --system-len 512 --output-len 64 --max-num-seqs 128]``
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from machine import machine_info, result_path


def workload(args) -> list[list[int]]:
    rng = np.random.default_rng(0)
    prompts = []
    for _ in range(args.groups):
        system = rng.integers(100, 49152, size=args.system_len).tolist()
        for _ in range(args.per_group):
            prompts.append(system + rng.integers(100, 49152, size=args.question_len).tolist())
    return prompts


def run(loaded, prompts, args, enable: bool) -> dict:
    from jaxinfer.config import EngineConfig
    from jaxinfer.engine import Engine
    from jaxinfer.sampling_params import SamplingParams

    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=args.system_len + args.question_len + args.output_len + 16,
                       enable_prefix_caching=enable)
    eng = Engine(loaded, cfg)
    eng.warmup()
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, sp, arrival_time=start)
    ttft, n_out = {}, 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            n_out += sum(len(c.token_ids) for c in out.outputs)
            if out.request_id not in ttft and out.metrics.first_token_time is not None:
                ttft[out.request_id] = out.metrics.first_token_time - start
    total = time.perf_counter() - start
    t = np.array(list(ttft.values()))
    st = eng.stats()
    return {"ttft_mean_s": float(t.mean()), "ttft_p50_s": float(np.percentile(t, 50)),
            "ttft_p99_s": float(np.percentile(t, 99)), "total_s": total, "output_tok_s": n_out / total,
            "hit_rate": st.prefix_cache_hit_rate, "prefix_cache_hits": st.prefix_cache_hits,
            "preemptions": st.num_preemptions, "kv_capacity_tokens": st.kv_cache_capacity_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--per-group", type=int, default=8)
    ap.add_argument("--system-len", type=int, default=512)
    ap.add_argument("--question-len", type=int, default=24)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    args = ap.parse_args()

    from jaxinfer.loader import load_model

    loaded = load_model()
    prompts = workload(args)
    results = {"cache_off": run(loaded, prompts, args, False), "cache_on": run(loaded, prompts, args, True)}
    for name, r in results.items():
        print(f"{name:9s} TTFT mean {r['ttft_mean_s']:.2f} s p50 {r['ttft_p50_s']:.2f} p99 {r['ttft_p99_s']:.2f}  "
              f"total {r['total_s']:.1f} s  {r['output_tok_s']:.1f} tok/s  hit rate {r['hit_rate']:.2f}")
    ratios = {"ttft_mean_off_over_on": results["cache_off"]["ttft_mean_s"] / results["cache_on"]["ttft_mean_s"],
              "throughput_on_over_off": results["cache_on"]["output_tok_s"] / results["cache_off"]["output_tok_s"]}
    print(f"mean TTFT {ratios['ttft_mean_off_over_on']:.2f}x lower, throughput "
          f"{ratios['throughput_on_over_off']:.2f}x higher with the cache")
    record = {"benchmark": "prefix_cache", "model": "smollm2-135m-instruct", "workload": vars(args),
              "machine": machine_info(), "results": results, "ratios": ratios}
    path = result_path("prefix_cache")
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
