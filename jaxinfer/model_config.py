"""``ModelConfig``: a model's frozen, typed definition, built once from an HF config or GGUF metadata.

Every architecture difference the model code needs is a field here; nothing downstream guesses from
file names. ``ModelConfig.from_hf`` accepts a ``transformers`` config object or a plain ``config.json``
dict (both the 4.x ``rope_theta``/``rope_scaling`` and the 5.x ``rope_parameters`` spellings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxinfer.errors import UnsupportedModelError

if TYPE_CHECKING:
    pass

# HF architecture class name -> jaxinfer architecture family.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe",
               "mixtral": "mixtral", "qwen2_moe": "qwen2_moe"}
MOE_ARCHITECTURES = ("qwen3_moe", "mixtral", "qwen2_moe")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``rope_type`` is one of ``SUPPORTED_ROPE_TYPES``."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder.

    Attributes:
      architecture: "llama" | "mistral" | "qwen2" | "qwen3" | "qwen3_moe" | "mixtral" | "qwen2_moe".
      attention_bias: q/k/v projections carry a bias (Qwen2).
      qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3).
      sliding_window: each token attends to the ``sliding_window`` most recent positions (itself
        included); ``None`` for full attention.
      rope_freq_factors: per-frequency divisors from a GGUF ``rope_freqs`` tensor (llama3 scaling
        precomputed by the converter), ``None`` otherwise.
      num_experts: routed experts per mixture-of-experts layer (0: a dense model).
      num_experts_per_tok: experts each token is routed to (top-k).
      moe_intermediate_size: each routed expert's SwiGLU width (``intermediate_size`` is the dense MLP's).
      norm_topk_prob: renormalise the top-k routing probabilities to sum to 1 (Mixtral always does).
      shared_expert_intermediate_size: width of the always-on shared expert with its sigmoid gate
        (Qwen2-MoE); 0 for none.
      decoder_sparse_step, mlp_only_layers: layer ``i`` is a MoE layer when ``(i + 1) % decoder_sparse_step
        == 0`` and ``i not in mlp_only_layers``; the others use the dense MLP.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rope_freq_factors: tuple[float, ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope scaling type {self.rope_scaling.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise UnsupportedModelError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts={self.num_experts}]")
        if self.num_experts and (self.moe_intermediate_size <= 0 or self.decoder_sparse_step <= 0):
            raise UnsupportedModelError("a mixture-of-experts model needs moe_intermediate_size > 0 and "
                                        "decoder_sparse_step > 0")

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer ``i`` runs the sparse MoE block (else the dense MLP)."""
        return (self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0
                and i not in self.mlp_only_layers)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def sm_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def num_params(self, *, active: bool = False) -> int:
        """Parameter count (tied embeddings counted once). ``active=True``: only the parameters one token
        reads, i.e. ``num_experts_per_tok`` of each MoE layer's routed experts (and the router, shared
        expert); equal to the total for a dense model."""
        e, f = self.hidden_size, self.intermediate_size
        per_layer = e * (self.q_size + 2 * self.kv_size) + self.q_size * e + 2 * e
        if self.attention_bias:
            per_layer += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        total = self.num_layers * per_layer
        for i in range(self.num_layers):
            total += self.moe_layer_params(active=active) if self.is_moe_layer(i) else 3 * e * f
        embed = self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
        return total + embed + e

    def moe_layer_params(self, *, active: bool = False) -> int:
        """Parameters of one MoE block: router, routed experts (all, or the top-k with ``active``), shared
        expert and its gate."""
        e = self.hidden_size
        experts = self.num_experts_per_tok if active else self.num_experts
        n = e * self.num_experts + experts * 3 * e * self.moe_intermediate_size
        if self.shared_expert_intermediate_size:
            n += 3 * e * self.shared_expert_intermediate_size + e
        return n

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies, float32 ``[head_dim // 2]`` (computed in float64 on the host)."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        rs = self.rope_scaling
        if rs.rope_type == "linear":
            inv = inv / rs.factor
        elif rs.rope_type == "llama3":
            low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
            high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
            smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = np.where(medium, smoothed, scaled)
        if self.rope_freq_factors is not None:
            inv = inv / np.asarray(self.rope_freq_factors, dtype=np.float64)
        return inv.astype(np.float32)

    def with_overrides(self, **kwargs) -> ModelConfig:
        return replace(self, **kwargs)

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Build from a ``transformers`` ``PretrainedConfig`` or a ``config.json`` dict."""
        c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        arch = _hf_architecture(c)
        get = c.get
        num_heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        head_dim = get("head_dim") or hidden // num_heads
        theta, scaling = _hf_rope(c)
        sliding = _hf_sliding_window(c, arch)
        act = get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only silu)")
        eos = get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        bias_key = "qkv_bias" if arch == "qwen2_moe" else "attention_bias"
        return cls(
            architecture=arch,
            vocab_size=int(get("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_layers=int(get("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=bool(get(bias_key, arch in ("qwen2", "qwen2_moe"))),
            mlp_bias=bool(get("mlp_bias", False)),
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=get("bos_token_id"),
            eos_token_ids=eos_ids,
            **_hf_moe(c, arch),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
        """Build from GGUF key/value metadata (already decoded to Python values).

        GGUF architectures: ``llama`` (Llama 2/3, SmolLM2 and Mistral conversions; with
        ``llama.expert_count`` a Mixtral), ``qwen3moe`` and ``qwen2moe``.
        """
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHITECTURES)})"
            )

        def key(name, default=None):
            return meta.get(f"{arch}.{name}", default)

        num_heads = int(key("attention.head_count"))
        hidden = int(key("embedding_length"))
        head_dim = int(key("attention.key_length") or key("rope.dimension_count") or hidden // num_heads)
        vocab = key("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        scaling = RopeScaling()
        scaling_type = key("rope.scaling.type")
        if scaling_type in ("linear",):
            scaling = RopeScaling(rope_type="linear", factor=float(key("rope.scaling.factor", 1.0)))
        elif scaling_type not in (None, "none"):
            raise UnsupportedModelError(f"GGUF rope scaling type {scaling_type!r} is not supported")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        kv_heads = key("attention.head_count_kv") or num_heads
        if isinstance(kv_heads, (list, tuple)):
            raise UnsupportedModelError("per-layer kv head counts are not supported")
        moe = _gguf_moe(arch, key)
        family = moe.pop("architecture", "llama")
        return cls(
            architecture=family,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length") or moe.get("moe_intermediate_size", 0)),
            num_layers=int(key("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(kv_heads),
            head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(key("context_length", 4096)),
            tie_word_embeddings="output.weight" not in tensor_names,
            sliding_window=None,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            attention_bias=family == "qwen2_moe",
            qk_norm=family == "qwen3_moe",
            **moe,
        )


GGUF_ARCHITECTURES = ("llama", "qwen3moe", "qwen2moe")


def _gguf_moe(arch: str, key) -> dict:
    """MoE fields from GGUF metadata (``key(name)`` reads ``{arch}.{name}``), as llama.cpp reads them: top-k
    weights renormalised for Mixtral and Qwen3-MoE, not for Qwen2-MoE, unless ``expert_weights_norm`` says."""
    experts = int(key("expert_count") or 0)
    if not experts:
        if arch != "llama":
            raise UnsupportedModelError(f"GGUF {arch} model without {arch}.expert_count")
        return {}
    family = {"llama": "mixtral", "qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe"}[arch]
    ffn = key("feed_forward_length") if arch == "llama" else key("expert_feed_forward_length")
    norm = key("expert_weights_norm")
    return dict(
        architecture=family,
        num_experts=experts,
        num_experts_per_tok=int(key("expert_used_count")),
        moe_intermediate_size=int(ffn),
        norm_topk_prob=bool(family != "qwen2_moe" if norm is None else norm),
        shared_expert_intermediate_size=int(key("expert_shared_feed_forward_length") or 0),
    )


def _hf_architecture(c: dict) -> str:
    for name in c.get("architectures") or []:
        if name in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[name]
    model_type = c.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    known = ", ".join(sorted(HF_ARCHITECTURES))
    raise UnsupportedModelError(
        f"unsupported architecture {c.get('architectures') or model_type!r}; supported: {known}"
    )


def _hf_moe(c: dict, arch: str) -> dict:
    """The mixture-of-experts fields of an HF config (empty for a dense architecture)."""
    if arch not in MOE_ARCHITECTURES:
        return {}
    get = c.get
    experts = get("num_experts") or get("num_local_experts")  # 5.x writes Qwen3-MoE's as num_local_experts
    if not experts:
        raise UnsupportedModelError(f"{arch} config has no num_experts / num_local_experts")
    mixtral = arch == "mixtral"
    return dict(
        num_experts=int(experts),
        num_experts_per_tok=int(get("num_experts_per_tok")),
        moe_intermediate_size=int(get("intermediate_size") if mixtral else get("moe_intermediate_size")),
        norm_topk_prob=True if mixtral else bool(get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(get("shared_expert_intermediate_size") or 0) if arch == "qwen2_moe" else 0,
        decoder_sparse_step=1 if mixtral else int(get("decoder_sparse_step") or 1),
        mlp_only_layers=() if mixtral else tuple(int(i) for i in get("mlp_only_layers") or ()),
    )


def _hf_sliding_window(c: dict, arch: str) -> int | None:
    """The sliding window if every layer uses it, ``None`` if none does; mixed layers are unsupported."""
    window = c.get("sliding_window")
    n = c.get("num_hidden_layers")
    kinds = set(c.get("layer_types") or [])
    if not kinds and arch == "qwen3_moe":  # one window for every layer when use_sliding_window
        return int(window) if c.get("use_sliding_window", False) and window else None
    if not kinds and arch in ("qwen2", "qwen3", "qwen2_moe"):
        if not c.get("use_sliding_window", False):
            return None
        first_sliding = c.get("max_window_layers", n)
        kinds = {"full_attention"} if first_sliding >= n else (
            {"sliding_attention"} if first_sliding == 0 else {"full_attention", "sliding_attention"})
    if kinds == {"full_attention"} or window is None:
        return None
    if kinds - {"sliding_attention"}:
        raise UnsupportedModelError(f"mixed per-layer attention types {sorted(kinds)} are not supported")
    return int(window)


def _hf_rope(c: dict) -> tuple[float, RopeScaling]:
    params = c.get("rope_parameters") or {}
    legacy = c.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    spec = {**legacy, **params}
    rope_type = spec.get("rope_type", spec.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, RopeScaling()
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(spec.get("factor", 1.0)),
        low_freq_factor=float(spec.get("low_freq_factor", 1.0)),
        high_freq_factor=float(spec.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            spec.get("original_max_position_embeddings", c.get("max_position_embeddings", 8192))
        ),
    )
