"""The default model's quantized projections chained in one jit: the C++ CPU kernel's bfloat16 path against
its int8 dot path (``int8_activations``), at the row counts of engine steps.

Loads ``LLM()`` (the default settings: the GGUF's Q4_1 / Q8_0 weights kept quantized, bfloat16 compute), takes
every quantized 2-D projection weight of the decoder layers (q, k, v, o, gate, up, down of the 30 layers;
the tied LM head is left out: it runs on a few rows per step) and times ``x[M, K] @ w`` for all of them in
one jitted function, bfloat16 activations, each setting interleaved with the other, best of ``--reps``; wall
time and the process's CPU time (the machine is shared: CPU time counts other people's jobs less).

Usage: ``python bench/quant_matmul_chain.py [--rows 64 512] [--reps 5]``; writes
``bench/results/quant_matmul_chain-<date>-<machine>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from machine import machine_info, result_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", type=int, default=[64, 512])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxinfer import LLM
    from pallas_kernels.quantized_matmul.api import quantized_matmul
    from pallas_kernels.quantized_matmul.qarray import QArray

    llm = LLM(max_model_len=256, max_num_seqs=2, max_num_batched_tokens=64, kv_cache_memory="16MiB")
    leaves = jax.tree.leaves(llm.engine.runner.params, is_leaf=lambda a: isinstance(a, QArray))
    head = llm.engine.model_config.vocab_size
    ws = [w for w in leaves if isinstance(w, QArray) and w.ndim == 2 and w.shape[1] != head]

    def chain(int8: bool):
        def f(xs, ws):
            return sum(quantized_matmul(xs[w.shape[0]], w, impl="cpu", int8_activations=int8).sum() for w in ws)
        return jax.jit(f)

    record = {"benchmark": "quant_matmul_chain", "machine": machine_info(), "load_average": list(os.getloadavg()),
              "weights": len(ws), "formats": sorted({w.config.name for w in ws}), "results": []}
    fns = {"bf16": chain(False), "int8": chain(True)}
    for m in args.rows:
        rng = np.random.default_rng(0)
        xs = {k: jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16) for k in {w.shape[0] for w in ws}}
        for f in fns.values():
            f(xs, ws).block_until_ready()
        wall, cpu = dict.fromkeys(fns, float("inf")), dict.fromkeys(fns, float("inf"))
        for _ in range(args.reps):
            for name, f in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                f(xs, ws).block_until_ready()
                wall[name] = min(wall[name], time.perf_counter() - t0)
                cpu[name] = min(cpu[name], time.process_time() - c0)
        flops = sum(2 * m * w.shape[0] * w.shape[1] for w in ws)
        row = {"m": m, "gflop": flops / 1e9, **{f"{n}_wall_ms": wall[n] * 1e3 for n in fns},
               **{f"{n}_cpu_ms": cpu[n] * 1e3 for n in fns}, "speedup_wall": wall["bf16"] / wall["int8"],
               "speedup_cpu": cpu["bf16"] / cpu["int8"]}
        record["results"].append(row)
        print(f"M={m}: bf16 {row['bf16_wall_ms']:.1f} ms (cpu {row['bf16_cpu_ms']:.1f}), int8 "
              f"{row['int8_wall_ms']:.1f} ms (cpu {row['int8_cpu_ms']:.1f}): {row['speedup_wall']:.2f}x wall, "
              f"{row['speedup_cpu']:.2f}x cpu", flush=True)
    path = result_path("quant_matmul_chain")
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
