"""Mixture-of-experts models (Qwen3-MoE, Mixtral, Qwen2-MoE) against HF transformers on tiny random models,
and the MoE block against a float64 numpy per-expert loop.

Tolerances: logits |ours - hf| <= 1e-4 * max|hf| (both float32, as tests/models/test_models_vs_hf.py);
the expert FFN within 1e-5 relative of the float64 loop. Greedy generation and engine outputs must be
token-identical to ``hf.generate``.
"""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.torch import save_file

from jaxinfer.config import EngineConfig
from jaxinfer.engine import Engine
from jaxinfer.loader import load_model
from jaxinfer.model_config import ModelConfig
from jaxinfer.models.moe import expert_ffn, route
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.sharding import make_mesh
from tests.engine.test_engine import GREEDY, _run, count_compilations
from tests.models.dense_steps import ragged_prefill
from tests.models.hf_checks import check_incremental_decode_vs_full, check_ragged_prefill_vs_hf, hf_greedy
from tests.tiny_models import MOE_ARCHS


@pytest.fixture(scope="module", params=sorted(MOE_ARCHS))
def moe_model(request, tiny_model_dir):
    path, hf = tiny_model_dir(request.param)
    return request.param, path, load_model(str(path)), hf


def test_config_layers_and_parameter_count(moe_model):
    arch, path, m, hf = moe_model
    c = m.config
    layers = hf.model.layers
    assert [c.is_moe_layer(i) for i in range(c.num_layers)] == [hasattr(layer.mlp, "experts") for layer in layers]
    assert any(c.is_moe_layer(i) for i in range(c.num_layers))
    assert c.num_params() == sum(p.numel() for p in hf.parameters())
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    unused = (c.num_experts - c.num_experts_per_tok) * per_expert * sum(map(c.is_moe_layer, range(c.num_layers)))
    assert c.num_params(active=True) == c.num_params() - unused


def test_logits_match_hf_on_ragged_batch(moe_model):
    arch, _, m, hf = moe_model
    check_ragged_prefill_vs_hf(m, hf, arch)


def test_incremental_decode_equals_full_forward(moe_model):
    arch, _, m, _ = moe_model
    check_incremental_decode_vs_full(m, arch)


SHARED = [1, 9, 8, 7, 9, 8, 7, 9, 8, 7, 9, 8, 7, 9, 8, 7, 9]  # two full pages of 8: prefix-cache hits
PROMPTS = [
    SHARED + [40, 41, 42, 40, 41, 42, 40, 41],
    [1, 250, 3, 8, 64, 120, 77, 5, 9],
    SHARED + [100, 7],
    [1, 17, 42, 99, 7] * 6,
    SHARED + [5, 5, 5],
]
ARRIVALS = [0, 0, 1, 3, 6]


def test_engine_greedy_equals_hf(moe_model, method="ngram"):
    """Paged engine, prompts longer than the 16-token step budget (chunked prefill), staggered arrivals
    (continuous batching), shared prompt prefixes (prefix caching), n-gram speculation (steps without a
    draft decode plainly): 32 greedy tokens per request equal ``hf.generate``."""
    arch, _, m, hf = moe_model
    cfg = EngineConfig(
        max_model_len=96,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        page_size=8,
        min_token_bucket=16,
        speculative_method=method,
        num_speculative_tokens=3,
    )
    eng = Engine(m, cfg)
    reqs = [(f"r{i}", p, SamplingParams(max_tokens=32, **GREEDY)) for i, p in enumerate(PROMPTS)]
    out = _run(eng, reqs, ARRIVALS)
    for rid, prompt, _ in reqs:
        assert out[rid][0][0] == hf_greedy(hf, prompt, 32), (arch, method, rid)
    stats = eng.stats()
    assert stats.prefix_cache_hits > 0
    if method == "ngram":
        assert stats.spec_verified > 0 and stats.spec_draft_tokens > 0
        if arch != "mixtral":  # the tiny Qwen models' outputs repeat (drafts accepted); Mixtral's never do
            assert stats.spec_accepted_tokens > 0


def test_fused_expert_layout_loads_the_same(moe_model, tmp_path):
    """transformers 5 keeps experts fused in memory (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj
    [E, H, I]``); a checkpoint written in that layout loads to the same parameters as the per-expert one."""
    arch, path, m, hf = moe_model
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(path / "config.json", tmp_path / "config.json")
    for mesh in (None, make_mesh(4)):  # 4 devices: expert parallelism, each device reads its experts' slice
        fused = load_model(str(tmp_path), load_tokenizer_too=False, mesh=mesh)
        if mesh is not None:
            moe = next(i for i in range(m.config.num_layers) if m.config.is_moe_layer(i))
            assert fused.params[f"layers_{moe}"]["mlp"]["experts"]["up_proj"].sharding.spec[0] == "model"
            assert fused.config.num_kv_heads == 2 * m.config.num_kv_heads  # KV heads repeated for TP 4
        for path, a in flatten_dict(m.params).items():
            b = flatten_dict(fused.params)[path]
            if {"k_proj", "v_proj"} & set(path) and mesh is not None:
                continue  # repeated heads: tests/models/test_shard_local_reads.py
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg="/".join(path))


def _ffn64(x, w, ids, wg, wu, wd):
    """float64 per-token, per-expert loop."""
    out = np.zeros((x.shape[0], wd.shape[-1]))
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t]):
            g, u = x[t] @ wg[e], x[t] @ wu[e]
            out[t] += w[t, j] * ((g / (1 + np.exp(-g)) * u) @ wd[e])
    return out


@pytest.mark.parametrize("pattern", ["random", "one_expert", "empty_groups"])
def test_expert_ffn_matches_float64_loop_and_shards(pattern):
    """Routing patterns with empty groups and a group holding every assignment; the sum over expert shards
    (``first_expert``, as expert parallelism runs it) equals the whole; one compilation for every pattern."""
    rng = np.random.default_rng(0)
    t, h, inter, e, k = 13, 16, 24, 8, 3
    x = rng.standard_normal((t, h)).astype(np.float32)
    wg, wu = (rng.standard_normal((e, h, inter)).astype(np.float32) / 4 for _ in range(2))
    wd = rng.standard_normal((e, inter, h)).astype(np.float32) / 4
    ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    if pattern == "one_expert":  # expert 5 in every token's top-k: one group holds T of the T*k rows
        ids[:, 0] = 5
        ids[:, 1:] = np.where(ids[:, 1:] == 5, 0, ids[:, 1:])
    elif pattern == "empty_groups":
        ids = rng.choice([1, 6], size=(t, k)).astype(np.int32)  # six experts get nothing
    w = rng.random((t, k)).astype(np.float32)
    ref = _ffn64(x.astype(np.float64), w, ids, wg, wu, wd)
    fn = jax.jit(expert_ffn, static_argnames=())
    with count_compilations() as events:
        got = np.asarray(fn(x, w, ids, wg, wu, wd))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    parts = sum(
        np.asarray(
            jax.jit(expert_ffn)(x, w, ids, wg[s : s + 2], wu[s : s + 2], wd[s : s + 2], first_expert=jnp.int32(s))
        )
        for s in range(0, e, 2)
    )
    np.testing.assert_allclose(parts, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    with count_compilations() as again:
        fn(x, w, np.roll(ids, 1, axis=0), wg, wu, wd).block_until_ready()
    assert len(again) == 0 and len(events) <= 2


def test_route_orders_and_renormalises():
    logits = jnp.array([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 0.0, -2.0]])
    p = np.exp(np.asarray(logits, np.float64))
    p /= p.sum(-1, keepdims=True)
    w, ids = route(logits, 2, normalize=False)
    np.testing.assert_array_equal(ids, [[1, 3], [0, 1]])
    np.testing.assert_allclose(w, np.take_along_axis(p, np.asarray(ids), 1), rtol=1e-6)
    wn, _ = route(logits, 2, normalize=True)
    np.testing.assert_allclose(np.asarray(wn).sum(-1), 1.0, rtol=1e-6)
    # Mixtral: softmax over the two selected logits
    np.testing.assert_allclose(wn[0], np.exp([2.0, 1.5]) / np.exp([2.0, 1.5]).sum(), rtol=1e-6)


def test_hf_config_fields(tmp_path):
    raw = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "norm_topk_prob": True,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
        "use_sliding_window": False,
        "sliding_window": 4096,
    }
    c = ModelConfig.from_hf(json.loads(json.dumps(raw)))
    assert (c.architecture, c.qk_norm, c.sliding_window, c.norm_topk_prob) == ("qwen3_moe", True, None, True)
    assert [c.is_moe_layer(i) for i in range(4)] == [False, True, False, False]
    with pytest.raises(Exception, match="num_experts_per_tok"):
        ModelConfig.from_hf({**raw, "num_experts_per_tok": 9})


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_pallas_grouped_matmul_kernels_run_the_model(tiny_model_dir, impl):
    """The model with the grouped matmul's Pallas kernels (interpret mode on the CPU) and int8 experts gives
    the XLA path's logits (both dequantize the same int8 experts; 1e-4 relative to max |logit|)."""
    from jaxinfer.target import Kernels
    from quantize.model_quant import quantize_model

    path, _ = tiny_model_dir("qwen3_moe")
    m = load_model(str(path), load_tokenizer_too=False)
    q = quantize_model(m.model, m.params, "rtn", "int8", progress=False).params
    seqs = [[1, 17, 42, 99, 7, 250, 3, 8], [1, 5, 9]]
    ref, _ = ragged_prefill(m.model, q, seqs)
    got, _ = ragged_prefill(_WithKernels(m.model, Kernels("xla", impl, matmul_interpret=True)), q, seqs)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max(), rtol=0)


class _WithKernels:
    """A CausalLM whose forward runs with the given kernels (for tests.models.dense_steps)."""

    def __init__(self, model, kernels):
        self.config, self.dtype = model.config, model.dtype
        self.forward = functools.partial(model.forward, kernels=kernels)
