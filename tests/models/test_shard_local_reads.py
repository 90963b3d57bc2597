"""Shard-local weight reads: every slice a device of a tensor-parallel mesh holds is read from the
checkpoint alone, equals the same slice of the HF tensor (transposed, KV heads repeated, llama.cpp's row
permutation undone), and the devices of one process read only their share of the checkpoint's bytes.

The mesh is TP 4 over 4 CPU devices, as 2 processes x 2 devices would see it; "process 0" is the first
two devices (tests/test_multihost.py checks the byte counts in real processes).
"""

from __future__ import annotations

import flax.linen as nn
import gguf
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jaxinfer.loader import load_config, resolve_model
from jaxinfer.models.causal_lm import CausalLM
from jaxinfer.sharding import make_mesh, param_shardings, plan_sharding
from jaxinfer.weights import expand_kv_heads, gguf_sources, hf_sources
from tests.gguf_writer import write_llama_gguf

HF_NAMES = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}


def _hf_reference(state: dict, path: tuple[str, ...], head_dim: int, replicas: int) -> np.ndarray:
    """The parameter at ``path`` computed from the HF state dict directly (float64)."""
    if path[0].startswith("layers_"):
        name = f"model.layers.{path[0][7:]}." + ".".join(p for p in path[1:] if p not in ("kernel", "scale"))
        name += ".bias" if path[-1] == "bias" else ".weight"
    else:
        name = HF_NAMES[path[0]]
    w = state[name].astype(np.float64)
    if path[-1] == "kernel":
        w = w.T
    if len(path) > 2 and path[-2] in ("k_proj", "v_proj") and replicas > 1:
        heads = w.reshape(*w.shape[:-1], -1, head_dim)
        w = np.repeat(heads, replicas, axis=-2).reshape(*w.shape[:-1], -1)
    return w


def _setup(model_path):
    source = resolve_model(str(model_path))
    config, ckpt = load_config(source)
    plan = plan_sharding(config, make_mesh(4))
    assert plan.kv_head_replicas == 2  # 2 KV heads over TP 4: the repeat path is exercised
    sources = gguf_sources(config) if source.kind == "gguf" else hf_sources(config)
    sources = expand_kv_heads(sources, config.head_dim, plan.kv_head_replicas)
    lm = CausalLM(config.with_overrides(num_kv_heads=config.num_kv_heads * 2), np.float32, plan)
    boxed = lm.abstract_params()
    shardings = flatten_dict(param_shardings(nn.get_partition_spec(boxed), plan.mesh, plan.rules))
    return config, ckpt, sources, shardings, plan.mesh.devices.flat[:2]


@pytest.mark.parametrize("kind", ["safetensors", "gguf-f32", "gguf-q8_0"])
def test_each_device_reads_its_slice(tiny_model_dir, tmp_path, kind):
    model_dir, hf = tiny_model_dir("llama")
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    qtype = gguf.GGMLQuantizationType.Q8_0 if kind == "gguf-q8_0" else gguf.GGMLQuantizationType.F32
    path = model_dir if kind == "safetensors" else write_llama_gguf(hf, tmp_path / "m.gguf", qtype)
    config, ckpt, sources, shardings, process0 = _setup(path)
    total = replicated = 0
    ckpt.bytes_read = 0
    for p, src in sources.items():
        shape = src.shape(ckpt.shape(src.name))
        ref = _hf_reference(state, p, config.head_dim, 2)
        assert shape == ref.shape, p
        sharding = shardings[p]
        total += ckpt.nbytes(src.name)
        replicated += ckpt.nbytes(src.name) if sharding.is_fully_replicated else 0
        if kind == "gguf-q8_0":
            full = src.read(ckpt, tuple(slice(None) for _ in shape))
        cache = {}  # what load_params shares between the slices of process 0's devices
        for device, index in sharding.devices_indices_map(shape).items():
            before = ckpt.bytes_read
            got = src.read(ckpt, index, cache if device in process0 else None)
            if device not in process0:
                ckpt.bytes_read = before  # count process 0's reads only
            if kind == "gguf-q8_0":  # a slice equals the slice of the whole tensor, which is close to HF's
                np.testing.assert_array_equal(got, full[index], err_msg=str(p))
            else:
                np.testing.assert_array_equal(got, ref[index], err_msg=str(p))
        if kind == "gguf-q8_0":
            np.testing.assert_allclose(full, ref, atol=0.02 * np.abs(ref).max(), err_msg=str(p))
    if kind != "gguf-q8_0":  # every sharded tensor splits evenly: half of it, plus every replicated one
        assert ckpt.bytes_read == (total - replicated) // 2 + replicated
        assert replicated < total / 10
