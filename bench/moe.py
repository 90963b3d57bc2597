"""Mixture-of-experts expert matmul: grouped matmul vs a dense per-expert loop vs ``jax.lax.ragged_dot``.

One MoE layer's fused gate/up projection ``x[T * top_k, hidden] @ w[e]`` (``w: [E, hidden, 2 * moe_inter]``)
with tokens routed uniformly at random to ``top_k`` distinct experts each, rows sorted by expert. Shapes
are Qwen3-30B-A3B's (hidden 2048, moe_intermediate 768, 128 experts, top-8) scaled down to fit a small CPU:
by default hidden and moe_intermediate are halved (1024, 384) and experts and top-k divided by 4 (32, top-2),
which keeps the rows per expert (``T * top_k / E = T / 16``) of the real model.

Methods:

* ``grouped-xla``: :func:`pallas_kernels.grouped_matmul.grouped_matmul` with ``impl="xla"`` (the work-item
  loop; float32, int8 and int4 experts);
* ``grouped-pallas``: the same with the backend's Pallas kernel (only on a GPU / TPU: interpret mode on the
  CPU measures the interpreter, not the kernel);
* ``dense-loop``: every expert's matmul over all rows, masked to its group and summed (``E`` times the
  flops);
* ``ragged_dot``: ``jax.lax.ragged_dot`` over float32 experts.

Usage::

    python bench/moe.py               # decode 1, 8, 64 tokens and prefill 512, 2048
    python bench/moe.py --quick       # small shapes

Writes ``bench/results/moe-<date>-<machine>.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.machine import call_times, machine_info, result_path  # noqa: E402
from pallas_kernels.backend import default_impl  # noqa: E402
from pallas_kernels.grouped_matmul import grouped_matmul  # noqa: E402
from pallas_kernels.grouped_matmul.reference import grouped_matmul_ragged_dot  # noqa: E402
from pallas_kernels.quantized_matmul.experts import quantize_experts  # noqa: E402

QWEN3_30B_A3B = {"hidden": 2048, "moe_intermediate": 768, "experts": 128, "top_k": 8}


def dense_loop(x, w, sizes):
    """Each expert over all rows, masked to its own rows, summed: ``E * M * K * N`` multiply-adds."""
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    rows = jnp.arange(x.shape[0])[:, None]

    def body(e, acc):
        y = jnp.dot(x, w[e], preferred_element_type=jnp.float32)
        return acc + jnp.where((rows >= starts[e]) & (rows < ends[e]), y, 0.0)

    return jax.lax.fori_loop(0, w.shape[0], body, jnp.zeros((x.shape[0], w.shape[-1]), jnp.float32))


def route(tokens: int, experts: int, top_k: int, rng) -> np.ndarray:
    """Group sizes of ``tokens`` each routed to ``top_k`` distinct experts chosen uniformly at random."""
    picks = np.argsort(rng.random((tokens, experts)), axis=1)[:, :top_k]
    return np.bincount(picks.ravel(), minlength=experts).astype(np.int32)


def timeit(fn, *args, reps: int) -> float:
    return statistics.median(call_times(fn, *args, iters=reps))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--moe-intermediate", type=int, default=384)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, nargs="*", default=[1, 8, 64, 512, 2048])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="hidden 256, moe_intermediate 128, 8 experts, tokens 1 and 64")
    p.add_argument("--out", type=pathlib.Path, default=None)
    a = p.parse_args()
    if a.quick:
        a.hidden, a.moe_intermediate, a.experts, a.tokens, a.reps = 256, 128, 8, [1, 64], 3
    k, n, e = a.hidden, 2 * a.moe_intermediate, a.experts
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((e, k, n)).astype(np.float32) / np.sqrt(k))
    weights = {"f32": w, "int8": quantize_experts(w, "int8"), "int4": quantize_experts(w, "int4")}
    pallas = default_impl()
    methods = {"grouped-xla": lambda x, ww, s: grouped_matmul(x, ww, s, impl="xla")}
    if pallas != "xla":
        methods["grouped-pallas"] = lambda x, ww, s: grouped_matmul(x, ww, s, impl=pallas)
    methods["dense-loop"] = dense_loop
    methods["ragged_dot"] = lambda x, ww, s: grouped_matmul_ragged_dot(x, ww, s, jnp.float32)
    jitted = {name: jax.jit(f) for name, f in methods.items()}

    rows_out = []
    for tokens in a.tokens:
        sizes = jnp.asarray(route(tokens, e, a.top_k, rng))
        m = tokens * a.top_k
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        useful = 2.0 * m * k * n
        base = None
        for name, fn in jitted.items():
            for fmt, ww in weights.items():
                if fmt != "f32" and not name.startswith("grouped"):
                    continue
                sec = timeit(fn, x, ww, sizes, reps=a.reps if m * e < 2**15 else max(2, a.reps // 2))
                if name == "grouped-xla" and fmt == "f32":
                    base = sec
                row = {
                    "tokens": tokens,
                    "rows": m,
                    "phase": "decode" if tokens <= 64 else "prefill",
                    "method": name,
                    "weights": fmt,
                    "ms": sec * 1e3,
                    "useful_gflops": useful / sec / 1e9,
                    "vs_grouped_xla_f32": sec / base,
                    "experts_with_rows": int((sizes > 0).sum()),
                }
                rows_out.append(row)
                print(
                    f"T={tokens:5d} rows={m:5d} {name:14s} {fmt:4s} {sec * 1e3:10.2f} ms "
                    f"{row['useful_gflops']:7.2f} useful GFLOP/s  x{row['vs_grouped_xla_f32']:.2f} vs grouped-xla f32",
                    flush=True,
                )
    record = {
        "benchmark": "moe_grouped_matmul",
        "machine": machine_info(),
        "note": "shared machine (other jobs ran on the same 2 cores); compare rows of one run only",
        "real_model": QWEN3_30B_A3B,
        "shapes": {"hidden": k, "gate_up_n": n, "experts": e, "top_k": a.top_k},
        "routing": "uniform random top-k distinct experts per token",
        "results": rows_out,
    }
    out = a.out or result_path("moe")
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
