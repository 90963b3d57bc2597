"""The embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1) against HF transformers loading the
same GGUF file (transformers dequantizes it independently with its own GGUF reader).

Tolerance: |logits - hf| <= 2e-4 * max|hf logits| (float32 both; 30 layers of summation-order noise).
"""

import numpy as np
import pytest
import torch

from jaxinfer import SamplingParams
from jaxinfer.tokenizer import encode_chat
from tests.models.dense_steps import ragged_prefill

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
]


@pytest.fixture(scope="module")
def hf_gguf(default_llm):
    from transformers import AutoModelForCausalLM

    path = default_llm.loaded.source.path
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def test_default_model_config(default_llm, hf_gguf):
    c = default_llm.config
    hc = hf_gguf.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        hc.num_hidden_layers, hc.hidden_size, hc.num_attention_heads, hc.num_key_value_heads, hc.head_dim)
    assert c.tie_word_embeddings and c.vocab_size == hc.vocab_size
    assert c.num_params() == sum(p.numel() for p in hf_gguf.parameters())


def test_default_model_logits_match_transformers(default_llm, hf_gguf):
    tok = default_llm.tokenizer
    seqs = [tok(p)["input_ids"] for p in PROMPTS]
    ours, _ = ragged_prefill(default_llm.loaded.model, default_llm.loaded.params, seqs, max_len=64)
    for ids, got in zip(seqs, ours):
        with torch.no_grad():
            ref = hf_gguf(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max(), rtol=0)
        assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_default_model_greedy_tokens_match_transformers(default_llm, hf_gguf):
    ids = encode_chat(default_llm.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    out = default_llm.generate([ids], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    with torch.no_grad():
        ref = hf_gguf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               do_sample=False, max_new_tokens=32, min_new_tokens=32, eos_token_id=None,
                               pad_token_id=2)
    assert out.outputs[0].token_ids == ref[0, len(ids):].tolist()


def test_chat_answers_sensibly(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0, max_tokens=48))[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # <|im_end|> ends the turn
    assert out.outputs[0].token_ids[-1] == 2


def test_cli_generate_prints_answer_and_speed(capsys):
    from jaxinfer.cli import main

    assert main(["generate", "What is the capital of France?", "--max-tokens", "32"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "tok/s" in captured.err
