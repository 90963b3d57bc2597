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


GGUF_MOE_ARCH = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}


def write_moe_gguf(hf_model, path: Path) -> Path:
    """Write a tiny HF Mixtral / Qwen3-MoE / Qwen2-MoE model as llama.cpp's converter does (F32): experts
    stacked into ``ffn_{gate,up,down}_exps`` (numpy ``[E, out, in]``), router ``ffn_gate_inp``, shared expert
    ``ffn_*_shexp`` and ``ffn_gate_inp_shexp``; q/k rows permuted only for the llama architecture (Mixtral).
    Every layer must be a MoE layer (llama.cpp's layout has no dense layers for these architectures)."""
    cfg = hf_model.config
    kind = cfg.model_type
    arch = GGUF_MOE_ARCH[kind]
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_expert_count(cfg.num_local_experts if kind == "mixtral" else cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if kind == "mixtral":
        w.add_feed_forward_length(cfg.intermediate_size)
    else:
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if kind == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if cfg.eos_token_id is not None:
        w.add_eos_token_id(cfg.eos_token_id)
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
               "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        hf, b = f"model.layers.{i}", f"blk.{i}"
        tensors[f"{b}.attn_norm.weight"] = sd[f"{hf}.input_layernorm.weight"]
        tensors[f"{b}.ffn_norm.weight"] = sd[f"{hf}.post_attention_layernorm.weight"]
        for g, h in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("output", "o_proj")):
            t = sd[f"{hf}.self_attn.{h}.weight"]
            if kind == "mixtral" and g in ("q", "k"):
                t = _llama_cpp_row_order(t, cfg.num_attention_heads if g == "q" else cfg.num_key_value_heads)
            tensors[f"{b}.attn_{g}.weight"] = t
            if f"{hf}.self_attn.{h}.bias" in sd:
                tensors[f"{b}.attn_{g}.bias"] = sd[f"{hf}.self_attn.{h}.bias"]
        if kind == "qwen3_moe":
            tensors[f"{b}.attn_q_norm.weight"] = sd[f"{hf}.self_attn.q_norm.weight"]
            tensors[f"{b}.attn_k_norm.weight"] = sd[f"{hf}.self_attn.k_norm.weight"]
        gate_up, down = sd[f"{hf}.mlp.experts.gate_up_proj"], sd[f"{hf}.mlp.experts.down_proj"]  # [E, 2I, H], [E, H, I]
        inter = gate_up.shape[1] // 2
        tensors[f"{b}.ffn_gate_inp.weight"] = sd[f"{hf}.mlp.gate.weight"]
        tensors[f"{b}.ffn_gate_exps.weight"] = np.ascontiguousarray(gate_up[:, :inter])
        tensors[f"{b}.ffn_up_exps.weight"] = np.ascontiguousarray(gate_up[:, inter:])
        tensors[f"{b}.ffn_down_exps.weight"] = down
        if kind == "qwen2_moe":
            for g in ("gate", "up", "down"):
                tensors[f"{b}.ffn_{g}_shexp.weight"] = sd[f"{hf}.mlp.shared_expert.{g}_proj.weight"]
            tensors[f"{b}.ffn_gate_inp_shexp.weight"] = sd[f"{hf}.mlp.shared_expert_gate.weight"].reshape(-1)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
