"""The C++ CPU quantized matmul's streaming (decode, M <= 8) path, this checkout against another's, on the
default model's shapes, with the weights coming from memory as in a real decode step.

Each (tree, round) runs in its own process (``PYTHONPATH`` = that tree). For each of SmolLM2-135M's
projections in its GGUF formats (Q4_1 = int4 g32 asymmetric, Q8_0 = int8 g32 for the tied LM head, float16
scales) and each M in ``--rows``, it times one jitted chain of ``x[M, K] @ w_i`` (bfloat16 activations,
bfloat16 out, summed in float32) over as many distinct weights as make ``--stream-mb`` MB, so that each
product reads its weight from memory, not from a cache a repeated call would leave it in (at most 128
weights: the small projections' 128 x 55 KB stay partly cached); 2 warm-up calls,
best of ``--iters`` per process, ms per product. Rounds alternate between the trees; the table gives
the median over rounds. Writes JSON to ``bench/results/``.

Usage: ``python bench/qmm_cpu_decode_ab.py --baseline-tree /tmp/wt-old [--rounds 4]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from machine import machine_info, result_path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(576, 192, "q4_1"), (576, 576, "q4_1"), (576, 1536, "q4_1"), (1536, 576, "q4_1"), (576, 49152, "q8_0")]

_TIMER = """
import json, math, os, sys, time
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels.quantized_matmul.api import quantized_matmul
from pallas_kernels.quantized_matmul.config import QuantConfig
from pallas_kernels.quantized_matmul.qarray import QArray
shapes, rows, iters, stream_mb = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
fmts = {"q4_1": (QuantConfig("int4", group_size=32, symmetric=False, scale_dtype="float16"), 0.5),
        "q8_0": (QuantConfig("int8", group_size=32, scale_dtype="float16"), 1.0)}
rng = np.random.default_rng(0)

def chain(x, ws):
    acc = jnp.zeros((x.shape[0], ws[0].scale.shape[-1]), jnp.float32)
    for w in ws:
        acc = acc + quantized_matmul(x, w, impl="cpu").astype(jnp.float32)
    return acc

f = jax.jit(chain)
out = {}
for k, n, fmt in shapes:
    cfg, bpw = fmts[fmt]
    count = min(max(2, math.ceil(stream_mb * 1e6 / (k * n * bpw))), 128)
    ws = [QArray.quantize(jnp.asarray(rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)), cfg)
          for _ in range(count)]
    for m in rows:
        x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32), jnp.bfloat16)
        for _ in range(2):
            f(x, ws).block_until_ready()
        best = float("inf")
        for _ in range(iters):
            t = time.perf_counter()
            f(x, ws).block_until_ready()
            best = min(best, time.perf_counter() - t)
        out[f"{m}x{k}x{n} {fmt}"] = best / count * 1e3
print(json.dumps({"ms": out}))
"""


def _run(tree: Path, rows: list[int], iters: int, stream_mb: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", _TIMER, json.dumps(SHAPES), json.dumps(rows), str(iters),
                           str(stream_mb)], cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-tree", type=Path, required=True, help="another checkout whose kernel to time")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 5, 8])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--stream-mb", type=float, default=100.0, help="weight MB per chain (more than the caches)")
    p.add_argument("--tag", default="qmm-cpu-decode-ab")
    args = p.parse_args()
    variants = {"this": ROOT, "baseline": args.baseline_tree.resolve()}
    runs: dict[str, list] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, tree in variants.items():
            runs[name].append(_run(tree, args.rows, args.iters, args.stream_mb))
            print(name, {k: round(v, 4) for k, v in runs[name][-1]["ms"].items()}, flush=True)
    med = {name: {k: statistics.median(r["ms"][k] for r in rs) for k in rs[0]["ms"]} for name, rs in runs.items()}
    print(f"{'product (median ms)':<24}{'baseline':>10}{'this':>10}{'speed-up':>10}")
    for key in med["this"]:
        print(f"{key:<24}{med['baseline'][key]:>10.4f}{med['this'][key]:>10.4f}"
              f"{med['baseline'][key] / med['this'][key]:>9.2f}x")
    out = result_path(args.tag)
    out.write_text(json.dumps({"benchmark": "qmm_cpu_decode_ab", "machine": machine_info(), "rounds": runs,
                               "median_ms": med, "stream_mb": args.stream_mb,
                               "baseline_tree": str(args.baseline_tree)}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
