"""The EAGLE head inside the engine: choosing and checking the head file, its paged cache geometry and its
paged forward pass (the head's definition and file format are :mod:`jaxinfer.speculative.eagle_head`, its
dense reference forward :mod:`jaxinfer.speculative.eagle_dense`).

Cache layout: the head's entry ``t`` (input ``(x_{t+1}, h_t)``, RoPE position ``t + 1``) is stored at the
target's cache slot of position ``t``, in a one-layer cache with the target's page count, page size, layout
and storage dtype, so the target's block tables and page ids serve it (like the draft model's cache,
:mod:`jaxinfer.speculative.draft`). Entry ``t`` exists once the target has computed position ``t`` and token
``x_{t+1}`` is known.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.attention import AttentionMetadata
from jaxinfer.errors import UnsupportedModelError
from jaxinfer.kv_cache import KVCacheSpec
from jaxinfer.models.causal_lm import ATTENTION_CLASSES
from jaxinfer.models.layers import Rotary, embed, linear
from jaxinfer.models.llama import DecoderLayer
from jaxinfer.speculative.draft import draft_bytes_per_token, draft_sample
from jaxinfer.speculative.eagle_dense import draft_logits
from jaxinfer.speculative.eagle_head import LAYER_FIELDS, EagleHeadConfig, load_eagle_head, shipped_head_path
from jaxinfer.target import Kernels


def _short(name: str | None) -> str:
    return "" if not name else Path(str(name).rstrip("/")).name.lower()


def resolve_head(speculative_model: str | None, target_config, target_name: str | None):
    """The head for a target: ``(EagleHeadConfig, params)`` read from ``speculative_model`` (a head file), or the
    shipped head of ``target_name`` (a registered model name; ``None``: the default model) when it is ``None``.

    Raises:
      ValueError: no head given and none shipped for the target.
      UnsupportedModelError: the head was trained for another model (its shapes or its recorded target name
        differ from the target's).
    """
    if speculative_model is None:
        path = shipped_head_path(target_name)
        if path is None:
            raise ValueError(f"speculative_method 'eagle' needs speculative_model=<head file>: no EAGLE head is "
                             f"shipped for {target_name!r} (train one with `jaxinfer train-draft`)")
    else:
        path = Path(os.path.expanduser(str(speculative_model)))
    cfg, params = load_eagle_head(path)
    check_head(cfg, target_config, target_name, path)
    return cfg, params


def check_head(cfg: EagleHeadConfig, target_config, target_name: str | None, path) -> None:
    """Refuse a head trained for another target (see :func:`resolve_head`)."""
    from jaxinfer.model_registry import DEFAULT_MODEL

    want = EagleHeadConfig.from_target(target_config, cfg.draft_vocab_size, cfg.target_model)
    # Every field the head keeps must be the target's, but the context length (the head reads no position
    # past the target's own).
    bad = [f for f in LAYER_FIELDS
           if f != "max_position_embeddings" and getattr(want.layer, f) != getattr(cfg.layer, f)]
    name = DEFAULT_MODEL if target_name is None else target_name
    head_for, target = _short(cfg.target_model), _short(name)
    if bad or (head_for and target and head_for != target):
        what = f"different {', '.join(bad)}" if bad else "a different model name"
        raise UnsupportedModelError(
            f"the EAGLE head {path} was trained for {cfg.target_model or 'an unnamed model'!r}, not for the "
            f"target {name!r} ({what})")


def eagle_kv_spec(cfg: EagleHeadConfig, target_spec: KVCacheSpec) -> KVCacheSpec:
    """The head's one-layer cache on the target's pages."""
    lc = cfg.layer
    return KVCacheSpec(1, target_spec.num_pages, target_spec.page_size, lc.num_kv_heads, lc.head_dim,
                       target_spec.dtype, target_spec.quant_dtype, target_spec.layout)


def eagle_bytes_per_token(cfg: EagleHeadConfig, page_size: int, dtype, kv_cache_dtype: str, impl: str | None) -> int:
    """Cache bytes per token of the head (to share the KV memory budget with the target)."""
    return draft_bytes_per_token(cfg.layer, page_size, dtype, kv_cache_dtype, impl)


class EagleHead:
    """The head's paged forward pass (pure functions of their arguments, traced inside the runner's step).

    Args:
      cfg: the head's :class:`EagleHeadConfig`.
      d2t: ``int[Vd]`` target id of each draft id.
      dtype: activations and parameters (the target's).
      kernels: the runner's kernel choice.
    """

    def __init__(self, cfg: EagleHeadConfig, d2t: np.ndarray, dtype, kernels: Kernels | None):
        self.cfg = cfg
        lc = cfg.layer
        self.layer = DecoderLayer(lc, ATTENTION_CLASSES[lc.architecture], jnp.dtype(dtype), kernels=kernels)
        self.inv_freq = np.asarray(lc.inv_freq(), np.float32)
        self.kernels = kernels
        self.vocab = lc.vocab_size
        self.full_vocab = len(d2t) == lc.vocab_size and bool(np.all(d2t == np.arange(len(d2t))))

    def features(self, params, embed_table, tokens, hidden, positions, cache, md: AttentionMetadata):
        """``f = layer(fc([embed(tokens); hidden]))`` over a ragged batch, the new K/V written to ``cache``.

        Args:
          params: head parameters; embed_table: the target's embedding.
          tokens: ``i32[T]`` (``x_{t+1}``), hidden: ``[T, D]`` (``h_t`` or the head's own feature),
          positions: ``i32[T]`` (``t + 1``); cache: the head's one-layer cache; md: the step's metadata
            (entry ``t`` at the slot of position ``t``).
        Returns:
          ``(features [T, D], cache)``.
        """
        x = embed(embed_table, tokens, hidden.dtype)
        x = linear(jnp.concatenate([x, hidden], axis=-1), params["fc"]["kernel"], params["fc"]["bias"])
        if self.kernels is not None:
            md = md.replace(impl=self.kernels.attention, interpret=self.kernels.attention_interpret)
        return self.layer.apply({"params": params["layer"]}, x, Rotary.at(positions, self.inv_freq), cache, md)

    def draft_logits(self, params, features) -> jax.Array:
        """Draft logits over the draft vocabulary, ``[N, D] -> f32[N, Vd]``."""
        return draft_logits(params, self.cfg, features)

    def on_target_vocab(self, params, logits) -> jax.Array:
        """Draft logits on the target's vocabulary, ``f32[N, Vd] -> f32[N, V]`` (ids outside the draft
        vocabulary get ``-inf``)."""
        if self.full_vocab:
            return logits
        out = jnp.full((logits.shape[0], self.vocab), -jnp.inf, jnp.float32)
        return out.at[:, params["d2t"]].set(logits)

    def sample(self, params, logits, st, probs, q_rows):
        """Draft tokens from ``logits f32[S, Vd]``: greedy rows the draft vocabulary's argmax, sampled rows a
        draw from the warped draft distribution ``q`` (kept at ``probs[q_rows]``, out-of-range rows dropped).

        Returns:
          ``(tokens i32[S], probs, confidence f32[S])``: the confidence is the drawn token's probability
          (greedy rows: the softmax maximum of the draft logits; sampled rows: ``q`` at the token).
        """
        greedy_conf = 1.0 / jnp.sum(jnp.exp(logits - jnp.max(logits, -1, keepdims=True)), -1)

        def greedy():  # q is not read for greedy rows
            return params["d2t"][jnp.argmax(logits, axis=-1)].astype(jnp.int32), probs, greedy_conf

        def sampled():
            tokens, q = draft_sample(self.on_target_vocab(params, logits), st)
            conf = jnp.take_along_axis(q, tokens[:, None], axis=1)[:, 0]
            return tokens, probs.at[q_rows].set(q, mode="drop"), jnp.where(st.temperature <= 0, greedy_conf, conf)

        return jax.lax.cond(jnp.all(st.temperature <= 0), greedy, sampled)

    def draft(self, params, embed_table, cache, probs, source, batch, source_rows, q_rows, chain, chain_q_rows,
              active, num_steps, threshold):
        """The catch-up step and up to ``K - 1`` further draft steps in one program (a ``while_loop``).

        Step 1 runs ``batch`` (``S`` rows; ``source[source_rows]`` its input states) and drafts ``d_1`` per row.
        Chain step ``j`` (``0 .. K - 2``) feeds each row its previous draft and the feature of its previous
        entry, with the host-built ``chain`` (a ``StepBatch`` stacked ``[K - 1, ...]``, row ``n`` = row ``n`` of
        ``batch``, one token each; rows that do not draft there have no slot and write nothing).

        Early stop (EAGLE-2's confidence for a chain): a row proposes draft ``j + 2`` only while the product of
        its drafts' confidences (:meth:`sample`) is at least ``threshold``; the loop ends after ``num_steps``
        steps or when no row proposes any more.

        Args:
          chain_q_rows: ``i32[K - 1, S2]`` ``q`` rows per chain step; active: ``bool[K - 1, S]`` row ``n`` may
            draft at chain step ``j`` (its ``k > j + 1``); num_steps: ``i32`` chain steps at most;
            threshold: ``f32`` (0: never stop early).
        Returns:
          ``(drafts i32[S, K], counts i32[S], (cache,), probs)``: row ``n`` proposes ``drafts[n, :counts[n]]``
          (``counts`` counts from the first draft on; rows with no drafts at all are the host's to drop).
        """
        hidden = jnp.take(source, source_rows, axis=0)
        f, cache = self.features(params, embed_table, batch.tokens, hidden, batch.positions + 1, cache, batch.md)
        first = jnp.take(f, batch.logits_indices, axis=0)
        tokens, probs, conf = self.sample(params, self.draft_logits(params, first), batch.sampling, probs, q_rows)
        s = tokens.shape[0]
        k1, t2 = chain.tokens.shape
        out = jnp.zeros((k1 + 1, s), jnp.int32).at[0].set(tokens)
        counts = jnp.ones(s, jnp.int32)
        alive = conf >= threshold
        if k1 == 0:
            return out.T, counts, (cache,), probs
        feats = jnp.zeros((t2, first.shape[-1]), first.dtype).at[:s].set(first)
        prev = jnp.zeros(t2, jnp.int32).at[:s].set(tokens)

        def body(state):
            j, cache, probs, prev, feats, out, counts, cum, alive = state
            b = jax.tree.map(lambda a: a[j], chain)
            f, cache = self.features(params, embed_table, prev, feats, b.positions + 1, cache, b.md)
            logits = self.draft_logits(params, jnp.take(f, b.logits_indices, axis=0))
            tok, probs, c = self.sample(params, logits, b.sampling, probs, chain_q_rows[j])
            go = alive & active[j]
            cum = cum * c[:s]
            return (j + 1, cache, probs, prev.at[:s].set(tok[:s]), f, out.at[j + 1].set(tok[:s]),
                    counts + go.astype(jnp.int32), cum, go & (cum >= threshold))

        def cond(state):
            return (state[0] < num_steps) & jnp.any(state[-1])

        state = (jnp.int32(0), cache, probs, prev, feats, out, counts, conf, alive)
        _, cache, probs, _, _, out, counts, _, _ = jax.lax.while_loop(cond, body, state)
        return out.T, counts, (cache,), probs
