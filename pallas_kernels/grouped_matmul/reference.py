"""XLA path of the grouped matmul: ``jax.lax.ragged_dot`` over dense expert weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, out_dtype) -> jax.Array:
    """``out[i] = lhs[i] @ rhs[g(i)]`` where row ``i`` belongs to group ``g(i)`` by ``group_sizes``.

    Args:
      lhs: ``[M, K]`` rows sorted by group.
      rhs: ``[G, K, N]`` dense expert weights.
      group_sizes: ``int32[G]``; rows past ``sum(group_sizes)`` give zeros.
      out_dtype: output dtype.

    Returns:
      ``[M, N]`` in ``out_dtype`` (accumulated in float32).
    """
    out = jax.lax.ragged_dot(
        lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32
    )
    return out.astype(out_dtype)
