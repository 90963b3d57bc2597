"""Compile the engine for TPU and H100 targets on this machine (``jaxinfer compile``) and tabulate fit, memory
and roofline: the README's "Compiled for TPU and GPU" table.

Nothing runs on an accelerator: every figure is the compiler's (memory) or arithmetic (roofline =
bytes that must move per decode step / HBM bandwidth, flops / peak). Needs the aot extra and
``JAX_PLATFORMS=cpu`` (set here before jax is imported).

    python bench/compile_targets.py --out bench/results/compile-targets-2026-12-06.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
LLAMA8B = str(ROOT / "bench" / "configs" / "llama-3-8b.json")

# (label, model, target, quantization, kv cache dtype)
CASES = [
    ("SmolLM2-135M", None, "tpu-v5e-1", None, "auto"),
    ("SmolLM2-135M", None, "h100", None, "auto"),
    ("Llama-3-8B-shaped", LLAMA8B, "tpu-v5e-1", None, "auto"),
    ("Llama-3-8B-shaped", LLAMA8B, "tpu-v5e-1", "int8", "int8"),
    ("Llama-3-8B-shaped", LLAMA8B, "tpu-v5e-8", None, "auto"),
    ("Llama-3-8B-shaped", LLAMA8B, "tpu-v5e-8", "int8", "auto"),
    ("Llama-3-8B-shaped", LLAMA8B, "tpu-v6e-1", None, "auto"),
    ("Llama-3-8B-shaped", LLAMA8B, "tpu-v6e-1", "int4", "int8"),
    ("Llama-3-8B-shaped", LLAMA8B, "h100", None, "auto"),
    ("Llama-3-8B-shaped", LLAMA8B, "h100", "int8", "int8"),
]

# decode HBM traffic vs the minimum (README "Decode traffic"): all layers, batch 1 and max_num_seqs
TRAFFIC_CASES = [
    ("SmolLM2-135M", None, "tpu-v5e-1", None, "auto"),
    ("Llama-3-8B-shaped", LLAMA8B, "tpu-v6e-1", None, "auto"),
    ("Llama-3-8B-shaped", LLAMA8B, "tpu-v6e-1", "int8", "int8"),
    ("Llama-3-8B-shaped", LLAMA8B, "tpu-v5e-8", None, "auto"),
    ("Llama-3-8B-shaped", LLAMA8B, "tpu-v5e-8", "int8", "int8"),
    ("Llama-3-8B-shaped", LLAMA8B, "h100", None, "auto"),
    ("Llama-3-8B-shaped", LLAMA8B, "h100", "int8", "int8"),
]


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--page-size", type=int, default=None, help="KV page size (default: EngineConfig's)")
    p.add_argument("--buckets", default="smallest", choices=("all", "decode", "smallest"))
    p.add_argument("--traffic", action="store_true", help="only the decode-traffic cases (SmolLM2 on tpu-v5e-1; "
                   "Llama-3-8B-shaped on tpu-v6e-1 / v5e-8 / h100, bf16 and int8 weights + int8 KV) with "
                   "--buckets decode")
    p.add_argument("--cases", default=None, help="comma-separated indices into the case list (default: all); "
                   "rows are appended to --out when it exists")
    args = p.parse_args()

    from jaxinfer.aot import compile_for_target
    from jaxinfer.config import EngineConfig

    cases = CASES
    if args.traffic:
        cases, args.buckets = TRAFFIC_CASES, "decode"
    if args.cases is not None:
        cases = [cases[int(i)] for i in args.cases.split(",")]
    rows = json.loads(Path(args.out).read_text())["rows"] if args.cases is not None and Path(args.out).exists() else []
    for label, model, target, quant, kv in cases:
        start = time.perf_counter()
        cfg = EngineConfig(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, kv_cache_dtype=kv,
                           **({} if args.page_size is None else {"page_size": args.page_size}))
        report = compile_for_target(model, target, cfg, quantization=quant, buckets=args.buckets)
        row = {"label": label, "target": target, "quantization": quant, "kv_cache_dtype": kv,
               "page_size": cfg.page_size,
               "seconds": round(time.perf_counter() - start, 1), **report.to_json()}
        rows.append(row)
        r1 = report.rooflines[0]
        for b in report.buckets:
            sys.stdout.write(f"  T={b.tokens} S={b.seqs}: compiler bytes accessed {b.bytes_accessed / 1e9:.2f} GB, "
                             f"estimated {b.estimated_bytes / 1e9:.2f} GB, minimum {b.minimum_bytes / 1e9:.2f} GB "
                             f"({b.traffic_ratio:.3f}x; every optional branch {b.traffic_ratio_max:.3f}x)\n")
        sys.stdout.write(f"{label:18} {target:10} {quant or 'bf16':5} kv {kv:4} ok={report.ok} "
                         f"weights {report.weight_bytes_per_device / 2**30:.2f} GiB/chip, KV "
                         f"{report.kv_capacity_tokens} tok, roofline b1 {r1.tokens_per_s:.0f} tok/s\n")
        sys.stdout.flush()
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": _cpu_name(),
                                              "cpus": os.cpu_count(), "max_model_len": args.max_model_len,
                                              "max_num_seqs": args.max_num_seqs, "buckets": args.buckets,
                                              "note": "compiled on the CPU for the target; nothing ran",
                                              "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
