"""Training an EAGLE draft head with optax: batches, loss, the update step and held-out acceptance.

Rows of a sequence ``x_0 .. x_{L-1}`` with target states ``h`` and greedy predictions ``g``: row ``r`` feeds
``(x_{r+1}, h_r)`` at position ``r + 1``; its feature regresses onto ``h_{r+1}`` and its logits learn
``g_{r+1}`` (the target's greedy next token). Only rows at reply positions count. With ``unroll = J > 1``
each row also drafts ``J - 1`` further steps from its own features, as drafting does (the true next tokens
fed in, teacher forcing over tokens; :mod:`jaxinfer.speculative.eagle_chain`), each step with the same loss
against the targets ``j - 1`` rows ahead.

Loss per step: ``smooth_l1((f - h) / rms(h)).mean(-1) + ce_weight * cross_entropy(logits, g)`` (``rms(h)``
the target state's per-token RMS, no gradient), averaged over the counted rows (cross-entropy only where
``g`` is in the draft vocabulary).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinfer.speculative.eagle_chain import acceptance_counts, chain_step, greedy_chain, shift_rows
from jaxinfer.speculative.eagle_dense import eagle_forward_dense
from jaxinfer.speculative.eagle_head import EagleHeadConfig
from jaxinfer.train.settings import TrainSettings


def optimizer(s: TrainSettings) -> optax.GradientTransformation:
    """AdamW under linear warmup + cosine decay, after global-norm clipping."""
    sched = optax.warmup_cosine_decay_schedule(0.0, s.lr, min(s.warmup, max(s.steps - 1, 1)), max(s.steps, 2),
                                               end_value=s.lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(s.clip), optax.adamw(sched, weight_decay=s.weight_decay))


def rows_of(seq, max_rows: int):
    """Row arrays of one sequence (see the module docstring), at most ``max_rows`` rows."""
    n = min(len(seq.tokens) - 1, max_rows)
    r = np.arange(n)
    return {"tokens": seq.tokens[1:n + 1], "hidden": seq.hidden[:n], "positions": (r + 1).astype(np.int32),
            "target": seq.hidden[1:n + 1], "labels": seq.argmax[1:n + 1], "mask": r + 1 >= seq.prompt_len}


def make_batch(seqs, max_rows: int, t2d: np.ndarray, bucket: int = 64) -> dict[str, np.ndarray]:
    """Rows of ``seqs`` padded to a multiple of ``bucket``; ``labels`` as draft ids (-1: not in the draft
    vocabulary or padding)."""
    rows = [rows_of(q, max_rows) for q in seqs]
    t = -(-max(len(r["tokens"]) for r in rows) // bucket) * bucket
    d = seqs[0].hidden.shape[1]
    out = {"tokens": np.zeros((len(rows), t), np.int32), "hidden": np.zeros((len(rows), t, d), np.float32),
           "positions": np.zeros((len(rows), t), np.int32), "target": np.zeros((len(rows), t, d), np.float32),
           "labels": np.full((len(rows), t), -1, np.int32), "mask": np.zeros((len(rows), t), bool)}
    for i, r in enumerate(rows):
        n = len(r["tokens"])
        for k in ("tokens", "hidden", "positions", "target", "mask"):
            out[k][i, :n] = r[k]
        out["positions"][i, n:] = np.arange(n + 1, t + 1)
        out["labels"][i, :n] = t2d[r["labels"]]
    return out


def target_to_draft(d2t: np.ndarray, vocab_size: int) -> np.ndarray:
    """``t2d[target id]`` = draft id, or -1 outside the draft vocabulary."""
    t2d = np.full(vocab_size, -1, np.int32)
    t2d[np.asarray(d2t)] = np.arange(len(d2t), dtype=np.int32)
    return t2d


def _step_loss(f, logits, target, labels, mask, ce_weight):
    target = target.astype(f.dtype)
    # in units of the target's per-token RMS: raw last-layer states of small models carry a few huge
    # channels (SmolLM2-135M: RMS ~36, single channels to ~4,500) that would swamp the token loss
    scale = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(target), -1, keepdims=True)) + 1e-6)
    reg = jnp.mean(optax.huber_loss(f / scale, target / scale, delta=1.0), axis=-1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    ce_mask = mask & (labels >= 0)
    n = jnp.maximum(jnp.sum(mask), 1)
    reg_m = jnp.sum(jnp.where(mask, reg, 0.0)) / n
    ce_m = jnp.sum(jnp.where(ce_mask, ce, 0.0)) / jnp.maximum(jnp.sum(ce_mask), 1)
    acc = jnp.sum(jnp.where(ce_mask, jnp.argmax(logits, -1) == labels, False)) / jnp.maximum(jnp.sum(ce_mask), 1)
    return reg_m + ce_weight * ce_m, (reg_m, ce_m, acc)


def loss_fn(trainable, d2t, cfg: EagleHeadConfig, table, batch, ce_weight: float, unroll: int):
    """Mean loss over the ``unroll`` steps and per-step ``(regression, cross-entropy, top-1 accuracy)``."""
    params = dict(trainable, d2t=d2t)
    f, logits, (k, v) = eagle_forward_dense(params, cfg, table, batch["tokens"], batch["hidden"], batch["positions"])
    total, m = _step_loss(f, logits, batch["target"], batch["labels"], batch["mask"], ce_weight)
    metrics = [m]
    context, own = (k, v, batch["positions"]), []
    for j in range(2, unroll + 1):
        tokens = shift_rows(batch["tokens"], j - 1)
        f, logits, kv = chain_step(params, cfg, table, tokens, f, batch["positions"] + j - 1, context, own)
        own.append(kv)
        mask = batch["mask"] & shift_rows(batch["mask"], j - 1, False)
        lj, m = _step_loss(f, logits, shift_rows(batch["target"], j - 1), shift_rows(batch["labels"], j - 1, -1),
                           mask, ce_weight)
        total, metrics = total + lj, [*metrics, m]
    return total / unroll, metrics


def make_update(cfg: EagleHeadConfig, opt: optax.GradientTransformation, ce_weight: float, unroll: int):
    """``update(trainable, opt_state, d2t, table, batch) -> (trainable, opt_state, loss, metrics)`` (jitted)."""

    @jax.jit
    def update(trainable, opt_state, d2t, table, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, d2t, cfg, table, batch,
                                                                           ce_weight, unroll)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss, metrics

    return update


def held_out_acceptance(params, cfg: EagleHeadConfig, table, seqs, k: int = 4, batch_size: int = 8,
                        max_rows: int = 256) -> dict:
    """Greedy chain acceptance at ``k`` on greedy held-out replies, computed densely.

    For every reply position ``p`` with ``k`` known tokens after it, the head drafts ``k`` tokens from
    ``(x_p, h_{p-1})`` autoregressively (:func:`~jaxinfer.speculative.eagle_chain.greedy_chain`); the accepted
    count is the number of leading drafts equal to the target's greedy continuation (the reply itself).
    Returns ``{"k", "positions", "mean_accepted", "mean_length" (accepted + 1, tokens per verify step),
    "histogram" (positions with 0 .. k accepted)}``.
    """
    seqs = [q for q in seqs if q.greedy]
    if not seqs:
        raise ValueError("held-out acceptance needs greedy replies")
    run = jax.jit(lambda p, b: greedy_chain(p, cfg, table, b["tokens"], b["hidden"], b["positions"], k))
    t2d = target_to_draft(np.asarray(params["d2t"]), cfg.layer.vocab_size)
    hist = np.zeros(k + 1, np.int64)
    for i in range(0, len(seqs), batch_size):
        b = make_batch(seqs[i:i + batch_size], max_rows, t2d)
        drafts = run(params, {key: jnp.asarray(b[key]) for key in ("tokens", "hidden", "positions")})
        valid = b["mask"] & np.asarray(shift_rows(jnp.asarray(b["mask"]), k, False))
        acc = np.asarray(acceptance_counts(drafts, jnp.asarray(b["tokens"]), jnp.asarray(valid), k))
        hist += np.bincount(acc[valid], minlength=k + 1)
    n = int(hist.sum())
    mean = float((hist * np.arange(k + 1)).sum() / max(n, 1))
    return {"k": k, "positions": n, "mean_accepted": mean, "mean_length": mean + 1.0, "histogram": hist.tolist()}
