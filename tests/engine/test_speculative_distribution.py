"""Sampled speculative decoding through the engine follows the target's distribution: a tiny model with a
32-token vocabulary, a perturbed copy as draft model (about half its drafts rejected) or an untrained
EAGLE head warm-started from the target over 24 of the 32 ids (the others have draft probability 0),
thousands of seeded requests; the token at the first verified position, given the token before it, is
compared with the target's warped softmax computed by HF transformers in float64 (stratified chi-square)."""

import jax
import numpy as np
import pytest
import torch
from scipy import stats

from jaxinfer.config import EngineConfig
from jaxinfer.engine import Engine
from jaxinfer.loader import load_model
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.speculative.eagle_head import init_eagle_head, save_eagle_head
from tests.engine.test_speculative_sampler import _probs
from tests.tiny_models import make_tiny_model

PROMPT = [1, 7, 12, 5]
SETTINGS = {"topk": SamplingParams(temperature=1.0, top_k=10, max_tokens=3, ignore_eos=True),
            "topp": SamplingParams(temperature=0.9, top_p=0.85, max_tokens=3, ignore_eos=True)}
N = 2048  # requests per setting


@pytest.fixture(scope="module")
def vocab32(tmp_path_factory):
    """``(hf target, loaded target, loaded draft model, EAGLE head file)``."""
    root = tmp_path_factory.mktemp("vocab32")
    hf = make_tiny_model("llama", root / "target", vocab_size=32)
    make_tiny_model("llama", root / "draft", vocab_size=32, perturb=0.2)
    target = load_model(str(root / "target"))
    draft_vocab = np.random.default_rng(1).permutation(32)[:24]
    cfg, params = init_eagle_head(jax.random.key(1), target.config, draft_vocab, target_params=target.params,
                                  target_model=str(root / "target"))
    save_eagle_head(root / "head.safetensors", cfg, params, dtype="float32")
    return hf, target, load_model(str(root / "draft")), str(root / "head.safetensors")


def _stratified_pvalue(pairs, cond_probs):
    """Chi-square over strata (previous token): ``pairs`` [(t1, t2)], ``cond_probs[t1]`` = p(t2 | t1)."""
    chi2, dof = 0.0, 0
    by_t1: dict[int, list[int]] = {}
    for t1, t2 in pairs:
        by_t1.setdefault(t1, []).append(t2)
    for t1, t2s in by_t1.items():
        if len(t2s) < 30:
            continue
        p = cond_probs[t1]
        counts = np.bincount(t2s, minlength=len(p)).astype(np.float64)
        exp = p * len(t2s)
        assert counts[exp == 0].sum() == 0, "a token outside the target's support"
        big = exp >= 5
        obs, ex = list(counts[big]), list(exp[big])
        if exp[~big].sum() > 0:
            obs.append(counts[~big].sum())
            ex.append(exp[~big].sum())
        chi2 += sum((o - e) ** 2 / e for o, e in zip(obs, ex))
        dof += len(obs) - 1
    return stats.chi2.sf(chi2, dof), dof


@pytest.mark.parametrize("method", ["draft", "eagle", "eagle_stop"])
def test_sampled_speculation_matches_target_distribution(vocab32, method):
    """``eagle_stop``: k = 2 with the early stop, which ends some proposals after their first draft; the
    second verified position (given the two tokens before it) is checked too."""
    hf, target, draft, head = vocab32
    stop = method == "eagle_stop"
    cfg = EngineConfig(max_model_len=16, max_num_seqs=64, max_num_batched_tokens=256, page_size=8,
                       min_token_bucket=128, speculative_method="eagle" if stop else method,
                       num_speculative_tokens=2 if stop else 1, eagle_draft_threshold=0.2 if stop else 0.0,
                       speculative_model=head if method != "draft" else None)
    eng = Engine(target, cfg, draft=draft if method == "draft" else None)
    pairs = {name: [] for name in SETTINGS}
    triples = {name: [] for name in SETTINGS}
    outs: dict[str, list[int]] = {}
    for name, sp in SETTINGS.items():
        for i in range(N):
            # eagle_stop: 4 tokens, so that the first verify may take 2 drafts (it yields at most k + 1 tokens)
            eng.add_request(f"{name}{i}", PROMPT, sp.__class__(**{**sp.__dict__, "seed": 10_000 + i,
                                                                  "max_tokens": 4 if stop else 3}))
    while eng.has_unfinished_requests():
        for out in eng.step():
            outs.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    for rid, toks in outs.items():
        assert len(toks) == (4 if stop else 3)
        pairs[rid.rstrip("0123456789")].append((toks[0], toks[1]))
        triples[rid.rstrip("0123456789")].append((toks[0] * 32 + toks[1], toks[2]))
    st = eng.stats()
    if stop:  # some proposals stopped after one draft, others went on to two
        assert 1.1 * st.spec_verified < st.spec_draft_tokens < 1.9 * st.spec_verified, st
    # drafts both accepted and rejected, hundreds of each (draft model about 0.5, EAGLE head about 0.17)
    assert 0.1 < st.spec_accepted_tokens / st.spec_draft_tokens < 0.8 and st.spec_draft_tokens > 1000
    with torch.no_grad():
        ctx = torch.tensor([PROMPT + [t] for t in range(32)])
        logits = hf(ctx).logits[:, -1].double().numpy()
        first = hf(torch.tensor([PROMPT])).logits[0, -1].double().numpy()
    for name, sp in SETTINGS.items():
        cond = {t: _probs(logits[t], sp) for t in range(32)}
        pval, dof = _stratified_pvalue(pairs[name], cond)
        assert dof > 10 and pval > 1e-3, (name, pval, dof)
        if stop:
            with torch.no_grad():
                ctx2 = torch.tensor([PROMPT + [a, b] for a in range(32) for b in range(32)])
                logits2 = hf(ctx2).logits[:, -1].double().numpy()
            pval, dof = _stratified_pvalue(triples[name], {t: _probs(logits2[t], sp) for t in range(32 * 32)})
            assert dof > 10 and pval > 1e-3, (name, "second position", pval, dof)
        t1 = np.array([a for a, _ in pairs[name]])
        assert stats.chisquare(*_pooled(np.bincount(t1, minlength=32), _probs(first, sp) * N)).pvalue > 1e-3


def _pooled(counts, exp):
    assert counts[exp == 0].sum() == 0
    big = exp >= 5
    if exp[~big].sum() == 0:
        return counts[big], exp[big]
    return np.append(counts[big], counts[~big].sum()), np.append(exp[big], exp[~big].sum())
