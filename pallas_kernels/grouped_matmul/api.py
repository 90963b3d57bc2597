"""Public entry point: ``grouped_matmul(lhs, rhs, group_sizes)``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.backend import check_impl, default_impl
from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference

_X_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    impl: str | None = None,
    interpret: bool | None = None,
    out_dtype=None,
) -> jax.Array:
    """Per-group matmul over rows sorted by group (the expert FFN of a mixture-of-experts layer).

    Args:
      lhs: ``[M, K]`` activations (float32, bfloat16 or float16), rows sorted by group: the first
        ``group_sizes[0]`` rows belong to group 0, and so on. Rows past ``sum(group_sizes)`` are padding
        and give zero output.
      rhs: ``[G, K, N]`` expert weights.
      group_sizes: ``int32[G]`` rows per group (may be 0; ``sum <= M``).
      impl: ``"xla"``, ``"pallas_tpu"``, ``"pallas_gpu"`` or ``None`` for the backend default.
      interpret: run a Pallas kernel in interpret mode (``None``: when the backend cannot compile it).
      out_dtype: output dtype (default ``lhs.dtype``).

    Returns:
      ``[M, N]`` in ``out_dtype``.
    """
    lhs = jnp.asarray(lhs)
    if lhs.dtype not in _X_DTYPES:
        raise TypeError(f"lhs must be float32, bfloat16 or float16, got {lhs.dtype}")
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"need lhs [M, K] and rhs [G, K, N], got {lhs.shape} and {rhs.shape}")
    if rhs.shape[1] != lhs.shape[1]:
        raise ValueError(f"lhs K={lhs.shape[1]} does not match rhs K={rhs.shape[1]}")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"group_sizes must have shape ({rhs.shape[0]},), got {group_sizes.shape}")
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    impl = check_impl(impl or default_impl())
    del interpret  # the Pallas kernels take it
    # Only the XLA path exists so far; the Pallas TPU / GPU kernels also route here until they land.
    return grouped_matmul_reference(lhs, rhs, group_sizes, out_dtype)
