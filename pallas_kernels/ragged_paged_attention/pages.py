"""The paged KV cache: its types, construction, geometry and writes.

This module owns the cache; :mod:`.api` only dispatches :func:`~.api.ragged_paged_attention` to an
implementation (:mod:`.reference`, :mod:`.cpu`, :mod:`.tpu`, :mod:`.gpu`), and every implementation takes
:class:`KVPages` / :class:`KVLayout` from here, never from :mod:`.api`.

``KVPages`` is one layer's paged cache. :func:`init_kv_pages` allocates a zero-filled one,
:func:`write_kv` scatters a step's keys / values into it, and :func:`padded_head_dim` /
:func:`page_bytes_per_token` report its geometry (so callers sizing a cache do not re-derive lane
padding or scale bytes).

Layouts. The cache comes in two physical layouts, named by ``KVPages.layout``:

* ``KVLayout.TOKEN_MAJOR`` (default off TPU): ``k, v: [num_pages, page_size, num_kv_heads, head_dim]``.
  A page is a contiguous run of tokens with all heads; the GPU kernel gathers key rows from it.
* ``KVLayout.HEAD_MAJOR`` (default on TPU for ``head_dim > 64``; ``"pallas_tpu"`` reads it or the fused one):
  ``k, v: [num_pages, num_kv_heads, page_size, round_up(head_dim, 128)]``, the pad lanes are zero.
  On a TPU the two minor dimensions of an array are tiled (8 or 16 sublanes x 128 lanes). With the
  token-major layout those would be ``(num_kv_heads, head_dim)``: 3 KV heads x 64 dims would be padded to
  8-16 x 128 in HBM and VMEM (5-10x the bytes) and every per-head load in the kernel a sublane-strided
  gather. Head-major pages make each (page, head) a dense ``[page_size, 128k]`` tile, so one DMA per
  page fetches all heads and per-head operands are plain 2D tiles feeding the MXU. Padding
  ``head_dim`` to 128 costs nothing extra in VMEM, but for ``head_dim <= 64`` it doubles the HBM bytes
  of every page read, hence:
* ``KVLayout.HEAD_MAJOR_FUSED`` (default on TPU for ``head_dim <= 64``): one array
  ``k: [num_pages, num_kv_heads, page_size, 128]`` holding a (token, head)'s key in lanes ``0..63`` and
  its value in lanes ``64..127`` (each zero-padded to 64); ``v`` is ``None``. A page row is then all
  payload, and the page has exactly the shape (and DMA) of a head-major page, so the TPU kernel reads
  half the bytes without any new alignment constraint: it multiplies queries zero-padded to 128 lanes
  by the fused tile (only the key lanes count) and probabilities by the same tile (only the value
  lanes of the product are kept).

The layout is a static part of the pytree (it never becomes a traced leaf). Code that only uses
:func:`init_kv_pages`, :func:`write_kv` and :func:`~.api.ragged_paged_attention` never needs to look at
it. The XLA path reads every layout; the GPU and CPU kernels read token-major only, the TPU kernel
the two head-major ones.

Quantized KV (``init_kv_pages(..., quant_dtype=jnp.int8 | jnp.float8_e4m3fn | jnp.float8_e5m2)``):
``k`` / ``v`` hold the quantized values and ``k_scale`` / ``v_scale`` one float32 absmax scale per
(token, KV head): token-major ``[num_pages, page_size, num_kv_heads]``; head-major and fused rows
of ``G`` pages (``scale_pages_per_row``, default 1), ``[num_pages / G, num_kv_heads * G * page_size]``:
page ``p``, head ``h``, token ``t`` at row ``p // G``, lane ``h * G * page_size + (p % G) * page_size + t``
(:func:`scale_lanes`; :func:`page_scales` gives the ``[num_pages, num_kv_heads, page_size]`` view).
A TPU lays a 2-D f32 array out row-major in (8, 128) tiles when its rows are a multiple of 128 lanes,
which is then the layout the kernel DMAs a page's row from; a 3-D ``[pages, heads, page_size]`` array
(16 lanes) was instead laid out pages-minor by the compiler and relaid out around every layer's kernel
and write. Under tensor parallelism the row splits into contiguous per-device head groups, each a
multiple of 128 lanes when ``G`` is :func:`scale_pages_per_row` of the heads one device holds (e.g. 8
pages per row at one KV head of 16 tokens per device).
:func:`write_kv` quantizes; every implementation applies the scales inside (see :mod:`.kv_quant`).
"""

from __future__ import annotations

import enum
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.backend import ATTENTION_IMPLS, check_impl, default_impl, needs_interpret
from pallas_kernels.ragged_paged_attention import kv_quant

TPU_LANES = 128
FUSED_HALF = TPU_LANES // 2  # lanes of K (and of V) in a fused row; the largest head_dim it takes


@jax.tree_util.register_static
class KVLayout(enum.Enum):
    """Physical layout of :class:`KVPages` (see the module docstring)."""

    TOKEN_MAJOR = "token_major"
    HEAD_MAJOR = "head_major"
    HEAD_MAJOR_FUSED = "head_major_fused"

    @property
    def head_major(self) -> bool:
        """Pages are ``[num_pages, num_kv_heads, page_size, lanes]`` (head-major or fused)."""
        return self is not KVLayout.TOKEN_MAJOR


class KVPages(NamedTuple):
    """One layer's paged KV cache (a pytree; ``layout`` is static).

    Attributes:
      k, v: token-major ``[num_pages, page_size, num_kv_heads, head_dim]`` or head-major
        ``[num_pages, num_kv_heads, page_size, padded_head_dim]``; fused: ``k`` is
        ``[num_pages, num_kv_heads, page_size, 128]`` (K in lanes 0-63, V in 64-127) and ``v`` is ``None``.
      k_scale, v_scale: per-(token, head) f32 scales of a quantized cache (:func:`scale_shape`), else ``None``.
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
        return self.k.shape[2] if self.layout.head_major else self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1] if self.layout.head_major else self.k.shape[2]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def scale_pages_per_row(self) -> int:
        """Pages per scale row ``G`` of a quantized head-major / fused cache (see the module docstring); 1
        otherwise. Read from the shapes, so it holds for a device's shard too."""
        if not self.quantized or not self.layout.head_major:
            return 1
        return max(self.k_scale.shape[1] // (self.num_kv_heads * self.page_size), 1)


def default_layout(impl: str | None = None, head_dim: int | None = None) -> KVLayout:
    """The layout for ``impl``'s kernel: for ``"pallas_tpu"`` fused when ``head_dim <= 64`` (given),
    else head-major; token-major for every other implementation."""
    impl = check_impl(impl, ATTENTION_IMPLS) if impl is not None else default_impl()
    if impl != "pallas_tpu":
        return KVLayout.TOKEN_MAJOR
    if head_dim is not None and head_dim <= FUSED_HALF:
        return KVLayout.HEAD_MAJOR_FUSED
    return KVLayout.HEAD_MAJOR


def _as_layout(layout: KVLayout | str | None) -> KVLayout:
    if layout is None:
        return default_layout()
    try:
        return KVLayout(layout)
    except ValueError:
        raise ValueError(
            f"unknown KV layout {layout!r}; expected one of {[m.value for m in KVLayout]}"
        ) from None


def scale_pages_per_row(num_kv_heads: int, page_size: int) -> int:
    """Pages per head-major scale row so that ``num_kv_heads`` heads' row is a multiple of 128 lanes
    (pass the heads one device holds): ``128 / gcd(num_kv_heads * page_size, 128)``, a power of two."""
    return TPU_LANES // math.gcd(num_kv_heads * page_size, TPU_LANES)


def scale_shape(layout: KVLayout, num_pages: int, page_size: int, num_kv_heads: int,
                pages_per_row: int = 1) -> tuple[int, ...]:
    """Shape of ``k_scale`` / ``v_scale``: ``[P, ps, Hkv]`` token-major, ``[P / G, Hkv * G * ps]`` otherwise
    (``G = pages_per_row``, which must divide ``P``)."""
    if layout.head_major:
        if pages_per_row < 1 or num_pages % pages_per_row:
            raise ValueError(f"pages_per_row must be a positive divisor of num_pages={num_pages}, got {pages_per_row}")
        return (num_pages // pages_per_row, num_kv_heads * pages_per_row * page_size)
    return (num_pages, page_size, num_kv_heads)


def scale_lanes(page: jax.Array, offset: jax.Array, num_kv_heads: int, page_size: int, pages_per_row: int):
    """Row ``i32[T]`` and lanes ``i32[T, Hkv]`` of token ``offset`` of ``page`` in head-major scale rows."""
    g, ps = pages_per_row, page_size
    heads = jnp.arange(num_kv_heads, dtype=jnp.int32)[None, :] * (g * ps)
    return page // g, heads + ((page % g) * ps + offset)[:, None]


def page_scales(kv: KVPages, scales: jax.Array) -> jax.Array:
    """``scales`` (``kv.k_scale`` / ``kv.v_scale`` of a head-major or fused cache) as ``[P, Hkv, ps]``."""
    g, hkv, ps = kv.scale_pages_per_row, kv.num_kv_heads, kv.page_size
    return scales.reshape(-1, hkv, g, ps).transpose(0, 2, 1, 3).reshape(-1, hkv, ps)


def padded_head_dim(head_dim: int, layout: KVLayout) -> int:
    """Lanes one of K or V takes: ``head_dim`` rounded up to 128 head-major, 64 fused (``ValueError``
    past 64), unchanged token-major."""
    if layout is KVLayout.HEAD_MAJOR_FUSED:
        if head_dim > FUSED_HALF:
            raise ValueError(f"the fused KV layout takes head_dim <= {FUSED_HALF}, got {head_dim}")
        return FUSED_HALF
    if layout is KVLayout.HEAD_MAJOR:
        return -(-head_dim // TPU_LANES) * TPU_LANES
    return head_dim


def stored_minor_dim(head_dim: int, layout: KVLayout) -> int:
    """The minor dim of ``KVPages.k``: :func:`padded_head_dim`, or 128 (K and V) for the fused layout."""
    d = padded_head_dim(head_dim, layout)
    return 2 * d if layout is KVLayout.HEAD_MAJOR_FUSED else d


def page_bytes_per_token(layout: KVLayout, num_kv_heads: int, head_dim: int, dtype, quant_dtype=None) -> int:
    """Bytes one token occupies in one layer's :class:`KVPages` (K and V, lane padding and scales included).

    Args:
      layout: the cache's :class:`KVLayout` (head-major pads ``head_dim`` to 128 lanes, fused to 64).
      num_kv_heads, head_dim: the model's KV heads and logical head dim.
      dtype: storage dtype of a float cache; unused when ``quant_dtype`` is set.
      quant_dtype: int8 / fp8 storage; each (token, head) then also holds one float32 scale.
    """
    d = 2 * padded_head_dim(head_dim, layout)  # K and V lanes
    if quant_dtype is not None:
        per_head = d * jnp.dtype(quant_dtype).itemsize + 8  # + f32 scales of K and V
    else:
        per_head = d * jnp.dtype(dtype).itemsize
    return num_kv_heads * per_head


def init_kv_pages(
    num_pages: int,
    page_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype=jnp.float32,
    *,
    layout: KVLayout | str | None = None,
    quant_dtype=None,
    scale_pages_per_row: int = 1,
) -> KVPages:
    """A zero-filled cache.

    Args:
      num_pages, page_size, num_kv_heads, head_dim: cache geometry; ``page_size`` a power of two.
      dtype: storage dtype of K and V (e.g. ``jnp.float32``, ``jnp.bfloat16``) for a float cache.
      layout: a :class:`KVLayout` or its value; ``None`` means :func:`default_layout`.
      quant_dtype: ``jnp.int8``, ``jnp.float8_e4m3fn`` or ``jnp.float8_e5m2`` for a quantized cache
        (K / V stored in it, with f32 scales); ``dtype`` is then unused.
      scale_pages_per_row: pages per scale row of a quantized head-major / fused cache (must divide
        ``num_pages``; :func:`scale_pages_per_row` of the heads per device makes rows of 128+ lanes).

    Returns:
      ``KVPages`` with ``k, v`` of shape ``[num_pages, page_size, num_kv_heads, head_dim]``
      (token-major) or ``[num_pages, num_kv_heads, page_size, round_up(head_dim, 128)]`` (head-major);
      fused: ``k`` ``[num_pages, num_kv_heads, page_size, 128]``, ``v`` ``None``.
    """
    for name, value in (("num_pages", num_pages), ("page_size", page_size),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if not isinstance(value, int | np.integer) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    layout = _as_layout(layout)
    dp = stored_minor_dim(head_dim, layout)
    if layout.head_major:
        shape = (num_pages, num_kv_heads, page_size, dp)
    else:
        shape = (num_pages, page_size, num_kv_heads, dp)
    fused = layout is KVLayout.HEAD_MAJOR_FUSED
    if quant_dtype is not None:
        qdt = kv_quant.check_quant_dtype(quant_dtype)
        sshape = scale_shape(layout, num_pages, page_size, num_kv_heads,
                             scale_pages_per_row if layout.head_major else 1)
        return KVPages(jnp.zeros(shape, qdt), None if fused else jnp.zeros(shape, qdt),
                       jnp.zeros(sshape, jnp.float32), jnp.zeros(sshape, jnp.float32), layout=layout)
    return KVPages(k=jnp.zeros(shape, dtype), v=None if fused else jnp.zeros(shape, dtype), layout=layout)


def check_cache(kv: KVPages) -> None:
    """Validate a cache's type, shapes, dtypes and scales (``TypeError`` / ``ValueError``)."""
    if not isinstance(kv, KVPages):
        raise TypeError(f"kv must be a KVPages, got {type(kv).__name__}")
    if kv.layout is KVLayout.HEAD_MAJOR_FUSED:
        if kv.v is not None or kv.k.ndim != 4 or kv.k.shape[-1] != 2 * FUSED_HALF:
            raise ValueError(f"a fused cache holds k [P, Hkv, page_size, {2 * FUSED_HALF}] and v=None, got "
                             f"k {getattr(kv.k, 'shape', None)} and v {getattr(kv.v, 'shape', None)}")
    elif kv.v is None or kv.k.ndim != 4 or kv.k.shape != kv.v.shape:
        raise ValueError(f"kv.k and kv.v must be 4-D and of equal shape, got {kv.k.shape} and "
                         f"{getattr(kv.v, 'shape', None)}")
    elif kv.k.dtype != kv.v.dtype:
        raise ValueError(f"kv.k and kv.v must share a dtype, got {kv.k.dtype} and {kv.v.dtype}")
    if (kv.k_scale is None) != (kv.v_scale is None):
        raise ValueError("k_scale and v_scale must both be set or both be None")
    if kv.k_scale is not None:
        kv_quant.check_quant_dtype(kv.k.dtype)
        g = kv.scale_pages_per_row
        if kv.layout.head_major and (kv.k_scale.ndim != 2 or kv.num_pages % g
                                     or kv.k_scale.shape[1] != kv.num_kv_heads * g * kv.page_size):
            raise ValueError(f"head-major scale rows must be [num_pages / G, num_kv_heads * G * page_size] for a "
                             f"G dividing num_pages={kv.num_pages}, got {list(kv.k_scale.shape)}")
        want = scale_shape(kv.layout, kv.num_pages, kv.page_size, kv.num_kv_heads, g)
        for name, sc in (("k_scale", kv.k_scale), ("v_scale", kv.v_scale)):
            if sc.shape != want or sc.dtype != jnp.float32:
                raise ValueError(f"{name} must be float32 of shape {want}, got {sc.dtype}{list(sc.shape)}")
    if kv.page_size & (kv.page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {kv.page_size}")


@functools.partial(jax.jit, static_argnames=("impl", "interpret"))
def write_kv(kv: KVPages, k_new: jax.Array, v_new: jax.Array, slot_mapping: jax.Array, *,
             impl: str | None = None, interpret: bool | None = None) -> KVPages:
    """Scatter this step's keys and values into the cache.

    Args:
      kv: the cache; donate it (``jax.jit(..., donate_argnums=...)``) so XLA updates it in place.
      k_new, v_new: ``[T, num_kv_heads, head_dim]``; cast to the cache dtype, or quantized (absmax
        per token and head) for a quantized cache. A fused cache gets ``[k_new | v_new]`` rows.
      slot_mapping: ``i32[T]``; token ``t`` goes to page ``slot // page_size``, offset
        ``slot % page_size``. A negative slot marks a padding token: nothing is written for it.
        Slots must be unique among non-negative entries.
      impl: the attention implementation that reads the cache (``None``: the backend's default). With
        ``"pallas_tpu"`` the scale rows of a quantized head-major / fused cache, when a multiple of 128
        lanes (see ``scale_pages_per_row``), are written by a Pallas kernel in place in HBM
        (:mod:`.tpu_scales`: an XLA scatter lets the TPU compiler stage the whole scale arrays in VMEM);
        everything else is an XLA scatter.
      interpret: Pallas interpret mode for that kernel (``None``: interpret off a TPU).

    Returns:
      The updated ``KVPages`` (same layout).
    """
    check_cache(kv)
    if k_new.ndim != 3 or k_new.shape != v_new.shape:
        raise ValueError(
            f"k_new and v_new must be [T, num_kv_heads, head_dim], got {k_new.shape}, {v_new.shape}")
    t, hkv, d = k_new.shape
    fused = kv.layout is KVLayout.HEAD_MAJOR_FUSED
    if hkv != kv.num_kv_heads or (d > FUSED_HALF if fused else padded_head_dim(d, kv.layout) != kv.k.shape[-1]):
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
        v_new, v_sc = kv_quant.quantize(v_new, kv.k.dtype)
        scales = (k_sc, v_sc)
    dp = padded_head_dim(d, kv.layout)
    if dp != d:
        pad = ((0, 0), (0, 0), (0, dp - d))
        k_new, v_new = jnp.pad(k_new, pad), jnp.pad(v_new, pad)
    k_new, v_new = k_new.astype(kv.k.dtype), v_new.astype(kv.k.dtype)

    def scatter(cache, new):
        if kv.layout.head_major:
            # Advanced indices separated by a slice: the token axis comes first ([T, Hkv, ...]).
            return cache.at[page, :, offset].set(new, mode="drop", unique_indices=True)
        return cache.at[page, offset].set(new, mode="drop", unique_indices=True)

    if fused:
        out = kv._replace(k=scatter(kv.k, jnp.concatenate([k_new, v_new], axis=-1)))
    else:
        out = kv._replace(k=scatter(kv.k, k_new), v=scatter(kv.v, v_new))
    if scales is not None:
        kernel = None
        if kv.layout.head_major:
            impl = check_impl(impl, ATTENTION_IMPLS) if impl is not None else default_impl(attention=True)
            from pallas_kernels.ragged_paged_attention import tpu_scales

            if impl == "pallas_tpu" and tpu_scales.supported(kv.k_scale.shape[1]):
                kernel = functools.partial(tpu_scales.write_scale_rows,
                                           interpret=needs_interpret("pallas_tpu", interpret))

        def scatter_scales(cache, new):  # new [T, Hkv]
            if kv.layout.head_major:  # rows of G pages (scale_lanes); padding tokens' row is out of range
                row, lanes = scale_lanes(page, offset, hkv, ps, kv.scale_pages_per_row)
                if kernel is not None:
                    return kernel(cache, row, lanes, new)
                return cache.at[row[:, None], lanes].set(new, mode="drop", unique_indices=True)
            return cache.at[page, offset].set(new, mode="drop", unique_indices=True)

        out = out._replace(k_scale=scatter_scales(kv.k_scale, scales[0]),
                           v_scale=scatter_scales(kv.v_scale, scales[1]))
    return out
