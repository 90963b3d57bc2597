"""Device meshes and the ONE table mapping logical axis names to mesh axes.

Parameters and caches name their dimensions logically ("vocab", "embed", "heads", "kv_heads",
"head_dim", "mlp", "batch"); :data:`LOGICAL_AXIS_RULES` says which mesh axis ("data", "model") each one
is split over. ``heads`` / ``kv_heads`` on projection weights are flattened ``heads * head_dim``
columns, so a split over "model" hands whole heads to each shard.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", None),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("mlp", "model"),
)


def make_mesh(tensor_parallel_size: int = 1, data_parallel_size: int = 1, devices=None) -> Mesh:
    """A ``("data", "model")`` mesh over the first ``dp * tp`` devices."""
    devices = list(jax.devices() if devices is None else devices)
    need = tensor_parallel_size * data_parallel_size
    if tensor_parallel_size < 1 or data_parallel_size < 1:
        raise ValueError("tensor_parallel_size and data_parallel_size must be >= 1")
    if need > len(devices):
        raise ValueError(f"mesh needs {need} devices, only {len(devices)} available")
    grid = np.array(devices[:need]).reshape(data_parallel_size, tensor_parallel_size)
    return Mesh(grid, MESH_AXES)


def logical_to_mesh_spec(names, rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """Mesh ``PartitionSpec`` for a tuple of logical names (``None`` entries stay replicated)."""
    table = dict(rules)
    return PartitionSpec(*(table.get(n) if n is not None else None for n in names))


def param_shardings(logical_axes, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Pytree of ``NamedSharding`` for a pytree of logical ``PartitionSpec`` / name tuples."""
    return nn.logical_to_mesh_sharding(logical_axes, mesh, list(rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
