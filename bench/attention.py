"""Ragged paged attention benchmark: decode bandwidth and prefill FLOP/s.

Meant for a GPU. Compares, in the same run:

* ``pallas_gpu``: the Pallas Triton kernel on the paged cache,
* ``xla``: the project's pure-jnp path on the paged cache,
* ``dense``: ``jax.nn.dot_product_attention`` (cuDNN on a GPU) on K/V already gathered into dense
  ``[batch, ctx, kv_heads, head_dim]`` arrays (the gather is not timed: a peer, not a paged kernel).

Decode reports bytes/s (K/V bytes of every context token + q + out) against a measured device copy
bandwidth; prefill reports causal-attention TFLOP/s (``4 * heads * head_dim * sum(L*(L+1)/2)``).
Results go to ``bench/results/attention_<device>_<UTC date>.json`` with the device name.

``--cpu`` compares the C++ CPU kernel (``cpu``) with ``xla`` on the default model's heads at the shapes
of the CPU throughput benchmark: 64 decode rows at ~350 keys, a 2 x 256-token prefill, 63 decode rows
plus a 256-token prefill chunk (compiled, not interpreted: a CPU result).

``--quick`` runs a tiny SmolLM2-shaped configuration that works on a CPU (Pallas kernels in interpret
mode, which measures the interpreter, not a kernel); its JSON is labelled with the CPU device and is
not a GPU result.

Usage: ``python bench/attention.py [--quick | --cpu] [--impls pallas_gpu,xla,dense] [--kv-quant int8]
[--max-cache-gb 24]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.machine import call_times  # noqa: E402
from pallas_kernels.ragged_paged_attention import kv_quant  # noqa: E402
from pallas_kernels.ragged_paged_attention.api import ragged_paged_attention  # noqa: E402
from pallas_kernels.ragged_paged_attention.pages import KVLayout, KVPages, default_layout  # noqa: E402

MODELS = {  # (num_q_heads, num_kv_heads, head_dim)
    "llama3-8b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),
}
PAGE_SIZE = 16


def time_fn(fn, *args, iters: int) -> float:
    """Median wall time of ``fn(*args)`` in seconds after one warm-up (compile) call."""
    return statistics.median(call_times(fn, *args, iters=iters))


def copy_bandwidth(nbytes: int, iters: int) -> float:
    """Device read+write bandwidth in bytes/s measured with an elementwise copy."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    return 2 * x.nbytes / time_fn(f, x, iters=iters)


def make_inputs(key, lengths: list[tuple[int, int]], heads, dtype, kv_quant_dtype=None):
    """Paged inputs for sequences given as (q_len, kv_len); pages are shuffled."""
    hq, hkv, d = heads
    n = len(lengths)
    pages_per_seq = max(-(-kv // PAGE_SIZE) for _, kv in lengths)
    num_pages = n * pages_per_seq
    kk, kv_, kq, kp = jax.random.split(key, 4)
    shape = (num_pages, PAGE_SIZE, hkv, d)
    cache = KVPages(jax.random.normal(kk, shape, dtype), jax.random.normal(kv_, shape, dtype),
                    layout=KVLayout.TOKEN_MAJOR)
    if kv_quant_dtype is not None:
        (k, ks), (v, vs) = (kv_quant.quantize(x, kv_quant_dtype) for x in (cache.k, cache.v))
        cache = KVPages(k, v, ks, vs, layout=KVLayout.TOKEN_MAJOR)
    page_indices = jax.random.permutation(kp, num_pages).reshape(n, pages_per_seq).astype(jnp.int32)
    q_lens = np.array([q for q, _ in lengths], np.int32)
    t = int(q_lens.sum())
    q = jax.random.normal(kq, (t, hq, d), dtype)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    kv_lens = jnp.asarray([kv for _, kv in lengths], jnp.int32)
    return q, cache, kv_lens, page_indices, cu, jnp.array([n], jnp.int32)


def to_head_major(cache: KVPages) -> KVPages:
    """Token-major cache -> the layout the TPU kernel reads by default: head-major with lanes padded to 128,
    or K|V fused in one 128-lane row at head_dim <= 64; scales as one [Hkv * page_size] row per page."""
    d = cache.k.shape[-1]
    layout = default_layout("pallas_tpu", d)
    width = 64 if layout is KVLayout.HEAD_MAJOR_FUSED else d + (-d % 128)
    pad = ((0, 0), (0, 0), (0, 0), (0, width - d))
    k, v = (jnp.pad(jnp.swapaxes(x, 1, 2), pad) for x in (cache.k, cache.v))
    if layout is KVLayout.HEAD_MAJOR_FUSED:
        k, v = jnp.concatenate([k, v], axis=-1), None
    scales = [None if s is None else jnp.swapaxes(s, 1, 2).reshape(s.shape[0], -1)
              for s in (cache.k_scale, cache.v_scale)]
    return KVPages(k, v, *scales, layout=layout)


def dense_peer(q, cache, kv_lens, page_indices, lengths, causal: bool):
    """Inputs for ``jax.nn.dot_product_attention`` (q padded per sequence, K/V gathered densely)."""
    n = len(lengths)
    q_max = max(ql for ql, _ in lengths)
    kv_max = page_indices.shape[1] * PAGE_SIZE
    _, hq, d = q.shape
    hkv = cache.k.shape[2]
    k = cache.k[page_indices].reshape(n, kv_max, hkv, d)
    v = cache.v[page_indices].reshape(n, kv_max, hkv, d)
    if cache.k_scale is not None:  # the dense peer reads a dequantized copy
        k = kv_quant.dequantize(k, cache.k_scale[page_indices].reshape(n, kv_max, hkv)).astype(q.dtype)
        v = kv_quant.dequantize(v, cache.v_scale[page_indices].reshape(n, kv_max, hkv)).astype(q.dtype)
    qd = q.reshape(n, q_max, hq, d)  # benchmark batches are uniform
    q_lens = jnp.full((n,), q_max, jnp.int32)
    impl = "cudnn" if jax.default_backend() == "gpu" else None

    @jax.jit
    def fn(qd, k, v, kv_lens):
        return jax.nn.dot_product_attention(qd, k, v, is_causal=causal, query_seq_lengths=q_lens,
                                            key_value_seq_lengths=kv_lens, implementation=impl)

    return fn, (qd, k, v, kv_lens)


def run_case(kind, lengths, heads, dtype, impls, iters, interpret, kv_quant_dtype=None):
    q, cache, kv_lens, page_indices, cu, num_seqs = make_inputs(jax.random.key(0), lengths, heads, dtype,
                                                                kv_quant_dtype)
    hq, hkv, d = heads
    itemsize = jnp.dtype(dtype).itemsize
    kv_itemsize = cache.k.dtype.itemsize
    kv_tokens = sum(kv for _, kv in lengths)
    scale_bytes = 2 * kv_tokens * hkv * 4 if cache.k_scale is not None else 0
    bytes_moved = 2 * kv_tokens * hkv * d * kv_itemsize + scale_bytes + 2 * q.size * itemsize
    flops = sum(4 * hq * d * (ql * (2 * kv - ql + 1) // 2) for ql, kv in lengths)
    sm_scale = d ** -0.5
    rows = []
    for impl in impls:
        if impl == "dense":
            if len({ql for ql, _ in lengths}) != 1:
                continue
            fn, args = dense_peer(q, cache, kv_lens, page_indices, lengths, causal=kind != "decode")
        else:
            opts = dict(sm_scale=sm_scale, impl=impl)
            if impl.startswith("pallas"):
                opts["interpret"] = interpret
            fn = jax.jit(lambda *a, _o=opts: ragged_paged_attention(*a, **_o))
            kv = to_head_major(cache) if impl == "pallas_tpu" else cache
            args = (q, kv, kv_lens, page_indices, cu, num_seqs)
        try:
            sec = time_fn(fn, *args, iters=iters)
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            rows.append(dict(kind=kind, impl=impl, error=f"{type(e).__name__}: {e}"[:300]))
            continue
        rows.append(dict(kind=kind, impl=impl, num_seqs=len(lengths), q_len=lengths[0][0],
                         kv_len=lengths[0][1], seconds=sec, bytes_per_s=bytes_moved / sec,
                         tflops=flops / sec / 1e12))
        print(f"{kind:8s} {impl:11s} seqs={len(lengths):4d} q={lengths[0][0]:5d} kv={lengths[0][1]:6d} "
              f"{sec * 1e3:9.3f} ms  {bytes_moved / sec / 1e9:8.2f} GB/s  {flops / sec / 1e12:7.3f} TFLOP/s")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU-friendly configuration")
    p.add_argument("--cpu", action="store_true", help="C++ CPU kernel vs xla at the CPU engine's shapes")
    p.add_argument("--model", choices=sorted(MODELS), default=None)
    p.add_argument("--impls", default=None, help="comma list of pallas_gpu, pallas_tpu, xla, dense")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    p.add_argument("--kv-quant", choices=["int8", "float8_e4m3fn"], default=None,
                   help="quantized KV cache (per-token-per-head scales)")
    p.add_argument("--max-cache-gb", type=float, default=24.0, help="skip decode cases with a larger cache")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out-dir", default=str(pathlib.Path(__file__).parent / "results"))
    a = p.parse_args(argv)

    on_cpu = jax.default_backend() == "cpu"
    model = a.model or ("smollm2-135m" if a.quick or a.cpu else "llama3-8b")
    heads = MODELS[model]
    dtype = jnp.dtype(a.dtype or ("float32" if on_cpu else "bfloat16"))
    default_impls = "cpu,xla" if a.cpu else "xla,pallas_gpu,pallas_tpu,dense" if a.quick else "pallas_gpu,xla,dense"
    impls = (a.impls or default_impls).split(",")
    iters = a.iters or (3 if a.quick else 20)
    interpret = (on_cpu and not a.cpu) or None
    kvq = None if a.kv_quant is None else jnp.dtype(a.kv_quant)
    if a.cpu:
        decode = [(64, 352)]
        prefill = [(2, 256)]
        mixed = [[(1, 352)] * 63 + [(256, 256)]]
    elif a.quick:
        decode = [(8, 256)]
        prefill = [(1, 256)]
        mixed = [[(1, 256)] * 8 + [(128, 256)]]
    else:
        decode = [(b, c) for b in (1, 8, 32, 64, 128, 256) for c in (512, 2048, 8192, 32768)]
        prefill = [(1, 2048), (1, 8192), (4, 2048)]
        mixed = [[(1, 2048)] * 64 + [(512, 2048)]]

    device = jax.devices()[0]
    bw = copy_bandwidth((64 if on_cpu else 2048) * 2**20, iters)
    print(f"device: {device.device_kind} ({jax.default_backend()}), copy bandwidth {bw / 1e9:.1f} GB/s")
    results = []
    for batch, ctx in decode:
        cache_gb = 2 * batch * ctx * heads[1] * heads[2] * dtype.itemsize / 2**30
        if cache_gb > a.max_cache_gb:
            continue
        results += run_case("decode", [(1, ctx)] * batch, heads, dtype, impls, iters, interpret, kvq)
    for n, length in prefill:
        results += run_case("prefill", [(length, length)] * n, heads, dtype, impls, iters, interpret, kvq)
    for lengths in mixed:
        results += run_case("mixed", lengths, heads, dtype, [i for i in impls if i != "dense"], iters,
                            interpret, kvq)
    for r in results:
        if "bytes_per_s" in r:
            r["fraction_of_copy_bw"] = r["bytes_per_s"] / bw

    now = datetime.datetime.now(datetime.UTC)
    label = device.device_kind.replace(" ", "_").lower() + (f"_kv{a.kv_quant}" if a.kv_quant else "")
    out = pathlib.Path(a.out_dir) / f"attention_{label}_{now:%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        benchmark="ragged_paged_attention", date=now.isoformat(timespec="seconds"),
        device=device.device_kind, backend=jax.default_backend(), jax_version=jax.__version__,
        model=model, heads=dict(zip(("num_q_heads", "num_kv_heads", "head_dim"), heads, strict=True)),
        page_size=PAGE_SIZE, dtype=str(dtype), kv_quant=a.kv_quant, quick=a.quick, cpu_preset=a.cpu,
        interpret=bool(interpret),
        copy_bandwidth_bytes_per_s=bw, results=results), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
