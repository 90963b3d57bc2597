"""Checks of a loaded model against its HF transformers twin, shared by the dense and MoE model tests.

Tolerance: |logits - hf| <= RTOL * max|hf logits| (both float32; differences come from summation order).
"""

import numpy as np
import torch

from tests.models.dense_steps import decode_one, ragged_prefill

RTOL = 1e-4


def hf_logits(hf, ids: list[int]) -> np.ndarray:
    """HF's logits ``[len(ids), V]`` for one unbatched sequence."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """Exactly ``n`` greedy tokens from ``hf.generate`` (EOS ignored)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_ragged_prefill_vs_hf(m, hf, label: str, kernels=None) -> None:
    """One ragged prefill of three sequences (21 tokens: longer than the tiny models' sliding window of 8)
    equals HF's per-sequence logits (``kernels``: a :class:`jaxinfer.target.Kernels` to run the forward with)."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 300, size=n).tolist() for n in (21, 7, 1)]
    ours, _ = ragged_prefill(m.model, m.params, seqs, kernels=kernels)
    for ids, got in zip(seqs, ours):
        ref = hf_logits(hf, ids)
        np.testing.assert_allclose(got, ref, atol=RTOL * np.abs(ref).max(), rtol=0, err_msg=label)


def check_incremental_decode_vs_full(m, label: str) -> None:
    """Decoding one token at a time from a 5-token cached prefix equals the full forward's logits."""
    rng = np.random.default_rng(1)
    seqs = [rng.integers(3, 300, size=n).tolist() for n in (17, 12)]
    full, _ = ragged_prefill(m.model, m.params, seqs)
    prefix = 5
    _, caches = ragged_prefill(m.model, m.params, [s[:prefix] for s in seqs])
    for p in range(prefix, 12):
        logits, caches = decode_one(m.model, m.params, caches, [s[p] for s in seqs], [p, p])
        for i in range(2):
            scale = np.abs(full[i][p]).max()
            np.testing.assert_allclose(logits[i], full[i][p], atol=RTOL * scale, rtol=0, err_msg=f"{label} pos {p}")
