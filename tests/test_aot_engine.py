"""The engine's whole step compiled (not run) for TPU v5e / v6e and H100 on this CPU machine.

Every case lowers the engine's own jitted step (``ModelRunner``) on abstract weights and an abstract KV
cache placed on compile-only devices of the target, and compiles it with the vendor's compiler. The
Llama-3-8B-shaped cases keep every per-layer shape of Llama-3-8B (hidden 4096, 32 heads / 8 KV heads,
MLP 14336, vocabulary 128256) with 2 layers instead of 32, so the suite compiles them in seconds; the
README's table has the 32-layer figures from ``jaxinfer compile``.
"""

from __future__ import annotations

import json
import re

import pytest

from jaxinfer import aot
from jaxinfer.aot import compile_for_target, parse_target
from jaxinfer.config import EngineConfig
from jaxinfer.hlo_traffic import op_traffic

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
}
SMALL = dict(max_model_len=2048, max_num_seqs=16, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("llama8b") / "config.json"
    path.write_text(json.dumps(LLAMA3_8B))
    return str(path)


def _check(report, *, chips: int, quantized: bool = False, moe: bool = False):
    assert report.chips == chips
    assert report.buckets and all(b.ok for b in report.buckets), [b.error for b in report.buckets]
    assert report.fits and report.ok
    for b in report.buckets:
        # the compiled program holds at least the weights and the KV cache as arguments
        assert b.argument_bytes >= report.weight_bytes_per_device + report.kv_bytes_per_device
        assert b.peak_bytes <= report.hbm_bytes_per_device
        # decode traffic: the compiled program moves at least the minimum bytes by the per-op count; XLA's GPU
        # compiler gives no "bytes accessed" figure for a deviceless compile (0), the TPU compiler does
        assert 0 < b.minimum_bytes <= b.estimated_bytes
        assert b.bytes_accessed > 0 or report.target.startswith("h100")
    one = report.rooflines[0]
    assert one.batch == 1
    if not moe:  # a MoE step reads only the routed experts (checked by the MoE test)
        assert one.bytes_per_device >= report.weight_bytes_per_device
    assert one.tokens_per_s > 0


def test_parse_target():
    assert parse_target("tpu-v5e-8")[0].name == "tpu-v5e" and parse_target("tpu-v5e-8")[1] == 8
    assert parse_target("h100")[1] == 1 and parse_target("tpu-v6e")[0].name == "tpu-v6e"
    with pytest.raises(ValueError, match="unknown compile target"):
        parse_target("tpu-v9x-4")


def test_default_model_on_one_v5e_chip(monkeypatch):
    texts = []
    monkeypatch.setattr(aot, "op_traffic", lambda text, **kw: texts.append(text) or op_traffic(text, **kw))
    report = compile_for_target(None, "tpu-v5e-1", EngineConfig(**SMALL), buckets="decode")
    _check(report, chips=1)
    assert report.dtype == "bfloat16"
    assert len(texts) == 2 * len(report.buckets) == 4  # the plain-path and every-branch counts of each bucket
    table = 49152 * 576 * 2  # the tied bf16 embedding table, which is also the LM head
    for b, text in zip(report.buckets, texts[::2]):
        # the lookup reads its rows in the LM head's layout: no op copies the table
        assert not [name for name, n in b.top_ops if "embed_tokens" in name and n >= table // 2], b.top_ops
        # the attention kernels' step metadata (searchsorted over cu_q_lens) is computed once per step, not
        # per layer: the compiler keeps layer 0's and shares it with the other 29 layers' kernels
        owners = set(re.findall(r"(layers_\d+)/self_attn/jit\(ragged_paged_attention_tpu\)/jit\(searchsorted\)", text))
        assert owners == {"layers_0"}, owners
        # head_dim 64: K and V share one 128-lane row of the pages (no lane padding), so the decode step moves
        # within 10% of the minimum bytes (the rest is sampling)
        assert f"bf16[{report.kv_capacity_tokens // 16},3,16,128]" in text
        assert b.traffic_ratio < 1.10, b.traffic_ratio


def test_default_model_full_batch_decode_on_h100():
    """The full-batch decode bucket compiles for H100 without a GPU: its sampler sorts ``[64, 49152]``
    logits, which XLA's GPU compiler hands to CUB's radix sort, whose scratch-size query needs a device
    (``cudaErrorInvalidDevice`` before the deviceless compile kept XLA's own sort)."""
    report = compile_for_target(None, "h100", EngineConfig(**{**SMALL, "max_num_seqs": 64}), buckets="decode")
    assert [(b.tokens, b.seqs) for b in report.buckets] == [(2, 2), (64, 64)]
    _check(report, chips=1)


@pytest.mark.parametrize("target,chips", [("tpu-v6e-1", 1), ("tpu-v5e-4", 4), ("tpu-v5e-8", 8), ("h100", 1)])
def test_llama8b_shaped_bf16(llama8b, target, chips, monkeypatch):
    texts = []
    monkeypatch.setattr(aot, "op_traffic", lambda text, **kw: texts.append(text) or op_traffic(text, **kw))
    report = compile_for_target(llama8b, target, EngineConfig(**SMALL), buckets="smallest")
    _check(report, chips=chips)
    if chips > 1:
        # the penalty state ([max_num_seqs + 1, vocab]) is split over the vocabulary like the logits: no chip
        # holds (gathers and relays out) the whole of it after the sampler's update
        slots, local = SMALL["max_num_seqs"] + 1, 128256 // chips
        assert f"s32[{slots},{local}]" in texts[0] and f"pred[{slots},{local}]" in texts[0]
        assert f"s32[{slots},128256]" not in texts[0] and f"pred[{slots},128256]" not in texts[0]
    # weights split over the chips: the per-chip share shrinks with tensor parallelism
    total = (2 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336) + 2 * 128256 * 4096) * 2
    assert report.weight_bytes_per_device == pytest.approx(total / chips, rel=0.02)


@pytest.mark.parametrize("target", ["tpu-v6e-1", "h100"])
@pytest.mark.parametrize("quantization,kv", [("int8", "auto"), ("int4", "auto"), (None, "int8")])
def test_llama8b_shaped_quantized(llama8b, target, quantization, kv, monkeypatch):
    texts = []
    monkeypatch.setattr(aot, "op_traffic", lambda text, **kw: texts.append(text) or op_traffic(text, **kw))
    report = compile_for_target(llama8b, target, EngineConfig(**SMALL, kv_cache_dtype=kv), quantization=quantization,
                                buckets="smallest")
    _check(report, chips=1, quantized=quantization is not None)
    if kv == "int8" and target.startswith("tpu"):
        # The int8 cache's scale rows ([pages, 8 KV heads x 16 tokens] f32) are laid out as the attention kernel
        # and the write read them: every value of that shape in the compiled step is row-major, so no op relays
        # a scale array out (a [pages, 8, 16] array was laid out pages-minor and copied around every layer). The
        # compiler may still stage a row-major array in VMEM (a copy-start with the same layout).
        scales = f"f32[{report.kv_capacity_tokens // 16},128]"
        _check_scale_rows(texts[0], scales)
    if target.startswith("tpu"):
        # the attention kernel's K and V pages (and an int8 cache's scale rows) are pinned to HBM (the compiler
        # may not stage a whole cache in VMEM)
        _check_pinned_cache(texts[0], 4 if kv == "int8" else 2)
        if quantization is not None:
            _check_compiled_matmuls(texts[0])


def _check_compiled_matmuls(text: str, layers: int = 2):
    """Every quantized projection of the compiled TPU step is the Mosaic kernel (a ``tpu_custom_call``), none
    its interpret-mode grid loop (XLA while loops of dynamic slices: under tensor parallelism the per-shard
    call once fell back on the runtime backend, the CPU, and was interpreted)."""
    calls = re.findall(r'custom_call_target="tpu_custom_call".*op_name="[^"]*/(qmm_\w+)/pallas_call"', text)
    assert len(calls) >= 7 * layers, calls  # q, k, v, o, gate, up, down of each layer
    interpreted = set(re.findall(r'op_name="[^"]*/(qmm_\w+)/while', text))
    assert not interpreted, interpreted


def _check_pinned_cache(text: str, operands: int):
    calls = [line for line in text.splitlines() if "= " in line and "ragged_paged_attention_tpu/pallas_call" in
             line and "custom-call(" in line]
    assert len(calls) >= 2, len(calls)  # one per layer
    for line in calls:
        hbm = re.findall(r'\{"operand_index":"(\d+)","color":"0"', line)  # memory space color 0: HBM
        assert len(hbm) == operands, hbm


def _check_scale_rows(text: str, scales: str):
    """The int8 cache's scale rows (``scales``, one device's shape) in a compiled TPU step: row-major (a
    ``[pages, 8, 16]`` array was laid out pages-minor and copied around every layer), written in place by the
    scale-row kernel, and never staged in VMEM (an XLA scatter into them had the compiler prefetch each
    array whole, scatter there and write it back every step)."""
    assert text.count(scales) >= 4, "the scale rows are the step's arguments"
    layouts = set(re.findall(re.escape(scales) + r"\{([0-9,]+)", text))
    assert layouts == {"1,0"}, layouts
    writes = [line for line in text.splitlines()
              if re.match(r"\s*%kv_scale_rows_write\S* = " + re.escape(scales), line)]
    assert len(writes) >= 4, len(writes)  # K and V of each layer
    staged = [line.split("metadata")[0][:200] for line in text.splitlines()
              if re.search(r"= \(*" + re.escape(scales) + r"\S*S\(1\)", line)  # a scale array in VMEM
              or (re.search(r"(copy|slice)-start\(", line) and scales in line)]
    assert not staged, staged


@pytest.mark.parametrize("quantization,kv", [("int8", "int8"), ("int4", "auto")])
def test_llama8b_shaped_quantized_under_tensor_parallelism(llama8b, quantization, kv, monkeypatch):
    texts = []
    monkeypatch.setattr(aot, "op_traffic", lambda text, **kw: texts.append(text) or op_traffic(text, **kw))
    report = compile_for_target(llama8b, "tpu-v5e-4", EngineConfig(**SMALL, kv_cache_dtype=kv),
                                quantization=quantization, buckets="smallest")
    _check(report, chips=4, quantized=True)
    _check_compiled_matmuls(texts[0])
    if kv == "int8":
        # 2 KV heads x 16 tokens per chip: scale rows of 4 pages, 128 lanes per chip, pinned, written in place
        _check_scale_rows(texts[0], f"f32[{report.kv_capacity_tokens // 16 // 4},128]")
        _check_pinned_cache(texts[0], 4)


def test_a_model_that_does_not_fit_is_reported(tmp_path):
    """Negative control: the full 32-layer Llama-3-8B shape in bf16 (15 GiB of weights) on one 16 GiB v5e chip:
    the compiler runs out of HBM and the report says so."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA3_8B, "num_hidden_layers": 32}))
    report = compile_for_target(str(path), "tpu-v5e-1", EngineConfig(**SMALL), buckets="smallest")
    assert report.weight_bytes_per_device > 14 * 2**30
    assert not report.buckets[0].ok and "RESOURCE_EXHAUSTED" in report.buckets[0].error
    assert not report.fits and not report.ok


def test_jaxinfer_compile_command_with_a_weight_format(capsys):
    """The CLI's --quantization is the weight format (not EngineConfig.quantization), --json is the report."""
    from jaxinfer.cli import main

    rc = main(["compile", "--target", "h100", "--quantization", "int8", "--buckets", "smallest",
               "--max-model-len", "1024", "--max-num-seqs", "8", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"] and report["quantization"] == "int8" and report["chips"] == 1
    assert report["buckets"][0]["ok"] and report["buckets"][0]["tokens"] == 2


QWEN3_30B_A3B = {  # bench/configs/qwen3-30b-a3b.json's per-layer shapes, 2 layers instead of 48
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 2, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "tie_word_embeddings": False, "eos_token_id": 151645,
}


def test_qwen3_moe_shaped_expert_parallel_on_v5e_8(tmp_path, quantization="int8"):
    """128 int8 experts (stacked QArrays) split 16 per chip over v5e x 8 with tensor-parallel attention; the
    batch-1 roofline reads only the 8 routed experts' share (8/128) of the expert bytes. (bf16 and the
    48-layer model: the README's table, from ``jaxinfer compile``.)"""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN3_30B_A3B))
    report = compile_for_target(str(path), "tpu-v5e-8", EngineConfig(**SMALL), quantization=quantization,
                                buckets="smallest")
    _check(report, chips=8, quantized=quantization is not None, moe=True)
    bpp = 2 if quantization is None else 1
    experts = 2 * 128 * 3 * 2048 * 768 * bpp / 8  # per chip, int8 scales not counted
    one = report.rooflines[0]
    assert report.weight_bytes_per_device > experts
    skipped = experts * (1 - 8 / 128)  # expert bytes a batch-1 step does not read (int8 scales: < 1% more)
    assert report.weight_bytes_per_device - 1.01 * skipped <= one.bytes_per_device
    assert one.bytes_per_device < report.weight_bytes_per_device - skipped + 64 * 2**20  # + KV read at 1k tokens
