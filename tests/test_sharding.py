"""Tensor and data parallelism on 8 virtual CPU devices (tests/conftest.py sets the device count).

Every sharded configuration must generate exactly the TP=1 tokens (greedy, with repetition / presence /
frequency penalties) with log-probabilities within 2e-4, through the full engine: paged cache, chunked
prefill (small token budget), continuous batching (staggered arrivals). Shardings of parameters and KV
cache are asserted on ``.sharding``.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxinfer.config import EngineConfig
from jaxinfer.dp_engine import DataParallelEngine
from jaxinfer.engine import Engine
from jaxinfer.loader import LoadedModel, load_model
from jaxinfer.models.causal_lm import CausalLM
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.sharding import make_mesh, place_params, plan_sharding
from pallas_kernels.quantized_matmul.qarray import QArray
from tests.tiny_models import ARCHS

# min_token_bucket = the token budget: one step shape per engine (bucketing is tested elsewhere), which keeps
# the cold-cache compile time of the many sharded engines here small.
CFG = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, page_size=8, min_token_bucket=32)
PROMPTS = [[1, 5, 9, 22, 33, 44, 55, 66, 77, 88, 99, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111,
            112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 123, 124, 125],  # > token budget: chunked
           [1, 200, 3], [1, 7], [1, 250, 251, 252, 253, 254]]
ARRIVALS = [0, 0, 2, 5]


def generate(engine, prompts=PROMPTS, arrivals=ARRIVALS, max_tokens=6):
    # penalties on: the penalty state is split over the vocabulary with the logits under TP
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2, repetition_penalty=1.3,
                        presence_penalty=0.5, frequency_penalty=0.3)
    pending = sorted(zip(arrivals, range(len(prompts))))
    toks, lps, step = {}, {}, 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, i = pending.pop(0)
            engine.add_request(f"r{i}", prompts[i], sp)
        for out in engine.step():
            toks.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
            lps.setdefault(out.request_id, []).extend(out.outputs[0].logprobs)
        step += 1
    return toks, lps


def assert_same(ref, got):
    assert got[0] == ref[0]
    for rid in ref[1]:
        for a, b in zip(ref[1][rid], got[1][rid]):
            assert a.keys() == b.keys()
            np.testing.assert_allclose([b[k] for k in a], [a[k] for k in a], atol=2e-4)


def engine_for(path, tp=1, dp=1):
    mesh = make_mesh(tp, dp)
    loaded = load_model(str(path), mesh=mesh)
    cfg = EngineConfig(**CFG, tensor_parallel_size=tp, data_parallel_size=dp)
    cls = DataParallelEngine if dp > 1 else Engine
    return cls(loaded, cfg)


# Every architecture at TP=2; TP=4 and DP x TP = 2 x 2 on two of them (GQA with KV heads repeated for TP=4,
# and 1 KV head repeated for every TP), to keep compile time small.
MESHES = {arch: [(2, 1)] for arch in ARCHS}
MESHES["llama"] = [(2, 1), (4, 1), (2, 2)]
MESHES["llama3_rope"] = [(4, 1), (2, 2)]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tp_and_dp_equal_tp1(tiny_model_dir, arch):
    path, _ = tiny_model_dir(arch)
    ref = generate(engine_for(path))
    for tp, dp in MESHES[arch]:
        eng = engine_for(path, tp, dp)
        assert_same(ref, generate(eng))
        if dp > 1:
            assert all(r.stats().prompt_tokens_total > 0 for r in eng.replicas)  # both replicas served


def test_parameter_and_cache_shardings(tiny_model_dir):
    path, _ = tiny_model_dir("llama3_rope")  # 4 q heads, 1 kv head: kv heads repeated for TP=4
    eng = engine_for(path, tp=4)
    m = eng.loaded
    assert m.plan.kv_head_replicas == 4 and m.config.num_kv_heads == 4
    layer = m.params["layers_0"]
    expect = {("self_attn", "q_proj", "kernel"): P(None, "model"), ("self_attn", "k_proj", "kernel"): P(None, "model"),
              ("self_attn", "o_proj", "kernel"): P("model", None), ("mlp", "gate_proj", "kernel"): P(None, "model"),
              ("mlp", "down_proj", "kernel"): P("model", None), ("input_layernorm", "scale"): P(None)}
    for path_, spec in expect.items():
        leaf = layer
        for k in path_:
            leaf = leaf[k]
        assert leaf.sharding.spec == spec, path_
        assert len(leaf.sharding.device_set) == 4
    assert m.params["embed_tokens"].sharding.spec == P("model", None)
    assert m.params["lm_head"]["kernel"].sharding.spec == P(None, "model")
    # the penalty state is split over the vocabulary as the logits are: the sampler updates it in place
    for leaf in (eng.runner.penalty_state.output_counts, eng.runner.penalty_state.prompt_mask):
        assert leaf.sharding.spec == P(None, "model") and len(leaf.sharding.device_set) == 4
    kv = eng.runner.kv_cache[0]
    assert kv.k.shape[2] == 4 and kv.k.sharding.spec == P(None, None, "model", None)
    # each device holds exactly one (repeated) KV head
    assert {s.data.shape[2] for s in kv.k.addressable_shards} == {1}


def test_default_model_plan_and_equality(default_llm):
    """SmolLM2 has 9 query / 3 KV heads: with TP=2 attention stays replicated, MLP and vocab are split."""
    ref_loaded = default_llm.loaded
    plan = plan_sharding(ref_loaded.config, make_mesh(2))
    rules = dict(plan.rules)
    assert rules["heads"] is None and rules["kv_heads"] is None and rules["mlp"] == "model"
    assert rules["vocab"] == "model"
    cfg = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16, min_token_bucket=16)  # one shape
    tok = default_llm.tokenizer
    prompts = [tok("The capital of France is")["input_ids"], tok("def add(a, b):")["input_ids"]]
    ref = generate(Engine(ref_loaded, EngineConfig(**cfg)), prompts, [0, 1], max_tokens=8)
    mesh = make_mesh(2)
    sharded = LoadedModel(ref_loaded.source, CausalLM(ref_loaded.config, ref_loaded.model.dtype, plan),
                          place_params(ref_loaded.params, ref_loaded.model.logical_axes(), plan),
                          ref_loaded.tokenizer, mesh, plan)
    assert sharded.params["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, "model")
    got = generate(Engine(sharded, EngineConfig(**cfg, tensor_parallel_size=2)), prompts, [0, 1],
                   max_tokens=8)
    assert_same(ref, got)


@pytest.mark.parametrize("fmt", ["int8", "int4-g32"])
def test_quantized_weights_shard_with_their_scales(tiny_model_dir, fmt):
    path, _ = tiny_model_dir("llama")
    base = load_model(str(path))

    def quantize_kernels(tree):
        return {k: (QArray.quantize(v, fmt, dtype=v.dtype) if k == "kernel" else
                    quantize_kernels(v) if isinstance(v, dict) else v) for k, v in tree.items()}

    qparams = quantize_kernels(base.params)
    ref = generate(Engine(LoadedModel(base.source, base.model, qparams, base.tokenizer, base.mesh, base.plan),
                          EngineConfig(**CFG)))
    mesh = make_mesh(2)
    plan = plan_sharding(base.config, mesh)
    model = CausalLM(base.config, base.model.dtype, plan)
    placed = place_params(qparams, model.logical_axes(), plan)
    q = placed["layers_0"]["self_attn"]["q_proj"]["kernel"]
    o = placed["layers_0"]["self_attn"]["o_proj"]["kernel"]
    assert isinstance(q, QArray) and q.value.sharding.spec == P(None, "model")
    assert q.scale.sharding.spec[-1] == "model"  # column scales follow the columns
    assert o.value.sharding.spec == P("model", None)
    if fmt == "int4-g32":
        assert o.scale.sharding.spec == P("model", None)  # row-group scales follow the rows
    got = generate(Engine(LoadedModel(base.source, model, placed, base.tokenizer, mesh, plan),
                          EngineConfig(**CFG, tensor_parallel_size=2)))
    assert_same(ref, got)


def test_cpu_default_kv_budget_is_for_the_whole_mesh(tiny_model_dir):
    """Virtual CPU devices share the host's memory: with no budget given, a replica's cache takes 1 GiB in all,
    however many devices it is split over (not 1 GiB per device)."""
    from jaxinfer.kv_cache import CPU_DEFAULT_BUDGET, plan_kv_cache
    from jaxinfer.model_config import ModelConfig

    mc = ModelConfig(architecture="llama", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                     num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)
    per_token = 32 * 2 * 8 * 128 * 2  # layers x (k, v) x kv heads x head_dim x bf16 bytes
    one = plan_kv_cache(mc, page_size=16, dtype="bfloat16")
    assert one.capacity_tokens == CPU_DEFAULT_BUDGET // (16 * per_token) * 16
    for tp, devices in ((1, 4), (4, 4), (2, 6)):  # replicated cache on 4 devices, split over 4, TP 2 of 6 devices
        spec = plan_kv_cache(mc, page_size=16, dtype="bfloat16", kv_shards=tp, devices=devices)
        held = spec.total_bytes * devices // tp  # every device holds 1/tp of each page
        assert CPU_DEFAULT_BUDGET - 16 * per_token * devices < held <= CPU_DEFAULT_BUDGET, (tp, devices)
    # through the engine: TP 2 on 2 virtual devices
    path, _ = tiny_model_dir("llama")
    eng = Engine(load_model(str(path), mesh=make_mesh(2, 1)),
                 EngineConfig(max_model_len=256, max_num_seqs=4096, max_num_batched_tokens=4096,
                              tensor_parallel_size=2))
    kv = eng.runner.kv_cache
    held = sum(s.data.nbytes for layer in kv for leaf in jax.tree.leaves(layer) for s in leaf.addressable_shards)
    assert CPU_DEFAULT_BUDGET // 2 < held <= CPU_DEFAULT_BUDGET


@pytest.mark.parametrize("head_dim", [64, 128])
def test_tpu_int8_kv_cache_splits_over_kv_heads(head_dim):
    """The TPU kernel's cache (fused K|V rows at head_dim 64, head-major at 128; int8 with one scale row per
    page) split over 2 devices: each device's values and scale rows are the same KV heads, as written by
    write_kv on the whole cache."""
    import jax.numpy as jnp

    from jaxinfer.kv_cache import init_kv_cache, plan_kv_cache
    from jaxinfer.model_config import ModelConfig
    from jaxinfer.sharding import ShardingPlan
    from pallas_kernels.ragged_paged_attention.pages import KVLayout, page_scales, write_kv

    mc = ModelConfig(architecture="llama", vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=1,
                     num_heads=8, num_kv_heads=4, head_dim=head_dim)
    spec = plan_kv_cache(mc, page_size=16, dtype="bfloat16", kv_cache_dtype="int8", impl="pallas_tpu",
                         memory="1MiB", max_useful_tokens=64, kv_shards=2)
    assert spec.layout is (KVLayout.HEAD_MAJOR_FUSED if head_dim == 64 else KVLayout.HEAD_MAJOR)
    (kv,) = init_kv_cache(spec, ShardingPlan(make_mesh(2, 1)))
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal((40, 4, head_dim)), jnp.float32) for _ in range(2))
    slots = jnp.arange(40, dtype=jnp.int32)
    out = jax.jit(write_kv, donate_argnums=0)(kv, k, v, slots)
    whole = jax.tree.map(np.asarray, out)
    # 2 heads x 16 tokens per device: rows of 4 pages (128 lanes per device)
    g = spec.scale_pages_per_row
    assert g == 4 and spec.num_pages % g == 0 and whole.k_scale.shape == (spec.num_pages // g, 4 * g * 16)
    for shard_k, shard_s in zip(out.k.addressable_shards, out.k_scale.addressable_shards):
        heads = shard_k.index[1]  # KV heads held by this device
        assert (heads.start, heads.stop) in ((0, 2), (2, 4))
        np.testing.assert_array_equal(np.asarray(shard_k.data), whole.k[:, heads])
        lanes = slice(heads.start * g * 16, heads.stop * g * 16)
        assert shard_s.index[1] == lanes and shard_s.data.shape[1] == 128
        np.testing.assert_array_equal(np.asarray(shard_s.data), whole.k_scale[:, lanes])
    # the scale rows hold each head's token scales in order: page p, head h, token t at row p // 4, lane
    # h * 64 + (p % 4) * 16 + t
    absmax = np.abs(np.asarray(k)).max(-1) / 127  # [40 tokens, 4 heads]
    manual = whole.k_scale.reshape(-1, 4, g, 16).transpose(0, 2, 3, 1).reshape(-1, 4)
    np.testing.assert_allclose(manual[:40], absmax, rtol=1e-6)
    rows = np.swapaxes(np.asarray(page_scales(out, jnp.asarray(whole.k_scale))), 1, 2).reshape(-1, 4)
    np.testing.assert_allclose(rows[:40], absmax, rtol=1e-6)
