"""Paged KV cache and ragged paged attention: the public entry points.

``KVPages`` is one layer's paged cache. ``write_kv`` scatters this step's keys / values into it and
``ragged_paged_attention`` attends a flattened, ragged batch of queries (decode, prefill chunks and
speculative-verify sequences mixed) against it. ``impl`` picks the implementation: ``"xla"`` (pure jnp,
:mod:`.reference`), ``"cpu"`` (C++ through ``jax.ffi``, :mod:`.cpu`), ``"pallas_tpu"`` (:mod:`.tpu`) or
``"pallas_gpu"`` (:mod:`.gpu`); ``None`` follows :func:`pallas_kernels.backend.default_impl`.

Layouts. The cache comes in two physical layouts, named by ``KVPages.layout``:

* ``KVLayout.TOKEN_MAJOR`` (default off TPU): ``k, v: [num_pages, page_size, num_kv_heads, head_dim]``.
  A page is a contiguous run of tokens with all heads; the GPU kernel gathers key rows from it.
* ``KVLayout.HEAD_MAJOR`` (default on TPU, required by ``"pallas_tpu"``):
  ``k, v: [num_pages, num_kv_heads, page_size, round_up(head_dim, 128)]``, the pad lanes are zero.
  On a TPU the two minor dimensions of an array are tiled (8 or 16 sublanes x 128 lanes). With the
  token-major layout those would be ``(num_kv_heads, head_dim)``: 3 KV heads x 64 dims would be padded to
  8-16 x 128 in HBM and VMEM (5-10x the bytes) and every per-head load in the kernel a sublane-strided
  gather. Head-major pages make each (page, head) a dense ``[page_size, 128k]`` tile, so one DMA per
  page fetches all heads and per-head operands are plain 2D tiles feeding the MXU. Padding
  ``head_dim`` to 128 costs nothing extra on a TPU (the lanes would be padded anyway).

The layout is a static part of the pytree (it never becomes a traced leaf). Code that only uses
:func:`init_kv_pages`, :func:`write_kv` and :func:`ragged_paged_attention` never needs to look at it.
The XLA path reads both layouts; the GPU kernel reads token-major only.

Quantized KV (``init_kv_pages(..., quant_dtype=jnp.int8 | jnp.float8_e4m3fn | jnp.float8_e5m2)``):
``k`` / ``v`` hold the quantized values and ``k_scale`` / ``v_scale`` one float32 absmax scale per
(token, KV head), shaped like ``k.shape[:3]`` in either layout (token-major
``[num_pages, page_size, num_kv_heads]``, head-major ``[num_pages, num_kv_heads, page_size]``).
:func:`write_kv` quantizes; every implementation applies the scales inside (see :mod:`.kv_quant`).
"""

from __future__ import annotations

import enum
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.backend import ATTENTION_IMPLS, check_impl, default_impl, needs_interpret
from pallas_kernels.ragged_paged_attention import kv_quant

TPU_LANES = 128


@jax.tree_util.register_static
class KVLayout(enum.Enum):
    """Physical layout of :class:`KVPages` (see the module docstring)."""

    TOKEN_MAJOR = "token_major"
    HEAD_MAJOR = "head_major"


class KVPages(NamedTuple):
    """One layer's paged KV cache (a pytree; ``layout`` is static).

    Attributes:
      k, v: token-major ``[num_pages, page_size, num_kv_heads, head_dim]`` or head-major
        ``[num_pages, num_kv_heads, page_size, padded_head_dim]``.
      k_scale, v_scale: ``f32[k.shape[:3]]`` per-(token, head) scales of a quantized cache, else ``None``.
      layout: :class:`KVLayout`.
    """

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None
    layout: KVLayout = KVLayout.TOKEN_MAJOR

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def page_size(self) -> int:
        return self.k.shape[2] if self.layout is KVLayout.HEAD_MAJOR else self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1] if self.layout is KVLayout.HEAD_MAJOR else self.k.shape[2]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None


def default_layout(impl: str | None = None) -> KVLayout:
    """Layout :func:`init_kv_pages` uses by default: head-major for ``"pallas_tpu"``, else token-major."""
    impl = check_impl(impl, ATTENTION_IMPLS) if impl is not None else default_impl()
    return KVLayout.HEAD_MAJOR if impl == "pallas_tpu" else KVLayout.TOKEN_MAJOR


def _as_layout(layout: KVLayout | str | None) -> KVLayout:
    if layout is None:
        return default_layout()
    try:
        return KVLayout(layout)
    except ValueError:
        raise ValueError(
            f"unknown KV layout {layout!r}; expected one of {[m.value for m in KVLayout]}"
        ) from None


def _padded_head_dim(head_dim: int, layout: KVLayout) -> int:
    if layout is KVLayout.HEAD_MAJOR:
        return -(-head_dim // TPU_LANES) * TPU_LANES
    return head_dim


def init_kv_pages(
    num_pages: int,
    page_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype=jnp.float32,
    *,
    layout: KVLayout | str | None = None,
    quant_dtype=None,
) -> KVPages:
    """A zero-filled cache.

    Args:
      num_pages, page_size, num_kv_heads, head_dim: cache geometry; ``page_size`` a power of two.
      dtype: storage dtype of K and V (e.g. ``jnp.float32``, ``jnp.bfloat16``) for a float cache.
      layout: a :class:`KVLayout` or its value; ``None`` means :func:`default_layout`.
      quant_dtype: ``jnp.int8``, ``jnp.float8_e4m3fn`` or ``jnp.float8_e5m2`` for a quantized cache
        (K / V stored in it, with f32 scales); ``dtype`` is then unused.

    Returns:
      ``KVPages`` with ``k, v`` of shape ``[num_pages, page_size, num_kv_heads, head_dim]``
      (token-major) or ``[num_pages, num_kv_heads, page_size, round_up(head_dim, 128)]`` (head-major).
    """
    for name, value in (("num_pages", num_pages), ("page_size", page_size),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if not isinstance(value, int | np.integer) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    layout = _as_layout(layout)
    dp = _padded_head_dim(head_dim, layout)
    if layout is KVLayout.HEAD_MAJOR:
        shape = (num_pages, num_kv_heads, page_size, dp)
    else:
        shape = (num_pages, page_size, num_kv_heads, dp)
    if quant_dtype is not None:
        qdt = kv_quant.check_quant_dtype(quant_dtype)
        scale = jnp.zeros(shape[:3], jnp.float32)
        return KVPages(jnp.zeros(shape, qdt), jnp.zeros(shape, qdt), scale, jnp.zeros(shape[:3], jnp.float32),
                       layout=layout)
    return KVPages(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), layout=layout)


def _check_cache(kv: KVPages) -> None:
    if not isinstance(kv, KVPages):
        raise TypeError(f"kv must be a KVPages, got {type(kv).__name__}")
    if kv.k.ndim != 4 or kv.k.shape != kv.v.shape:
        raise ValueError(f"kv.k and kv.v must be 4-D and of equal shape, got {kv.k.shape} and {kv.v.shape}")
    if kv.k.dtype != kv.v.dtype:
        raise ValueError(f"kv.k and kv.v must share a dtype, got {kv.k.dtype} and {kv.v.dtype}")
    if (kv.k_scale is None) != (kv.v_scale is None):
        raise ValueError("k_scale and v_scale must both be set or both be None")
    if kv.k_scale is not None:
        kv_quant.check_quant_dtype(kv.k.dtype)
        for name, sc in (("k_scale", kv.k_scale), ("v_scale", kv.v_scale)):
            if sc.shape != kv.k.shape[:3] or sc.dtype != jnp.float32:
                raise ValueError(
                    f"{name} must be float32 of shape {kv.k.shape[:3]}, got {sc.dtype}{list(sc.shape)}")
    if kv.page_size & (kv.page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {kv.page_size}")


@jax.jit
def write_kv(kv: KVPages, k_new: jax.Array, v_new: jax.Array, slot_mapping: jax.Array) -> KVPages:
    """Scatter this step's keys and values into the cache.

    Args:
      kv: the cache; donate it (``jax.jit(..., donate_argnums=...)``) so XLA updates it in place.
      k_new, v_new: ``[T, num_kv_heads, head_dim]``; cast to the cache dtype, or quantized (absmax
        per token and head) for a quantized cache.
      slot_mapping: ``i32[T]``; token ``t`` goes to page ``slot // page_size``, offset
        ``slot % page_size``. A negative slot marks a padding token: nothing is written for it.
        Slots must be unique among non-negative entries.

    Returns:
      The updated ``KVPages`` (same layout).
    """
    _check_cache(kv)
    if k_new.ndim != 3 or k_new.shape != v_new.shape:
        raise ValueError(
            f"k_new and v_new must be [T, num_kv_heads, head_dim], got {k_new.shape}, {v_new.shape}")
    t, hkv, d = k_new.shape
    dp = _padded_head_dim(d, kv.layout)
    if hkv != kv.num_kv_heads or dp != kv.k.shape[-1]:
        raise ValueError(
            f"k_new [T, num_kv_heads, head_dim] = {k_new.shape} does not match the cache "
            f"(num_kv_heads={kv.num_kv_heads}, head_dim={kv.k.shape[-1]}, layout={kv.layout.value})"
        )
    if slot_mapping.shape != (t,) or not jnp.issubdtype(slot_mapping.dtype, jnp.integer):
        raise ValueError(f"slot_mapping must be an integer array of shape ({t},), got "
                         f"{slot_mapping.dtype}{list(slot_mapping.shape)}")
    ps = kv.page_size
    slots = slot_mapping.astype(jnp.int32)
    # Padding tokens get an out-of-range page index and are dropped by the scatter.
    page = jnp.where(slots >= 0, slots // ps, kv.num_pages)
    offset = jnp.where(slots >= 0, slots % ps, 0)
    scales = None
    if kv.quantized:
        k_new, k_sc = kv_quant.quantize(k_new, kv.k.dtype)
        v_new, v_sc = kv_quant.quantize(v_new, kv.v.dtype)
        scales = (k_sc, v_sc)
    if dp != d:
        pad = ((0, 0), (0, 0), (0, dp - d))
        k_new, v_new = jnp.pad(k_new, pad), jnp.pad(v_new, pad)
    k_new, v_new = k_new.astype(kv.k.dtype), v_new.astype(kv.v.dtype)

    def scatter(cache, new):
        if kv.layout is KVLayout.HEAD_MAJOR:
            # Advanced indices separated by a slice: the token axis comes first ([T, Hkv, ...]).
            return cache.at[page, :, offset].set(new, mode="drop", unique_indices=True)
        return cache.at[page, offset].set(new, mode="drop", unique_indices=True)

    out = kv._replace(k=scatter(kv.k, k_new), v=scatter(kv.v, v_new))
    if scales is not None:
        out = out._replace(k_scale=scatter(kv.k_scale, scales[0]), v_scale=scatter(kv.v_scale, scales[1]))
    return out


def _check_attention_args(q, kv, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale, sliding_window,
                          soft_cap):
    _check_cache(kv)
    if q.ndim != 3:
        raise ValueError(f"q must be [T, num_q_heads, head_dim], got shape {q.shape}")
    _, hq, d = q.shape
    hkv = kv.num_kv_heads
    if hq % hkv:
        raise ValueError(f"num_q_heads ({hq}) must be a multiple of num_kv_heads ({hkv})")
    if _padded_head_dim(d, kv.layout) != kv.k.shape[-1]:
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
    ``kv_lens[s]`` keys (this step's included, already written with :func:`write_kv`). Its row ``i``
    sits at position ``kv_lens[s] - q_len + i`` and attends to key positions ``j <= position`` (and
    ``j > position - sliding_window``). Key ``j`` lives in page ``page_indices[s, j // page_size]``.
    Rows from ``cu_q_lens[num_seqs[0]]`` on are padding and come out as zeros.

    Args:
      q: ``[T, num_q_heads, head_dim]``.
      kv: the layer's :class:`KVPages`.
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

        if explicit or cpu.unsupported_reason(q, kv) is None:
            return cpu.ragged_paged_attention_cpu(q, kv, *meta, **opts)
        impl = "xla"  # the default choice falls back for inputs the C++ kernel does not take
    if impl == "xla":
        from pallas_kernels.ragged_paged_attention import reference

        return reference.ragged_paged_attention_xla(q, kv, *meta, **opts)
    interp = needs_interpret(impl, interpret)
    if impl == "pallas_tpu":
        if kv.layout is not KVLayout.HEAD_MAJOR:
            raise ValueError("impl='pallas_tpu' needs a head-major cache: create it with "
                             "init_kv_pages(..., layout='head_major')")
        from pallas_kernels.ragged_paged_attention import tpu

        return tpu.ragged_paged_attention_tpu(q, kv, *meta, interpret=interp, **opts)
    if kv.layout is not KVLayout.TOKEN_MAJOR:
        raise ValueError("impl='pallas_gpu' needs a token-major cache: create it with "
                         "init_kv_pages(..., layout='token_major')")
    from pallas_kernels.ragged_paged_attention import gpu

    return gpu.ragged_paged_attention_gpu(q, kv, *meta, interpret=bool(interp), **opts)

