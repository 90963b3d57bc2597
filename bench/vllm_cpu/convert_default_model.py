"""Writes a GGUF model as a Hugging Face directory vLLM can load (vLLM's CPU build does not read GGUF).

Run with the vLLM environment's python (it has transformers + torch):
``.venv-vllm/bin/python bench/vllm_cpu/convert_default_model.py GGUF_PATH OUT_DIR``.
transformers dequantizes the GGUF tensors (Q4_1 -> float32); the model is saved in float32 with its tokenizer,
so vLLM sees the same weights jaxinfer and HF transformers run.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
    if (out / "config.json").exists():
        print(f"{out} exists")
        return
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model is marked quantized and refuses save_pretrained: build a plain model of the same
    # architecture from its config (without the quantization entry) and copy the dequantized weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
