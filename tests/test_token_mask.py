"""The structured-output token mask in the batched sampler, against numpy references: the packed bitmask
unpacks to the right tokens, masking comes before temperature / top-k / top-p (so the sampled distribution
is the model's renormalised over allowed tokens), unconstrained rows are untouched, and one compiled
sampler serves any mix of constrained and unconstrained rows."""

import jax
import numpy as np
from scipy import stats

from jaxinfer.grammar_matcher import mask_words
from jaxinfer.sampling import SamplingTensors, apply_token_mask, sample
from jaxinfer.sampling_params import SamplingParams

V = 70  # not a multiple of 32: the last word is partly padding


def _pack(allowed: np.ndarray) -> np.ndarray:
    """numpy reference packing: bool[V] -> i32[W], bit t % 32 of word t // 32."""
    words = np.zeros(mask_words(len(allowed)), np.uint32)
    for t in np.flatnonzero(allowed):
        words[t // 32] |= np.uint32(1) << np.uint32(t % 32)
    return words.view(np.int32)


def _tensors(params, allowed_rows, seeds=None, steps=None):
    n = len(params)
    masks = [None if a is None else _pack(a) for a in allowed_rows]
    return SamplingTensors.build(params, seeds=seeds or [0] * n, steps=steps or [0] * n, num_rows=n, masks=masks)


def test_apply_token_mask_unpacks_every_bit():
    rng = np.random.default_rng(0)
    allowed = rng.random((4, V)) < 0.3
    allowed[:, 31] = allowed[:, 32] = allowed[:, 63] = True  # word edges, sign bit
    x = rng.normal(size=(4, V)).astype(np.float32)
    out = np.asarray(apply_token_mask(x, np.stack([_pack(a) for a in allowed])))
    np.testing.assert_array_equal(np.isfinite(out), allowed)
    np.testing.assert_array_equal(out[allowed], x[allowed])


def test_mask_before_filters_and_unconstrained_rows_untouched():
    """Row 0: greedy over allowed tokens. Row 1: top_k=1 after the mask = best allowed token (top-k before
    the mask would keep only a forbidden token). Row 2: unconstrained, greedy = global argmax."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, V)).astype(np.float32)
    allowed = rng.random((2, V)) < 0.2
    for row in range(2):
        allowed[row, np.argmax(logits[row])] = False  # the global best is forbidden
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1, seed=3),
              SamplingParams(temperature=0)]
    out = jax.jit(sample)(logits, _tensors(params, [allowed[0], allowed[1], None]))
    expect = [int(np.argmax(np.where(allowed[r], logits[r], -np.inf))) for r in range(2)] + [int(np.argmax(logits[2]))]
    assert np.asarray(out.tokens).tolist() == expect
    # log-probabilities stay those of the raw model distribution
    raw = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(out.logprobs), raw[np.arange(3), expect], atol=1e-5)


def test_sampled_distribution_is_renormalised_over_allowed_tokens():
    """Temperature 0.7 + top_p 0.9 over a mask: frequencies of 4000 seeded draws match the numpy
    distribution softmax(masked logits / T) cut to the top-p nucleus (chi-square)."""
    rng = np.random.default_rng(2)
    logits = (2 * rng.normal(size=V)).astype(np.float32)
    allowed = np.zeros(V, bool)
    allowed[rng.choice(V, 9, replace=False)] = True
    n = 4000
    sp = SamplingParams(temperature=0.7, top_p=0.9)
    st = _tensors([sp] * n, [allowed] * n, seeds=list(range(n)), steps=[5] * n)
    toks = np.asarray(jax.jit(sample)(np.tile(logits, (n, 1)), st).tokens)
    assert allowed[toks].all()
    x = np.where(allowed, logits.astype(np.float64) / 0.7, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros(V, bool)
    mass = 0.0
    for i in order:
        if mass >= 0.9:
            break
        keep[i] = True
        mass += p[i]
    q = np.where(keep, p, 0)
    q /= q.sum()
    support = np.flatnonzero(q)
    counts = np.bincount(toks, minlength=V)
    assert counts[~keep].sum() == 0
    _, pval = stats.chisquare(counts[support], q[support] * n)
    assert pval > 1e-3, (counts[support], q[support] * n)


def test_one_compiled_sampler_for_any_mix():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, V)).astype(np.float32)
    allowed = rng.random(V) < 0.5
    ones = np.full((2, mask_words(V)), -1, np.int32)
    run = jax.jit(sample)
    greedy = [SamplingParams(temperature=0)] * 2
    plain = SamplingTensors.build(greedy, seeds=[0, 0], steps=[0, 0], num_rows=2).replace(token_mask=ones)
    first = run(logits, plain)
    size = run._cache_size()
    mixed = run(logits, _tensors(greedy, [None, allowed]))
    assert run._cache_size() == size
    assert np.asarray(first.tokens).tolist() == np.argmax(logits, -1).tolist()
    assert int(mixed.tokens[1]) == int(np.argmax(np.where(allowed, logits[1], -np.inf)))
