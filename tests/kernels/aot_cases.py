"""Abstract kernel calls compiled ahead of time for a target (no accelerator needed).

Each case builds ``jax.ShapeDtypeStruct`` arguments on one compile-only device of a target
(:mod:`pallas_kernels.targets`) and compiles the Pallas kernel with interpret off through
``jax.jit(...).lower(...).compile()``. Used by ``test_aot_kernels.py``; also runnable as a script to print
every case's result and compile time (``python -m tests.kernels.aot_cases tpu-v5e``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.grouped_matmul.api import grouped_matmul
from pallas_kernels.quantized_matmul.api import quantized_matmul
from pallas_kernels.quantized_matmul.config import as_config
from pallas_kernels.quantized_matmul.experts import abstract_expert_qarray
from pallas_kernels.quantized_matmul.qarray import abstract_qarray
from pallas_kernels.ragged_paged_attention.api import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.pages import KVLayout, default_layout, init_kv_pages
from pallas_kernels.targets import get_target, target_devices

# Engine-shaped buckets (EngineConfig defaults: page_size 16, max_num_seqs 32, max_num_batched_tokens 512;
# max_model_len 2048 -> 128 pages per sequence): (T tokens, S sequences).
BUCKETS = {"decode": (32, 32), "mixed": (128, 32), "prefill": (512, 8)}
PAGE_SIZE = 16
PAGES_PER_SEQ = 128
NUM_PAGES = 2048
KV_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
# (num_q_heads, num_kv_heads, head_dim): SmolLM2-135M (GQA 3, d 64), Llama-3-8B per TP-1 shard (GQA 4,
# d 128), MHA (GQA 1).
HEADS = {"gqa3-d64": (9, 3, 64), "gqa4-d128": (32, 8, 128), "gqa1-d64": (8, 8, 64), "gqa1-d128": (4, 4, 128)}


@dataclasses.dataclass(frozen=True)
class AttnCase:
    bucket: str = "decode"
    kv: str = "bf16"
    heads: str = "gqa3-d64"
    sliding_window: int | None = None
    soft_cap: float | None = None
    layout: str | None = None  # None: the target's default for the head_dim (fused K|V on TPU at d <= 64)

    @property
    def id(self) -> str:
        extra = (f"-sw{self.sliding_window}" if self.sliding_window else "") + (
            f"-cap{self.soft_cap:g}" if self.soft_cap else "") + (f"-{self.layout}" if self.layout else "")
        return f"{self.bucket}-{self.kv}-{self.heads}{extra}"


@functools.cache
def one_device_mesh(target: str) -> Mesh:
    return Mesh(target_devices(target, 1), ("x",))


def _sds(mesh, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))


def attention_lowered(target: str, case: AttnCase):
    """The lowered (not yet compiled) ragged paged attention call of ``case`` for ``target``."""
    tgt = get_target(target)
    mesh = one_device_mesh(target)
    t, s = BUCKETS[case.bucket]
    hq, hkv, d = HEADS[case.heads]
    kv_dtype = KV_DTYPES[case.kv]
    quantized = case.kv in ("int8", "fp8")
    q_dtype = jnp.float32 if case.kv == "f32" else jnp.bfloat16
    layout = KVLayout(case.layout) if case.layout else default_layout(tgt.impl, d)
    kv = jax.eval_shape(lambda: init_kv_pages(NUM_PAGES, PAGE_SIZE, hkv, d, kv_dtype, layout=layout,
                                              quant_dtype=kv_dtype if quantized else None))
    kv = jax.tree.map(lambda a: _sds(mesh, a.shape, a.dtype), kv)
    i32 = jnp.int32
    args = (_sds(mesh, (t, hq, d), q_dtype), kv, _sds(mesh, (s,), i32), _sds(mesh, (s, PAGES_PER_SEQ), i32),
            _sds(mesh, (s + 1,), i32), _sds(mesh, (1,), i32))
    fn = functools.partial(ragged_paged_attention, sm_scale=d**-0.5, sliding_window=case.sliding_window,
                           soft_cap=case.soft_cap, impl=tgt.impl, interpret=False)
    return jax.jit(fn).lower(*args)


# (K, N) of engine matmuls. SmolLM2-135M: hidden 576, MLP 1536 (gate/up K=576, down_proj K=1536);
# Llama-3-8B: hidden 4096, MLP 14336.
# On the GPU (bk = 128) K=576 leaves a masked K tail; on the TPU int4 g128 at K=1536 does (bk = 1024).
MATMUL_SHAPES = {"k576": (576, 1536), "k1536": (1536, 576), "k4096": (4096, 14336), "k14336": (14336, 4096)}
QMM_FORMATS = ("int8", "int8-g32", "int4", "int4-g32", "int4-g64", "int4-asym", "fp8", "fp8-w8a8", "int8-w8a8")


def matmul_lowered(target: str, fmt: str, m: int, shape: str | tuple[int, int], blocks=None):
    """The lowered quantized matmul ``x[m, K] (bf16) @ w[K, N] (fmt)`` for ``target``; ``shape``: a
    :data:`MATMUL_SHAPES` name or ``(K, N)``."""
    tgt = get_target(target)
    mesh = one_device_mesh(target)
    k, n = MATMUL_SHAPES[shape] if isinstance(shape, str) else shape
    w = abstract_qarray(k, n, as_config(fmt))
    w = jax.tree.map(lambda a: _sds(mesh, a.shape, a.dtype), w)
    x = _sds(mesh, (m, k), jnp.bfloat16)
    fn = functools.partial(quantized_matmul, impl=tgt.impl, interpret=False, blocks=blocks)
    return jax.jit(fn).lower(x, w)


# Grouped (MoE expert) matmuls at Qwen3-30B-A3B's layer shapes (hidden 2048, moe_intermediate 768, 128 experts,
# top-8): (G, K, N) of the fused gate/up projection and of down_proj. Rows M = tokens x top-k: decode 32 x 8,
# prefill 512 x 8.
GMM_SHAPES = {"gate_up": (128, 2048, 1536), "down": (128, 768, 2048)}
GMM_ROWS = {"decode": 256, "prefill": 4096}


def grouped_lowered(target: str, fmt: str | None, rows: str, shape: str):
    """The lowered grouped matmul ``x[M, K] (bf16)`` times experts ``[G, K, N]`` (``fmt``: None for bf16, or a
    QArray format) with traced group sizes, for ``target``."""
    tgt = get_target(target)
    mesh = one_device_mesh(target)
    g, k, n = GMM_SHAPES[shape]
    m = GMM_ROWS[rows]
    if fmt is None:
        w = _sds(mesh, (g, k, n), jnp.bfloat16)
    else:
        w = jax.tree.map(lambda a: _sds(mesh, a.shape, a.dtype), abstract_expert_qarray(g, k, n, as_config(fmt)))
    fn = functools.partial(grouped_matmul, impl=tgt.impl, interpret=False)
    return jax.jit(fn).lower(_sds(mesh, (m, k), jnp.bfloat16), w, _sds(mesh, (g,), jnp.int32))


def k_has_tail(target: str, fmt: str, m: int, shape: str) -> bool:
    """Whether the kernel's default K block leaves a masked tail for this case."""
    from pallas_kernels.quantized_matmul.tuning import gpu_blocks, tpu_blocks

    k, n = MATMUL_SHAPES[shape]
    cfg = as_config(fmt)
    blocks = (tpu_blocks if get_target(target).impl == "pallas_tpu" else gpu_blocks)(m, k, n, cfg)
    return k % blocks.bk != 0


if __name__ == "__main__":  # pragma: no cover - exploration helper
    import sys
    import time

    target = sys.argv[1]
    what = sys.argv[2] if len(sys.argv) > 2 else "all"
    cases = []
    if what in ("all", "attn"):
        for kv in KV_DTYPES:
            for bucket in BUCKETS:
                cases.append(("attn", AttnCase(bucket=bucket, kv=kv)))
        for heads in HEADS:
            cases.append(("attn", AttnCase(heads=heads)))
        cases.append(("attn", AttnCase(sliding_window=256, soft_cap=30.0, kv="int8", bucket="mixed")))
    if what in ("all", "qmm"):
        for fmt in QMM_FORMATS:
            for m in (1, 64):
                for shape in MATMUL_SHAPES:
                    cases.append(("qmm", (fmt, m, shape)))
    for kind, case in cases:
        t0 = time.time()
        try:
            low = attention_lowered(target, case) if kind == "attn" else matmul_lowered(target, *case)
            low.compile()
            res = "ok"
        except Exception as e:  # noqa: BLE001
            res = "FAIL " + str(e).splitlines()[0][:300]
        name = case.id if kind == "attn" else "-".join(map(str, case))
        print(f"{kind} {name}: {res} ({time.time() - t0:.1f}s)", flush=True)
