"""``jaxinfer compile``: AOT-compile the engine's steps for a TPU or NVIDIA GPU target on this machine and
report, per step bucket, whether it compiles and the memory it needs, plus the model's fit and a roofline
estimate (:mod:`jaxinfer.aot`)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxinfer.config_cli import add_engine_args, engine_config_from_args

_TARGETS_HELP = ("tpu-v5e | tpu-v6e | tpu-v5p | h100, optionally with a chip count: tpu-v5e-8, tpu-v6e-1, h100-8 "
                 "(needs the aot extra: pip install -e \".[aot]\")")
_QUANT = ("int8", "int8-g32", "int4", "int4-g32", "int4-g64", "int4-asym", "fp8", "fp8-w8a8", "int8-w8a8")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``compile`` sub-command to the ``jaxinfer`` parser."""
    p = subparsers.add_parser("compile", help="AOT-compile the engine for a TPU / GPU target and report fit, "
                              "memory and a roofline (nothing runs)")
    p.add_argument("--target", required=True, help=_TARGETS_HELP)
    p.add_argument("--model", default=None, help="registered name, HF directory or config.json, GGUF file or "
                   "quantized checkpoint; only the configuration is read (default: smollm2-135m-instruct)")
    p.add_argument("--quantization", default=None, choices=_QUANT, help="weight format of the decoder linears "
                   "(abstract weights in that format; default: float)")
    p.add_argument("--buckets", default="all", choices=("all", "decode", "smallest"),
                   help="step buckets to compile: all the engine uses, the decode ones, or the smallest")
    p.add_argument("--context", type=int, default=1024, help="context tokens per sequence in the roofline")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_engine_args(p.add_argument_group("engine"), exclude=("quantization",))
    p.set_defaults(handler=run)
    return p


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def run(args) -> int:
    """Compile, print the report; 0 when every bucket compiled and the model fits, else 1."""
    if "jax" not in sys.modules:  # the CUDA plugin offers its deviceless topology only with jax on the CPU here
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jaxinfer.aot import compile_for_target

    config = engine_config_from_args(args, quantization=None)  # --quantization here is the weight format
    out = sys.stdout

    def progress(b):
        if not args.json:
            status = "ok" if b.ok else "FAILED"
            out.write(f"  bucket T={b.tokens:<5} S={b.seqs:<4} {status:6} {b.seconds:6.1f} s  "
                      f"peak {_gib(b.peak_bytes)} (args {_gib(b.argument_bytes)}, temp {_gib(b.temp_bytes)})\n")
            if b.ok:
                compiler = f"{b.bytes_accessed / 1e9:.2f} GB" if b.bytes_accessed else "n/a"
                out.write(f"    decode traffic at --context {args.context}: compiler bytes accessed "
                          f"{compiler}; XLA ops {b.hlo_bytes / 1e9:.2f} GB + attention pages -> "
                          f"{b.estimated_bytes / 1e9:.2f} GB vs minimum {b.minimum_bytes / 1e9:.2f} GB "
                          f"({b.traffic_ratio:.3f}x; every optional branch: {b.traffic_ratio_max:.3f}x)\n")
                for name, n in b.top_ops[:4]:
                    out.write(f"      {n / 1e9:8.3f} GB  {name[:110]}\n")
            if b.error:
                out.write(f"    {b.error.splitlines()[0][:300]}\n")
            out.flush()

    report = compile_for_target(args.model, args.target, config, quantization=args.quantization,
                                buckets=args.buckets, context=args.context, progress=progress)
    if args.json:
        out.write(json.dumps(report.to_json(), indent=1) + "\n")
        return 0 if report.ok else 1
    out.write(f"{report.model} on {report.chips} x {report.target} ({report.dtype}, weights "
              f"{report.quantization or 'float'}, KV {report.kv_cache_dtype}), per chip:\n"
              f"  HBM {_gib(report.hbm_bytes_per_device)}; weights {_gib(report.weight_bytes_per_device)}; "
              f"KV cache {_gib(report.kv_bytes_per_device)} ({report.kv_capacity_tokens} tokens)\n")
    for r in report.rooflines:
        out.write(f"  roofline decode batch {r.batch}, context {r.context}: {r.bytes_per_device / 1e9:.2f} GB and "
                  f"{r.flops_per_device / 1e12:.3f} TFLOP per step per chip -> {r.step_seconds * 1e3:.2f} ms, "
                  f"{r.tokens_per_s:.0f} tok/s (an upper bound; compiled, not run)\n")
    verdict = "compiles and fits" if report.ok else ("does not fit" if not report.fits else "does not compile")
    out.write(f"  {verdict}\n")
    return 0 if report.ok else 1
