"""Public entry point: ``grouped_matmul(lhs, rhs, group_sizes)``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.backend import check_impl, default_impl, needs_interpret
from pallas_kernels.grouped_matmul.gpu import grouped_matmul_gpu
from pallas_kernels.grouped_matmul.tpu import grouped_matmul_tpu
from pallas_kernels.grouped_matmul.tuning import xla_block_m
from pallas_kernels.grouped_matmul.xla import grouped_matmul_xla
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.tuning import Blocks

_X_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array | QArray,
    group_sizes: jax.Array,
    *,
    impl: str | None = None,
    interpret: bool | None = None,
    out_dtype=None,
    blocks: Blocks | None = None,
) -> jax.Array:
    """Per-group matmul over rows sorted by group (the expert FFN of a mixture-of-experts layer).

    Args:
      lhs: ``[M, K]`` activations (float32, bfloat16 or float16), rows sorted by group: the first
        ``group_sizes[0]`` rows belong to group 0, and so on. Rows past ``sum(group_sizes)`` are padding
        and give zero output.
      rhs: ``[G, K, N]`` expert weights: a float array, or a :class:`QArray` of logical shape
        ``[G, K, N]`` in any quantized format (see
        :func:`pallas_kernels.quantized_matmul.experts.quantize_experts`), dequantized inside the matmul.
      group_sizes: ``int32[G]`` rows per group (may be 0; ``sum <= M``; rows past ``M`` are dropped).
      impl: ``"xla"``, ``"pallas_tpu"``, ``"pallas_gpu"`` or ``None`` for the backend default.
      interpret: run a Pallas kernel in interpret mode (``None``: when the backend cannot compile it).
      out_dtype: output dtype (default ``lhs.dtype``).
      blocks: optional tiles ``Blocks(bm, bn, bk)`` (``bm``: rows per work-item tile; the XLA path uses
        only ``bm``); see :mod:`pallas_kernels.grouped_matmul.tuning` for the defaults and rules.

    Returns:
      ``[M, N]`` in ``out_dtype``. Shapes are static and ``group_sizes`` a traced array: under ``jit`` one
      compilation serves every routing.
    """
    lhs = jnp.asarray(lhs)
    if lhs.dtype not in _X_DTYPES:
        raise TypeError(f"lhs must be float32, bfloat16 or float16, got {lhs.dtype}")
    if not isinstance(rhs, QArray):
        rhs = jnp.asarray(rhs)
        if not jnp.issubdtype(rhs.dtype, jnp.floating):
            raise TypeError(f"rhs must be a float array or a QArray, got dtype {rhs.dtype}")
    if lhs.ndim != 2 or len(rhs.shape) != 3:
        raise ValueError(f"need lhs [M, K] and rhs [G, K, N], got {lhs.shape} and {tuple(rhs.shape)}")
    if rhs.shape[1] != lhs.shape[1]:
        raise ValueError(f"lhs K={lhs.shape[1]} does not match rhs K={rhs.shape[1]}")
    group_sizes = jnp.asarray(group_sizes)
    if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"group_sizes must be an integer array of shape ({rhs.shape[0]},), "
            f"got {group_sizes.dtype}{list(group_sizes.shape)}"
        )
    group_sizes = group_sizes.astype(jnp.int32)
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    impl = check_impl(impl or default_impl())
    if impl == "cpu":  # no C++ grouped matmul: the CPU's XLA path
        impl = "xla"
    m = lhs.shape[0]
    if m == 0:
        return jnp.zeros((0, rhs.shape[2]), out_dtype)
    if impl == "xla":
        bm = blocks.bm if blocks is not None else xla_block_m(m, rhs.shape[0])
        if bm <= 0:
            raise ValueError(f"bm must be positive, got {bm}")
        return grouped_matmul_xla(lhs, rhs, group_sizes, out_dtype=out_dtype, bm=bm)
    kernel = grouped_matmul_tpu if impl == "pallas_tpu" else grouped_matmul_gpu
    return kernel(lhs, rhs, group_sizes, out_dtype=out_dtype, interpret=needs_interpret(impl, interpret), blocks=blocks)
