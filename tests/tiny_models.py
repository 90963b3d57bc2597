"""Tiny random HF models (one per supported architecture) saved to disk for tests.

Each model gets a real byte-level BPE tokenizer trained here on a few sentences (no hub access).
Weights use a larger init so next-token distributions are peaked (greedy comparisons are then not
decided by float noise between near-ties).
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320

_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "JAX and Pallas compile programs for TPUs and GPUs.",
    "Once upon a time there was a small language model that liked to count: 1, 2, 3, 4, 5.",
]

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.25, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_mha_tied": ("LlamaConfig", "LlamaForCausalLM",
                       {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM",
                    {"num_key_value_heads": 1, "rope_theta": 500000.0,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8, "head_dim": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "use_sliding_window": False}),
}

# Mixture-of-experts models (tests/models/test_moe.py): few, narrow experts; every routing feature once:
# Qwen3-MoE with normalised top-3 of 8 and a dense layer (mlp_only_layers), Mixtral top-2 of 4 with a
# sliding window, Qwen2-MoE with un-normalised top-2 of 8, its gated shared expert, qkv bias and
# decoder_sparse_step 2 (layer 0 dense).
MOE_ARCHS = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"head_dim": 32, "num_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 32,
                   "norm_topk_prob": True, "mlp_only_layers": [1], "use_sliding_window": False}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64, "sliding_window": 8,
                 "head_dim": 16}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 64, "norm_topk_prob": False, "decoder_sparse_step": 2,
                   "use_sliding_window": False}),
}


def train_tokenizer(path: Path):
    """A byte-level BPE tokenizer with ``<unk>``, ``<s>``, ``</s>`` at ids 0, 1, 2 and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    fast.save_pretrained(str(path))
    return fast


def make_tiny_model(arch: str, path: Path, seed: int = 0, *, perturb: float = 0.0, perturb_seed: int = 1,
                    **overrides):
    """Create, save (safetensors + tokenizer) and return the torch model of ``arch``.

    ``perturb`` adds Gaussian noise of that relative scale to every weight (drawn with ``perturb_seed``):
    a model close to the unperturbed one (e.g. a speculative draft that agrees only partly);
    ``overrides`` replace config fields (e.g. ``vocab_size``).
    """
    import transformers

    cfg_name, model_name, extra = {**ARCHS, **MOE_ARCHS}[arch]
    cfg = getattr(transformers, cfg_name)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).to(torch.float32).eval()
    with torch.no_grad():  # biases / norms are zero / one at init: randomise so they matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        if perturb:
            gen = torch.Generator().manual_seed(perturb_seed)
            for p in model.parameters():
                p.add_(perturb * p.std() * torch.randn(p.shape, generator=gen))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    train_tokenizer(path)
    return model
