"""Greedy decode speed on the default model: jaxinfer beside HF transformers, same machine, same prompts.

Reports, at batch 1 and batch 32 (configurable): decode tokens/s (tokens after the first, over the time
after the first token), end-to-end output tokens/s, the jaxinfer / HF ratio, and the batch-1 memory
roofline: decoding one token reads every weight once, so tok/s <= read bandwidth / weight bytes, with
the read bandwidth measured here. Writes a JSON record to ``bench/results/``.

Usage: ``python bench/decode.py [--batches 1 32] [--new-tokens 64] [--skip-hf]``
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from machine import machine_info, result_path

PROMPT = "Write a short story about a robot who learns to paint."


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Best-of-N numpy read (sum) and copy bandwidth in GB/s over a ``nbytes`` buffer."""
    a = np.ones(nbytes // 8, np.float64)
    b = np.empty_like(a)
    read, copy = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        read.append(nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        np.copyto(b, a)
        copy.append(2 * nbytes / (time.perf_counter() - t) / 1e9)  # read + write
    return {"read_GBps": max(read), "copy_GBps": max(copy)}


def bench_jaxinfer(batch: int, new_tokens: int) -> dict:
    from jaxinfer import LLM, SamplingParams

    llm = getattr(bench_jaxinfer, "llm", None)
    if llm is None:
        # a budget that prefills all batch-32 prompts in one step, so every first token lands together
        llm = bench_jaxinfer.llm = LLM(max_num_batched_tokens=2048)
        llm.engine.warmup()  # compiles every step bucket: the timed runs never compile
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    prompts = [[{"role": "user", "content": PROMPT}]] * batch
    llm.chat(prompts, sp)  # warm-up run
    llm.engine.flush_prefix_cache()  # the timed run prefills its prompt, as HF does
    t = time.perf_counter()
    outs = llm.chat(prompts, sp)
    total = time.perf_counter() - t
    first = min(o.metrics.first_token_time for o in outs)
    end = max(o.metrics.finish_time for o in outs)
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"decode_tok_s": (n - batch) / (end - first), "e2e_tok_s": n / total,
            "weight_bytes": llm.config.num_params() * 4, "sample": outs[0].outputs[0].text[:80]}


def bench_hf(batch: int, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from jaxinfer.model_registry import resolve_model
    from jaxinfer.tokenizer import encode_chat, load_tokenizer

    src = resolve_model(None)
    tok = load_tokenizer(src)
    model = bench_hf.model = getattr(bench_hf, "model", None) or AutoModelForCausalLM.from_pretrained(
        str(src.path.parent), gguf_file=src.path.name, dtype=torch.float32).eval()
    ids = torch.tensor([encode_chat(tok, [{"role": "user", "content": PROMPT}])] * batch)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.no_grad():
            t = time.perf_counter()
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=tok.pad_token_id or 0)
            return time.perf_counter() - t

    run(2)  # warm-up
    prefill = run(1)
    total = run(new_tokens)
    return {"decode_tok_s": batch * (new_tokens - 1) / (total - prefill), "e2e_tok_s": batch * new_tokens / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    bw = measure_read_bandwidth()
    rows = []
    for b in args.batches:
        ours = bench_jaxinfer(b, args.new_tokens)
        hf = None if args.skip_hf else bench_hf(b, args.new_tokens)
        row = {"batch": b, "jaxinfer": ours, "hf_transformers": hf}
        if hf:
            row["decode_ratio_vs_hf"] = ours["decode_tok_s"] / hf["decode_tok_s"]
        if b == 1:
            row["roofline_tok_s"] = bw["read_GBps"] * 1e9 / ours["weight_bytes"]
            row["fraction_of_roofline"] = ours["decode_tok_s"] / row["roofline_tok_s"]
        rows.append(row)
        hf_txt = f"HF {hf['decode_tok_s']:.1f} tok/s, ratio {row['decode_ratio_vs_hf']:.2f}x" if hf else ""
        roof = (f", roofline {row['roofline_tok_s']:.1f} tok/s ({100 * row['fraction_of_roofline']:.0f}%)"
                if b == 1 else "")
        print(f"batch {b:3d}: jaxinfer decode {ours['decode_tok_s']:.1f} tok/s "
              f"(e2e {ours['e2e_tok_s']:.1f}); {hf_txt}{roof}")
    record = {"benchmark": "decode", "model": "smollm2-135m-instruct (GGUF Q4_1 dequantized to f32)",
              "new_tokens": args.new_tokens, "bandwidth": bw, "machine": machine_info(), "results": rows}
    path = result_path("decode")
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
