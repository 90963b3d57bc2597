"""The paged KV cache behind the model's forward equals the dense cache path (the foundation's).

Pages are assigned in a shuffled, non-contiguous order, with a small page size so sequences cross
page boundaries. Tolerance: 2e-5 x max |logit| (float32; the paged path uses an online softmax).
"""

import jax
import numpy as np
import pytest

from jaxinfer.attention import AttentionMetadata
from jaxinfer.kv_cache import KVCacheSpec, init_kv_cache
from jaxinfer.loader import load_model
from pallas_kernels.ragged_paged_attention.pages import KVLayout
from tests.models.dense_steps import decode_one, jitted_forward, ragged_prefill
from tests.tiny_models import ARCHS

PAGE = 4


class PagedSeqs:
    """Page tables for a few sequences over a shuffled pool of pages."""

    def __init__(self, model, num_seqs, max_len=64, seed=0):
        c = model.config
        self.model = model
        self.pages_per_seq = max_len // PAGE
        pool = np.random.default_rng(seed).permutation(num_seqs * self.pages_per_seq + 3)
        self.tables = pool[: num_seqs * self.pages_per_seq].reshape(num_seqs, self.pages_per_seq).astype(np.int32)
        spec = KVCacheSpec(c.num_layers, len(pool), PAGE, c.num_kv_heads, c.head_dim, model.dtype, None,
                           KVLayout.TOKEN_MAJOR)
        self.caches = init_kv_cache(spec)
        self.lens = np.zeros(num_seqs, np.int32)

    def step(self, params, chunks):
        """Run one ragged step: ``chunks[i]`` new tokens for sequence i. Returns logits per sequence."""
        s = len(chunks)
        q = np.array([len(x) for x in chunks], np.int32)
        cu = np.concatenate([[0], np.cumsum(q)]).astype(np.int32)
        t = int(cu[-1]) + 2
        tokens, pos, slots = np.zeros(t, np.int32), np.zeros(t, np.int32), np.full(t, -1, np.int32)
        for i, x in enumerate(chunks):
            p = self.lens[i] + np.arange(len(x))
            tokens[cu[i]:cu[i + 1]] = x
            pos[cu[i]:cu[i + 1]] = p
            slots[cu[i]:cu[i + 1]] = self.tables[i, p // PAGE] * PAGE + p % PAGE
        self.lens = self.lens + q
        md = AttentionMetadata(cu, self.lens.copy(), np.array([s], np.int32), slots, self.tables, impl="xla")
        logits, self.caches = jitted_forward(self.model)(params, tokens, pos, self.caches, md)
        logits = np.asarray(logits)
        return [logits[cu[i]:cu[i + 1]] for i in range(s)]


def _close(a, b, msg=""):
    np.testing.assert_allclose(a, b, atol=2e-5 * np.abs(b).max(), rtol=0, err_msg=msg)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_paged_prefill_and_decode_equal_dense(tiny_model_dir, arch):
    path, _ = tiny_model_dir(arch)
    m = load_model(str(path), load_tokenizer_too=False)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(3, 300, size=n).tolist() for n in (13, 8, 1)]  # ends mid-page, on a page, 1 token
    dense, dcache = ragged_prefill(m.model, m.params, seqs)
    paged = PagedSeqs(m.model, len(seqs))
    # chunked: the first 5 tokens of each, then the rest, as two ragged steps
    first = paged.step(m.params, [s[:5] for s in seqs])
    rest = paged.step(m.params, [s[5:] if len(s) > 5 else [s[-1]] for s in seqs[:2]] + [[7]])
    for i in range(2):
        _close(np.concatenate([first[i], rest[i]]), dense[i], f"{arch} seq {i}")
    _close(first[2], dense[2], f"{arch} seq 2")
    # decode 6 tokens on the first two sequences, both paths
    dcache_lens = [len(s) for s in seqs[:2]]
    for step in range(6):
        toks = [17 + step, 99 - step]
        got = paged.step(m.params, [[t] for t in toks] + [[5]])
        ref, dcache = decode_one(m.model, m.params, dcache, toks + [0], dcache_lens + [0])
        for i in range(2):
            _close(got[i][0], ref[i], f"{arch} decode {step} seq {i}")
        dcache_lens = [n + 1 for n in dcache_lens]


def test_paged_equals_dense_on_default_model(default_llm):
    model, params = default_llm.loaded.model, default_llm.loaded.params
    tok = default_llm.tokenizer
    seqs = [tok("The Eiffel Tower is located in")["input_ids"], tok("1, 2, 3, 4,")["input_ids"]]
    dense, _ = ragged_prefill(model, params, seqs)
    paged = PagedSeqs(model, len(seqs), max_len=64, seed=1)
    got = paged.step(params, seqs)
    for i in range(2):
        _close(got[i], dense[i], f"seq {i}")
    jax.clear_caches()
