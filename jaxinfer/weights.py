"""Checkpoint -> parameter pytree, each leaf loaded straight into its sharding.

The model describes its parameters abstractly (shape, dtype, logical axes); for each leaf this module
knows which checkpoint tensor feeds it and how to reorient it (HF stores linear weights ``[out, in]``;
jaxinfer uses ``[in, out]``; llama.cpp permutes the rows of q/k for its RoPE layout). Every leaf is
materialised with ``jax.make_array_from_callback``, so each device receives only its own slice and the
host holds at most one tensor at a time.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxinfer.errors import JaxinferError, WeightLoadError
from jaxinfer.model_config import ModelConfig
from jaxinfer.sharding import LOGICAL_AXIS_RULES, param_shardings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSource:
    """Checkpoint tensor ``name`` turned into jaxinfer orientation by ``transform`` (numpy -> numpy)."""

    name: str
    transform: Callable[[np.ndarray], np.ndarray] = lambda a: a


def _t(a: np.ndarray) -> np.ndarray:
    return a.T


def unpermute_gguf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> half-split RoPE pairs) on ``w[rows, ...]``."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_sources(config: ModelConfig) -> dict[tuple[str, ...], TensorSource]:
    """Parameter path -> HF safetensors tensor."""
    src = {("embed_tokens",): TensorSource("model.embed_tokens.weight"),
           ("norm", "scale"): TensorSource("model.norm.weight")}
    if not config.tie_word_embeddings:
        src[("lm_head", "kernel")] = TensorSource("lm_head.weight", _t)
    for i in range(config.num_layers):
        hf = f"model.layers.{i}"
        p = f"layers_{i}"
        src[(p, "input_layernorm", "scale")] = TensorSource(f"{hf}.input_layernorm.weight")
        src[(p, "post_attention_layernorm", "scale")] = TensorSource(f"{hf}.post_attention_layernorm.weight")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            src[(p, "self_attn", proj, "kernel")] = TensorSource(f"{hf}.self_attn.{proj}.weight", _t)
        if config.attention_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                src[(p, "self_attn", proj, "bias")] = TensorSource(f"{hf}.self_attn.{proj}.bias")
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                src[(p, "self_attn", norm, "scale")] = TensorSource(f"{hf}.self_attn.{norm}.weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            src[(p, "mlp", proj, "kernel")] = TensorSource(f"{hf}.mlp.{proj}.weight", _t)
            if config.mlp_bias:
                src[(p, "mlp", proj, "bias")] = TensorSource(f"{hf}.mlp.{proj}.bias")
    return src


def gguf_sources(config: ModelConfig) -> dict[tuple[str, ...], TensorSource]:
    """Parameter path -> GGUF tensor (llama architecture naming)."""
    hq, hkv = config.num_heads, config.num_kv_heads
    src = {("embed_tokens",): TensorSource("token_embd.weight"),
           ("norm", "scale"): TensorSource("output_norm.weight")}
    if not config.tie_word_embeddings:
        src[("lm_head", "kernel")] = TensorSource("output.weight", _t)
    for i in range(config.num_layers):
        b = f"blk.{i}"
        p = f"layers_{i}"
        src[(p, "input_layernorm", "scale")] = TensorSource(f"{b}.attn_norm.weight")
        src[(p, "post_attention_layernorm", "scale")] = TensorSource(f"{b}.ffn_norm.weight")
        src[(p, "self_attn", "q_proj", "kernel")] = TensorSource(
            f"{b}.attn_q.weight", lambda a: unpermute_gguf_rows(a, hq).T)
        src[(p, "self_attn", "k_proj", "kernel")] = TensorSource(
            f"{b}.attn_k.weight", lambda a: unpermute_gguf_rows(a, hkv).T)
        src[(p, "self_attn", "v_proj", "kernel")] = TensorSource(f"{b}.attn_v.weight", _t)
        src[(p, "self_attn", "o_proj", "kernel")] = TensorSource(f"{b}.attn_output.weight", _t)
        src[(p, "mlp", "gate_proj", "kernel")] = TensorSource(f"{b}.ffn_gate.weight", _t)
        src[(p, "mlp", "up_proj", "kernel")] = TensorSource(f"{b}.ffn_up.weight", _t)
        src[(p, "mlp", "down_proj", "kernel")] = TensorSource(f"{b}.ffn_down.weight", _t)
    return src


def expand_kv_heads(sources: dict[tuple[str, ...], TensorSource], head_dim: int, replicas: int
                    ) -> dict[tuple[str, ...], TensorSource]:
    """Repeat every KV head of the k/v projections ``replicas`` times (columns ``[.., kv * D]`` ->
    ``[.., kv * replicas * D]``; expanded head ``j`` is checkpoint head ``j // replicas``), so tensor
    parallelism wider than the KV-head count gives each shard whole heads."""
    if replicas == 1:
        return sources

    def repeat(transform):
        def f(a):
            t = transform(a)
            heads = t.reshape(*t.shape[:-1], t.shape[-1] // head_dim, head_dim)
            return np.repeat(heads, replicas, axis=-2).reshape(*t.shape[:-1], -1)
        return f

    out = dict(sources)
    for path, src in sources.items():
        if len(path) >= 2 and path[-2] in ("k_proj", "v_proj"):
            out[path] = TensorSource(src.name, repeat(src.transform))
    return out


def load_params(checkpoint, sources: dict[tuple[str, ...], TensorSource], abstract_params, mesh: Mesh,
                *, rules=LOGICAL_AXIS_RULES, desc: str = "Loading weights"):
    """Load every parameter of ``abstract_params`` (boxed, from ``CausalLM.abstract_params``).

    Args:
      checkpoint: object with ``keys()`` and ``get(name) -> np.ndarray``.
      sources: parameter path -> :class:`TensorSource`.
      abstract_params: boxed abstract parameter pytree (carries shapes, dtypes and logical axes).
      mesh: device mesh; each leaf gets the sharding its logical axes map to.
      rules: logical axis -> mesh axis table (a model's ``ShardingPlan.rules``).
    Returns:
      The parameter pytree of ``jax.Array`` leaves.
    Raises:
      WeightLoadError: missing tensors or shape mismatches (all named).
    """
    shardings = flatten_dict(param_shardings(nn.get_partition_spec(abstract_params), mesh, rules))
    leaves = flatten_dict(nn.unbox(abstract_params))
    available = checkpoint.keys()
    missing = [s.name for p, s in sources.items() if p in leaves and s.name not in available]
    unmapped = [".".join(p) for p in leaves if p not in sources]
    if unmapped:
        raise WeightLoadError(f"no checkpoint tensor mapped for parameters: {unmapped[:5]}")
    if missing:
        raise WeightLoadError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
    out = {}
    for path, spec in tqdm(leaves.items(), desc=desc, unit="tensor", leave=False):
        src = sources[path]
        try:
            host = src.transform(checkpoint.get(src.name))
        except JaxinferError:
            raise
        except (ValueError, TypeError) as e:
            raise WeightLoadError(f"tensor {src.name}: cannot read or reshape ({e})") from e
        if tuple(host.shape) != tuple(spec.shape):
            raise WeightLoadError(
                f"tensor {src.name} has shape {tuple(host.shape)} but the configuration implies "
                f"{tuple(spec.shape)} for parameter {'/'.join(path)}"
            )
        dtype = spec.dtype
        out[path] = jax.make_array_from_callback(
            spec.shape, shardings[path], lambda idx, h=host, d=dtype: np.asarray(h[idx], dtype=d)
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    logger.info("loaded %d tensors; peak host RSS %.0f MB", len(out), peak_mb)
    return unflatten_dict(out)
