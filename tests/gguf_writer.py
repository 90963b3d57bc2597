"""Write a tiny HF Llama model as a llama-architecture GGUF file (llama.cpp tensor names and q/k row
order), for GGUF loader tests without a real converted checkpoint."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def _llama_cpp_row_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter stores q/k rows with each head's two RoPE halves interleaved."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(hf_model, path: Path, qtype=gguf.GGMLQuantizationType.F32, raw_override=None) -> Path:
    """Write ``hf_model`` (a torch ``LlamaForCausalLM``) to ``path``.

    ``qtype`` applies to 2-D weights (norms stay F32). ``raw_override`` maps a GGUF tensor name to a
    ``(GGMLQuantizationType, raw bytes array)`` written as is (e.g. an unsupported type).
    """
    cfg = hf_model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_eos_token_id(cfg.eos_token_id)

    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"],
               "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        for g, h in names.items():
            t = sd[f"model.layers.{i}.{h}.weight"]
            if g == "attn_q":
                t = _llama_cpp_row_order(t, cfg.num_attention_heads)
            elif g == "attn_k":
                t = _llama_cpp_row_order(t, cfg.num_key_value_heads)
            tensors[f"blk.{i}.{g}.weight"] = t
    for name, t in tensors.items():
        if raw_override and name in raw_override:
            rtype, raw = raw_override[name]  # raw: uint8 [rows, bytes per row]
            w.add_tensor(name, raw, raw_dtype=rtype)
        elif t.ndim == 2 and qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, t.astype(np.float16))
        elif t.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
