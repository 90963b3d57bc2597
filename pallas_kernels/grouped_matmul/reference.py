"""``jax.lax.ragged_dot`` over dense expert weights: the grouped matmul as XLA's own op.

Kept as a peer of the project's paths (tests and ``bench/moe.py`` compare against it). XLA lowers it per
backend; on the CPU (jax 0.10.2) it becomes a dense dot over all ``G`` experts with the rows masked per
group (``G`` times the flops of the grouped matmul), which is why the CPU path is :mod:`.xla` instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, out_dtype) -> jax.Array:
    """``out[i] = lhs[i] @ rhs[g(i)]`` where row ``i`` belongs to group ``g(i)`` by ``group_sizes``.

    Args:
      lhs: ``[M, K]`` rows sorted by group.
      rhs: ``[G, K, N]`` dense expert weights (cast to ``lhs.dtype``).
      group_sizes: ``int32[G]``; rows past ``sum(group_sizes)`` give zeros.
      out_dtype: output dtype.

    Returns:
      ``[M, N]`` in ``out_dtype`` (accumulated in float32).
    """
    out = jax.lax.ragged_dot(
        lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32
    )
    return out.astype(out_dtype)
