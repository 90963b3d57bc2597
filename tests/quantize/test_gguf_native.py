"""Native GGUF import of the default model (Q4_1 linears, Q8_0 tied embedding kept quantized).

Exactness: every dequantized QArray / QEmbedding equals the float loader's tensor bit for bit (the
float loader dequantizes the same blocks with gguf-py, q/k rows unpermuted). Logits: the native model
equals the float-loaded model to 1e-5 of max |logit| (same weights; only the order of float operations
in the matmuls differs).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jaxinfer import LLM, SamplingParams
from jaxinfer.loader import load_model
from jaxinfer.models.qembedding import QEmbedding
from pallas_kernels.quantized_matmul.qarray import QArray
from tests.models.dense_steps import ragged_prefill


@pytest.fixture(scope="module")
def native():
    return load_model(None, quantization="gguf", load_tokenizer_too=False)


def test_native_leaves_equal_float_loader_exactly(default_llm, native):
    f, n = flatten_dict(default_llm.loaded.params), flatten_dict(native.params)
    assert f.keys() == n.keys()
    quantized = [p for p, v in n.items() if isinstance(v, (QArray, QEmbedding))]
    c = default_llm.config
    assert len(quantized) == 7 * c.num_layers + 1
    emb = n[("embed_tokens",)]
    assert isinstance(emb, QEmbedding) and emb.config.name == "int8-g32" and emb.shape == (c.vocab_size, c.hidden_size)
    q = n[("layers_0", "self_attn", "q_proj", "kernel")]
    assert q.config.name == "int4-g32-asym" and q.bytes_per_param == pytest.approx(0.625)
    for p in quantized:
        np.testing.assert_array_equal(np.asarray(n[p].dequantize(jnp.float32)), np.asarray(f[p]), err_msg=str(p))
    for p in set(n) - set(quantized):
        np.testing.assert_array_equal(np.asarray(n[p]), np.asarray(f[p]))


def test_native_logits_equal_float_logits(default_llm, native):
    tok = default_llm.tokenizer
    seqs = [tok("The capital of France is")["input_ids"], tok("def fibonacci(n):")["input_ids"]]
    want, _ = ragged_prefill(default_llm.loaded.model, default_llm.loaded.params, seqs)
    got, _ = ragged_prefill(native.model, native.params, seqs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)


def test_llm_with_native_gguf_generates_like_float(default_llm):
    llm = LLM(quantization="gguf")
    assert isinstance(llm.loaded.params["embed_tokens"], QEmbedding)
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    prompt = "The capital of France is"
    assert llm.generate(prompt, sp)[0].outputs[0].token_ids == default_llm.generate(prompt, sp)[0].outputs[0].token_ids
