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


@dataclass(frozen=True)
class StackedSource:
    """Stacked experts ``[E, ...]`` from per-expert tensors: row ``e`` is ``parts[e]``'s parameter. A slice
    reads only the experts it covers (under expert parallelism, each device its own)."""

    parts: tuple[TensorSource, ...]

    @property
    def name(self) -> str:
        return self.parts[0].name

    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts)

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """For ``stored``, the shape of each expert's tensor (all equal, checked when read)."""
        return (len(self.parts), *self.parts[0].shape(stored))

    def read(self, checkpoint, index: tuple[slice, ...], cache: dict | None = None) -> np.ndarray:
        out = []
        for e in range(len(self.parts))[index[0]]:
            part = self.parts[e]
            if checkpoint.shape(part.name) != checkpoint.shape(self.name):
                raise WeightLoadError(f"expert tensor {part.name} has shape {checkpoint.shape(part.name)}, "
                                      f"expert 0's {self.name} has {checkpoint.shape(self.name)}")
            out.append(part.read(checkpoint, index[1:], None if cache is None else cache.setdefault(e, {})))
        return np.stack(out)


@dataclass(frozen=True)
class ExpertsSource:
    """Stacked experts stored as one 3-D tensor ``[E, out, in]`` (HF's fused ``experts.gate_up_proj`` /
    ``experts.down_proj``, llama.cpp's ``ffn_*_exps``), as the parameter ``[E, in, out]``; ``rows`` picks a
    range of each expert's ``out`` rows (the gate or the up half of a fused gate_up)."""

    name: str
    rows: tuple[int, int] | None = None

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        e, out, inp = stored
        return (e, inp, out if self.rows is None else self.rows[1] - self.rows[0])

    def read(self, checkpoint, index: tuple[slice, ...], cache: dict | None = None) -> np.ndarray:
        shape = self.shape(checkpoint.shape(self.name))
        (e0, e1), (i0, i1), (o0, o1) = (s.indices(n)[:2] for s, n in zip(index, shape))
        base = self.rows[0] if self.rows is not None else 0
        region = checkpoint.read(self.name, (slice(e0, e1), slice(base + o0, base + o1), slice(i0, i1)))
        return region.transpose(0, 2, 1)


@dataclass(frozen=True)
class ColumnSource:
    """A stored vector of ``H`` values (or ``[1, H]``) as the parameter ``[H, 1]`` (Qwen2-MoE's shared-expert
    gate in GGUF)."""

    name: str

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        return (int(np.prod(stored)), 1)

    def read(self, checkpoint, index: tuple[slice, ...], cache: dict | None = None) -> np.ndarray:
        stored = checkpoint.shape(self.name)
        return checkpoint.read(self.name, tuple(slice(0, n) for n in stored)).reshape(-1, 1)[index]


def hf_moe_sources(config: ModelConfig, i: int, keys=frozenset()) -> dict[tuple[str, ...], object]:
    """Parameter path -> HF tensor(s) of MoE layer ``i``: per-expert tensors as the checkpoints store them
    (``mlp.experts.{e}.{gate,up,down}_proj.weight``; Mixtral ``block_sparse_moe.experts.{e}.w1/w3/w2``),
    or the fused ``mlp.experts.gate_up_proj [E, 2I, H]`` / ``mlp.experts.down_proj [E, H, I]`` of
    transformers 5's in-memory layout when ``keys`` (the checkpoint's tensor names) has them."""
    p = (f"layers_{i}", "mlp")
    hf = f"model.layers.{i}.mlp"  # Mixtral's checkpoints: block_sparse_moe (transformers 5 in memory: mlp)
    fused = f"{hf}.experts.gate_up_proj"
    if config.architecture == "mixtral" and fused not in keys:
        hf = f"model.layers.{i}.block_sparse_moe"
    src = {(*p, "gate", "kernel"): TensorSource(f"{hf}.gate.weight", transpose=True)}
    inter = config.moe_intermediate_size
    if fused in keys:
        src[(*p, "experts", "gate_proj")] = ExpertsSource(fused, (0, inter))
        src[(*p, "experts", "up_proj")] = ExpertsSource(fused, (inter, 2 * inter))
        src[(*p, "experts", "down_proj")] = ExpertsSource(f"{hf}.experts.down_proj")
    else:
        mixtral = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"} if "block_sparse_moe" in hf else {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            parts = tuple(TensorSource(f"{hf}.experts.{e}.{mixtral.get(proj, proj)}.weight", transpose=True)
                          for e in range(config.num_experts))
            src[(*p, "experts", proj)] = StackedSource(parts)
    if config.shared_expert_intermediate_size:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            src[(*p, "shared_expert", proj, "kernel")] = TensorSource(f"{hf}.shared_expert.{proj}.weight",
                                                                      transpose=True)
        src[(*p, "shared_expert_gate", "kernel")] = TensorSource(f"{hf}.shared_expert_gate.weight", transpose=True)
    return src


def gguf_moe_sources(config: ModelConfig, i: int) -> dict[tuple[str, ...], object]:
    """Parameter path -> GGUF tensor of MoE layer ``i``, as llama.cpp names them: router ``ffn_gate_inp``
    ``[E, H]``, stacked experts ``ffn_{gate,up}_exps`` ``[E, I, H]`` / ``ffn_down_exps`` ``[E, H, I]`` (numpy
    order), shared expert ``ffn_{gate,up,down}_shexp`` and its gate ``ffn_gate_inp_shexp`` (``H`` values)."""
    b, p = f"blk.{i}", (f"layers_{i}", "mlp")
    src = {(*p, "gate", "kernel"): TensorSource(f"{b}.ffn_gate_inp.weight", transpose=True)}
    for proj, g in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
        src[(*p, "experts", proj)] = ExpertsSource(f"{b}.ffn_{g}_exps.weight")
        if config.shared_expert_intermediate_size:
            src[(*p, "shared_expert", proj, "kernel")] = TensorSource(f"{b}.ffn_{g}_shexp.weight", transpose=True)
    if config.shared_expert_intermediate_size:
        src[(*p, "shared_expert_gate", "kernel")] = ColumnSource(f"{b}.ffn_gate_inp_shexp.weight")
    return src


def hf_sources(config: ModelConfig, keys=frozenset()) -> dict[tuple[str, ...], TensorSource]:
    """Parameter path -> HF safetensors tensor (``keys``: the checkpoint's tensor names, which pick between
    the per-expert and fused layouts of MoE experts)."""
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
        if config.is_moe_layer(i):
            src.update(hf_moe_sources(config, i, keys))
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            src[(p, "mlp", proj, "kernel")] = TensorSource(f"{hf}.mlp.{proj}.weight", transpose=True)
            if config.mlp_bias:
                src[(p, "mlp", proj, "bias")] = TensorSource(f"{hf}.mlp.{proj}.bias")
    return src


def gguf_sources(config: ModelConfig) -> dict[tuple[str, ...], TensorSource]:
    """Parameter path -> GGUF tensor (llama.cpp naming; q/k rows un-permuted for the llama architecture,
    which Mixtral's conversion uses, and stored as is for Qwen's)."""
    permuted = config.architecture in ("llama", "mistral", "mixtral")
    hq, hkv = (config.num_heads, config.num_kv_heads) if permuted else (0, 0)
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
        if config.attention_bias:
            for proj, g in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
                src[(p, "self_attn", proj, "bias")] = TensorSource(f"{b}.attn_{g}.bias")
        if config.qk_norm:
            src[(p, "self_attn", "q_norm", "scale")] = TensorSource(f"{b}.attn_q_norm.weight")
            src[(p, "self_attn", "k_norm", "scale")] = TensorSource(f"{b}.attn_k_norm.weight")
        if config.is_moe_layer(i):
            src.update(gguf_moe_sources(config, i))
            continue
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
                *, rules=LOGICAL_AXIS_RULES, desc: str = "Loading weights", log: bool = True):
    """Load every parameter of ``abstract_params`` (boxed, from ``CausalLM.abstract_params``).

    Args:
      checkpoint: object with ``keys()`` and ``get(name) -> np.ndarray``.
      sources: parameter path -> :class:`TensorSource`.
      abstract_params: boxed abstract parameter pytree (carries shapes, dtypes and logical axes).
      mesh: device mesh; each leaf gets the sharding its logical axes map to.
      rules: logical axis -> mesh axis table (a model's ``ShardingPlan.rules``).
      log: log the checkpoint bytes this process read (off when the caller loads more and logs the sum).
    Returns:
      The parameter pytree of ``jax.Array`` leaves.
    Raises:
      WeightLoadError: missing tensors or shape mismatches (all named).
    """
    shardings = flatten_dict(param_shardings(nn.get_partition_spec(abstract_params), mesh, rules))
    leaves = flatten_dict(nn.unbox(abstract_params))
    available = checkpoint.keys()
    missing = [n for p, s in sources.items() if p in leaves for n in _names(s) if n not in available]
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
    if log:
        log_bytes_read(getattr(checkpoint, "bytes_read", 0) - read_before,
                       sum(checkpoint.nbytes(n) for p in leaves for n in _names(sources[p])))
    return unflatten_dict(out)


def log_bytes_read(read: int, total: int) -> None:
    """Log (INFO, ``-v``) the ``read`` of ``total`` checkpoint bytes this process read, and the peak RSS."""
    logger.info("process %d of %d read %d of %d checkpoint bytes (the shards of its devices)",
                jax.process_index(), jax.process_count(), read, total)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    logger.info("peak host RSS %.0f MB after loading", peak_mb)


def _names(src) -> tuple[str, ...]:
    """The checkpoint tensors a source reads (several for per-expert tensors stacked)."""
    return src.names() if hasattr(src, "names") else (src.name,)


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
