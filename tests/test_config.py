"""ModelConfig parsing and RoPE frequencies against transformers' own implementations."""

import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxinfer.errors import UnsupportedModelError
from jaxinfer.model_config import ModelConfig

LLAMA = dict(vocab_size=100, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
])
def test_scaled_rope_inv_freq_matches_transformers(rope):
    hf = transformers.LlamaConfig(**LLAMA, rope_parameters=rope)
    ref, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, device="cpu")
    ours = ModelConfig.from_hf(hf).inv_freq()
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)


def test_default_rope_inv_freq():
    c = ModelConfig.from_hf(transformers.LlamaConfig(**LLAMA, rope_theta=10000.0))
    d = c.head_dim
    np.testing.assert_allclose(c.inv_freq(), 10000.0 ** (-np.arange(0, d, 2) / d), rtol=1e-6)


def test_legacy_rope_scaling_dict():
    raw = {"architectures": ["LlamaForCausalLM"], **LLAMA, "rope_theta": 500000.0,
           "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    c = ModelConfig.from_hf(raw)
    assert c.rope_theta == 500000.0 and c.rope_scaling.rope_type == "llama3" and c.rope_scaling.factor == 8.0


def test_architecture_flags():
    q2 = ModelConfig.from_hf({"architectures": ["Qwen2ForCausalLM"], **LLAMA})
    assert q2.attention_bias and not q2.qk_norm and q2.sliding_window is None
    q3 = ModelConfig.from_hf({"architectures": ["Qwen3ForCausalLM"], **LLAMA, "head_dim": 128})
    assert q3.qk_norm and q3.head_dim == 128 and not q3.attention_bias
    mi = ModelConfig.from_hf({"architectures": ["MistralForCausalLM"], **LLAMA, "sliding_window": 4096})
    assert mi.sliding_window == 4096
    mi_full = ModelConfig.from_hf({"architectures": ["MistralForCausalLM"], **LLAMA, "sliding_window": None})
    assert mi_full.sliding_window is None


def test_qwen_sliding_window_rules():
    base = {"architectures": ["Qwen2ForCausalLM"], **LLAMA, "sliding_window": 1024}
    assert ModelConfig.from_hf({**base, "use_sliding_window": False}).sliding_window is None
    assert ModelConfig.from_hf({**base, "use_sliding_window": True, "max_window_layers": 0}).sliding_window == 1024
    assert ModelConfig.from_hf({**base, "use_sliding_window": True, "max_window_layers": 2}).sliding_window is None
    with pytest.raises(UnsupportedModelError, match="mixed"):
        ModelConfig.from_hf({**base, "use_sliding_window": True, "max_window_layers": 1})


def test_invalid_head_counts():
    with pytest.raises(UnsupportedModelError, match="multiple"):
        ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], **LLAMA, "num_key_value_heads": 3})
