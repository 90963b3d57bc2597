"""``CausalLM``: a model definition plus its pure forward function.

``forward(params, tokens[T], positions[T], kv_caches, md, logits_indices=None) -> (logits, kv_caches)``
is a pure function of its arguments (jit it with the caches donated). ``abstract_params()`` describes
every parameter (shape, dtype, logical axis names) without allocating, so weights can be loaded straight
into their shardings.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxinfer.attention import AttentionMetadata, init_dense_cache
from jaxinfer.model_config import ModelConfig
from jaxinfer.models.llama import CausalTransformer, LlamaAttention, LMHead
from jaxinfer.models.qwen3 import Qwen3Attention
from jaxinfer.sharding import ShardingPlan
from jaxinfer.target import Kernels

ATTENTION_CLASSES = {
    "llama": LlamaAttention,
    "mistral": LlamaAttention,
    "qwen2": LlamaAttention,
    "qwen3": Qwen3Attention,
    "qwen3_moe": Qwen3Attention,
    "mixtral": LlamaAttention,
    "qwen2_moe": LlamaAttention,
}


class CausalLM:
    """A decoder-only LM: config + Flax module + pure forward."""

    def __init__(self, config: ModelConfig, dtype=jnp.float32, plan: ShardingPlan | None = None):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.plan = plan
        mesh = plan.mesh if plan is not None and plan.shard_attention else None
        multi = plan if plan is not None and plan.tp > 1 else None
        self.module = CausalTransformer(config, ATTENTION_CLASSES[config.architecture], self.dtype, mesh, plan=multi)

    def forward(self, params, tokens, positions, kv_caches, md: AttentionMetadata, logits_indices=None,
                kernels: Kernels | None = None, hidden_indices=None):
        """Run the decoder over a ragged step.

        Args:
          params: parameter pytree (plain or quantized leaves).
          tokens, positions: ``i32[T]``.
          kv_caches: tuple of one cache per layer.
          md: the step's :class:`AttentionMetadata`.
          logits_indices: ``i32[N]`` rows whose logits are wanted (``None``: all ``T``).
          kernels: the attention and quantized-matmul kernels to run, compiled or interpreted (``None``:
            ``md.impl`` and the kernels' own defaults).
          hidden_indices: ``i32[R]`` rows whose last hidden states are also returned (for :meth:`logits`).
        Returns:
          ``(f32[N, vocab], kv_caches)``, or ``(f32[N, vocab], kv_caches, hidden[R, hidden_size])`` with
          ``hidden_indices``.
        """
        module = self.module
        if kernels is not None:
            module = module.clone(kernels=kernels)
            md = md.replace(impl=kernels.attention, interpret=kernels.attention_interpret)
        return module.apply({"params": params}, tokens, positions, kv_caches, md, logits_indices, hidden_indices)

    def logits(self, params, hidden, kernels: Kernels | None = None):
        """The final norm and LM head over hidden states from :meth:`forward`: ``[N, hidden] -> f32[N, vocab]``."""
        m = self.module
        head = LMHead(self.config, self.dtype, kernels if kernels is not None else m.kernels, m.plan)
        return head.apply({"params": {k: params[k] for k in LMHead.param_names(self.config)}}, hidden)

    def _init_fn(self):
        """``rng -> boxed params`` on a one-token dummy step (shapes only depend on the config)."""
        c = self.config
        caches = init_dense_cache(c.num_layers, 1, 1, c.num_kv_heads, c.head_dim, self.dtype)
        one = jnp.ones((1,), jnp.int32)
        md = AttentionMetadata(cu_q_lens=jnp.array([0, 1], jnp.int32), kv_lens=one, num_seqs=one,
                               slot_mapping=one - 1)
        return lambda rng: self.module.init(rng, one, one, caches, md)["params"]

    def abstract_params(self):
        """Boxed abstract params: ``nn.LogicallyPartitioned(ShapeDtypeStruct, names)`` leaves."""
        return jax.eval_shape(self._init_fn(), jax.random.PRNGKey(0))

    def logical_axes(self):
        """Pytree of logical axis-name tuples, one per parameter."""
        return nn.get_partition_spec(self.abstract_params())

    def param_shardings(self):
        """Pytree of ``NamedSharding``, one per parameter, under this model's sharding plan."""
        from jaxinfer.sharding import param_shardings, plan_sharding

        plan = self.plan or plan_sharding(self.config)
        return param_shardings(self.logical_axes(), plan.mesh, plan.rules)

