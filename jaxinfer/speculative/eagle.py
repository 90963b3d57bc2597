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
from jaxinfer.models.layers import embed, linear
from jaxinfer.models.llama import DecoderLayer
from jaxinfer.speculative.draft import draft_bytes_per_token
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
        return self.layer.apply({"params": params["layer"]}, x, positions, cache, md, jnp.asarray(self.inv_freq))

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
