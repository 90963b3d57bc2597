"""Resolve a model argument and load config, parameters and tokenizer."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxinfer.config import QUANTIZATION_OPTIONS
from jaxinfer.errors import QuantizationError, WeightLoadError
from jaxinfer.model_config import ModelConfig
from jaxinfer.model_registry import ModelSource, resolve_model
from jaxinfer.models.causal_lm import CausalLM
from jaxinfer.sharding import ShardingPlan, make_mesh, plan_sharding
from jaxinfer.tokenizer import load_tokenizer
from jaxinfer.weight_sources import GGUFCheckpoint, SafetensorsCheckpoint
from jaxinfer.weights import expand_kv_heads, gguf_sources, hf_sources, load_params

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """Everything needed to run a model: its source, definition, parameters and tokenizer."""

    source: ModelSource
    model: CausalLM
    params: dict
    tokenizer: object
    mesh: Mesh
    plan: ShardingPlan | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def load_config(source: ModelSource) -> tuple[ModelConfig, object]:
    """``(ModelConfig, opened checkpoint)`` for a resolved source."""
    if source.kind == "gguf":
        ckpt = GGUFCheckpoint(source.path)
        config = ModelConfig.from_gguf_metadata(ckpt.metadata(), ckpt.keys())
        if "rope_freqs.weight" in ckpt.keys():  # llama3 RoPE scaling, precomputed by the converter
            factors = tuple(float(f) for f in np.asarray(ckpt.get("rope_freqs.weight")).reshape(-1))
            config = config.with_overrides(rope_freq_factors=factors)
        return config, ckpt
    try:
        raw = json.loads((source.path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightLoadError(f"{source.path}/config.json: cannot read ({e})") from e
    return ModelConfig.from_hf(raw), SafetensorsCheckpoint(source.path)


def _plan_without_kv_expansion(config: ModelConfig, mesh: Mesh, what: str) -> ShardingPlan:
    """The sharding plan for weights that cannot be rewritten at load (quantized storage)."""
    plan = plan_sharding(config, mesh)
    if plan.kv_head_replicas > 1:
        raise QuantizationError(
            f"tensor_parallel_size {plan.tp} exceeds the model's {config.num_kv_heads} KV heads: repeating KV "
            f"heads is not supported for {what}; use tensor_parallel_size <= {config.num_kv_heads}")
    return plan


def load_model(model: str | None = None, *, dtype=jnp.float32, mesh: Mesh | None = None,
               load_tokenizer_too: bool = True, quantization: str | None = None) -> LoadedModel:
    """Load a model by name / path / hub id (``None``: the default model) into ``mesh``.

    Args:
      model: registered name, HF directory, GGUF file, hub id, or a quantized-checkpoint directory
        (written by ``jaxinfer quantize``; loaded with its quantized weights).
      dtype: float dtype of unquantized parameters and of computation.
      mesh: device mesh (default: one device).
      quantization: ``None`` loads GGUF files dequantized to float (the fastest path on the CPU);
        ``"gguf"`` keeps a GGUF file's Q8_0 / Q4_0 / Q4_1 tensors quantized (lossless, see
        ``jaxinfer.gguf_native``).

    Raises:
      QuantizationError: an unknown ``quantization``, or ``"gguf"`` for a non-GGUF model.
    """
    if quantization not in QUANTIZATION_OPTIONS:
        raise QuantizationError(f"unknown quantization {quantization!r}; expected None or 'gguf'")
    source = resolve_model(model)
    if quantization == "gguf" and source.kind != "gguf":
        raise QuantizationError(f"quantization='gguf' needs a GGUF model; {source.name} is {source.kind!r}")
    mesh = mesh or make_mesh()
    if source.kind == "quantized":
        from jaxinfer.quantized_checkpoint import config_from_dict, load_quantized, read_manifest

        config = config_from_dict(read_manifest(source.path)["model_config"])
        plan = _plan_without_kv_expansion(config, mesh, "a quantized checkpoint")
        lm, params, _ = load_quantized(source.path, dtype=dtype, plan=plan)
    else:
        config, ckpt = load_config(source)
        if quantization == "gguf":
            from jaxinfer.gguf_native import load_gguf_native

            plan = _plan_without_kv_expansion(config, mesh, "native GGUF weights")
            lm = CausalLM(config, dtype, plan)
            params = load_gguf_native(ckpt, lm, desc=f"Loading {source.name} (native GGUF)")
        else:
            plan = plan_sharding(config, mesh)
            sources = gguf_sources(config) if source.kind == "gguf" else hf_sources(config, ckpt.keys())
            if plan.kv_head_replicas > 1:
                sources = expand_kv_heads(sources, config.head_dim, plan.kv_head_replicas)
                config = config.with_overrides(num_kv_heads=config.num_kv_heads * plan.kv_head_replicas)
            lm = CausalLM(config, dtype, plan)
            params = load_params(ckpt, sources, lm.abstract_params(), mesh, rules=plan.rules,
                                 desc=f"Loading {source.name}")
    fields = ckpt.reader.fields if source.kind == "gguf" else None  # parsed once, for weights and tokenizer
    tok = load_tokenizer(source, fields) if load_tokenizer_too else None
    return LoadedModel(source, lm, params, tok, mesh, plan)
