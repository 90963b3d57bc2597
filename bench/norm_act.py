"""The layers' row operations on this machine: RMSNorm, residual add + RMSNorm and SwiGLU, XLA's fusions
against the C++ row kernel (:mod:`pallas_kernels.norm_act`, the engine's choice on one CPU device).

At each ``--rows`` (the engine's token buckets: 2 for batch-1 decode, 64 for a 64-sequence decode step, 512
for a full prefill step) it times each operation jitted alone on random operands of the default model's
widths (hidden 576, MLP 1,536; ``--hidden`` / ``--mlp``) in ``--dtype``, once per implementation; best of
``--iters`` calls, microseconds. Writes JSON to ``bench/results/``.

Usage: ``python bench/norm_act.py [--rows 2 64 512] [--dtype bfloat16] [--tag NAME]``
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from machine import call_times, machine_info, result_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 64, 512])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--mlp", type=int, default=1536)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--tag", default="", help="suffix of the result file name (keeps runs apart)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from pallas_kernels.norm_act import add_rms_norm, cpu, rms_norm, swiglu

    if not cpu.available():
        raise SystemExit("the C++ row kernel could not be built here: nothing to compare")
    dtype = jnp.dtype(args.dtype)
    ops = {
        "rms_norm": (lambda impl: lambda x, a, s: rms_norm(x, s, 1e-5, impl), "hidden"),
        "add_rms_norm": (lambda impl: lambda x, a, s: add_rms_norm(x, a, s, 1e-5, impl), "hidden"),
        "swiglu": (lambda impl: lambda x, a, s: swiglu(x, a, impl), "mlp"),
    }
    rng = np.random.default_rng(0)
    rows_out = []
    for r in args.rows:
        row = {"rows": r}
        for name, (make, width) in ops.items():
            e = args.hidden if width == "hidden" else args.mlp
            x = jnp.asarray(rng.standard_normal((r, e)), dtype)
            a = jnp.asarray(rng.standard_normal((r, e)), dtype)
            s = jnp.asarray(rng.standard_normal(e), dtype)
            for impl in ("xla", "cpu"):
                fn = jax.jit(make(impl))
                row[f"{name}_{impl}_us"] = round(min(call_times(fn, x, a, s, iters=args.iters)) * 1e6, 1)
            row[f"{name}_speedup"] = round(row[f"{name}_xla_us"] / row[f"{name}_cpu_us"], 2)
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    out = {"benchmark": "norm_act", "dtype": args.dtype, "hidden": args.hidden, "mlp": args.mlp,
           "iters": args.iters, "machine": machine_info(), "rows": rows_out}
    path = result_path("norm_act" + (f"-{args.tag}" if args.tag else ""))
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
