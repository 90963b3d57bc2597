"""EAGLE head: dense forward vs a float64 numpy re-implementation, the layer vs the target's own decoder layer,
file round trip and its checks."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.attention import AttentionMetadata, init_dense_cache
from jaxinfer.model_config import ModelConfig, RopeScaling
from jaxinfer.models.causal_lm import ATTENTION_CLASSES, CausalLM
from jaxinfer.models.layers import Rotary
from jaxinfer.models.llama import DecoderLayer
from jaxinfer.speculative.eagle_dense import eagle_forward_dense
from jaxinfer.speculative.eagle_head import (
    EagleHeadConfig,
    expected_layer_shapes,
    init_eagle_head,
    load_eagle_head,
    read_eagle_metadata,
    save_eagle_head,
    shipped_head_path,
)

V, D = 97, 32
CONFIGS = {
    "llama": ModelConfig("llama", V, D, 48, 2, 4, 2, 8, rope_theta=10000.0, tie_word_embeddings=True),
    "qwen2_bias": ModelConfig("qwen2", V, D, 48, 2, 4, 1, 8, attention_bias=True, rope_theta=1e6),
    "qwen3_qknorm": ModelConfig("qwen3", V, D, 48, 2, 2, 2, 16, qk_norm=True),
    "mistral_window": ModelConfig("mistral", V, D, 48, 2, 4, 2, 8, sliding_window=4),
    "llama3_rope": ModelConfig("llama", V, D, 48, 2, 4, 4, 8, rope_theta=5e5,
                               rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 16)),
}


def _perturb(params, key, scale=0.3):
    """Random values everywhere (norm scales and biases are ones / zeros at init)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = [a if a.dtype == jnp.int32 else a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, out)


# ---- float64 numpy reference ---------------------------------------------------------------------
def _np_rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _np_rope(x, pos, inv):  # x [T, H, Dh]
    ang = pos[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = np.split(x, 2, -1)
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _np_head(p, cfg: EagleHeadConfig, table, tokens, hidden, positions):
    """One sequence: ``tokens[T]``, ``hidden[T, D]``, ``positions[T]`` -> (features, logits), float64."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    lp = jax.tree.map(f64, p["layer"])
    a = lp["self_attn"]
    lc = cfg.layer
    eps = lc.rms_norm_eps
    x = np.concatenate([f64(table)[tokens], f64(hidden)], -1) @ f64(p["fc"]["kernel"]) + f64(p["fc"]["bias"])
    h = _np_rms(x, lp["input_layernorm"]["scale"], eps)
    t = len(tokens)

    def proj(name, heads):
        y = h @ a[name]["kernel"] + (a[name]["bias"] if "bias" in a[name] else 0.0)
        return y.reshape(t, heads, lc.head_dim)

    q, k, v = proj("q_proj", lc.num_heads), proj("k_proj", lc.num_kv_heads), proj("v_proj", lc.num_kv_heads)
    if lc.qk_norm:
        q, k = _np_rms(q, a["q_norm"]["scale"], eps), _np_rms(k, a["k_norm"]["scale"], eps)
    inv = np.asarray(lc.inv_freq(), np.float64)
    pos = np.asarray(positions, np.float64)
    q, k = _np_rope(q, pos, inv), _np_rope(k, pos, inv)
    g = lc.num_heads // lc.num_kv_heads
    out = np.zeros((t, lc.num_heads, lc.head_dim))
    for i in range(t):
        for hh in range(lc.num_heads):
            kv = hh // g
            js = [j for j in range(i + 1) if lc.sliding_window is None or positions[i] - positions[j]
                  < lc.sliding_window]
            s = np.array([q[i, hh] @ k[j, kv] for j in js]) / math.sqrt(lc.head_dim)
            w = np.exp(s - s.max())
            w /= w.sum()
            out[i, hh] = sum(wj * v[j, kv] for wj, j in zip(w, js))
    x = x + out.reshape(t, -1) @ a["o_proj"]["kernel"]
    m = lp["mlp"]
    h = _np_rms(x, lp["post_attention_layernorm"]["scale"], eps)
    gate, up = h @ m["gate_proj"]["kernel"], h @ m["up_proj"]["kernel"]
    f = x + (gate / (1 + np.exp(-gate)) * up) @ m["down_proj"]["kernel"]
    logits = _np_rms(f, f64(p["norm"]["scale"]), eps) @ f64(p["lm_head"]["kernel"])
    return f, logits


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dense_forward_matches_float64_numpy(name):
    tc = CONFIGS[name]
    cfg, params = init_eagle_head(jax.random.PRNGKey(0), tc, draft_vocab=np.array([5, 3, 90, 17, 0, 42, 64]))
    params = _perturb(params, jax.random.PRNGKey(1))
    b, t = 2, 9
    table = jax.random.normal(jax.random.PRNGKey(2), (V, D))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (b, t), 0, V)
    hidden = 3.0 * jax.random.normal(jax.random.PRNGKey(4), (b, t, D))
    positions = jnp.stack([jnp.arange(t) + 1, jnp.arange(t) + 5]).astype(jnp.int32)
    f, logits, _ = jax.jit(eagle_forward_dense, static_argnums=1)(params, cfg, table, tokens, hidden, positions)
    assert f.shape == (b, t, D) and logits.shape == (b, t, 7) and logits.dtype == jnp.float32
    for i in range(b):
        rf, rl = _np_head(params, cfg, np.asarray(table), np.asarray(tokens[i]), np.asarray(hidden[i]),
                          np.asarray(positions[i]))
        np.testing.assert_allclose(np.asarray(f[i]), rf, rtol=2e-5, atol=2e-5 * np.abs(rf).max())
        np.testing.assert_allclose(np.asarray(logits[i]), rl, rtol=2e-5, atol=2e-5 * np.abs(rl).max())


@pytest.mark.parametrize("name", ["llama", "qwen3_qknorm", "mistral_window"])
def test_layer_params_are_the_target_decoder_layer(name):
    """The head's layer tree is DecoderLayer's, and the head's layer math equals DecoderLayer.apply (the
    target's own code path, dense cache) on one sequence starting at position 0."""
    tc = CONFIGS[name]
    cfg, params = init_eagle_head(jax.random.PRNGKey(0), tc)
    params = _perturb(params, jax.random.PRNGKey(5))
    flat = {".".join(str(k.key) for k in path): a.shape for path, a in jax.tree_util.tree_leaves_with_path(
        params["layer"])}
    assert flat == expected_layer_shapes(cfg)
    target_layer = CausalLM(tc).abstract_params()["layers_0"]
    assert jax.tree.structure(jax.tree.map(lambda a: 0, params["layer"])) == jax.tree.structure(
        jax.tree.map(lambda a: 0, target_layer, is_leaf=lambda a: hasattr(a, "unbox")))

    t = 7
    table = jax.random.normal(jax.random.PRNGKey(2), (V, D))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, t), 0, V)
    hidden = jax.random.normal(jax.random.PRNGKey(4), (1, t, D))
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    f, _, _ = eagle_forward_dense(params, cfg, table, tokens, hidden, positions)
    from jaxinfer.speculative.eagle_dense import fc_input

    x = fc_input(params, table, tokens, hidden)[0]
    lc = cfg.layer
    cache = init_dense_cache(1, 1, t, lc.num_kv_heads, lc.head_dim, jnp.float32)[0]
    md = AttentionMetadata(cu_q_lens=jnp.array([0, t], jnp.int32), kv_lens=jnp.array([t], jnp.int32),
                           num_seqs=jnp.array([1], jnp.int32), slot_mapping=jnp.arange(t, dtype=jnp.int32),
                           max_q_len=t)
    layer = DecoderLayer(lc, ATTENTION_CLASSES[lc.architecture])
    ref, _ = layer.apply({"params": params["layer"]}, x, Rotary.at(positions[0], lc.inv_freq()), cache, md)
    np.testing.assert_allclose(np.asarray(f[0]), np.asarray(ref), rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_warm_start_from_target():
    tc = CONFIGS["llama"]  # tied embeddings
    lm = CausalLM(tc)
    tp = lm._init_fn()(jax.random.PRNGKey(7))
    import flax.linen as nn

    tp = nn.unbox(tp)
    d2t = np.array([4, 8, 15, 16, 23, 42])
    cfg, params = init_eagle_head(jax.random.PRNGKey(0), tc, d2t, target_params=tp, target_model="tiny")
    assert cfg.target_model == "tiny" and cfg.draft_vocab_size == 6
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]), np.asarray(tp["embed_tokens"])[d2t].T)
    np.testing.assert_array_equal(np.asarray(params["layer"]["mlp"]["up_proj"]["kernel"]),
                                  np.asarray(tp["layers_1"]["mlp"]["up_proj"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(params["fc"]["kernel"])[D:], np.eye(D))
    # the draft logits equal the target's LM head logits on the draft ids when fed the same features
    from jaxinfer.speculative.eagle_dense import draft_logits

    h = jax.random.normal(jax.random.PRNGKey(9), (3, D))
    np.testing.assert_allclose(np.asarray(draft_logits(params, cfg, h)), np.asarray(lm.logits(tp, h))[:, d2t],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_save_load_round_trip(tmp_path, dtype):
    tc = CONFIGS["qwen3_qknorm"]
    cfg, params = init_eagle_head(jax.random.PRNGKey(0), tc, draft_vocab=np.arange(10, 40))
    meta = {"command": "jaxinfer train-draft ...", "steps": 3, "acceptance": {"k": 4, "mean_length": 2.1}}
    path = tmp_path / "head.safetensors"
    save_eagle_head(path, cfg, params, meta, dtype=dtype)
    cfg2, p2 = load_eagle_head(path)
    assert cfg2 == cfg
    assert read_eagle_metadata(path)[1] == meta
    tol = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 0}[dtype]
    flat1 = jax.tree_util.tree_leaves_with_path(params)
    flat2 = dict(jax.tree_util.tree_leaves_with_path(p2))
    assert len(flat1) == len(flat2)
    for path_, a in flat1:
        b = flat2[path_]
        assert b.dtype == (np.int32 if path_[0].key == "d2t" else np.dtype(dtype if dtype != "bfloat16" else
                                                                              jnp.bfloat16))
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=tol,
                                   atol=tol * float(np.abs(a).max()))


def test_file_checks(tmp_path):
    from safetensors.numpy import save_file

    tc = CONFIGS["llama"]
    cfg, params = init_eagle_head(jax.random.PRNGKey(0), tc)
    bad = dict(params, lm_head={"kernel": params["lm_head"]["kernel"][:, :5]})
    with pytest.raises(ValueError, match="lm_head.kernel"):
        save_eagle_head(tmp_path / "x.safetensors", cfg, bad)
    layer = {k: v for k, v in params["layer"].items() if k != "mlp"}
    with pytest.raises(ValueError, match="layer tensors"):
        save_eagle_head(tmp_path / "x.safetensors", cfg, dict(params, layer=layer))
    save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an EAGLE head"):
        load_eagle_head(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        load_eagle_head(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="draft_vocab"):
        init_eagle_head(jax.random.PRNGKey(0), tc, draft_vocab=[1, 1, 2])
    with pytest.raises(ValueError, match="draft_vocab_size"):
        EagleHeadConfig.from_target(tc, V + 1)
    moe = ModelConfig("qwen3_moe", V, D, 48, 2, 4, 2, 8, qk_norm=True, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16)
    head_layer = EagleHeadConfig.from_target(moe).layer
    assert head_layer.architecture == "qwen3" and head_layer.num_experts == 0 and head_layer.num_layers == 1
    with pytest.raises(ValueError, match="unknown keys"):
        EagleHeadConfig.from_dict(dict(EagleHeadConfig.from_target(tc).to_dict(), num_experts=4))
    assert shipped_head_path("not-a-registered-model") is None


def test_shipped_head_for_the_default_model():
    """The package carries a head for the default model that fits its configuration and records its training."""
    from safetensors import safe_open

    from jaxinfer.loader import load_config
    from jaxinfer.model_registry import resolve_model

    path = shipped_head_path(None)
    assert path is not None and path.is_file() and path.stat().st_size < 14 * 2**20
    cfg, params = load_eagle_head(path)
    target, _ = load_config(resolve_model(None))
    assert cfg == EagleHeadConfig.from_target(target, cfg.draft_vocab_size, "smollm2-135m-instruct")
    with safe_open(str(path), framework="numpy") as f:  # the config writes back the metadata it was read from
        assert cfg.to_dict() == json.loads(f.metadata()["eagle_config"])
    assert params["lm_head"]["kernel"].dtype == np.float16
    d2t = params["d2t"]
    assert len(np.unique(d2t)) == len(d2t) == cfg.draft_vocab_size and set(target.eos_token_ids) <= set(d2t)
    _, meta = read_eagle_metadata(path)
    assert meta["command"].startswith("jaxinfer train-draft") and meta["steps_run"] > 0
    assert meta["data"]["train_reply_tokens"] > 10_000 and meta["time_s"]["train_this_run"] > 0
    acc = meta["held_out_acceptance"]
    assert acc["k"] == 4 and sum(acc["histogram"]) == acc["positions"] > 1000 and acc["mean_length"] > 1.2
