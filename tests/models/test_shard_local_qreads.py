"""Shard-local reads of weights kept quantized: ``quantization="gguf"`` (Q8_0 / Q4_1 blocks as QArrays) and
quantized checkpoints (int8 per-channel, int4 g32 asymmetric, written by ``save_quantized``).

At TP 4 (4 of the 8 CPU devices) every device's slice of every QArray leaf (value, scale, offset) equals
the same slice of the QArray read whole, and the load reads each stored byte once. "Process 0" (the
first two devices, as with 2 processes x 2 devices) is simulated by letting ``make_array_from_callback``
ask only for its devices' slices: the bytes the loader then logs must be half of every split tensor plus
every replicated one, computed here from the stored shapes (tests/test_multihost.py checks a real
2-process run).
"""

from __future__ import annotations

import logging
import re

import gguf
import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jaxinfer.gguf_native import load_gguf_native
from jaxinfer.gguf_qarray import qarray_from_gguf
from jaxinfer.loader import load_config, load_model
from jaxinfer.model_registry import resolve_model
from jaxinfer.models.causal_lm import CausalLM
from jaxinfer.models.qembedding import QEmbedding
from jaxinfer.quantized_checkpoint import load_quantized, save_quantized
from jaxinfer.sharding import make_mesh, plan_sharding
from jaxinfer.weights import unpermute_gguf_rows
from pallas_kernels.quantized_matmul.config import QuantConfig
from pallas_kernels.quantized_matmul.qarray import QArray
from quantize.model_quant import quantize_model
from tests.gguf_writer import write_llama_gguf
from tests.tiny_models import make_tiny_model

T = gguf.GGMLQuantizationType
BLOCK_BYTES = {T.Q8_0: 34, T.Q4_1: 20}  # bytes per block of 32 values: f16 d (+ f16 m) + the values
ROW_SPLIT = ("o_proj", "down_proj")  # split along K at TP 4; every other weight along N
LOG = re.compile(r"process 0 of 1 read (\d+) of (\d+) checkpoint bytes")


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    """A tiny Llama whose every dimension splits over TP 4 in whole 32-value blocks: 4 query and 4 KV heads
    of 32, hidden 128 (o_proj: 32 rows per shard), MLP 256, vocabulary 320."""
    path = tmp_path_factory.mktemp("tp4") / "llama"
    hf = make_tiny_model("llama", path, hidden_size=128, intermediate_size=256, num_key_value_heads=4)
    return path, hf


def _mesh():
    return make_mesh(4, devices=jax.devices()[:4])


def _leaves(params) -> dict:
    """``{path/field: array}`` of every QArray (QEmbedding tables included) leaf of a parameter tree."""
    out = {}
    for p, w in flatten_dict(params).items():
        qa = w.table if isinstance(w, QEmbedding) else w
        if isinstance(qa, QArray):
            for f in ("value", "scale", "offset"):
                if getattr(qa, f) is not None:
                    out["/".join((*p, f))] = getattr(qa, f)
    return out


def _assert_shards_equal(params, reference: dict):
    got = _leaves(params)
    assert set(got) == set(reference) and got
    for name, arr in got.items():
        assert not arr.sharding.is_fully_replicated or "scale" in name or "offset" in name, name
        want = np.asarray(reference[name])
        assert arr.shape == want.shape, name
        for shard in arr.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], err_msg=name)


def _logged(caplog) -> tuple[int, int]:
    hits = [LOG.search(r.getMessage()) for r in caplog.records]
    read, total = [m for m in hits if m][-1].groups()
    return int(read), int(total)


def _as_process_0(monkeypatch, mesh):
    """``jax.make_array_from_callback`` asking only for the slices of the mesh's first two devices (the
    result is an abstract array: nothing is computed with it)."""
    mine = set(mesh.devices.flat[:2])

    def fake(shape, sharding, callback, dtype=None):
        got = [callback(i) for d, i in sharding.devices_indices_map(tuple(shape)).items() if d in mine]
        return jax.ShapeDtypeStruct(shape, np.asarray(got[0]).dtype)

    monkeypatch.setattr(jax, "make_array_from_callback", fake)


def _gguf_reference(ckpt, config) -> dict:
    """Every kept-quantized leaf from the whole GGUF tensor (the one-process import) with q/k columns
    un-permuted, keyed like :func:`_leaves`."""
    names = {"attn_q": "self_attn/q_proj", "attn_k": "self_attn/k_proj", "attn_v": "self_attn/v_proj",
             "attn_output": "self_attn/o_proj", "ffn_gate": "mlp/gate_proj", "ffn_up": "mlp/up_proj",
             "ffn_down": "mlp/down_proj"}
    out = {}
    for t in ckpt.reader.tensors:
        if t.tensor_type not in BLOCK_BYTES:
            continue
        qa = qarray_from_gguf(t.data, t.tensor_type, t.shape)
        if t.name == "token_embd.weight":
            path = "embed_tokens"
        elif t.name == "output.weight":
            path = "lm_head/kernel"
        else:
            _, i, g, _ = t.name.split(".")
            path = f"layers_{i}/{names[g]}/kernel"
            heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}.get(g)
            if heads:
                qa = qa.take_columns(unpermute_gguf_rows(np.arange(qa.shape[1]), heads))
        for f in ("value", "scale", "offset"):
            if getattr(qa, f) is not None:
                out[f"{path}/{f}"] = getattr(qa, f)
    return out


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_1], ids=lambda t: t.name)
def test_gguf_kept_quantized_reads_only_its_shards(model4, tmp_path, qtype, monkeypatch, caplog):
    path, hf = model4
    gguf_path = write_llama_gguf(hf, tmp_path / "m.gguf", qtype)
    caplog.set_level(logging.INFO, logger="jaxinfer.weights")
    mesh = _mesh()
    loaded = load_model(str(gguf_path), quantization="gguf", mesh=mesh, load_tokenizer_too=False)
    config, ckpt = load_config(resolve_model(str(gguf_path)))
    reference = _gguf_reference(ckpt, config)
    assert len({k.rsplit("/", 1)[0] for k in reference}) == 2 + 7 * config.num_layers  # embed, head, 7 per layer
    _assert_shards_equal(loaded.params, reference)
    # the whole mesh's devices together: every stored byte once
    quantized = replicated = 0
    for t in ckpt.reader.tensors:
        if t.tensor_type in BLOCK_BYTES:  # [N rows of K / 32 blocks]
            k, n = (int(d) for d in t.shape)
            quantized += n * k // 32 * BLOCK_BYTES[t.tensor_type]
        else:  # the norms (F32), replicated
            replicated += 4 * int(np.prod(t.shape))
    assert _logged(caplog) == (quantized + replicated, quantized + replicated)
    # process 0: half of every quantized tensor (all split over TP 4), every norm whole
    _as_process_0(monkeypatch, mesh)
    caplog.clear()
    load_gguf_native(ckpt, CausalLM(config, np.float32, plan_sharding(config, mesh)))
    assert _logged(caplog) == (quantized // 2 + replicated, quantized + replicated)
    assert replicated < quantized / 50


def _expected_process_0_bytes(name: str, a) -> int:
    """Bytes of stored array ``name`` that 2 of 4 tensor-parallel devices hold: half of anything split,
    all of the norms and of a row-split weight's per-channel scales (one row, applied after the sum)."""
    nbytes = a.size * a.dtype.itemsize
    if "norm" in name:
        return nbytes
    if name.endswith(("/scale", "/offset")) and a.shape[0] == 1 and any(p in name for p in ROW_SPLIT):
        return nbytes
    return nbytes // 2


@pytest.mark.parametrize("fmt", ["int8", "int4-g32-asym"])
def test_quantized_checkpoint_reads_only_its_shards(model4, tmp_path, fmt, monkeypatch, caplog):
    path, _ = model4
    cfg = QuantConfig("int8") if fmt == "int8" else QuantConfig("int4", group_size=32, symmetric=False)
    m = load_model(str(path))
    q = quantize_model(m.model, m.params, "rtn", cfg, quantize_head=True, quantize_embedding=True, progress=False)
    out = save_quantized(tmp_path / "q", m.model, q.params, info=q.info)
    caplog.set_level(logging.INFO, logger="jaxinfer.weights")
    mesh = _mesh()
    _, params, _ = load_quantized(out, mesh=mesh)
    reference = _leaves(q.params)
    assert len(reference) == (3 if fmt != "int8" else 2) * (2 + 7 * m.config.num_layers)
    _assert_shards_equal(params, reference)
    stored = {"/".join(p): np.asarray(a) for p, a in flatten_dict(q.params).items() if not isinstance(a, QArray)
              and not isinstance(a, QEmbedding)}
    stored.update(reference)
    total = sum(a.size * a.dtype.itemsize for a in map(np.asarray, stored.values()))
    assert _logged(caplog) == (total, total)
    _as_process_0(monkeypatch, mesh)
    caplog.clear()
    load_quantized(out, mesh=mesh)
    want = sum(_expected_process_0_bytes(k, np.asarray(a)) for k, a in stored.items())
    assert _logged(caplog) == (want, total)
    assert want < 0.55 * total
