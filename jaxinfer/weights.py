"""Checkpoint -> parameter pytree, each leaf loaded straight into its sharding.

The model describes its parameters abstractly (shape, dtype, logical axes); for each leaf this module
knows which checkpoint tensor feeds it and how to reorient it (HF stores linear weights ``[out, in]``;
jaxinfer uses ``[in, out]``; llama.cpp permutes the rows of q/k for its RoPE layout). Every leaf is
materialised with ``jax.make_array_from_callback`` from :meth:`TensorSource.read`, so each process reads
from the checkpoint only the slices its own devices hold (each distinct slice once) and holds at most one
tensor's slices at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
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
    """Checkpoint tensor ``name`` (stored ``[rows, cols]`` = HF ``[out, in]``, or 1-D) turned into jaxinfer
    orientation, in this order: llama.cpp's q/k row permutation undone (``unpermute_heads``: the head
    count; 0: none), transposed (``transpose``), each KV head of ``head_dim`` columns repeated
    ``repeat_kv`` times along the last axis (tensor parallelism wider than the KV-head count).

    :meth:`read` produces any rectangular slice of the result from the smallest stored region that
    determines it, so a process reads only the shards its devices hold.
    """

    name: str
    transpose: bool = False
    unpermute_heads: int = 0
    repeat_kv: int = 1
    head_dim: int = 0

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The parameter's shape for a stored tensor of shape ``stored``."""
        out = tuple(reversed(stored)) if self.transpose else tuple(stored)
        return (*out[:-1], out[-1] * self.repeat_kv)

    def read(self, checkpoint, index: tuple[slice, ...], cache: dict | None = None) -> np.ndarray:
        """``parameter[index]`` (unit-step slices, one per axis) read through ``checkpoint.read``; ``cache``
        (kept by the caller for one tensor) holds the stored regions read, so slices that need the same
        region (replicas, or repeated KV heads on neighbouring devices) read it once."""
        stored_shape = checkpoint.shape(self.name)
        bounds = [s.indices(n)[:2] for s, n in zip(index, self.shape(stored_shape))]
        *lead, (c0, c1) = bounds
        r, hd = self.repeat_kv, self.head_dim
        s0, s1 = ((c0 // hd) // r * hd, ((c1 - 1) // hd // r + 1) * hd) if r > 1 else (c0, c1)
        stored = [(s0, s1), *lead] if self.transpose else [*lead, (s0, s1)]
        if self.unpermute_heads:  # whole heads of stored rows
            hs = stored_shape[0] // self.unpermute_heads
            (a, b), want = stored[0], stored[0]
            stored[0] = (a // hs * hs, -(-b // hs) * hs)
        key = tuple(stored)
        region = cache.get(key) if cache is not None else None
        if region is None:
            region = checkpoint.read(self.name, tuple(slice(a, b) for a, b in stored))
            if cache is not None:
                cache[key] = region
        if self.unpermute_heads:
            a0, b0 = stored[0]
            region = unpermute_gguf_rows(region, (b0 - a0) // hs)[want[0] - a0 : want[1] - a0]
        if self.transpose:
            region = region.T
        if r > 1:
            heads = region.reshape(*region.shape[:-1], region.shape[-1] // hd, hd)
            region = np.repeat(heads, r, axis=-2).reshape(*region.shape[:-1], -1)
            region = region[..., c0 - s0 * r : c1 - s0 * r]
        return region


def unpermute_gguf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> half-split RoPE pairs) on ``w[rows, ...]``."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_sources(config: ModelConfig) -> dict[tuple[str, ...], TensorSource]:
    """Parameter path -> HF safetensors tensor."""
    src = {("embed_tokens",): TensorSource("model.embed_tokens.weight"),
           ("norm", "scale"): TensorSource("model.norm.weight")}
    if not config.tie_word_embeddings:
        src[("lm_head", "kernel")] = TensorSource("lm_head.weight", transpose=True)
    for i in range(config.num_layers):
        hf = f"model.layers.{i}"
        p = f"layers_{i}"
        src[(p, "input_layernorm", "scale")] = TensorSource(f"{hf}.input_layernorm.weight")
        src[(p, "post_attention_layernorm", "scale")] = TensorSource(f"{hf}.post_attention_layernorm.weight")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            src[(p, "self_attn", proj, "kernel")] = TensorSource(f"{hf}.self_attn.{proj}.weight", transpose=True)
        if config.attention_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                src[(p, "self_attn", proj, "bias")] = TensorSource(f"{hf}.self_attn.{proj}.bias")
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                src[(p, "self_attn", norm, "scale")] = TensorSource(f"{hf}.self_attn.{norm}.weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            src[(p, "mlp", proj, "kernel")] = TensorSource(f"{hf}.mlp.{proj}.weight", transpose=True)
            if config.mlp_bias:
                src[(p, "mlp", proj, "bias")] = TensorSource(f"{hf}.mlp.{proj}.bias")
    return src


def gguf_sources(config: ModelConfig) -> dict[tuple[str, ...], TensorSource]:
    """Parameter path -> GGUF tensor (llama architecture naming)."""
    hq, hkv = config.num_heads, config.num_kv_heads
    src = {("embed_tokens",): TensorSource("token_embd.weight"),
           ("norm", "scale"): TensorSource("output_norm.weight")}
    if not config.tie_word_embeddings:
        src[("lm_head", "kernel")] = TensorSource("output.weight", transpose=True)
    for i in range(config.num_layers):
        b = f"blk.{i}"
        p = f"layers_{i}"
        src[(p, "input_layernorm", "scale")] = TensorSource(f"{b}.attn_norm.weight")
        src[(p, "post_attention_layernorm", "scale")] = TensorSource(f"{b}.ffn_norm.weight")
        src[(p, "self_attn", "q_proj", "kernel")] = TensorSource(f"{b}.attn_q.weight", True, hq)
        src[(p, "self_attn", "k_proj", "kernel")] = TensorSource(f"{b}.attn_k.weight", True, hkv)
        src[(p, "self_attn", "v_proj", "kernel")] = TensorSource(f"{b}.attn_v.weight", True)
        src[(p, "self_attn", "o_proj", "kernel")] = TensorSource(f"{b}.attn_output.weight", True)
        src[(p, "mlp", "gate_proj", "kernel")] = TensorSource(f"{b}.ffn_gate.weight", True)
        src[(p, "mlp", "up_proj", "kernel")] = TensorSource(f"{b}.ffn_up.weight", True)
        src[(p, "mlp", "down_proj", "kernel")] = TensorSource(f"{b}.ffn_down.weight", True)
    return src


def expand_kv_heads(sources: dict[tuple[str, ...], TensorSource], head_dim: int, replicas: int
                    ) -> dict[tuple[str, ...], TensorSource]:
    """Repeat every KV head of the k/v projections ``replicas`` times (columns ``[.., kv * D]`` ->
    ``[.., kv * replicas * D]``; expanded head ``j`` is checkpoint head ``j // replicas``), so tensor
    parallelism wider than the KV-head count gives each shard whole heads."""
    if replicas == 1:
        return sources
    out = dict(sources)
    for path, src in sources.items():
        if len(path) >= 2 and path[-2] in ("k_proj", "v_proj"):
            out[path] = dataclasses.replace(src, repeat_kv=replicas, head_dim=head_dim)
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
    read_before = getattr(checkpoint, "bytes_read", 0)
    for path, spec in tqdm(leaves.items(), desc=desc, unit="tensor", leave=False):
        src = sources[path]
        shape = src.shape(checkpoint.shape(src.name))
        if tuple(shape) != tuple(spec.shape):
            raise WeightLoadError(
                f"tensor {src.name} has shape {tuple(shape)} but the configuration implies "
                f"{tuple(spec.shape)} for parameter {'/'.join(path)}"
            )
        reader = _shard_reader(checkpoint, src, spec.dtype)
        out[path] = jax.make_array_from_callback(spec.shape, shardings[path], reader)
    read = getattr(checkpoint, "bytes_read", 0) - read_before
    total = sum(checkpoint.nbytes(sources[p].name) for p in leaves)
    logger.info("process %d of %d read %d of %d checkpoint bytes (the shards of its devices)",
                jax.process_index(), jax.process_count(), read, total)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    logger.info("loaded %d tensors; peak host RSS %.0f MB", len(out), peak_mb)
    return unflatten_dict(out)


def _shard_reader(checkpoint, src: TensorSource, dtype):
    """``make_array_from_callback``'s callback over one tensor: each stored region is read once."""
    cache = {}

    def read(index):
        try:
            return np.asarray(src.read(checkpoint, index, cache), dtype=dtype)
        except JaxinferError:
            raise
        except (ValueError, TypeError) as e:
            raise WeightLoadError(f"tensor {src.name}: cannot read or reshape ({e})") from e

    return read
