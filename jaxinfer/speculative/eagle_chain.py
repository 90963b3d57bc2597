"""Dense multi-step EAGLE drafting from every position of a sequence at once (training and evaluation).

Row ``r`` of a teacher-forced pass (:func:`~jaxinfer.speculative.eagle_dense.eagle_forward_dense`) feeds
``(x_p, h_{p-1})`` at position ``p = positions[r]`` and its logits draft ``d_1``, the token after ``x_p``.
A chain starting at row ``r`` continues as drafting does in the engine: step ``j >= 2`` feeds
``(token_j, f_{j-1})`` (the previous step's own feature) at position ``p + j - 1``, attending to the
teacher-forced K/V of rows ``<= r`` (the head's cache of the known tokens) and to the chain's own K/V of
steps ``2 .. j``. All chains of a batch advance together: one step is one ``[B, T]`` layer pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.speculative.eagle_dense import (
    draft_logits,
    eagle_forward_dense,
    fc_input,
    layer_finish,
    layer_qkv,
)
from jaxinfer.speculative.eagle_head import EagleHeadConfig


def chain_step(params, cfg: EagleHeadConfig, embed_table, tokens, feats, positions, context, own):
    """One further drafting step of every chain.

    Args:
      tokens: ``i32[B, T]`` target token ids fed by each chain (its previous draft).
      feats: ``[B, T, D]`` each chain's previous feature.
      positions: ``i32[B, T]`` the step's position per chain.
      context: ``(k, v, positions)`` of the teacher-forced rows (``[B, T, Hkv, Dh]`` twice, ``i32[B, T]``);
        chain ``r`` sees rows ``<= r``.
      own: list of ``(k, v, positions)`` of the chain's earlier steps ``>= 2`` (per chain, ``[B, T, ...]``).
    Returns:
      ``(features [B, T, D], logits f32[B, T, Vd], (k, v, positions))``; append the last to ``own``.
    """
    x = fc_input(params, embed_table, tokens, feats)
    q, k, v = layer_qkv(params["layer"], cfg, x, positions)
    own = [*own, (k, v, positions)]
    b, t, hq, dh = q.shape
    ck, cv, cpos = context
    hkv = ck.shape[2]
    qg = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, dh)
    scale = cfg.layer.sm_scale
    s_ctx = jnp.einsum("btkgd,bskd->bkgts", qg, ck.astype(jnp.float32)) * scale
    idx = jnp.arange(t)
    mask = idx[None, :] <= idx[:, None]
    mask = jnp.broadcast_to(mask, (b, t, t))
    window = cfg.layer.sliding_window
    if window is not None:
        mask = mask & (positions[:, :, None] - cpos[:, None, :] < window)
    s_ctx = jnp.where(mask[:, None, None], s_ctx, -jnp.inf)
    s_own = jnp.stack([jnp.einsum("btkgd,btkd->bkgt", qg, ok.astype(jnp.float32)) * scale for ok, _, _ in own], -1)
    if window is not None:
        ok_mask = jnp.stack([positions - op < window for _, _, op in own], -1)  # [B, T, E]
        s_own = jnp.where(ok_mask[:, None, None], s_own, -jnp.inf)
    p = jax.nn.softmax(jnp.concatenate([s_ctx, s_own], -1), axis=-1)
    p_ctx, p_own = p[..., :t], p[..., t:]
    o = jnp.einsum("bkgts,bskd->btkgd", p_ctx, cv.astype(jnp.float32))
    o = o + jnp.einsum("bkgte,ebtkd->btkgd", p_own, jnp.stack([ov.astype(jnp.float32) for _, ov, _ in own]))
    o = o.reshape(b, t, hq * dh).astype(q.dtype)
    f = layer_finish(params["layer"], cfg, x, o)
    return f, draft_logits(params, cfg, f), own[-1]


def shift_rows(a, j: int, fill=0):
    """``a[:, r + j]`` at row ``r`` (``fill`` past the end): the value ``j`` rows ahead, ``a[B, T, ...]``."""
    if j == 0:
        return a
    pad = jnp.full((a.shape[0], j, *a.shape[2:]), fill, a.dtype)
    return jnp.concatenate([a[:, j:], pad], axis=1)


def greedy_chain(params, cfg: EagleHeadConfig, embed_table, tokens, hidden, positions, k: int):
    """``k`` greedy drafts from every row: ``i32[B, T, k]`` target token ids (draft ``j`` of the chain that
    starts at row ``r`` drafts the token ``j`` places after ``tokens[:, r]``)."""
    d2t = jnp.asarray(params["d2t"])
    f, logits, (ck, cv) = eagle_forward_dense(params, cfg, embed_table, tokens, hidden, positions)
    context = (ck, cv, positions)
    drafts = [d2t[jnp.argmax(logits, -1)]]
    own = []
    for j in range(2, k + 1):
        f, logits, kv = chain_step(params, cfg, embed_table, drafts[-1], f, positions + j - 1, context, own)
        own.append(kv)
        drafts.append(d2t[jnp.argmax(logits, -1)])
    return jnp.stack(drafts, -1)


def acceptance_counts(drafts, tokens, valid, k: int):
    """Greedy chain acceptance per row: ``drafts i32[B, T, k]``, the target's greedy tokens ``i32[B, T]``
    (the continuation of row ``r`` is ``tokens[:, r + 1 : r + k + 1]``), ``valid bool[B, T]`` rows whose
    chain is scored (its ``k`` continuation tokens all exist). Returns ``i32[B, T]`` accepted drafts
    (0 .. k; 0 on rows not scored)."""
    target = jnp.stack([shift_rows(tokens, j) for j in range(1, k + 1)], -1)
    ok = (drafts == target).astype(jnp.int32)
    return jnp.where(valid, jnp.sum(jnp.cumprod(ok, axis=-1), axis=-1), 0)
