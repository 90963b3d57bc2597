"""The C++ CPU attention kernel at a git revision against the working tree's, interleaved in one process.

Both kernels are built (the revision's ``ragged_paged_attention/*.cc, *.h`` and the shared
``pallas_kernels/*.h`` exported to a temporary folder), registered as two FFI targets and called in
turns on the same inputs, so machine load hits both alike (the machine this runs on is usually
shared). Each case reports the minimum and the median of ``--iters`` calls per kernel, the speed-up
of the minima, attention GFLOP/s (``4 * Hq * D * visible (query, key) pairs``) and the largest
difference between the two outputs. Shapes are the default engine's on a CPU (SmolLM2-135M heads:
9 q, 3 KV, head_dim 64; pages of 16; bf16 queries): a 512-token prefill step as 1, 2 or 8
sequences with 400-512 tokens of context, and decode steps of 64 or 32 rows with 64-512 or 64-640
tokens of context; bf16 and int8 pages (``--pages``, ``--cases`` and ``--heads`` pick others; ``--dtype float32``:
float32 queries, and float32 pages where ``--pages`` names float32, as on a CPU without bfloat16 instructions).
``--caches N`` calls N input sets in turn (the two kernels on different ones), so that the KV cache is
read from DRAM rather than L3, as in a model with many layers.

Usage: ``python bench/attention_cpu_ab.py [--rev main] [--heads 9,3,64] [--iters 15] [--cases decode]``; writes
``bench/results/attention_cpu_ab-<date>-<machine>.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from attention import make_inputs  # noqa: E402
from machine import machine_info, result_path  # noqa: E402

from pallas_kernels import cpu_build  # noqa: E402
from pallas_kernels.ragged_paged_attention import cpu  # noqa: E402

KERNEL_DIR = "pallas_kernels/ragged_paged_attention"


def build_revision(rev: str, folder: Path) -> str:
    """Builds the kernel as it is at ``rev`` and registers it; returns its FFI target name."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, f"{KERNEL_DIR}/", "pallas_kernels/"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if name.endswith((".h", ".cc")):
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], capture_output=True, text=True,
                                  check=True).stdout
            (folder / Path(name).name).write_text(text)
    lib = ctypes.cdll.LoadLibrary(str(cpu_build.build(folder / "cpu_kernel.cc", "rpa_ab", cpu_build.compiler())))
    target = "jaxinfer_rpa_cpu_baseline"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.JaxinferRaggedPagedAttentionCpu), platform="cpu")
    return target


def kernel_fn(target: str, sm_scale: float):
    def f(q, kv, kv_lens, page_indices, cu, num_seqs):
        none = jnp.zeros((1,), jnp.float32)
        ks, vs = (kv.k_scale, kv.v_scale) if kv.quantized else (none, none)
        call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, q.dtype))
        return call(q, kv.k, kv.v, ks, vs, kv_lens, page_indices, cu, num_seqs, sm_scale=np.float32(sm_scale),
                    sliding_window=np.int64(0), soft_cap=np.float32(0.0))
    return jax.jit(f)


def cases(rng: np.random.Generator) -> dict[str, list[tuple[int, int]]]:
    """(q_len, kv_len) per sequence."""
    return {
        "prefill_1x512": [(512, 512)],
        "prefill_2x256_ctx480-500": [(256, 480), (256, 500)],
        "prefill_8x64_ctx400-512": [(64, 400 + 16 * i) for i in range(8)],
        "decode_64_ctx64-512": [(1, int(c)) for c in rng.integers(64, 513, 64)],
        "decode_64_ctx64-640": [(1, int(c)) for c in rng.integers(64, 641, 64)],
        "decode_32_ctx64-640": [(1, int(c)) for c in rng.integers(64, 641, 32)],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", default="main", help="git revision of the baseline kernel")
    p.add_argument("--heads", default="9,3,64", help="num_q_heads,num_kv_heads,head_dim")
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--cases", default="", help="only cases whose name contains this (e.g. decode)")
    p.add_argument("--caches", type=int, default=1,
                   help="inputs with this many caches called in turn, so that with several the cache is not "
                        "sitting in L3 (as in a model with many layers); the two kernels read different ones")
    p.add_argument("--pages", default="bfloat16,int8",
                   help="KV page dtypes (bfloat16 or float32: unquantized, in --dtype; int8, float8_e4m3fn)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="queries and unquantized pages")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    heads = tuple(int(x) for x in a.heads.split(","))
    sm_scale = heads[2] ** -0.5
    cpu.KERNEL.require()
    with tempfile.TemporaryDirectory() as tmp:
        base = kernel_fn(build_revision(a.rev, Path(tmp)), sm_scale)
    new = kernel_fn(cpu._TARGET, sm_scale)
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    load_before = os.getloadavg()
    rows = []
    for pages in a.pages.split(","):
        kv_quant = None if pages in ("bfloat16", "float32") else pages
        for name, lengths in cases(np.random.default_rng(0)).items():
            if a.cases not in name:
                continue
            inputs = [make_inputs(jax.random.key(i), lengths, heads, jnp.dtype(a.dtype),
                                  None if kv_quant is None else jnp.dtype(kv_quant)) for i in range(a.caches)]
            outs = [np.asarray(f(*inputs[0]).astype(jnp.float32)) for f in (base, new)]
            times: list[list[float]] = [[], []]
            for i in range(a.iters):
                for k, (f, ts) in enumerate(zip((base, new), times, strict=True)):
                    args = inputs[(i + k * (a.caches // 2)) % a.caches]
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(*args))
                    ts.append(time.perf_counter() - t0)
            flops = sum(4 * heads[0] * heads[2] * (ql * (2 * kv - ql + 1) // 2) for ql, kv in lengths)
            row = dict(case=name, kv_pages=kv_quant or a.dtype, tokens=sum(q for q, _ in lengths),
                       baseline_ms_min=min(times[0]) * 1e3, baseline_ms_median=statistics.median(times[0]) * 1e3,
                       new_ms_min=min(times[1]) * 1e3, new_ms_median=statistics.median(times[1]) * 1e3,
                       speedup_min=min(times[0]) / min(times[1]), baseline_gflops=flops / min(times[0]) / 1e9,
                       new_gflops=flops / min(times[1]) / 1e9, max_abs_diff=float(np.abs(outs[0] - outs[1]).max()))
            rows.append(row)
            print(f"{name:26s} {row['kv_pages']:8s} {rev} {row['baseline_ms_min']:7.3f} ms "
                  f"({row['baseline_gflops']:5.1f} GFLOP/s)  new {row['new_ms_min']:7.3f} ms "
                  f"({row['new_gflops']:5.1f} GFLOP/s)  x{row['speedup_min']:.2f}  max|diff| {row['max_abs_diff']:.3g}",
                  flush=True)
    out = Path(a.out) if a.out else result_path("attention_cpu_ab")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(benchmark="attention_cpu_ab", baseline_rev=rev, **machine_info(),
                                   heads=dict(zip(("num_q_heads", "num_kv_heads", "head_dim"), heads, strict=True)),
                                   page_size=16, q_dtype=a.dtype, iters=a.iters, caches=a.caches,
                                   load_average_1_5_15={"before": load_before, "after": os.getloadavg()},
                                   note="shared 2-core machine: compare the two kernels within this run only",
                                   results=rows), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
