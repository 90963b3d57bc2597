"""Ragged paged attention on the CPU: a C++ kernel (``cpu_kernel.cc``) called through ``jax.ffi``.

XLA:CPU runs the pure-jnp path (:mod:`.reference`) by gathering pages into float32 blocks, and with a
16-bit or 8-bit cache it converts far more of the cache than a step reads. The C++ kernel reads each
sequence's pages in place, dequantizes one block of keys at a time into float32 tiles and runs an
online softmax over them, spread over XLA's intra-op thread pool (see the comment at the top of
``cpu_kernel.cc``). Decode rows take a decode path (``cpu_decode.h``: each key / value row widened
once in registers for all query heads of its KV head; bf16 dot products for Q K^T on a bf16 cache);
prefill rows (``q_len * group >= 16``) a blocked path (``cpu_blocked.h``) where all query heads of a KV
head over a block of rows share each tile, with register-blocked products and, for bfloat16 queries on a
16- or 8-bit cache where the CPU has AVX512-BF16, bf16 dot products with float32 accumulation (the
softmax weights are rounded to bfloat16 before P @ V; everything else is exact or float32).

The kernel is compiled on first use with the system C++ compiler and cached
(:mod:`pallas_kernels.cpu_build`, shared with the quantized-matmul kernel).

Choosing and building are separate. :func:`buildable` is cheap and side-effect free (is the kernel
built, or not yet tried and a compiler on the path?); :func:`pallas_kernels.backend.default_impl` asks
it. :func:`available` builds and registers the kernel (once; the result is remembered) and is called
where the kernel is about to be used: by the dispatcher and by :func:`ragged_paged_attention_cpu`.
Without a compiler the default implementation on the CPU is ``"xla"``; if the build fails,
:func:`available` is ``False``, the default falls back to ``"xla"`` and ``impl="cpu"`` raises
:class:`~pallas_kernels.backend.KernelUnavailableError`.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_build
from pallas_kernels.ragged_paged_attention.pages import KVLayout, KVPages

_TARGET = "jaxinfer_ragged_paged_attention_cpu"
_Q_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_KV_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int8),
              jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))

_MAX_HEAD_DIM = 256  # kMaxVecs * kLanes in cpu_kernel.cc

#: The C++ kernel (built on first use; :mod:`pallas_kernels.cpu_build`).
KERNEL = cpu_build.CpuKernel(Path(__file__).with_name("cpu_kernel.cc"), prefix="rpa_cpu",
                             symbol="JaxinferRaggedPagedAttentionCpu", target=_TARGET, what="CPU attention kernel")
buildable = KERNEL.buildable
available = KERNEL.available


def unsupported_reason(q: jax.Array, kv: KVPages) -> str | None:
    """Why the kernel cannot take these inputs (``None`` if it can)."""
    if kv.layout is not KVLayout.TOKEN_MAJOR:
        return "impl='cpu' needs a token-major cache"
    if jnp.dtype(q.dtype) not in _Q_DTYPES:
        return f"impl='cpu' takes float32 or bfloat16 queries, got {q.dtype}"
    if jnp.dtype(kv.k.dtype) not in _KV_DTYPES:
        return f"impl='cpu' does not read a {kv.k.dtype} cache"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"impl='cpu' takes head_dim <= {_MAX_HEAD_DIM}, got {q.shape[-1]}"
    return None


def ragged_paged_attention_cpu(q: jax.Array, kv: KVPages, kv_lens: jax.Array, page_indices: jax.Array,
                               cu_q_lens: jax.Array, num_seqs: jax.Array, *, sm_scale: float,
                               sliding_window: int | None = None, soft_cap: float | None = None) -> jax.Array:
    """The C++ kernel (arguments as in :func:`.api.ragged_paged_attention`, already validated).

    ``q [T, Hq, D]`` (f32 / bf16), token-major ``kv``, ``kv_lens i32[S]``, ``page_indices i32[S, P]``,
    ``cu_q_lens i32[S+1]``, ``num_seqs i32[1]`` -> ``[T, Hq, D]`` in ``q.dtype``.
    """
    KERNEL.require()
    reason = unsupported_reason(q, kv)
    if reason:
        raise ValueError(reason)
    none = jnp.zeros((1,), jnp.float32)
    ks = kv.k_scale if kv.quantized else none
    vs = kv.v_scale if kv.quantized else none
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")
    return call(q, kv.k, kv.v, ks, vs, kv_lens.astype(jnp.int32), page_indices.astype(jnp.int32),
                cu_q_lens.astype(jnp.int32), num_seqs.astype(jnp.int32), sm_scale=np.float32(sm_scale),
                sliding_window=np.int64(sliding_window or 0), soft_cap=np.float32(soft_cap or 0.0))
