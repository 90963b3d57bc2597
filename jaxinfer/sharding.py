"""Device meshes, the ONE table mapping logical axis names to mesh axes, and per-model sharding plans.

Parameters and caches name their dimensions logically ("vocab", "embed", "heads", "kv_heads",
"head_dim", "mlp", "batch"); :data:`LOGICAL_AXIS_RULES` says which mesh axis ("data", "model") each one
is split over. ``heads`` / ``kv_heads`` on projection weights are flattened ``heads * head_dim``
columns, so a split over "model" hands whole heads to each shard.

:func:`plan_sharding` adapts the table to a model and a mesh (tensor parallelism over "model"):

* query heads not divisible by the model-axis size: attention stays replicated (MLP and vocabulary are
  still split);
* fewer KV heads than the model axis (GQA): each KV head is repeated ``tp / num_kv_heads`` times at load
  time, so every shard holds exactly the KV heads its query heads read (the KV cache too);
* an MLP width or vocabulary not divisible by the model axis: that dimension stays replicated;
* mixture-of-experts weights ``[E, ...]`` ("expert", "moe_mlp"): expert parallelism by default, whole
  experts split over "model" (``E / tp`` per device, attention still tensor-parallel over the same axis);
  with ``expert_parallel=False`` or ``E`` not divisible by the model axis, every device holds every expert
  and the experts' intermediate columns are split instead (see :mod:`jaxinfer.models.moe`).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    ("expert", "model"),
    ("moe_mlp", None),
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


@dataclass(frozen=True)
class ShardingPlan:
    """How one model is laid out on one mesh.

    Attributes:
      mesh: the device mesh (axes "data", "model").
      rules: logical axis -> mesh axis table for this model (a restriction of ``LOGICAL_AXIS_RULES``).
      kv_head_replicas: each checkpoint KV head is stored this many times (1: none).
    """

    mesh: Mesh
    rules: tuple[tuple[str, str | None], ...] = LOGICAL_AXIS_RULES
    kv_head_replicas: int = 1

    @property
    def tp(self) -> int:
        return int(self.mesh.shape["model"])

    @property
    def shard_attention(self) -> bool:
        """Attention runs per shard (heads split over "model")."""
        return self.tp > 1 and dict(self.rules).get("heads") == "model"

    def spec(self, names) -> PartitionSpec:
        return logical_to_mesh_spec(names, self.rules)

    def sharding(self, names) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def plan_sharding(config, mesh: Mesh | None = None, *, expert_parallel: bool = True) -> ShardingPlan:
    """The :class:`ShardingPlan` of ``config`` (a ``ModelConfig``) on ``mesh`` (default: one device);
    ``expert_parallel``: split a MoE model's experts over "model" (else their intermediate columns)."""
    mesh = mesh or make_mesh()
    tp = int(mesh.shape["model"])
    rules = dict(LOGICAL_AXIS_RULES)
    replicas = 1
    if tp > 1:
        if config.num_heads % tp:
            rules["heads"] = rules["kv_heads"] = None
        elif config.num_kv_heads % tp:
            if tp % config.num_kv_heads:
                rules["heads"] = rules["kv_heads"] = None
            else:
                replicas = tp // config.num_kv_heads
        if config.intermediate_size % tp or getattr(config, "shared_expert_intermediate_size", 0) % tp:
            rules["mlp"] = None
        experts = getattr(config, "num_experts", 0)
        if experts and expert_parallel and experts % tp == 0:
            rules["moe_mlp"] = None
        else:
            rules["expert"] = None
            rules["moe_mlp"] = "model" if experts and config.moe_intermediate_size % tp == 0 else None
        if config.vocab_size % tp:
            rules["vocab"] = None
    return ShardingPlan(mesh, tuple(rules.items()), replicas)


def param_shardings(logical_axes, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Pytree of ``NamedSharding`` for a pytree of logical ``PartitionSpec`` / name tuples."""
    return nn.logical_to_mesh_sharding(logical_axes, mesh, list(rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _is_quantized(x) -> bool:
    return hasattr(x, "logical_axes") and not isinstance(x, jax.Array | np.ndarray)


def place_param(w, names, plan: ShardingPlan):
    """Put one parameter into its sharding under ``plan``: a plain array by its logical ``names``; a
    quantized weight (``QArray``, ``QEmbedding``) leaf by leaf with the axes it derives from ``names``
    (``.logical_axes(names)``), so scales are split with their weight's columns / row groups."""
    if _is_quantized(w):
        axes = w.logical_axes(tuple(names))
        return jax.tree.map(lambda leaf, ax: jax.device_put(leaf, plan.sharding(ax)), w, axes,
                            is_leaf=lambda x: isinstance(x, tuple))
    return jax.device_put(w, plan.sharding(tuple(names)))


def place_params(params, logical_axes, plan: ShardingPlan):
    """:func:`place_param` over a parameter tree; ``logical_axes``: the model's per-parameter logical names
    (``CausalLM.logical_axes()``)."""
    return jax.tree.map(lambda w, names: place_param(w, names, plan), params, logical_axes, is_leaf=_is_quantized)
