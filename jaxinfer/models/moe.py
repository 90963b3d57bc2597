"""Sparse mixture-of-experts block (Qwen3-MoE, Mixtral, Qwen2-MoE) on the grouped matmul.

Per step, on device and with shapes fixed by the step's ``T`` tokens (the routing pattern never changes a
shape, so it never recompiles):

1. router logits ``x @ router -> [T, E]``; softmax over all experts in float32, top-k, and (``norm_topk_prob``,
   always for Mixtral) renormalisation of the k probabilities to sum 1. Mixtral's "softmax over the top-2
   logits" is the same number: softmax then renormalising the selected probabilities cancels the
   denominator. This is the order of transformers 5.25's ``Qwen3MoeTopKRouter`` / ``Qwen2MoeTopKRouter`` /
   ``MixtralTopKRouter``.
2. the ``T * k`` (token, expert) assignments flattened and sorted by expert (stable ``argsort``),
   ``group_sizes`` by a fixed-length ``bincount``, the token rows gathered in that order;
3. SiLU-GLU experts as three grouped matmuls (``gate``, ``up``, ``down``;
   :func:`pallas_kernels.grouped_matmul.grouped_matmul`, with the runner's kernel choice);
4. un-sorting (inverse permutation) and the top-k weighted sum back into ``[T, H]`` (the scatter-add of
   the k expert outputs of each token, written as a gather and a reduction over k, deterministic).

Expert parallelism (a :class:`~jaxinfer.sharding.ShardingPlan` whose ``"expert"`` axis maps to ``"model"``):
each device holds ``E / tp`` whole experts. The block runs under ``shard_map``: every device already has
all ``T`` tokens (attention's output projection ends in an all-reduce over ``"model"``, so the
"all-gather" of tokens costs nothing), routes them all, runs only the assignments to its own experts
(the others are sorted past the local groups, where the grouped matmul writes zeros, and get weight 0),
and the partial ``[T, H]`` sums are added with one ``psum`` over ``"model"``. This all-gather /
all-reduce scheme was chosen over an all-to-all token exchange because it is robust at decode batch
sizes (no capacity factor, no dropped tokens, fixed shapes: each device's buffer holds all ``T * k``
assignments, the worst case of every token routed to its experts), it composes with tensor-parallel
attention on the same axis, and the only collective is the all-reduce the dense MLP needs anyway. Its
cost is that each device's grouped matmul is sized for ``T * k`` rows; for long prefills an all-to-all
would move fewer bytes. Without expert parallelism (``"expert"`` unmapped) but with the expert width
``"moe_mlp"`` split, each device runs every expert on its slice of the intermediate columns (tensor
parallelism inside the experts) and the same ``psum`` adds the row-parallel ``down`` products.

Parameters of a block (logical axes in brackets): ``gate/kernel [H, E]`` (embed, None), ``experts/
gate_proj`` and ``experts/up_proj [E, H, I]`` (expert, embed, moe_mlp), ``experts/down_proj [E, I, H]``
(expert, moe_mlp, embed); Qwen2-MoE adds ``shared_expert`` (a dense SwiGLU MLP of width
``shared_expert_intermediate_size``) and ``shared_expert_gate/kernel [H, 1]``, whose sigmoid scales it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxinfer.model_config import ModelConfig
from jaxinfer.models.layers import Linear, weight_param
from jaxinfer.sharding import ShardingPlan
from jaxinfer.target import Kernels
from pallas_kernels.grouped_matmul import grouped_matmul

EXPERT_AXES = {
    "gate_proj": ("expert", "embed", "moe_mlp"),
    "up_proj": ("expert", "embed", "moe_mlp"),
    "down_proj": ("expert", "moe_mlp", "embed"),
}


def route(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Top-k routing.

    Args:
      logits: ``[T, E]`` router logits.
      k: experts per token.
      normalize: renormalise the k probabilities to sum to 1.
    Returns:
      ``(weights f32[T, k], expert ids i32[T, k])``, ids in descending probability order.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def expert_ffn(
    x: jax.Array,
    weights: jax.Array,
    ids: jax.Array,
    w_gate,
    w_up,
    w_down,
    *,
    first_expert=0,
    impl: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """The routed experts' SwiGLU outputs, weighted and summed per token, over the experts held here.

    Args:
      x: ``[T, H]`` tokens.
      weights, ids: ``f32[T, k]`` / ``i32[T, k]`` from :func:`route` (global expert ids).
      w_gate, w_up: ``[G, H, I]`` the ``G`` local experts' weights (float or a stacked quantized array).
      w_down: ``[G, I, H]``.
      first_expert: global id of local expert 0 (may be traced); assignments to experts outside
        ``[first_expert, first_expert + G)`` contribute nothing.
      impl, interpret: the grouped-matmul kernel.
    Returns:
      ``f32[T, H]``: ``sum_j weights[t, j] * FFN_{ids[t, j]}(x[t])`` over the local experts.
    """
    t, k = ids.shape
    g = w_gate.shape[0]
    local = ids - first_expert
    here = (local >= 0) & (local < g)
    flat = jnp.where(here, local, g).reshape(t * k)  # id g: not held here, sorted past every local group
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=g + 1)[:g].astype(jnp.int32)
    rows = jnp.take(x, order // k, axis=0)  # [T * k, H], grouped by expert
    kw = dict(impl=impl, interpret=interpret)
    gate = grouped_matmul(rows, w_gate, group_sizes, **kw)
    up = grouped_matmul(rows, w_up, group_sizes, **kw)
    out = grouped_matmul(jax.nn.silu(gate) * up, w_down, group_sizes, out_dtype=jnp.float32, **kw)
    unsorted = jnp.zeros_like(out).at[order].set(out).reshape(t, k, -1)  # inverse permutation
    w = jnp.where(here, weights, 0.0).astype(jnp.float32)
    return jnp.einsum("tkh,tk->th", unsorted, w)


def _spec(w, names, plan: ShardingPlan):
    """``PartitionSpec`` (tree, for a quantized weight) of an expert weight with logical ``names``."""
    if hasattr(w, "logical_axes") and not isinstance(w, jax.Array):
        return jax.tree.map(plan.spec, w.logical_axes(names), is_leaf=lambda a: isinstance(a, tuple))
    return plan.spec(names)


def sharded_expert_ffn(x, weights, ids, experts: dict, plan: ShardingPlan | None, *, impl=None, interpret=None):
    """:func:`expert_ffn` over all experts, run per shard when ``plan`` splits the expert weights (expert
    parallelism over ``"expert"`` and / or tensor parallelism over ``"moe_mlp"``, see the module docstring).

    ``experts``: ``{"gate_proj", "up_proj", "down_proj"}`` weights. Returns ``f32[T, H]``, replicated.
    """
    args = (experts["gate_proj"], experts["up_proj"], experts["down_proj"])
    rules = dict(plan.rules) if plan is not None else {}
    ep_axis, tp_axis = rules.get("expert"), rules.get("moe_mlp")
    if plan is None or plan.tp == 1 or (ep_axis is None and tp_axis is None):
        return expert_ffn(x, weights, ids, *args, impl=impl, interpret=interpret)
    reduce_axes = tuple(dict.fromkeys(a for a in (ep_axis, tp_axis) if a is not None))

    def local(x, weights, ids, wg, wu, wd):
        first = jax.lax.axis_index(ep_axis) * wg.shape[0] if ep_axis is not None else 0
        y = expert_ffn(x, weights, ids, wg, wu, wd, first_expert=first, impl=impl, interpret=interpret)
        return jax.lax.psum(y, reduce_axes)

    rep = PartitionSpec()
    specs = tuple(_spec(w, EXPERT_AXES[n], plan) for w, n in zip(args, ("gate_proj", "up_proj", "down_proj")))
    # check_vma=False as in the quantized matmul's shard_map: lowering the step on abstract inputs (``jaxinfer
    # compile``) gives ShapeDtypeStructs without a manual axis type, which the varying-axes check refuses
    fn = jax.shard_map(local, mesh=plan.mesh, in_specs=(rep, rep, rep, *specs), out_specs=rep, check_vma=False)
    return fn(x, weights, ids, *args)


class Experts(nn.Module):
    """The stacked expert weights of one MoE block (parameters only; :func:`sharded_expert_ffn` runs them)."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self) -> dict:
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        shapes = {"gate_proj": (e, h, i), "up_proj": (e, h, i), "down_proj": (e, i, h)}
        out = {}
        for name, shape in shapes.items():
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(batch_axis=(0,)), EXPERT_AXES[name])
            out[name] = weight_param(self, name, init, shape, self.param_dtype)
        return out


class SparseMoeBlock(nn.Module):
    """``[T, H] -> [T, H]``: routed SwiGLU experts (plus Qwen2-MoE's gated shared expert)."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    kernels: Kernels | None = None
    plan: ShardingPlan | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        from jaxinfer.models.llama import LlamaMLP  # llama imports this module

        c = self.config
        logits = Linear(c.num_experts, ("embed", None), name="gate", param_dtype=self.dtype)(x)
        weights, ids = route(logits, c.num_experts_per_tok, c.norm_topk_prob)
        experts = Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size, self.dtype, name="experts")()
        kw = {} if self.kernels is None else dict(impl=self.kernels.matmul, interpret=self.kernels.matmul_interpret)
        y = sharded_expert_ffn(x, weights, ids, experts, self.plan, **kw)
        if c.shared_expert_intermediate_size:
            width = c.shared_expert_intermediate_size
            shared = LlamaMLP(c, self.dtype, self.kernels, self.plan, intermediate_size=width, name="shared_expert")(x)
            gate = Linear(1, ("embed", None), name="shared_expert_gate", param_dtype=self.dtype)(x)
            y = y + jax.nn.sigmoid(gate.astype(jnp.float32)) * shared.astype(jnp.float32)
        return y.astype(x.dtype)
