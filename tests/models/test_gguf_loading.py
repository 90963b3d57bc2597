"""GGUF loading on tiny Llama models written in llama.cpp's layout, against HF transformers.

F32 files must reproduce the HF logits to 1e-4 (relative to max |logit|); F16 / Q8_0 files must equal
HF run on weights dequantized by the ``gguf`` package (same tolerance), which checks the tensor mapping
and the undoing of llama.cpp's q/k row permutation for GQA and MHA.
"""

import gguf
import numpy as np
import pytest
import torch

from jaxinfer.loader import load_model
from tests.gguf_writer import write_llama_gguf
from tests.models.dense_steps import ragged_prefill


def _dequantized_copy(hf, qtype):
    """HF model whose 2-D weights went through ``qtype`` quantization and back."""
    import copy

    m = copy.deepcopy(hf)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                q = gguf.quants.quantize(p.numpy().astype(np.float32), qtype)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, qtype).reshape(p.shape)))
    return m


@pytest.mark.parametrize("arch,qtype", [
    ("llama", gguf.GGMLQuantizationType.F32),
    ("llama_mha_tied", gguf.GGMLQuantizationType.F16),
    ("llama", gguf.GGMLQuantizationType.Q8_0),
])
def test_gguf_matches_hf(tiny_model_dir, tmp_path, arch, qtype):
    _, hf = tiny_model_dir(arch)
    path = write_llama_gguf(hf, tmp_path / "m.gguf", qtype)
    m = load_model(str(path), load_tokenizer_too=False)
    assert m.config.tie_word_embeddings == hf.config.tie_word_embeddings
    ref_model = hf if qtype == gguf.GGMLQuantizationType.F32 else _dequantized_copy(hf, qtype)
    seqs = [[1, 5, 9, 33, 150, 7, 2, 64, 64, 11], [1, 300, 12]]
    ours, _ = ragged_prefill(m.model, m.params, seqs)
    for ids, got in zip(seqs, ours):
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
