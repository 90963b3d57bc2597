"""Llama-architecture decoder (Llama 2/3/3.1, SmolLM2, Mistral, Qwen2; with :mod:`jaxinfer.models.moe` blocks
Qwen3-MoE, Mixtral, Qwen2-MoE) as Flax linen modules.

Architecture differences are ``ModelConfig`` fields (qkv bias, sliding window, RoPE scaling, tied
embeddings). Every parameter carries logical axis names; linear kernels are ``[in, out]`` and the
``heads`` / ``kv_heads`` axes denote flattened ``heads * head_dim`` columns (whole heads per shard).

The layers are unrolled in Python with one cache per layer, so each layer's cache is updated in place
when the cache is donated (a scan would copy the per-layer slice).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxinfer.attention import AttentionMetadata, attention
from jaxinfer.model_config import ModelConfig
from jaxinfer.models.layers import (
    Linear,
    RMSNorm,
    Rotary,
    apply_rope,
    embed,
    matmul_options,
    norm_impl,
    swiglu,
    unembed,
    weight_param,
)
from jaxinfer.models.moe import SparseMoeBlock
from jaxinfer.models.ops import tpu_vocab_minor
from jaxinfer.sharding import ShardingPlan
from jaxinfer.target import Kernels


class LlamaAttention(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    mesh: Mesh | None = None  # set when attention heads are split over the mesh's "model" axis
    kernels: Kernels | None = None  # the runner's kernel choice (jaxinfer.target)
    plan: ShardingPlan | None = None  # a multi-device plan (quantized linears run their kernel per shard)

    def qk_transform(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Hook applied to ``q[T, Hq, D]``, ``k[T, Hkv, D]`` before RoPE (Qwen3 normalises here)."""
        return q, k

    @nn.compact
    def __call__(self, x, rotary: Rotary, cache, md: AttentionMetadata):
        c = self.config
        t = x.shape[0]
        dense = dict(use_bias=c.attention_bias, param_dtype=self.dtype, kernels=self.kernels, plan=self.plan)
        q = Linear(c.q_size, ("embed", "heads"), name="q_proj", **dense)(x)
        k = Linear(c.kv_size, ("embed", "kv_heads"), name="k_proj", **dense)(x)
        v = Linear(c.kv_size, ("embed", "kv_heads"), name="v_proj", **dense)(x)
        q = q.reshape(t, c.num_heads, c.head_dim)
        k = k.reshape(t, c.num_kv_heads, c.head_dim)
        v = v.reshape(t, c.num_kv_heads, c.head_dim)
        q, k = self.qk_transform(q, k)
        q = apply_rope(q, rotary)
        k = apply_rope(k, rotary)
        out, cache = attention(q, k, v, cache, md, sm_scale=c.sm_scale, sliding_window=c.sliding_window,
                               mesh=self.mesh)
        o = Linear(c.hidden_size, ("heads", "embed"), name="o_proj", param_dtype=self.dtype, kernels=self.kernels,
                   plan=self.plan)
        return o(out.reshape(t, c.q_size)), cache


class LlamaMLP(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    kernels: Kernels | None = None
    plan: ShardingPlan | None = None
    intermediate_size: int | None = None  # None: config.intermediate_size (set for Qwen2-MoE's shared expert)

    @nn.compact
    def __call__(self, x):
        c = self.config
        width = self.intermediate_size or c.intermediate_size
        kw = dict(use_bias=c.mlp_bias, param_dtype=self.dtype, kernels=self.kernels, plan=self.plan)
        gate = Linear(width, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Linear(width, ("embed", "mlp"), name="up_proj", **kw)(x)
        down = Linear(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)
        return down(swiglu(gate, up, norm_impl(self.kernels)))


class DecoderLayer(nn.Module):
    config: ModelConfig
    attention_cls: type = LlamaAttention
    dtype: jnp.dtype = jnp.float32
    mesh: Mesh | None = None
    kernels: Kernels | None = None
    plan: ShardingPlan | None = None
    moe: bool = False  # the MLP is a sparse mixture-of-experts block (jaxinfer.models.moe)
    defer_residual: bool = False  # return the MLP output unsummed, for the next layer's norm to add

    @nn.compact
    def __call__(self, x, rotary: Rotary, cache, md, add=None):
        """``x[T, E]``, ``rotary`` the step's RoPE tables (:class:`Rotary`) -> ``(x[T, E], cache)``.

        ``add[T, E]``: the previous layer's deferred MLP output; the layer's input is ``x + add``, summed in
        the input norm's pass. With ``defer_residual`` the result is ``(x, m, cache)``, the layer's output
        being ``x + m`` (the residual sums then run inside the norm kernel, not as separate XLA adds).
        """
        c = self.config
        impl = norm_impl(self.kernels)
        norm1 = RMSNorm(c.rms_norm_eps, param_dtype=self.dtype, impl=impl, name="input_layernorm")
        h, x = (norm1(x), x) if add is None else norm1(x, add)
        attn = self.attention_cls(c, self.dtype, self.mesh, kernels=self.kernels, plan=self.plan, name="self_attn")
        a, cache = attn(h, rotary, cache, md)
        h, x = RMSNorm(c.rms_norm_eps, param_dtype=self.dtype, impl=impl, name="post_attention_layernorm")(x, a)
        mlp_cls = SparseMoeBlock if self.moe else LlamaMLP
        m = mlp_cls(c, self.dtype, self.kernels, self.plan, name="mlp")(h)
        return (x, m, cache) if self.defer_residual else (x + m, cache)


class CausalTransformer(nn.Module):
    """Embeddings, decoder layers, final norm and LM head.

    ``__call__(tokens i32[T], positions i32[T], caches (one per layer), md, logits_indices i32[N] | None,
    hidden_indices i32[R] | None)`` returns ``(logits f32[N or T, vocab], new caches)``, and with
    ``hidden_indices`` also the last layer's hidden states ``[R, hidden]`` at those rows (before the final
    norm; :class:`LMHead` turns them into logits).
    """

    config: ModelConfig
    attention_cls: type = LlamaAttention
    dtype: jnp.dtype = jnp.float32
    mesh: Mesh | None = None
    kernels: Kernels | None = None
    plan: ShardingPlan | None = None

    @nn.compact
    def __call__(self, tokens, positions, caches, md: AttentionMetadata, logits_indices=None, hidden_indices=None):
        c = self.config
        emb_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        embedding = weight_param(self, "embed_tokens", emb_init, (c.vocab_size, c.hidden_size), self.dtype)
        # a tied table is also the LM head: on a TPU that lays it out vocabulary-minor, look rows up in that
        # layout rather than have the compiler copy the table for a row gather (not for a vocabulary-split table)
        strips = c.tie_word_embeddings and self.kernels is not None and self.kernels.compiled_for_tpu
        strips = strips and self.plan is None and tpu_vocab_minor((c.vocab_size, c.hidden_size))
        x = embed(embedding, tokens, self.dtype, lane_strips=strips)
        rotary = Rotary.at(positions, c.inv_freq())  # once for all layers
        new_caches = []
        m = None
        for i in range(c.num_layers):
            layer = DecoderLayer(c, self.attention_cls, self.dtype, self.mesh, self.kernels, self.plan,
                                 moe=c.is_moe_layer(i), defer_residual=True, name=f"layers_{i}")
            x, m, cache = layer(x, rotary, caches[i], md, m)
            new_caches.append(cache)
        x = x + m
        hidden = None if hidden_indices is None else jnp.take(x, hidden_indices, axis=0)
        if logits_indices is not None:
            x = jnp.take(x, logits_indices, axis=0)
        logits = _lm_head(self, x, embedding)
        if hidden is None:
            return logits, tuple(new_caches)
        return logits, tuple(new_caches), hidden


def _lm_head(module: nn.Module, x: jax.Array, embedding) -> jax.Array:
    """Final norm and LM head as submodules ``norm`` / ``lm_head`` of ``module`` (call it from a compact
    method): ``x[N, hidden] -> f32[N, vocab]``."""
    c = module.config
    x = RMSNorm(c.rms_norm_eps, param_dtype=module.dtype, impl=norm_impl(module.kernels), name="norm")(x)
    if c.tie_word_embeddings:
        return unembed(x, embedding, **matmul_options(module.kernels))
    return Linear(c.vocab_size, ("embed", "vocab"), name="lm_head", param_dtype=module.dtype,
                  kernels=module.kernels, plan=module.plan, out_dtype=jnp.float32)(x)


class LMHead(nn.Module):
    """The final norm and LM head alone, over the same parameter names as :class:`CausalTransformer`
    (``norm`` and ``lm_head``, or ``embed_tokens`` when tied): ``hidden[N, hidden] -> f32[N, vocab]``."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    kernels: Kernels | None = None
    plan: ShardingPlan | None = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        embedding = None
        if c.tie_word_embeddings:
            emb_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
            embedding = weight_param(self, "embed_tokens", emb_init, (c.vocab_size, c.hidden_size), self.dtype)
        return _lm_head(self, x, embedding)

    @staticmethod
    def param_names(config: ModelConfig) -> tuple[str, str]:
        """The top-level parameter names the head reads."""
        return ("norm", "embed_tokens") if config.tie_word_embeddings else ("norm", "lm_head")
