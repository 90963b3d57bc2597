"""EAGLE draft head: one target-shaped decoder layer over ``[embed(token_{t+1}); h_t]``.

The head predicts the target's next hidden state from its current one. ``h_t`` is the target's last
decoder-layer output before the final norm at position ``t``; the head's feature at position ``t + 1`` is

    f_{t+1} = layer(fc([embed(x_{t+1}); h_t]))        (RoPE position t + 1)

and its draft logits are ``lm_head(norm(f_{t+1}))`` over a draft vocabulary of ``Vd`` ids (``d2t[i]`` is
the target token id of draft id ``i``; ``Vd = V`` with ``d2t = arange(V)`` is the full vocabulary). The
embedding is the target's own, frozen and not stored. Drafting is autoregressive: step ``j + 1`` feeds
``(d_j, f)`` with the head's own feature in place of the target's ``h``.

Parameters (a plain dict pytree)::

    {"fc": {"kernel": [2D, D], "bias": [D]},
     "layer": <one target decoder layer's params, as jaxinfer.models.llama.DecoderLayer builds them>,
     "norm": {"scale": [D]}, "lm_head": {"kernel": [D, Vd]}, "d2t": i32[Vd]}

File format: one safetensors file with tensors ``fc.kernel``, ``fc.bias``, ``norm.scale``,
``lm_head.kernel``, ``d2t`` and ``layer.<path>`` ('.'-joined param path), and header metadata
``eagle_config`` (JSON of :class:`EagleHeadConfig`) and ``training`` (JSON training record). Loading needs
numpy and safetensors only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from jaxinfer.model_config import ModelConfig, RopeScaling

FORMAT = "jaxinfer-eagle-1"
HEADS_DIR = Path(__file__).parent / "heads"
# Registered target model name -> shipped head file under HEADS_DIR.
SHIPPED_HEADS = {"smollm2-135m-instruct": "smollm2-135m-instruct-eagle.safetensors"}


# The target's ModelConfig fields the head keeps (its decoder layer, fc and norms are built on them); the
# file's ``eagle_config`` metadata holds these, ``draft_vocab_size`` and ``target_model``.
LAYER_FIELDS = ("architecture", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_freq_factors",
                "max_position_embeddings", "attention_bias", "mlp_bias", "qk_norm", "sliding_window")
_DENSE_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3"}
_MOE_TO_DENSE = {"qwen3_moe": "qwen3", "mixtral": "mistral", "qwen2_moe": "qwen2"}


@dataclass(frozen=True)
class EagleHeadConfig:
    """The head's decoder layer (derived from the target's config), its draft vocabulary and its target.

    Attributes:
      layer: a one-layer dense :class:`~jaxinfer.model_config.ModelConfig` with the target's
        :data:`LAYER_FIELDS` (a mixture-of-experts target's dense family, ``intermediate_size`` wide);
        ``layer.vocab_size`` is the target's ``V``. Build ``DecoderLayer(cfg.layer, ...)`` with it; RoPE
        frequencies and ``sm_scale`` come from it too.
      draft_vocab_size: the head's ``Vd`` (``1 <= Vd <= V``).
      target_model: the target (registered name, path or hub id) the head was trained on.
    """

    layer: ModelConfig
    draft_vocab_size: int
    target_model: str = ""

    def __post_init__(self):
        lc = self.layer
        if lc.architecture not in _DENSE_ARCHITECTURES or lc.num_layers != 1 or lc.num_experts:
            raise ValueError(f"an EAGLE head's layer is one dense decoder layer of {sorted(_DENSE_ARCHITECTURES)}, "
                             f"got {lc.num_layers} layer(s) of {lc.architecture!r}")
        if not 1 <= self.draft_vocab_size <= lc.vocab_size:
            raise ValueError(f"draft_vocab_size must be in [1, {lc.vocab_size}], got {self.draft_vocab_size}")

    @classmethod
    def from_target(cls, config: ModelConfig, draft_vocab_size: int | None = None,
                    target_model: str = "") -> EagleHeadConfig:
        """From the target's config (``draft_vocab_size=None``: the full vocabulary).

        Raises:
          ValueError: a target family without an EAGLE head, or a draft vocabulary out of range.
        """
        arch = _MOE_TO_DENSE.get(config.architecture, config.architecture)
        if arch not in _DENSE_ARCHITECTURES:
            raise ValueError(f"no EAGLE head for architecture {config.architecture!r} "
                             f"(supported: {', '.join(sorted(_DENSE_ARCHITECTURES))})")
        fields = {f: getattr(config, f) for f in LAYER_FIELDS}
        layer = ModelConfig(**dict(fields, architecture=arch), num_layers=1)
        return cls(layer, config.vocab_size if draft_vocab_size is None else int(draft_vocab_size), target_model)

    def to_dict(self) -> dict:
        """The ``eagle_config`` metadata (JSON-serialisable)."""
        d = {f: getattr(self.layer, f) for f in LAYER_FIELDS}
        return dict(d, rope_scaling=asdict(self.layer.rope_scaling), draft_vocab_size=self.draft_vocab_size,
                    target_model=self.target_model)

    @classmethod
    def from_dict(cls, d: dict) -> EagleHeadConfig:
        """Inverse of :meth:`to_dict` (fields left out take ``ModelConfig``'s defaults).

        Raises:
          ValueError: unknown or missing keys, or values the config refuses.
        """
        d = dict(d)
        unknown = set(d) - set(LAYER_FIELDS) - {"draft_vocab_size", "target_model"}
        if unknown or "draft_vocab_size" not in d:
            raise ValueError(f"EAGLE head config: unknown keys {sorted(unknown)} or no draft_vocab_size")
        draft, target = d.pop("draft_vocab_size"), d.pop("target_model", "")
        d["rope_scaling"] = RopeScaling(**(d.get("rope_scaling") or {}))
        if d.get("rope_freq_factors") is not None:
            d["rope_freq_factors"] = tuple(d["rope_freq_factors"])
        try:
            layer = ModelConfig(**d, num_layers=1)
        except TypeError as e:
            raise ValueError(f"EAGLE head config: {e}") from None
        return cls(layer, int(draft), str(target))


# ---- initialisation (jax) ------------------------------------------------------------------------
def init_layer_params(key, cfg: EagleHeadConfig, dtype=None) -> dict:
    """Random parameters of one decoder layer, exactly as ``DecoderLayer`` builds them (unboxed)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from jaxinfer.attention import AttentionMetadata, init_dense_cache
    from jaxinfer.models.causal_lm import ATTENTION_CLASSES
    from jaxinfer.models.layers import Rotary
    from jaxinfer.models.llama import DecoderLayer

    lc = cfg.layer
    dtype = jnp.float32 if dtype is None else dtype
    layer = DecoderLayer(lc, ATTENTION_CLASSES[lc.architecture], dtype)
    cache = init_dense_cache(1, 1, 1, lc.num_kv_heads, lc.head_dim, dtype)[0]
    one = jnp.ones((1,), jnp.int32)
    md = AttentionMetadata(cu_q_lens=jnp.array([0, 1], jnp.int32), kv_lens=one, num_seqs=one, slot_mapping=one - 1)
    x = jnp.zeros((1, lc.hidden_size), dtype)
    params = layer.init(key, x, Rotary.at(one, lc.inv_freq()), cache, md)["params"]
    return nn.unbox(params)


def init_eagle_head(key, target_config, draft_vocab=None, *, target_params=None, target_model: str = "",
                    dtype=None) -> tuple[EagleHeadConfig, dict]:
    """A fresh head for a target.

    Args:
      key: PRNG key.
      target_config: the target's ``ModelConfig``.
      draft_vocab: ``None`` (the full vocabulary) or the target token ids of the draft vocabulary
        (``int[Vd]``, distinct, in draft-id order; becomes ``d2t``).
      target_params: the target's parameters (optional warm start): ``lm_head`` from the target's LM head
        columns of ``draft_vocab``, ``norm`` from the target's final norm, ``layer`` a copy of the target's
        last decoder layer (dense targets), ``fc`` passing ``h_t`` through (identity on the ``h`` half,
        small random on the embedding half). Without it every part is random (``norm`` ones, ``fc`` and
        ``lm_head`` LeCun-normal).
      target_model: recorded in the config.
      dtype: parameter dtype (default float32).
    Returns:
      ``(EagleHeadConfig, params)``.
    """
    import jax
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    v = target_config.vocab_size
    d2t = np.arange(v, dtype=np.int32) if draft_vocab is None else np.asarray(draft_vocab, dtype=np.int32)
    if d2t.ndim != 1 or len(np.unique(d2t)) != len(d2t) or d2t.min() < 0 or d2t.max() >= v:
        raise ValueError(f"draft_vocab must be distinct target token ids in [0, {v}), got shape {d2t.shape}")
    cfg = EagleHeadConfig.from_target(target_config, len(d2t), target_model)
    d = cfg.layer.hidden_size
    k_fc, k_layer, k_lm = jax.random.split(key, 3)
    lecun = jax.nn.initializers.lecun_normal()
    params = {
        "fc": {"kernel": lecun(k_fc, (2 * d, d), dtype), "bias": jnp.zeros((d,), dtype)},
        "layer": init_layer_params(k_layer, cfg, dtype),
        "norm": {"scale": jnp.ones((d,), dtype)},
        "lm_head": {"kernel": lecun(k_lm, (d, len(d2t)), dtype)},
        "d2t": jnp.asarray(d2t),
    }
    if target_params is not None:
        params = _warm_start(params, cfg, target_config, target_params, dtype)
    return cfg, params


def _warm_start(params, cfg, target_config, tp, dtype):
    import jax
    import jax.numpy as jnp

    from jaxinfer.models.qembedding import QEmbedding

    d2t = np.asarray(params["d2t"])
    if target_config.tie_word_embeddings:
        table = tp["embed_tokens"]
        rows = table.lookup(jnp.asarray(d2t), jnp.float32) if isinstance(table, QEmbedding) else \
            jnp.take(jnp.asarray(table, jnp.float32), jnp.asarray(d2t), axis=0)
        head = rows.T
    else:
        head = _dense(tp["lm_head"]["kernel"])[:, d2t]
    out = dict(params)
    out["lm_head"] = {"kernel": jnp.asarray(head, dtype)}
    out["norm"] = {"scale": jnp.asarray(tp["norm"]["scale"], dtype)}
    last = tp.get(f"layers_{target_config.num_layers - 1}")
    if last is not None and not target_config.is_moe_layer(target_config.num_layers - 1):
        copied = jax.tree.map(lambda a: jnp.asarray(_dense(a), dtype), last,
                              is_leaf=lambda a: not isinstance(a, dict))
        if jax.tree.structure(copied) == jax.tree.structure(params["layer"]):
            out["layer"] = copied
    d = cfg.layer.hidden_size
    fc = np.asarray(params["fc"]["kernel"], np.float32) * 0.1
    fc[d:] = np.eye(d, dtype=np.float32)
    out["fc"] = {"kernel": jnp.asarray(fc, dtype), "bias": params["fc"]["bias"]}
    return out


def _dense(w):
    """A float array from a plain or quantized (``QArray``) weight."""
    from pallas_kernels.quantized_matmul.qarray import QArray

    if isinstance(w, QArray):
        return np.asarray(w.dequantize(), np.float32)
    return np.asarray(w, np.float32)


# ---- file format (numpy + safetensors only) ------------------------------------------------------
def _flatten(tree, prefix: str) -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}.{k}" if prefix else k
        out.update(_flatten(v, name) if isinstance(v, dict) else {name: v})
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for name, v in flat.items():
        node = out
        *path, leaf = name.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def save_eagle_head(path, cfg: EagleHeadConfig, params, meta: dict | None = None, dtype="float16") -> None:
    """Write the head as one safetensors file.

    Args:
      path: output file.
      cfg, params: the head.
      meta: the training record (JSON-serialisable; stored under the ``training`` metadata key).
      dtype: storage dtype of the float tensors: "float16", "bfloat16" or "float32" (``d2t`` stays int32).
    """
    import ml_dtypes
    from safetensors.numpy import save_file

    np_dtype = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}")
    _check_params(cfg, params)
    tensors = {}
    for name, v in _flatten(params, "").items():
        a = np.asarray(v)
        tensors[name] = np.ascontiguousarray(a.astype(np.int32) if name == "d2t" else a.astype(np_dtype))
    metadata = {"format": FORMAT, "eagle_config": json.dumps(cfg.to_dict()), "training": json.dumps(meta or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def read_eagle_metadata(path) -> tuple[EagleHeadConfig, dict]:
    """``(config, training record)`` from a head file's header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        md = f.metadata() or {}
    if md.get("format") != FORMAT:
        raise ValueError(f"{path} is not an EAGLE head file (metadata format {md.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return EagleHeadConfig.from_dict(json.loads(md["eagle_config"])), json.loads(md.get("training", "{}"))


def load_eagle_head(path) -> tuple[EagleHeadConfig, dict]:
    """Read a head file: ``(config, params)`` with numpy leaves in the stored dtype (``d2t`` int32).

    Raises:
      FileNotFoundError: no such file. ValueError: not a head file, or tensors that do not match the config.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no EAGLE head file at {path}")
    cfg, _ = read_eagle_metadata(path)
    params = _unflatten(load_file(str(path)))
    _check_params(cfg, params)
    return cfg, params


def _check_params(cfg: EagleHeadConfig, params) -> None:
    d, vd = cfg.layer.hidden_size, cfg.draft_vocab_size
    want = {"fc.kernel": (2 * d, d), "fc.bias": (d,), "norm.scale": (d,), "lm_head.kernel": (d, vd), "d2t": (vd,)}
    flat = _flatten(params, "")
    for name, shape in want.items():
        got = tuple(np.shape(flat[name])) if name in flat else None
        if got != shape:
            raise ValueError(f"EAGLE head tensor {name}: shape {got}, expected {shape}")
    d2t = np.asarray(flat["d2t"])
    if d2t.min() < 0 or d2t.max() >= cfg.layer.vocab_size:
        raise ValueError(f"EAGLE head d2t has ids outside the target vocabulary [0, {cfg.layer.vocab_size})")
    want_layer = {f"layer.{k}": v for k, v in expected_layer_shapes(cfg).items()}
    got_layer = {k: tuple(np.shape(v)) for k, v in flat.items() if k.startswith("layer.")}
    if got_layer != want_layer:
        diff = sorted(set(got_layer.items()) ^ set(want_layer.items()))
        raise ValueError(f"EAGLE head layer tensors do not match the config (differences: {diff[:6]})")


def expected_layer_shapes(cfg: EagleHeadConfig) -> dict[str, tuple[int, ...]]:
    """``'.'``-joined path -> shape of every parameter of the head's decoder layer (no jax needed)."""
    lc = cfg.layer
    d, q, kv, m = lc.hidden_size, lc.q_size, lc.kv_size, lc.intermediate_size
    out = {"input_layernorm.scale": (d,), "post_attention_layernorm.scale": (d,),
           "self_attn.q_proj.kernel": (d, q), "self_attn.k_proj.kernel": (d, kv), "self_attn.v_proj.kernel": (d, kv),
           "self_attn.o_proj.kernel": (q, d), "mlp.gate_proj.kernel": (d, m), "mlp.up_proj.kernel": (d, m),
           "mlp.down_proj.kernel": (m, d)}
    if lc.attention_bias:
        out.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if lc.mlp_bias:
        out.update({"mlp.gate_proj.bias": (m,), "mlp.up_proj.bias": (m,), "mlp.down_proj.bias": (d,)})
    if lc.qk_norm:
        out.update({"self_attn.q_norm.scale": (lc.head_dim,), "self_attn.k_norm.scale": (lc.head_dim,)})
    return out


def shipped_head_path(model_name: str | None) -> Path | None:
    """The head file shipped for a registered target model name (``None``: the default model), or ``None``."""
    from jaxinfer.model_registry import DEFAULT_MODEL

    name = SHIPPED_HEADS.get(DEFAULT_MODEL if model_name is None else str(model_name))
    return None if name is None else HEADS_DIR / name
