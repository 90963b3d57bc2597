"""The rejection sampler on its own: with many seeded rows, emitted tokens follow the (warped) target
distribution computed in float64 numpy, for draft-model and point-mass (n-gram) drafts; a wrong residual
fails the same test; greedy and point-mass verification reproduce the ordinary sampler token for token."""

import jax
import numpy as np
import pytest
from scipy import stats

from jaxinfer.sampling import SamplingTensors, sample
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.speculative import rejection
from jaxinfer.speculative.draft import draft_sample
from jaxinfer.speculative.rejection import VerifyInputs
from tests.test_sampling import _allowed

V = 16
K = 2  # drafts per sequence; rows 0, 1 check drafts, row 2 is the bonus


def _probs(logits, sp):
    """float64 reference of the distribution ``sp`` samples from (temperature, min-p, top-k, top-p)."""
    if sp.temperature == 0:
        return np.eye(len(logits))[np.argmax(logits)]
    keep = _allowed(logits, sp)
    x = np.where(keep, np.asarray(logits, np.float64) / sp.temperature, -np.inf)
    p = np.exp(x - x.max())
    return p / p.sum()


def _chi2_pvalue(tokens, p):
    n = len(tokens)
    counts = np.bincount(tokens, minlength=len(p)).astype(np.float64)
    exp = p * n
    assert counts[exp == 0].sum() == 0, "emitted a token outside the target's support"
    big = exp >= 5  # pool rare categories
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(exp[big], exp[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs, exp).pvalue


def _verify(target_logits, sp, n, drafts=None, q=None, seed0=0):
    """``n`` sequences, each verifying ``K`` drafts against the same per-position target logits."""
    rows = K + 1
    logits = np.tile(target_logits, (n, 1)).astype(np.float32)  # [n * rows, V]
    st = SamplingTensors.from_params([sp] * (n * rows), [seed0 + i // rows for i in range(n * rows)],
                                     [i % rows for i in range(n * rows)])
    has = np.tile(np.arange(rows) < K, n)
    d = np.zeros(n * rows, np.int32)
    d[has] = drafts.reshape(-1)
    vin = VerifyInputs(d, has, np.arange(n * rows, dtype=np.int32),
                       np.arange(n * rows, dtype=np.int32).reshape(n, rows), np.full(n, K, np.int32))
    probs = None if q is None else np.tile(q, (n, 1)).astype(np.float32)
    fn = jax.jit(lambda *a: rejection.rejection_sample(*a))  # traced anew: picks up monkeypatching
    out = jax.device_get(fn(logits, st, None, vin, probs))
    return np.asarray(out.tokens).reshape(n, rows), np.asarray(out.num_accepted)


SETTINGS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=5),
            SamplingParams(temperature=1.2, top_p=0.7), SamplingParams(temperature=1.0, min_p=0.08, top_k=9)]


def _case(seed):
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(K + 1, V)) * 1.5
    draft = target + rng.normal(size=(K + 1, V)) * 1.5  # a draft that often disagrees
    return rng, target, draft


def _check_first_two(tokens, acc, target, sp):
    p0, p1 = _probs(target[0], sp), _probs(target[1], sp)
    pv0 = _chi2_pvalue(tokens[:, 0], p0)
    reached = acc >= 1  # the second position is emitted by sequences that accepted the first draft
    pv1 = _chi2_pvalue(tokens[reached, 1], p1)
    return pv0, pv1, reached.mean()


@pytest.mark.parametrize("sp", SETTINGS, ids=["t1", "topk", "topp", "minp_topk"])
def test_draft_model_verification_matches_target_distribution(sp):
    rng, target, draft = _case(0)
    n = 12000
    q = np.stack([_probs(draft[j], sp) for j in range(K + 1)])
    drafts = np.stack([rng.choice(V, size=n, p=q[j]) for j in range(K)], axis=1)
    tokens, acc = _verify(target, sp, n, drafts, q)
    pv0, pv1, reach = _check_first_two(tokens, acc, target, sp)
    assert pv0 > 1e-3 and pv1 > 1e-3, (pv0, pv1)
    assert 0.1 < reach < 0.95  # rejections and acceptances both happen
    # a draft is only ever emitted where accepted, and accepted drafts are emitted unchanged
    assert (tokens[np.arange(n), 0][acc >= 1] == drafts[acc >= 1, 0]).all()


def test_wrong_residual_fails_the_same_test(monkeypatch):
    sp = SETTINGS[0]
    rng, target, draft = _case(0)
    n = 12000
    q = np.stack([_probs(draft[j], sp) for j in range(K + 1)])
    drafts = np.stack([rng.choice(V, size=n, p=q[j]) for j in range(K)], axis=1)
    monkeypatch.setattr(rejection, "residual_distribution", lambda p, q: p)  # resample from p: biased
    tokens, acc = _verify(target, sp, n, drafts, q)
    pv0, _, _ = _check_first_two(tokens, acc, target, sp)
    assert pv0 < 1e-6, pv0


@pytest.mark.parametrize("sp", SETTINGS[:3], ids=["t1", "topk", "topp"])
def test_point_mass_drafts_match_target_and_the_plain_sampler(sp):
    rng, target, _ = _case(1)
    n = 8000
    # n-gram style: deterministic drafts, here the target's likeliest token or a random one
    drafts = np.where(rng.random((n, K)) < 0.5, np.argmax(target[:K], axis=-1)[None, :], rng.integers(0, V, (n, K)))
    tokens, acc = _verify(target, sp, n, drafts)
    pv0, pv1, _ = _check_first_two(tokens, acc, target, sp)
    assert pv0 > 1e-3 and pv1 > 1e-3, (pv0, pv1)
    # every emitted token is what the ordinary sampler draws at that output index with that seed
    for j in range(K + 1):
        st = SamplingTensors.from_params([sp] * n, list(range(n)), [j] * n)
        plain = np.asarray(jax.jit(sample)(np.tile(target[j], (n, 1)).astype(np.float32), st).tokens)
        emitted = acc >= j
        np.testing.assert_array_equal(tokens[emitted, j], plain[emitted])


@pytest.mark.parametrize("with_q", [False, True])
def test_greedy_accepts_while_draft_is_argmax(with_q):
    rng, target, draft = _case(2)
    sp = SamplingParams(temperature=0)
    n = 64
    best = np.argmax(target, axis=-1)
    drafts = np.tile(best[:K], (n, 1))
    wrong_at = rng.integers(0, K + 1, n)  # K: all right
    for i, w in enumerate(wrong_at):
        if w < K:
            drafts[i, w] = (best[w] + 1 + rng.integers(0, V - 1)) % V
    q = np.stack([_probs(draft[j], SETTINGS[0]) for j in range(K + 1)]) if with_q else None
    tokens, acc = _verify(target, sp, n, drafts, q)
    np.testing.assert_array_equal(acc, wrong_at)
    for i in range(n):
        np.testing.assert_array_equal(tokens[i, : acc[i] + 1], best[: acc[i] + 1])


def test_draft_sampler_draws_from_the_q_it_reports():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=V) * 1.5
    sp = SamplingParams(temperature=0.9, top_k=7)
    n = 8000
    st = SamplingTensors.from_params([sp] * n, list(range(n)), [5] * n)
    toks, q = jax.jit(draft_sample)(np.tile(logits, (n, 1)).astype(np.float32), st)
    q = np.asarray(q, np.float64)
    np.testing.assert_allclose(q[0], _probs(logits, sp), atol=1e-6)
    assert _chi2_pvalue(np.asarray(toks), _probs(logits, sp)) > 1e-3
    # its noise stream is not the plain sampler's: otherwise drafts would be accepted far too often
    plain = np.asarray(jax.jit(sample)(np.tile(logits, (n, 1)).astype(np.float32), st).tokens)
    p = _probs(logits, sp)
    assert abs((plain == np.asarray(toks)).mean() - (p * p).sum()) < 0.03
