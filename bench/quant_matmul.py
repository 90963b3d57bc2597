"""Decode-shaped quantized matmul benchmark: int8 / int4 / fp8 weights vs bf16, against HBM bandwidth.

For each weight shape ``[K, N]`` (default: Llama-3-8B projections) and batch ``M`` (default 1..256),
times ``x[M, K] @ w`` for a bf16 weight (plain XLA dot, the peer) and for each quantized format with
each implementation (``xla`` = the jnp reference, which dequantizes in XLA; the Pallas kernel for the
backend). Reports time, bytes moved (weights + activations + output), achieved GB/s, the fraction of
the device's peak HBM bandwidth, speed-up over bf16, and the error against the bf16 product.

Usage::

    python bench/quant_matmul.py                 # on a GPU / TPU
    python bench/quant_matmul.py --quick         # tiny shapes; runs anywhere (kernels interpreted on CPU)
    python bench/quant_matmul.py --shapes smollm2 --dtype bfloat16 --formats int8 int4 int4-g32 \
        --batches 1 4 64 512                     # the CPU: the default model's projections, C++ kernel vs XLA

On the CPU the peers are the float32 and bfloat16 XLA dots of the float weight (bfloat16 as the model runs
it: float32 accumulation, then rounded), and the kernels are ``xla`` (the reference), ``cpu`` and, on a CPU
with AVX512-VNNI, ``cpu-int8`` (the C++ kernel with ``int8_activations=True``: activations quantized per
32-block, int8 dot for M > GEMV_MAX_M; the float path below). Rows carry GFLOP/s (2 M K N / time).

Writes ``bench/results/quant_matmul_<device>_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pathlib
import re
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.machine import call_times  # noqa: E402
from pallas_kernels.backend import default_impl  # noqa: E402
from pallas_kernels.quantized_matmul import cpu as cpu_kernel  # noqa: E402
from pallas_kernels.quantized_matmul.api import quantized_matmul  # noqa: E402
from pallas_kernels.quantized_matmul.config import as_config  # noqa: E402
from pallas_kernels.quantized_matmul.qarray import QArray  # noqa: E402

LLAMA3_8B_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
QUICK_SHAPES = [(256, 512), (512, 256)]
# SmolLM2-135M (the default model): q/o, k/v, gate/up, down, tied LM head.
SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
SHAPE_SETS = {"llama3-8b": LLAMA3_8B_SHAPES, "smollm2": SMOLLM2_SHAPES, "quick": QUICK_SHAPES}
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
QUICK_BATCHES = [1, 8]
FORMATS = ["int8", "int4", "int4-asym", "fp8", "int8-w8a8", "fp8-w8a8"]

# Peak memory bandwidth in GB/s by device-kind substring (vendor figures).
PEAK_GBPS = {
    "H200": 4800.0,
    "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0,
    "A100": 1555.0,
    "L4": 300.0,
    "TPU v6": 1640.0,
    "TPU v5p": 2765.0,
    "TPU v5 lite": 819.0,
    "TPU v5e": 819.0,
    "TPU v4": 1228.0,
}


def peak_gbps(device_kind: str) -> float | None:
    for key, value in PEAK_GBPS.items():
        if key.lower() in device_kind.lower():
            return value
    return None


def time_fn(fn, *args, reps: int) -> float:
    """Median wall time in seconds of ``fn(*args)`` (compiled and warmed up first)."""
    return statistics.median(call_times(fn, *args, iters=reps, warmups=2))


def nbytes(*arrays) -> int:
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(arrays)))


def run(args) -> dict:
    device = jax.devices()[0]
    kind = device.device_kind
    platform = device.platform
    peak = args.peak_gbps or peak_gbps(kind)
    shapes = SHAPE_SETS[args.shapes or ("quick" if args.quick else "llama3-8b")]
    batches = args.batches or (QUICK_BATCHES if args.quick else BATCHES)
    kernel = default_impl(platform)
    impls = args.impls or (["xla", kernel] if kernel != "xla" else ["xla"])
    if kernel == "cpu" and not args.impls and cpu_kernel.has_vnni():
        impls.append("cpu-int8")
    if args.quick and kernel == "xla" and not args.impls:
        impls = ["xla", "pallas_tpu", "pallas_gpu"]  # interpreted: checks they run, not their speed
    reps = 3 if args.quick else args.reps
    if args.dtype:
        dtype = jnp.dtype(args.dtype)
    else:
        dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
    # Dense peers: the float weight in the activation dtype; on the CPU also the other float dtype.
    dense_dtypes = [jnp.dtype(dtype)]
    if platform == "cpu":
        dense_dtypes = [jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)]

    rows = []
    rng = np.random.default_rng(0)
    for k, n in shapes:
        w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
        qws = {fmt: QArray.quantize(w, fmt) for fmt in args.formats}
        for m in batches:
            x = jnp.asarray(rng.standard_normal((m, k)), dtype)
            # As jaxinfer.models.ops.linear runs a float weight: 16-bit inputs accumulate in float32.
            dense = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
            ref = dense(x, w)
            t_dense = time_fn(dense, x, w, reps=reps)
            rows.append(_row(k, n, m, _short(dtype), "xla", t_dense, nbytes(x, w, ref), peak, t_dense, 0.0))
            for other in dense_dtypes:
                if other != jnp.dtype(dtype):
                    xo, wo = x.astype(other), w.astype(other)
                    t = time_fn(dense, xo, wo, reps=reps)
                    rows.append(_row(k, n, m, _short(other), "xla", t, nbytes(xo, wo, dense(xo, wo)), peak, t_dense,
                                     float("nan")))
            for fmt, qw in qws.items():
                for impl in impls:
                    int8 = impl == "cpu-int8"
                    fn = jax.jit(lambda x, w, impl=impl, int8=int8: quantized_matmul(
                        x, w, impl="cpu" if int8 else impl, int8_activations=int8))
                    try:
                        y = fn(x, qw)
                        t = time_fn(fn, x, qw, reps=reps)
                    except Exception as e:  # a kernel/format the device cannot run: record, go on
                        rows.append(
                            {
                                "k": k,
                                "n": n,
                                "m": m,
                                "format": fmt,
                                "impl": impl,
                                "error": f"{type(e).__name__}: {str(e)[:200]}",
                            }
                        )
                        continue
                    err = float(
                        jnp.linalg.norm((y - ref).astype(jnp.float32))
                        / jnp.linalg.norm(ref.astype(jnp.float32))
                    )
                    rows.append(
                        _row(k, n, m, as_config(fmt).name, impl, t, nbytes(x, qw, y), peak, t_dense, err)
                    )
            print(f"[{k}x{n}] M={m} done", file=sys.stderr)
    return {
        "benchmark": "quant_matmul",
        "cpu": _cpu_name() if platform == "cpu" else None,
        "load_average": list(os.getloadavg()),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device_kind": kind,
        "platform": platform,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "quick": bool(args.quick),
        "activation_dtype": jnp.dtype(dtype).name,
        "peak_hbm_gbps": peak,
        "interpreted_kernels": platform == "cpu" and any(i.startswith("pallas") for i in impls),
        "results": rows,
    }


def _short(dtype) -> str:
    return "bf16" if jnp.dtype(dtype) == jnp.bfloat16 else "f32"


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _row(k, n, m, fmt, impl, t, moved, peak, t_dense, err) -> dict:
    gbps = moved / t / 1e9
    return {
        "k": k,
        "n": n,
        "m": m,
        "format": fmt,
        "impl": impl,
        "time_us": round(t * 1e6, 2),
        "bytes": moved,
        "gbps": round(gbps, 2),
        "gflops": round(2 * m * k * n / t / 1e9, 2),
        "frac_of_peak_bw": None if peak is None else round(gbps / peak, 4),
        "speedup_vs_dense": round(t_dense / t, 3),
        "rel_err_vs_dense": err,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and batches (CPU smoke run)")
    p.add_argument("--formats", nargs="+", default=FORMATS)
    p.add_argument("--impls", nargs="+", choices=["xla", "cpu", "cpu-int8", "pallas_tpu", "pallas_gpu"])
    p.add_argument("--shapes", choices=sorted(SHAPE_SETS), help="weight shapes (default: llama3-8b; quick)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="activations (default: f32 on CPU)")
    p.add_argument("--batches", nargs="+", type=int)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--peak-gbps", type=float, help="override the device's peak memory bandwidth")
    p.add_argument("--out-dir", default=str(pathlib.Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    result = run(args)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", result["device_kind"]).strip("-").lower()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = pathlib.Path(args.out_dir) / f"quant_matmul_{slug}_{stamp}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for r in result["results"]:
        if "error" in r:
            print(f"{r['k']}x{r['n']} M={r['m']:<4} {r['format']:<14} {r['impl']:<11} ERROR {r['error']}")
        else:
            print(
                f"{r['k']}x{r['n']} M={r['m']:<4} {r['format']:<14} {r['impl']:<11} {r['time_us']:>10.1f} us "
                f"{r['gbps']:>8.1f} GB/s {r['gflops']:>7.1f} GFLOP/s  x{r['speedup_vs_dense']:<6} "
                f"err {r['rel_err_vs_dense']:.2e}"
            )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
