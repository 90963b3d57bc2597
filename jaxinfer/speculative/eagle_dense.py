"""The EAGLE head's dense (unpaged) forward pass: the reference the paged engine path is checked against,
and the building blocks of training (:mod:`jaxinfer.speculative.eagle_chain`). The head's definition,
parameters and file format are :mod:`jaxinfer.speculative.eagle_head`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.models.layers import embed, linear, rms_norm, rope, swiglu
from jaxinfer.speculative.eagle_head import EagleHeadConfig


def layer_qkv(lp: dict, cfg: EagleHeadConfig, x, positions):
    """The layer's attention inputs: ``x[B, T, D]`` -> ``q[B, T, Hq, Dh]``, ``k, v [B, T, Hkv, Dh]`` (input
    norm, projections, q/k norm when the architecture has it, RoPE at ``positions i32[B, T]``)."""
    lc = cfg.layer
    a = lp["self_attn"]
    b, t, _ = x.shape
    h = rms_norm(x, lp["input_layernorm"]["scale"], lc.rms_norm_eps)

    def proj(name, heads):
        p = a[name]
        return linear(h, p["kernel"], p.get("bias")).reshape(b, t, heads, lc.head_dim)

    q, k, v = proj("q_proj", lc.num_heads), proj("k_proj", lc.num_kv_heads), proj("v_proj", lc.num_kv_heads)
    if lc.qk_norm:
        q = rms_norm(q, a["q_norm"]["scale"], lc.rms_norm_eps)
        k = rms_norm(k, a["k_norm"]["scale"], lc.rms_norm_eps)
    inv_freq = jnp.asarray(lc.inv_freq())
    q = jax.vmap(rope, in_axes=(0, 0, None))(q, positions, inv_freq)
    k = jax.vmap(rope, in_axes=(0, 0, None))(k, positions, inv_freq)
    return q, k, v


def attend(q, k, v, mask, sm_scale: float):
    """Grouped-query attention in float32: ``q[B, T, Hq, Dh]``, ``k, v [B, S, Hkv, Dh]``, ``mask bool[B, T, S]``
    (True = visible) -> ``[B, T, Hq * Dh]`` in ``q.dtype``."""
    b, t, hq, dh = q.shape
    hkv = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, dh)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * sm_scale
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
    return o.reshape(b, t, hq * dh).astype(q.dtype)


def layer_finish(lp: dict, cfg: EagleHeadConfig, x, attn_out):
    """The rest of the layer after attention: ``x + o_proj(attn)``, then the MLP block with its residual."""
    a = lp["self_attn"]["o_proj"]
    x = x + linear(attn_out, a["kernel"], a.get("bias"))
    m = lp["mlp"]
    h = rms_norm(x, lp["post_attention_layernorm"]["scale"], cfg.layer.rms_norm_eps)
    gate = linear(h, m["gate_proj"]["kernel"], m["gate_proj"].get("bias"))
    up = linear(h, m["up_proj"]["kernel"], m["up_proj"].get("bias"))
    return x + linear(swiglu(gate, up), m["down_proj"]["kernel"], m["down_proj"].get("bias"))


def causal_mask(positions, sliding_window: int | None = None):
    """``bool[B, T, T]``: query row ``i`` sees key rows ``j <= i`` (within ``sliding_window`` positions)."""
    t = positions.shape[1]
    idx = jnp.arange(t)
    mask = idx[None, :] <= idx[:, None]
    if sliding_window is not None:
        mask = mask & (positions[:, :, None] - positions[:, None, :] < sliding_window)
    return jnp.broadcast_to(mask, (positions.shape[0], t, t))


def fc_input(params, embed_table, tokens, hidden):
    """``fc([embed(tokens); hidden])``: ``tokens i32[B, T]``, ``hidden[B, T, D]`` -> ``[B, T, D]`` in
    ``hidden.dtype`` (``embed_table``: the target's ``[V, D]`` table or its ``QEmbedding``)."""
    b, t = tokens.shape
    e = embed(embed_table, tokens.reshape(-1), hidden.dtype).reshape(b, t, -1)
    return linear(jnp.concatenate([e, hidden], axis=-1), params["fc"]["kernel"], params["fc"]["bias"])


def draft_logits(params, cfg: EagleHeadConfig, features):
    """``lm_head(norm(features))``: ``[..., D]`` -> ``f32[..., Vd]``."""
    x = rms_norm(features, params["norm"]["scale"], cfg.layer.rms_norm_eps)
    return linear(x, params["lm_head"]["kernel"]).astype(jnp.float32)


def eagle_forward_dense(params, cfg: EagleHeadConfig, embed_table, tokens, hidden, positions):
    """The head over whole sequences with causal attention over its own K/V.

    Args:
      params: head parameters (see :mod:`jaxinfer.speculative.eagle_head`).
      cfg: its :class:`EagleHeadConfig`.
      embed_table: the target's token embedding ``[V, D]`` (or ``QEmbedding``).
      tokens: ``i32[B, T]``: row ``t`` holds token ``x_{p+1}``.
      hidden: ``[B, T, D]``: row ``t`` holds the feature at ``p`` (the target's ``h_p``, or the head's own).
      positions: ``i32[B, T]``: ``p + 1`` (the position of ``tokens``' row).
    Returns:
      ``(features[B, T, D] in hidden.dtype, logits f32[B, T, Vd], (k, v) [B, T, Hkv, Dh])``: rows attend to
      earlier rows of their sequence (right padding is harmless); ``k, v`` are the layer's keys and values
      (what the head's cache holds for these rows).
    """
    x = fc_input(params, embed_table, tokens, hidden)
    q, k, v = layer_qkv(params["layer"], cfg, x, positions)
    o = attend(q, k, v, causal_mask(positions, cfg.layer.sliding_window), cfg.layer.sm_scale)
    f = layer_finish(params["layer"], cfg, x, o)
    return f, draft_logits(params, cfg, f), (k, v)
