"""Quantized checkpoints: round trip into shardings, manifest content, LLM(dir), CLI end to end."""

import json

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import NamedSharding

from jaxinfer import LLM, SamplingParams
from jaxinfer.errors import QuantizationError, WeightLoadError
from jaxinfer.loader import load_model
from jaxinfer.model_registry import resolve_model
from jaxinfer.models.qembedding import QEmbedding
from jaxinfer.quantized_checkpoint import MANIFEST, load_quantized, save_quantized
from pallas_kernels.quantized_matmul.qarray import QArray
from quantize.model_quant import count_quantized, quantize_model
from tests.models.dense_steps import ragged_prefill

SEQS = [[1, 5, 9, 33, 150, 7, 2, 64], [1, 300, 12]]


def _logits(model, params):
    return np.concatenate(ragged_prefill(model, params, SEQS)[0])


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """A tied-embedding tiny model, int4-asym RTN with the head quantized (QEmbedding), saved."""
    path, _ = tiny_model_dir("llama_mha_tied")
    m = load_model(str(path))
    q = quantize_model(m.model, m.params, "rtn", "int4-asym", quantize_head=True, keep=("layers_1/mlp/down_proj",),
                       progress=False)
    out = tmp_path_factory.mktemp("ckpt") / "q"
    save_quantized(out, m.model, q.params, info=q.info, source_model=str(path), tokenizer=m.tokenizer)
    return m, q, out


def test_round_trip_identical_logits_and_shardings(saved):
    m, q, out = saved
    model, params, manifest = load_quantized(out)
    assert model.config == m.config
    want, got = _logits(m.model, q.params), _logits(model, params)
    np.testing.assert_array_equal(got, want)  # same arrays, same program: bit-identical
    flat = flatten_dict(params)
    assert count_quantized(params) == count_quantized(q.params) == 14
    assert isinstance(params["embed_tokens"], QEmbedding)
    assert not isinstance(params["layers_1"]["mlp"]["down_proj"]["kernel"], QArray)
    for leaf in jax.tree.leaves(flat):
        assert isinstance(leaf.sharding, NamedSharding)  # restored straight into a mesh sharding
    qa, qa0 = params["layers_0"]["self_attn"]["q_proj"]["kernel"], q.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert qa.config == qa0.config and qa.offset is not None
    np.testing.assert_array_equal(np.asarray(qa.value), np.asarray(qa0.value))


def test_manifest_content(saved):
    m, q, out = saved
    man = json.loads((out / MANIFEST).read_text())
    assert man["format_version"] == 2 and man["jaxinfer_version"]
    assert man["method"] == "rtn" and man["format"] == "int4-g128-asym"
    assert man["group_size"] == 128 and man["source_model"].endswith("llama_mha_tied")
    assert man["model_config"]["num_layers"] == m.config.num_layers
    assert man["leaves"]["embed_tokens"]["kind"] == "qembedding"
    assert man["leaves"]["layers_0/self_attn/q_proj/kernel"]["config"]["symmetric"] is False
    # K = 64 is not a multiple of 128: the largest group size dividing it (64) is used and recorded
    assert man["leaves"]["layers_0/self_attn/q_proj/kernel"]["config"]["group_size"] == 64
    assert set(man["quantization"]["group_size_fallbacks"].values()) == {64}
    assert man["quantization"]["kept_float"] == ["layers_1/mlp/down_proj"]
    assert man["quantization"]["bytes"]["total_bytes"] < man["quantization"]["bytes"]["num_params"] * 4


def test_llm_and_registry_load_the_directory(saved):
    m, q, out = saved
    assert resolve_model(str(out)).kind == "quantized"
    llm = LLM(str(out))
    assert isinstance(llm.loaded.params["embed_tokens"], QEmbedding)
    res = llm.generate([SEQS[0]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    want = _logits(m.model, q.params)[len(SEQS[0]) - 1].argmax()
    assert res.outputs[0].token_ids[0] == int(want)
    assert len(res.outputs[0].token_ids) == 5
    with pytest.raises(WeightLoadError, match="already holds"):
        save_quantized(out, m.model, q.params)
    with pytest.raises(QuantizationError, match="GGUF"):
        load_model(str(out), quantization="gguf")


def test_cli_quantize_then_eval_ppl(tiny_model_dir, tmp_path, capsys):
    from jaxinfer.cli import main
    from tests.quantize.text_data import generated_text

    path, _ = tiny_model_dir("qwen3")
    text = tmp_path / "t.txt"
    text.write_text(generated_text(400))
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(path), "--method", "gptq", "--bits", "4", "--group-size", "32",
               "--calib-text", str(text), "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(out)])
    assert rc == 0 and (out / MANIFEST).is_file()
    assert "gptq int4-g32" in capsys.readouterr().err
    res_json = tmp_path / "r.json"
    rc = main(["eval-ppl", "--model", str(path), "--quantized", str(out), "--text", str(text), "--seq-len", "64",
               "--max-tokens", "640", "--json", str(res_json)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ppl" in printed and str(out)[-30:] in printed
    data = json.loads(res_json.read_text())
    r = data["results"]
    assert r["float"]["kl"] == 0.0 and r[str(out)]["kl"] > 0.0
    assert r[str(out)]["num_tokens"] == r["float"]["num_tokens"] == 10 * 63
    assert r[str(out)]["bytes"] < r["float"]["bytes"]
    assert main(["quantize", "--model", str(path), "--method", "awq", "--out", str(tmp_path / "x")]) == 2


def test_format_version_1_orbax_checkpoint_still_loads(saved, tmp_path):
    """Checkpoints written before format version 2 (the storage tree as an orbax checkpoint) load as before."""
    import orbax.checkpoint as ocp
    from flax.traverse_util import unflatten_dict

    from jaxinfer.quantized_checkpoint import _storage

    m, q, out = saved
    old = tmp_path / "v1"
    old.mkdir()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(old / "params", unflatten_dict(_storage(q.params)[0]))
    ckptr.wait_until_finished()
    man = json.loads((out / MANIFEST).read_text())
    (old / MANIFEST).write_text(json.dumps({**man, "format_version": 1}))
    model, params, _ = load_quantized(old)
    np.testing.assert_array_equal(_logits(model, params), _logits(m.model, q.params))
    (old / MANIFEST).write_text(json.dumps({**man, "format_version": 3}))
    with pytest.raises(WeightLoadError, match="format_version 3"):
        load_quantized(old)
