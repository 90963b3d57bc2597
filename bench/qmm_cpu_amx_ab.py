"""The C++ CPU quantized matmul's bfloat16 panel path with and without AMX tiles (and, optionally, another
checkout's kernel), on the default model's shapes.

Each variant runs in its own process (the kernel reads ``JAXINFER_CPU_AMX`` once per process): ``amx``
(this checkout, AMX tiles where the CPU has AMX-BF16), ``vdpbf16ps`` (this checkout, ``JAXINFER_CPU_AMX=0``)
and, with ``--baseline-tree DIR``, ``baseline`` (the kernel of the checkout at DIR, e.g. a ``git worktree``
of an older commit, run with AMX unless ``--baseline-amx 0``; ``--skip-vdpbf16ps`` leaves that variant out).
Variants alternate for ``--rounds`` rounds; each times ``x[M, K] @ w`` (bfloat16
activations, jitted, 3 warm-up calls, best of ``--iters``) for SmolLM2-135M's projections in its GGUF
formats (Q4_1 = int4 g32 asymmetric, Q8_0 = int8 g32 for the tied LM head, float16 scales) at
M = 16, 32, 64, 512 (``--x-dtype float32``: float32 activations, the float32 panel path that CPUs without
bfloat16 instructions run). Prints ms per call and writes JSON to ``bench/results/``.

Usage: ``python bench/qmm_cpu_amx_ab.py [--baseline-tree /tmp/wt-old] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from machine import machine_info, result_path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(576, 576, "q4_1"), (576, 1536, "q4_1"), (1536, 576, "q4_1"), (576, 49152, "q8_0")]
ROWS = (16, 32, 64, 512)

_TIMER = """
import json, os, sys, time
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels.quantized_matmul import cpu
from pallas_kernels.quantized_matmul.api import quantized_matmul
from pallas_kernels.quantized_matmul.config import QuantConfig
from pallas_kernels.quantized_matmul.qarray import QArray
shapes, rows, iters = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
x_dtype = getattr(jnp, sys.argv[4])
fmts = {"q4_1": QuantConfig("int4", group_size=32, symmetric=False, scale_dtype="float16"),
        "q8_0": QuantConfig("int8", group_size=32, scale_dtype="float16")}
rng = np.random.default_rng(0)
f = jax.jit(lambda a, b: quantized_matmul(a, b, impl="cpu"))
out = {}
for k, n, fmt in shapes:
    w = QArray.quantize(jnp.asarray(rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)), fmts[fmt])
    for m in rows:
        x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32), x_dtype)
        for _ in range(3):
            f(x, w).block_until_ready()
        best = float("inf")
        for _ in range(iters):
            t = time.perf_counter()
            f(x, w).block_until_ready()
            best = min(best, time.perf_counter() - t)
        out[f"{m}x{k}x{n} {fmt}"] = best * 1e3
print(json.dumps({"amx": getattr(cpu, "amx_enabled", lambda: False)(), "ms": out}))
"""


def _run(tree: Path, amx: str, iters: int, x_dtype: str) -> dict:
    env = {**os.environ, "JAXINFER_CPU_AMX": amx, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", _TIMER, json.dumps(SHAPES), json.dumps(ROWS), str(iters), x_dtype],
                          cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-tree", type=Path, default=None, help="another checkout whose kernel to time")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--baseline-amx", choices=["0", "1"], default="1",
                   help="JAXINFER_CPU_AMX for the baseline tree's kernel (1: AMX tiles where it has them)")
    p.add_argument("--skip-vdpbf16ps", action="store_true", help="time only amx (and the baseline)")
    p.add_argument("--tag", default="qmm-cpu-amx-ab")
    p.add_argument("--x-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="activations (float32: the CPU default without bfloat16 instructions, the float32 panel)")
    args = p.parse_args()
    variants = {"amx": (ROOT, "1")}
    if not args.skip_vdpbf16ps:
        variants["vdpbf16ps"] = (ROOT, "0")
    if args.baseline_tree is not None:
        variants["baseline"] = (args.baseline_tree.resolve(), args.baseline_amx)
    runs: dict[str, list] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (tree, amx) in variants.items():
            runs[name].append(_run(tree, amx, args.iters, args.x_dtype))
            print(name, {k: round(v, 3) for k, v in runs[name][-1]["ms"].items()}, flush=True)
    best = {name: {k: min(r["ms"][k] for r in rs) for k in rs[0]["ms"]} for name, rs in runs.items()}
    print(f"{'product':<26}" + "".join(f"{n:>12}" for n in best))
    for key in best["amx"]:
        print(f"{key:<26}" + "".join(f"{best[n][key]:>12.3f}" for n in best))
    out = result_path(args.tag)
    out.write_text(json.dumps({"benchmark": "qmm_cpu_amx_ab", "machine": machine_info(), "rounds": runs,
                               "best_ms": best, "amx_enabled": runs["amx"][0]["amx"], "x_dtype": args.x_dtype,
                               "baseline_tree": str(args.baseline_tree) if args.baseline_tree else None},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
