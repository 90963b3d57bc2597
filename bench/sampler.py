"""The on-device sampler's cost per step at the engine's shapes, by sampling setting, on this machine.

Times the jitted :func:`jaxinfer.sampling.sample` on random ``f32[S, V]`` logits (default V = 49,152,
the default model's vocabulary) for greedy rows, temperature only, top-p, top-k and top-k + top-p + min-p,
at each ``--rows``, for each ``--impls`` of the row argmax and log-normaliser (``xla``: jnp; ``cpu``: the
C++ row kernel, :mod:`pallas_kernels.logits_rows`, the engine's choice on a CPU). The peer is the one
operation any sort-based filter needs: a full descending ``jnp.sort`` of the same logits (what the sampler
ran before its threshold searches). Best of ``--iters`` calls; writes JSON to ``bench/results/``.

Usage: ``python bench/sampler.py [--rows 1 64 256] [--vocab 49152] [--impls xla cpu] [--tag NAME]``
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from machine import call_times, machine_info, result_path

SETTINGS = {
    "greedy": {"temperature": 0.0},
    "temperature": {"temperature": 0.7},
    "top_p=0.95": {"temperature": 0.7, "top_p": 0.95},
    "top_k=50": {"temperature": 0.7, "top_k": 50},
    "top_k=50,top_p=0.9,min_p=0.05": {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "min_p": 0.05},
}


def _best(fn, args, iters: int) -> float:
    return min(call_times(fn, *args, iters=iters)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--impls", nargs="+", default=["xla", "cpu"], choices=["xla", "cpu"])
    ap.add_argument("--tag", default="", help="suffix of the result file name (keeps runs apart)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxinfer.sampling import SamplingTensors, sample
    from jaxinfer.sampling_params import SamplingParams

    runs = {impl: jax.jit(lambda x, st, impl=impl: sample(x, st, impl=impl)) for impl in args.impls}
    sort = jax.jit(lambda x: -jnp.sort(-x, axis=-1))
    rows_out = []
    for s in args.rows:
        logits = jnp.asarray(np.random.default_rng(0).normal(size=(s, args.vocab)) * 3, jnp.float32)
        row = {"rows": s, "full_sort_ms": round(_best(sort, (logits,), args.iters), 2)}
        for name, kw in SETTINGS.items():
            st = SamplingTensors.from_params([SamplingParams(**kw)] * s, list(range(s)), [0] * s)
            for impl, run in runs.items():
                row[f"{name}_{impl}_ms"] = round(_best(run, (logits, st), args.iters), 2)
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    out = {"benchmark": "sampler", "vocab": args.vocab, "iters": args.iters, "impls": args.impls,
           "machine": machine_info(),
           "rows": rows_out}
    path = result_path("sampler" + (f"-{args.tag}" if args.tag else ""))
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
