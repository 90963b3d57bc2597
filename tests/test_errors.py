"""Bad input gives a clear, typed error naming the problem (and never a crash or an assert)."""

import json
import shutil

import gguf
import numpy as np
import pytest

from jaxinfer import LLM, SamplingParams
from jaxinfer.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    PromptTooLongError,
    UnsupportedModelError,
    WeightLoadError,
)
from jaxinfer.loader import load_model
from tests.gguf_writer import write_llama_gguf


def test_unknown_model_name_lists_known_ones():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        load_model("no-such-model")


def test_unreachable_hub_id_names_the_id():
    # No hub access here (and the id does not exist): either way one clear error naming the id.
    with pytest.raises(ModelNotFoundError, match="jaxinfer-tests/no-such-model"):
        load_model("jaxinfer-tests/no-such-model")


def test_unsupported_architecture(tiny_model_dir, tmp_path):
    src, _ = tiny_model_dir("llama")
    dst = tmp_path / "gpt2"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_model(str(dst))


def test_unsupported_rope_scaling(tiny_model_dir, tmp_path):
    src, _ = tiny_model_dir("llama")
    dst = tmp_path / "yarn"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        load_model(str(dst))


def test_mismatched_shapes_name_the_tensor(tiny_model_dir, tmp_path):
    src, _ = tiny_model_dir("llama")
    dst = tmp_path / "bad_shapes"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["intermediate_size"] = 96  # weights were saved with 128
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError, match=r"mlp\.(gate|up|down)_proj\.weight.*\(128"):
        load_model(str(dst))


def test_truncated_safetensors(tiny_model_dir, tmp_path):
    src, _ = tiny_model_dir("llama")
    dst = tmp_path / "truncated"
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightLoadError, match="truncated"):
        load_model(str(dst))


def test_garbage_safetensors(tiny_model_dir, tmp_path):
    src, _ = tiny_model_dir("llama")
    dst = tmp_path / "garbage"
    shutil.copytree(src, dst)
    (dst / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(WeightLoadError, match="not a valid safetensors"):
        load_model(str(dst))


def test_truncated_gguf(tiny_model_dir, tmp_path):
    _, hf = tiny_model_dir("llama")
    path = write_llama_gguf(hf, tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightLoadError, match="truncated|corrupted"):
        load_model(str(path), load_tokenizer_too=False)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a model")
    with pytest.raises(ModelNotFoundError, match="not a GGUF file"):
        load_model(str(path))


def test_unsupported_gguf_tensor_type(tiny_model_dir, tmp_path):
    _, hf = tiny_model_dir("llama")
    q5 = gguf.GGMLQuantizationType.Q5_0
    block, size = gguf.GGML_QUANT_SIZES[q5]
    raw = np.zeros((64, 128 // block * size), np.uint8)  # ffn_down of layer 0: [64 rows, 128 cols]
    path = write_llama_gguf(hf, tmp_path / "q5.gguf", raw_override={"blk.0.ffn_down.weight": (q5, raw)})
    with pytest.raises(UnsupportedModelError, match="Q5_0"):
        load_model(str(path), load_tokenizer_too=False)


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    path, _ = tiny_model_dir("llama")
    return LLM(str(path), max_model_len=64)


def test_prompt_longer_than_context(tiny_llm):
    with pytest.raises(PromptTooLongError, match="64"):
        tiny_llm.generate([[5] * 65])
    with pytest.raises(PromptTooLongError):
        tiny_llm.chat([{"role": "user", "content": "hello " * 100}])


@pytest.mark.parametrize("prompt", ["", [], [5, -1], [5, 10_000], [1.5], None])
def test_bad_prompts(tiny_llm, prompt):
    with pytest.raises(InvalidRequestError) as e:
        tiny_llm.generate([prompt])
    assert e.value.param == "prompt"


@pytest.mark.parametrize("messages", [[], [{"role": "user"}], [{"content": "x"}], ["hi"]])
def test_bad_messages(tiny_llm, messages):
    with pytest.raises(InvalidRequestError) as e:
        tiny_llm.chat([messages] if messages else messages)
    assert e.value.param == "messages"


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"seed": "abc"}, "seed"),
    ({"stop": [1, 2]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"logprobs": 100}, "logprobs"),
])
def test_bad_sampling_params(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_bad_llm_arguments(tiny_model_dir):
    path, _ = tiny_model_dir("llama")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(path), max_model_len=10_000)
    with pytest.raises(ValueError, match="dtype"):
        LLM(str(path), dtype="float7")
