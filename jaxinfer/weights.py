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

    def names(self) -> tuple[str, ...]:
        return (self.name,)

    def read(self, checkpoint) -> np.ndarray:
        return self.transform(checkpoint.get(self.name))


@dataclass(frozen=True)
class StackedSource:
    """Per-expert checkpoint tensors stacked on a new leading axis: ``[E, ...]``, row ``e`` from ``parts[e]``."""

    parts: tuple[TensorSource, ...]

    @property
    def name(self) -> str:
        return f"{self.parts[0].name} (and {len(self.parts) - 1} more experts)"

    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts)

    def read(self, checkpoint) -> _LazyStack:
        return _LazyStack(self.parts, checkpoint)


class _LazyStack:
    """The ``[E, ...]`` stack of per-expert tensors as an indexable view that reads only the experts an index
    selects: under expert parallelism each device's slice (``jax.make_array_from_callback``) touches only
    its own experts' tensors."""

    def __init__(self, parts: tuple[TensorSource, ...], checkpoint):
        self.parts, self.checkpoint = parts, checkpoint
        self.shape = (len(parts), *parts[0].read(checkpoint).shape)

    def __getitem__(self, idx) -> np.ndarray:
        idx = idx if isinstance(idx, tuple) else (idx,)
        experts = range(len(self.parts))[idx[0]] if idx else range(len(self.parts))
        return np.stack([np.asarray(self.parts[e].read(self.checkpoint)[idx[1:]]) for e in experts])


def _t(a: np.ndarray) -> np.ndarray:
    return a.T


def _t3(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 1)


def hf_moe_sources(config: ModelConfig, i: int, keys=frozenset()) -> dict[tuple[str, ...], TensorSource]:
    """Parameter path -> HF tensor(s) of MoE layer ``i``: per-expert tensors as the checkpoints store them
    (``mlp.experts.{e}.{gate,up,down}_proj.weight``; Mixtral ``block_sparse_moe.experts.{e}.w1/w3/w2``),
    or the fused ``mlp.experts.gate_up_proj [E, 2I, H]`` / ``mlp.experts.down_proj [E, H, I]`` of
    transformers 5's in-memory layout when ``keys`` (the checkpoint's tensor names) has them."""
    p = (f"layers_{i}", "mlp")
    hf = f"model.layers.{i}.mlp"  # Mixtral's checkpoints: block_sparse_moe (transformers 5 in memory: mlp)
    fused = f"{hf}.experts.gate_up_proj"
    mixtral = config.architecture == "mixtral" and fused not in keys
    if mixtral:
        hf = f"model.layers.{i}.block_sparse_moe"
    src = {(*p, "gate", "kernel"): TensorSource(f"{hf}.gate.weight", _t)}
    inter = config.moe_intermediate_size
    if fused in keys:
        src[(*p, "experts", "gate_proj")] = TensorSource(fused, lambda a: _t3(a[:, :inter]))
        src[(*p, "experts", "up_proj")] = TensorSource(fused, lambda a: _t3(a[:, inter:]))
        src[(*p, "experts", "down_proj")] = TensorSource(f"{hf}.experts.down_proj", _t3)
    else:
        names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"} if mixtral else {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            parts = tuple(TensorSource(f"{hf}.experts.{e}.{names.get(proj, proj)}.weight", _t)
                          for e in range(config.num_experts))
            src[(*p, "experts", proj)] = StackedSource(parts)
    if config.shared_expert_intermediate_size:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            src[(*p, "shared_expert", proj, "kernel")] = TensorSource(f"{hf}.shared_expert.{proj}.weight", _t)
        src[(*p, "shared_expert_gate", "kernel")] = TensorSource(f"{hf}.shared_expert_gate.weight", _t)
    return src


def unpermute_gguf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> half-split RoPE pairs) on ``w[rows, ...]``."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_sources(config: ModelConfig, keys=frozenset()) -> dict[tuple[str, ...], TensorSource]:
    """Parameter path -> HF safetensors tensor (``keys``: the checkpoint's tensor names, which pick between
    the per-expert and fused layouts of MoE experts)."""
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
        if config.is_moe_layer(i):
            src.update(hf_moe_sources(config, i, keys))
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            src[(p, "mlp", proj, "kernel")] = TensorSource(f"{hf}.mlp.{proj}.weight", _t)
            if config.mlp_bias:
                src[(p, "mlp", proj, "bias")] = TensorSource(f"{hf}.mlp.{proj}.bias")
    return src


def gguf_moe_sources(config: ModelConfig, i: int) -> dict[tuple[str, ...], TensorSource]:
    """Parameter path -> GGUF tensor of MoE layer ``i``, as llama.cpp names them: router ``ffn_gate_inp``
    ``[E, H]``, stacked experts ``ffn_{gate,up}_exps`` ``[E, I, H]`` / ``ffn_down_exps`` ``[E, H, I]`` (numpy
    order), shared expert ``ffn_{gate,up,down}_shexp`` and its gate ``ffn_gate_inp_shexp`` (``H`` values)."""
    b, p = f"blk.{i}", (f"layers_{i}", "mlp")
    src = {(*p, "gate", "kernel"): TensorSource(f"{b}.ffn_gate_inp.weight", _t)}
    for proj, g in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
        src[(*p, "experts", proj)] = TensorSource(f"{b}.ffn_{g}_exps.weight", _t3)
        if config.shared_expert_intermediate_size:
            src[(*p, "shared_expert", proj, "kernel")] = TensorSource(f"{b}.ffn_{g}_shexp.weight", _t)
    if config.shared_expert_intermediate_size:
        src[(*p, "shared_expert_gate", "kernel")] = TensorSource(f"{b}.ffn_gate_inp_shexp.weight",
                                                                 lambda a: a.reshape(-1, 1))
    return src


def gguf_sources(config: ModelConfig) -> dict[tuple[str, ...], TensorSource]:
    """Parameter path -> GGUF tensor (llama.cpp naming; q/k rows un-permuted for the llama architecture,
    which Mixtral's conversion uses, and stored as is for Qwen's)."""
    hq, hkv = config.num_heads, config.num_kv_heads
    permuted = config.architecture in ("llama", "mistral", "mixtral")
    src = {("embed_tokens",): TensorSource("token_embd.weight"),
           ("norm", "scale"): TensorSource("output_norm.weight")}
    if not config.tie_word_embeddings:
        src[("lm_head", "kernel")] = TensorSource("output.weight", _t)
    for i in range(config.num_layers):
        b = f"blk.{i}"
        p = f"layers_{i}"
        src[(p, "input_layernorm", "scale")] = TensorSource(f"{b}.attn_norm.weight")
        src[(p, "post_attention_layernorm", "scale")] = TensorSource(f"{b}.ffn_norm.weight")
        if permuted:
            src[(p, "self_attn", "q_proj", "kernel")] = TensorSource(
                f"{b}.attn_q.weight", lambda a: unpermute_gguf_rows(a, hq).T)
            src[(p, "self_attn", "k_proj", "kernel")] = TensorSource(
                f"{b}.attn_k.weight", lambda a: unpermute_gguf_rows(a, hkv).T)
        else:
            src[(p, "self_attn", "q_proj", "kernel")] = TensorSource(f"{b}.attn_q.weight", _t)
            src[(p, "self_attn", "k_proj", "kernel")] = TensorSource(f"{b}.attn_k.weight", _t)
        src[(p, "self_attn", "v_proj", "kernel")] = TensorSource(f"{b}.attn_v.weight", _t)
        src[(p, "self_attn", "o_proj", "kernel")] = TensorSource(f"{b}.attn_output.weight", _t)
        if config.attention_bias:
            for proj, g in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
                src[(p, "self_attn", proj, "bias")] = TensorSource(f"{b}.attn_{g}.bias")
        if config.qk_norm:
            src[(p, "self_attn", "q_norm", "scale")] = TensorSource(f"{b}.attn_q_norm.weight")
            src[(p, "self_attn", "k_norm", "scale")] = TensorSource(f"{b}.attn_k_norm.weight")
        if config.is_moe_layer(i):
            src.update(gguf_moe_sources(config, i))
            continue
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
    missing = [n for p, s in sources.items() if p in leaves for n in s.names() if n not in available]
    unmapped = [".".join(p) for p in leaves if p not in sources]
    if unmapped:
        raise WeightLoadError(f"no checkpoint tensor mapped for parameters: {unmapped[:5]}")
    if missing:
        raise WeightLoadError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
    out = {}
    for path, spec in tqdm(leaves.items(), desc=desc, unit="tensor", leave=False):
        src = sources[path]
        try:
            host = src.read(checkpoint)
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
