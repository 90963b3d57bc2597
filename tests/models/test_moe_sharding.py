"""Expert parallelism of the MoE models on virtual CPU devices (tests/conftest.py sets 8).

Through the full engine (paged cache, chunked prefill, staggered arrivals, tests/test_sharding.py's
workload) every layout must generate exactly the one-device tokens (greedy) with log-probabilities within
2e-4: expert parallelism with tensor-parallel attention (the default plan) at 4 devices, expert
parallelism alone (attention replicated) and tensor parallelism inside the experts at 2. The layouts are
asserted on each expert weight's ``.sharding``.
"""

import pytest
from jax.sharding import PartitionSpec as P

from jaxinfer.config import EngineConfig
from jaxinfer.engine import Engine
from jaxinfer.loader import LoadedModel, load_model
from jaxinfer.models.causal_lm import CausalLM
from jaxinfer.sharding import ShardingPlan, make_mesh, place_params, plan_sharding
from tests.test_sharding import CFG, assert_same, generate
from tests.tiny_models import MOE_ARCHS

_REF = {}


def _ref(path):
    if path not in _REF:
        loaded = load_model(str(path))
        _REF[path] = (loaded, generate(Engine(loaded, EngineConfig(**CFG))))
    return _REF[path]


def _moe_layer(loaded):
    c = loaded.config
    return next(f"layers_{i}" for i in range(c.num_layers) if c.is_moe_layer(i))


@pytest.mark.parametrize("arch", sorted(MOE_ARCHS))
def test_expert_and_tensor_parallel_equal_one_device(tiny_model_dir, arch):
    """The default plan at 4 devices: experts split over "model" (2 of 8, or 1 of Mixtral's 4, per device),
    attention heads split too (KV heads repeated), the shared expert's columns split."""
    path, _ = tiny_model_dir(arch)
    _, ref = _ref(path)
    loaded = load_model(str(path), mesh=make_mesh(4))
    rules = dict(loaded.plan.rules)
    assert rules["expert"] == "model" and rules["moe_mlp"] is None and rules["heads"] == "model"
    experts = loaded.params[_moe_layer(loaded)]["mlp"]["experts"]
    for name in ("gate_proj", "up_proj", "down_proj"):
        w = experts[name]
        assert w.sharding.spec == P("model", None, None), name
        assert {s.data.shape[0] for s in w.addressable_shards} == {loaded.config.num_experts // 4}
    got = generate(Engine(loaded, EngineConfig(**CFG, tensor_parallel_size=4)))
    assert_same(ref, got)


def _replan(loaded, plan):
    model = CausalLM(loaded.config, loaded.model.dtype, plan)
    params = place_params(loaded.params, model.logical_axes(), plan)
    return LoadedModel(loaded.source, model, params, loaded.tokenizer, plan.mesh, plan)


@pytest.mark.parametrize("layout", ["ep_only", "experts_tp"])
def test_expert_layouts_at_two_devices_equal_one_device(tiny_model_dir, layout):
    """Qwen2-MoE (shared expert, a dense layer): experts split over "model" with attention replicated, and
    every expert on every device with its intermediate columns split (``expert_parallel=False``)."""
    path, _ = tiny_model_dir("qwen2_moe")
    base, ref = _ref(path)
    mesh = make_mesh(2)
    if layout == "ep_only":
        rules = dict(plan_sharding(base.config, mesh).rules, heads=None, kv_heads=None)
        plan, spec = ShardingPlan(mesh, tuple(rules.items())), P("model", None, None)
    else:
        plan, spec = plan_sharding(base.config, mesh, expert_parallel=False), P(None, None, "model")
    loaded = _replan(base, plan)
    experts = loaded.params[_moe_layer(loaded)]["mlp"]["experts"]
    assert experts["gate_proj"].sharding.spec == spec
    if layout == "experts_tp":
        assert experts["down_proj"].sharding.spec == P(None, "model", None)
    assert not plan.shard_attention if layout == "ep_only" else plan.shard_attention
    got = generate(Engine(loaded, EngineConfig(**CFG, tensor_parallel_size=2)))
    assert_same(ref, got)
