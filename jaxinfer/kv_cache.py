"""The paged KV cache for all layers, sized from a memory budget.

``plan_kv_cache`` turns a budget (bytes, or a fraction of free device memory) into a page count and
reports how many tokens fit; ``init_kv_cache`` allocates one ``KVPages`` per layer (layout chosen by the
attention implementation, optional int8 / fp8 storage with per-token-per-head scales).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxinfer.attention import kv_pages_specs
from jaxinfer.model_config import ModelConfig
from jaxinfer.sharding import ShardingPlan, make_mesh
from pallas_kernels.ragged_paged_attention.pages import (
    FUSED_HALF,
    KVLayout,
    KVPages,
    default_layout,
    init_kv_pages,
    page_bytes_per_token,
    scale_pages_per_row,
)

logger = logging.getLogger(__name__)

KV_CACHE_DTYPES = {"auto": None, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn,
                   "fp8_e5m2": jnp.float8_e5m2}
CPU_DEFAULT_BUDGET = 1 << 30  # 1 GiB in all when the devices cannot report their memory (the CPU)


def parse_bytes(text: str | int) -> int:
    """``"2GiB"``, ``"512MB"``, ``"1e9"`` or an int -> bytes."""
    if isinstance(text, int | np.integer):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", str(text))
    if not m:
        raise ValueError(f"cannot parse a byte size from {text!r} (e.g. '2GiB', '512MB', 1073741824)")
    unit = (m.group(2) or "B").upper().rstrip("B")
    powers = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(float(m.group(1)) * powers[unit])


@dataclass(frozen=True)
class KVCacheSpec:
    """Geometry of the paged cache.

    Attributes:
      num_pages, page_size: pages per layer and tokens per page.
      dtype: storage dtype of a float cache; quant_dtype: int8 / fp8 storage (then dtype is unused).
      layout: physical page layout (token-major on CPU/GPU, head-major or, for head_dim <= 64, fused
        K|V rows for the TPU kernel).
      scale_pages_per_row: pages per int8 / fp8 scale row of a head-major / fused cache (``num_pages`` is a
        multiple of it): enough that one device's heads fill a multiple of 128 lanes (see
        :mod:`pallas_kernels.ragged_paged_attention.pages`).
    """

    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: jnp.dtype
    quant_dtype: jnp.dtype | None
    layout: KVLayout
    scale_pages_per_row: int = 1

    def __post_init__(self):
        # Fused K|V rows hold head_dim <= 64; a cache sharing a fused cache's pages with wider heads (a
        # speculative draft's) takes the padded head-major pages the same TPU kernel reads.
        if self.layout is KVLayout.HEAD_MAJOR_FUSED and self.head_dim > FUSED_HALF:
            object.__setattr__(self, "layout", KVLayout.HEAD_MAJOR)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies over all layers (K and V, lane padding and scales included)."""
        return self.num_layers * page_bytes_per_token(self.layout, self.num_kv_heads, self.head_dim, self.dtype,
                                                      self.quant_dtype)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def total_bytes(self) -> int:
        return self.capacity_tokens * self.bytes_per_token


def available_device_memory(params_bytes: int) -> int | None:
    """Free bytes on the first device after the parameters, or None when the backend cannot tell."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # backends without memory stats
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    used = stats.get("bytes_in_use", params_bytes)
    return max(0, int(stats["bytes_limit"]) - int(used))


def plan_kv_cache(config: ModelConfig, *, page_size: int, dtype, kv_cache_dtype: str = "auto",
                  memory: int | str | None = None, memory_fraction: float = 0.9, params_bytes: int = 0,
                  impl: str | None = None, min_tokens: int = 0, max_useful_tokens: int | None = None,
                  extra_bytes_per_token: int = 0, kv_shards: int = 1, devices: int = 1) -> KVCacheSpec:
    """Size the cache.

    Args:
      memory: explicit budget per device (bytes or a string like "2GiB"); ``None`` uses ``memory_fraction``
        of the first device's free memory, or, on backends that cannot report memory (the CPU), 1 GiB for the
        cache on all ``devices`` together (virtual CPU devices share the host's memory).
      kv_shards: devices the cache's KV heads are split over (tensor parallelism): each holds
        ``1 / kv_shards`` of every token, so the per-device budget holds ``kv_shards`` times the tokens.
      kv_cache_dtype: "auto" (the model dtype), "int8" or "fp8" (e4m3).
      min_tokens: the budget must hold at least this many tokens (one full-length sequence).
      max_useful_tokens: never allocate more than this (e.g. twice what the running sequences can use:
        the rest is headroom for the prefix cache), so small models do not take the whole budget.
      extra_bytes_per_token: bytes another cache over the same pages needs per token (a speculative
        draft model's); the budget is shared.
    Raises:
      ValueError: the budget holds fewer than ``min_tokens`` tokens (message says how much is needed).
    """
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    layout = default_layout(impl, config.head_dim)
    probe = KVCacheSpec(config.num_layers, 1, page_size, config.num_kv_heads, config.head_dim,
                        jnp.dtype(dtype), KV_CACHE_DTYPES[kv_cache_dtype], layout)
    if memory is not None:
        budget = parse_bytes(memory)
    else:
        free = available_device_memory(params_bytes)
        budget = CPU_DEFAULT_BUDGET // max(devices, 1) if free is None else int(free * memory_fraction)
    per_page = -(-(probe.bytes_per_token + extra_bytes_per_token) * page_size // kv_shards)
    num_pages = budget // per_page
    if max_useful_tokens is not None:
        num_pages = min(num_pages, -(-max_useful_tokens // page_size))
    group = 1
    if probe.quant_dtype is not None and probe.layout.head_major:
        # one device's scale rows of a multiple of 128 lanes: written in place and read without a relayout
        group = scale_pages_per_row(max(config.num_kv_heads // max(kv_shards, 1), 1), page_size)
        num_pages -= num_pages % group
    if num_pages * page_size < max(min_tokens, page_size):
        need = -(-max(min_tokens, page_size) // page_size) * per_page
        raise ValueError(
            f"KV cache budget of {budget / 2**20:.1f} MiB per device holds {num_pages * page_size} tokens; at least "
            f"{max(min_tokens, page_size)} are needed ({need / 2**20:.1f} MiB): raise the KV cache memory or "
            "lower max_model_len"
        )
    spec = KVCacheSpec(config.num_layers, int(num_pages), page_size, config.num_kv_heads, config.head_dim,
                       jnp.dtype(dtype), probe.quant_dtype, layout, group)
    logger.info("KV cache: %d pages x %d tokens = %d tokens (%.1f MiB, %s)", spec.num_pages, page_size,
                spec.capacity_tokens, spec.total_bytes / 2**20, kv_cache_dtype)
    return spec


def _one_layer(spec: KVCacheSpec):
    """A zero-filled ``KVPages`` of one layer (unplaced)."""
    return init_kv_pages(spec.num_pages, spec.page_size, spec.num_kv_heads, spec.head_dim, spec.dtype,
                         layout=spec.layout, quant_dtype=spec.quant_dtype,
                         scale_pages_per_row=spec.scale_pages_per_row)


def _layer_shardings(spec: KVCacheSpec, plan: ShardingPlan):
    """Shardings of one layer's ``KVPages``: split over KV heads when the plan splits attention over
    "model", replicated otherwise."""
    axis = "model" if plan.shard_attention else None
    specs = kv_pages_specs(jax.eval_shape(lambda: _one_layer(spec)), axis)
    return jax.tree.map(lambda p: NamedSharding(plan.mesh, p), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def init_kv_cache(spec: KVCacheSpec, plan: ShardingPlan | None = None) -> tuple[KVPages, ...]:
    """One zero-filled ``KVPages`` per layer, placed on ``plan``'s mesh (default: one device)."""
    plan = plan or plan_sharding_for_one_device()
    make = jax.jit(lambda: _one_layer(spec), out_shardings=_layer_shardings(spec, plan))
    return tuple(make() for _ in range(spec.num_layers))


def abstract_kv_cache(spec: KVCacheSpec, plan: ShardingPlan) -> tuple[KVPages, ...]:
    """The cache :func:`init_kv_cache` would make, as ``ShapeDtypeStruct`` leaves with their shardings
    (nothing allocated: for compiling on devices that are not this machine's)."""
    shapes = jax.eval_shape(lambda: _one_layer(spec))
    layer = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                         _layer_shardings(spec, plan))
    return (layer,) * spec.num_layers


def plan_sharding_for_one_device() -> ShardingPlan:
    return ShardingPlan(make_mesh())
