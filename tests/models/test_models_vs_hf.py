"""Every supported architecture against HF transformers (PyTorch, float32) on tiny random models.

Tolerance: |logits - hf| <= 1e-4 * max|hf logits| (both float32; differences come from summation order).
"""

import numpy as np
import pytest
import torch

from jaxinfer.loader import load_model
from jaxinfer.sampling_params import SamplingParams
from tests.models.dense_steps import decode_one, ragged_prefill
from tests.tiny_models import ARCHS

RTOL = 1e-4


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_model(request, tiny_model_dir):
    path, hf = tiny_model_dir(request.param)
    return request.param, load_model(str(path)), hf


def test_logits_match_hf_on_ragged_batch(arch_model):
    arch, m, hf = arch_model
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 300, size=n).tolist() for n in (21, 7, 1)]  # > sliding window (8) for mistral
    ours, _ = ragged_prefill(m.model, m.params, seqs)
    for ids, got in zip(seqs, ours):
        ref = _hf_logits(hf, ids)
        scale = np.abs(ref).max()
        np.testing.assert_allclose(got, ref, atol=RTOL * scale, rtol=0, err_msg=arch)


def test_incremental_decode_equals_full_forward(arch_model):
    arch, m, _ = arch_model
    rng = np.random.default_rng(1)
    seqs = [rng.integers(3, 300, size=n).tolist() for n in (17, 12)]
    full, _ = ragged_prefill(m.model, m.params, seqs)
    prefix = 5
    _, caches = ragged_prefill(m.model, m.params, [s[:prefix] for s in seqs])
    for p in range(prefix, 12):
        logits, caches = decode_one(m.model, m.params, caches, [s[p] for s in seqs], [p, p])
        for i in range(2):
            scale = np.abs(full[i][p]).max()
            np.testing.assert_allclose(logits[i], full[i][p], atol=RTOL * scale, rtol=0,
                                       err_msg=f"{arch} pos {p}")


def test_greedy_generation_equals_hf_generate(arch_model, tiny_model_dir):
    from jaxinfer import LLM

    arch, _, hf = arch_model
    path, _ = tiny_model_dir(arch)
    llm = LLM(str(path))
    prompts = [[1, 17, 42, 99, 7], [1, 250, 3, 8, 64, 120, 77, 5, 9]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            mask = torch.ones(1, len(prompt), dtype=torch.long)
            ref = hf.generate(torch.tensor([prompt]), attention_mask=mask, do_sample=False, max_new_tokens=32,
                              min_new_tokens=32, eos_token_id=None, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist(), arch
        assert out.outputs[0].finish_reason == "length"
