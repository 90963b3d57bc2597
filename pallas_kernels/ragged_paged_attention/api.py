"""Ragged paged attention: the dispatcher.

:func:`ragged_paged_attention` attends a flattened, ragged batch of queries (decode, prefill chunks and
speculative-verify sequences mixed) against one layer's paged cache. It validates the arguments and hands
them to the implementation ``impl`` names: ``"xla"`` (pure jnp, :mod:`.reference`), ``"cpu"`` (C++ through
``jax.ffi``, :mod:`.cpu`), ``"pallas_tpu"`` (:mod:`.tpu`) or ``"pallas_gpu"`` (:mod:`.gpu`); ``None``
follows :func:`pallas_kernels.backend.default_impl`.

The cache itself (:class:`~.pages.KVPages`, :class:`~.pages.KVLayout`, :func:`~.pages.init_kv_pages`,
:func:`~.pages.write_kv`, the page geometry) lives in :mod:`.pages`; import it from there. The
implementations import :mod:`.pages` too, never this module.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from pallas_kernels.backend import ATTENTION_IMPLS, check_impl, default_impl, needs_interpret
from pallas_kernels.ragged_paged_attention.pages import FUSED_HALF, KVLayout, KVPages, check_cache, padded_head_dim


def _check_attention_args(q, kv, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale, sliding_window,
                          soft_cap):
    check_cache(kv)
    if q.ndim != 3:
        raise ValueError(f"q must be [T, num_q_heads, head_dim], got shape {q.shape}")
    _, hq, d = q.shape
    hkv = kv.num_kv_heads
    if hq % hkv:
        raise ValueError(f"num_q_heads ({hq}) must be a multiple of num_kv_heads ({hkv})")
    if (d > FUSED_HALF if kv.layout is KVLayout.HEAD_MAJOR_FUSED
            else padded_head_dim(d, kv.layout) != kv.k.shape[-1]):
        raise ValueError(f"q head_dim {d} does not match the cache's head_dim {kv.k.shape[-1]} "
                         f"(layout {kv.layout.value})")
    if page_indices.ndim != 2:
        raise ValueError(f"page_indices must be [S, pages_per_seq], got shape {page_indices.shape}")
    s = page_indices.shape[0]
    expected = {"kv_lens": (s,), "cu_q_lens": (s + 1,), "num_seqs": (1,)}
    for name, arr in (("kv_lens", kv_lens), ("cu_q_lens", cu_q_lens), ("num_seqs", num_seqs),
                      ("page_indices", page_indices)):
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array, got {arr.dtype}")
        if name in expected and arr.shape != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} (S={s} from page_indices), "
                             f"got {arr.shape}")
    if not isinstance(sm_scale, numbers.Real) or isinstance(sm_scale, bool):
        raise TypeError(f"sm_scale must be a static real number, got {type(sm_scale).__name__}")
    window_ok = isinstance(sliding_window, numbers.Integral) and sliding_window > 0
    if sliding_window is not None and not window_ok:
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if soft_cap is not None and (not isinstance(soft_cap, numbers.Real) or soft_cap <= 0):
        raise ValueError(f"soft_cap must be a positive float or None, got {soft_cap!r}")


def ragged_paged_attention(
    q: jax.Array,
    kv: KVPages,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    impl: str | None = None,
    interpret=None,
) -> jax.Array:
    """Causal attention of a flattened ragged batch of queries against a paged KV cache.

    Sequence ``s < num_seqs[0]`` owns query rows ``cu_q_lens[s]:cu_q_lens[s+1]`` (``q_len`` rows) and
    ``kv_lens[s]`` keys (this step's included, already written with :func:`.pages.write_kv`). Its row ``i``
    sits at position ``kv_lens[s] - q_len + i`` and attends to key positions ``j <= position`` (and
    ``j > position - sliding_window``). Key ``j`` lives in page ``page_indices[s, j // page_size]``.
    Rows from ``cu_q_lens[num_seqs[0]]`` on are padding and come out as zeros.

    Args:
      q: ``[T, num_q_heads, head_dim]``.
      kv: the layer's :class:`.pages.KVPages`.
      kv_lens: ``i32[S]``; page_indices: ``i32[S, pages_per_seq]``; cu_q_lens: ``i32[S + 1]``;
        num_seqs: ``i32[1]``. Entries of sequences ``>= num_seqs[0]`` are ignored.
      sm_scale: multiplier of ``q . k`` (usually ``head_dim ** -0.5``).
      sliding_window: attend to the ``sliding_window`` most recent positions (itself included).
      soft_cap: logits become ``soft_cap * tanh(logits / soft_cap)`` before masking.
      impl: ``"xla"``, ``"cpu"``, ``"pallas_tpu"``, ``"pallas_gpu"`` or ``None`` (backend default; on
        the CPU the C++ kernel, or ``"xla"`` where it cannot be built or cannot take these inputs).
      interpret: Pallas interpret mode; ``None`` interprets when the backend cannot compile ``impl``.
        ``"pallas_tpu"`` also takes a ``pltpu.InterpretParams``.

    Returns:
      ``[T, num_q_heads, head_dim]`` in ``q.dtype``; softmax is computed in float32.
    """
    explicit = impl is not None
    impl = check_impl(impl, ATTENTION_IMPLS) if explicit else default_impl(attention=True)
    _check_attention_args(q, kv, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale, sliding_window,
                          soft_cap)
    meta = (kv_lens.astype(jnp.int32), page_indices.astype(jnp.int32), cu_q_lens.astype(jnp.int32),
            num_seqs.astype(jnp.int32))
    opts = dict(sm_scale=float(sm_scale),
                sliding_window=None if sliding_window is None else int(sliding_window),
                soft_cap=None if soft_cap is None else float(soft_cap))
    if impl == "cpu":
        from pallas_kernels.ragged_paged_attention import cpu

        # The default choice falls back for inputs the C++ kernel does not take, or when building it
        # (done here, on first use: default_impl() only checks for a compiler) fails.
        if explicit or (cpu.unsupported_reason(q, kv) is None and cpu.available()):
            return cpu.ragged_paged_attention_cpu(q, kv, *meta, **opts)
        impl = "xla"
    if impl == "xla":
        from pallas_kernels.ragged_paged_attention import reference

        return reference.ragged_paged_attention_xla(q, kv, *meta, **opts)
    interp = needs_interpret(impl, interpret)
    if impl == "pallas_tpu":
        if not kv.layout.head_major:
            raise ValueError("impl='pallas_tpu' needs a head-major or fused cache: create it with "
                             "init_kv_pages(..., layout='head_major')")
        from pallas_kernels.ragged_paged_attention import tpu

        return tpu.ragged_paged_attention_tpu(q, kv, *meta, interpret=interp, **opts)
    if kv.layout is not KVLayout.TOKEN_MAJOR:
        raise ValueError("impl='pallas_gpu' needs a token-major cache: create it with "
                         "init_kv_pages(..., layout='token_major')")
    from pallas_kernels.ragged_paged_attention import gpu

    return gpu.ragged_paged_attention_gpu(q, kv, *meta, interpret=bool(interp), **opts)

