"""Speculative decoding through the engine on tiny random models (and the default model): greedy output
equals plain decoding for both proposers under a mixed continuous-batching workload, stops inside
accepted runs are exact, seeded n-gram sampling reproduces plain sampling, preemption and rollback leak
no pages, nothing compiles after warm-up; sampled tokens follow the target's distribution."""

import numpy as np
import pytest

from jaxinfer.config import EngineConfig
from jaxinfer.engine import Engine
from jaxinfer.errors import InvalidRequestError
from jaxinfer.sampling_params import SamplingParams
from tests.engine.test_engine import GREEDY, _loaded, _run, count_compilations
from tests.tiny_models import make_tiny_model

# One bucket set and one page count for every engine here, so compiled steps are shared (the persistent
# compilation cache) and the workloads also preempt: 24 pages of 8 tokens, 512 B per token per model.
CFG = dict(max_model_len=160, max_num_seqs=4, max_num_batched_tokens=32, page_size=8, min_token_bucket=8,
           num_speculative_tokens=4, ngram_min=1)
PAGES = 24


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    """``(target path, loaded target, loaded close draft)``: the draft is the target with 4% weight noise
    (greedy agreement about 60%), so both acceptances and rejections happen."""
    path, _ = tiny_model_dir("llama")
    draft_path = tmp_path_factory.mktemp("draft") / "llama_close"
    make_tiny_model("llama", draft_path, perturb=0.04)
    return path, _loaded(path), _loaded(draft_path)


def _engine(models, method=None, draft=None, **kw):
    path, target, close = models
    memory = PAGES * CFG["page_size"] * 512 * (2 if draft else 1)
    cfg = EngineConfig(**{**CFG, "kv_cache_memory": memory, **kw}, speculative_method=method)
    return Engine(target, cfg, draft={"close": close, "self": target}.get(draft))


SHARED = [1, 9, 8, 7, 9, 8, 7, 9, 8, 7, 9, 8, 7, 9, 8, 7, 9]  # two pages: prefix-cache hits


def _workload(n, seed):
    """Prompts that repeat a short random block (n-gram food) or are random, some behind a shared prefix,
    random k per request (some 0: not speculating), random max_tokens and arrival steps."""
    rng = np.random.default_rng(seed)
    reqs, ks = [], []
    for i in range(n):
        block = rng.integers(3, 300, size=int(rng.integers(2, 6))).tolist()
        prompt = [1] + (block * 12)[: int(rng.integers(4, 60))] if i % 3 else [1] + rng.integers(
            3, 300, size=int(rng.integers(1, 60))).tolist()
        if i % 4 == 1:
            prompt = SHARED + prompt[1:]
        reqs.append((f"r{i}", prompt, SamplingParams(max_tokens=int(rng.integers(1, 40)), **GREEDY)))
        ks.append([None, 0, 1, 2, 4][i % 5])
    return reqs, ks, sorted(rng.integers(0, 24, size=n).tolist())


def _run_k(engine, reqs, ks, arrivals):
    """``_run`` with a per-request ``num_speculative_tokens``."""
    add = engine.add_request
    k_of = {r[0]: k for r, k in zip(reqs, ks)}
    engine.add_request = lambda rid, p, sp: add(rid, p, sp, num_speculative_tokens=k_of[rid])
    try:
        return _run(engine, reqs, arrivals)
    finally:
        engine.add_request = add


def test_greedy_speculative_equals_plain_for_both_proposers(models):
    """Mixed continuous batching under page pressure: preemption, prefix-cache hits and rollbacks."""
    reqs, ks, arrivals = _workload(20, seed=0)
    plain = _run(_engine(models), reqs, arrivals)
    for method, draft in [("ngram", None), ("draft", "close"), ("draft", "self")]:
        eng = _engine(models, method, draft)
        out = _run_k(eng, reqs, ks, arrivals)
        for rid, _, sp in reqs:
            assert out[rid][0][0] == plain[rid][0][0], (method, draft, rid)
            assert out[rid][0][1] == plain[rid][0][1] == "length" and len(out[rid][0][0]) == sp.max_tokens
        st = eng.stats()
        assert st.num_pages_used == 0 and st.num_preemptions > 0 and st.prefix_cache_hits > 0
        assert st.spec_verified > 0 and st.spec_draft_tokens >= st.spec_verified
        if draft == "self":
            assert st.spec_accepted_tokens == st.spec_draft_tokens  # the target agrees with itself
        else:
            assert 0 < st.spec_accepted_tokens < st.spec_draft_tokens
        assert st.spec_mean_acceptance_length == 1 + st.spec_accepted_tokens / st.spec_verified


def test_per_request_metrics_and_no_speculation_for_k0(models):
    eng = _engine(models, "draft", "self")
    prompt = [1, 5, 6, 7, 5, 6, 7, 5, 6]
    eng.add_request("a", prompt, SamplingParams(max_tokens=20, **GREEDY), num_speculative_tokens=3)
    eng.add_request("b", prompt, SamplingParams(max_tokens=20, **GREEDY), num_speculative_tokens=0)
    final = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out.metrics
    a, b = final["a"], final["b"]
    assert b.num_spec_steps == b.num_draft_tokens == 0 and b.mean_acceptance_length is None
    assert a.num_accepted_tokens == a.num_draft_tokens > 0
    assert a.num_draft_tokens <= 3 * a.num_spec_steps
    # 19 tokens after the first: each verify step yields accepted + 1
    assert a.num_accepted_tokens + a.num_spec_steps == 19
    st = eng.stats()
    assert (st.spec_draft_tokens, st.spec_accepted_tokens, st.spec_verified) == (
        a.num_draft_tokens, a.num_accepted_tokens, a.num_spec_steps)


def test_stops_inside_accepted_runs_are_exact(models):
    """The target as its own draft accepts everything, so stops fall inside long accepted runs."""
    plain_eng = _engine(models)
    prompts = [[1, 17, 42, 99, 7, 120, 33], [1, 50, 60, 70, 50, 60, 70, 50], [1, 200, 3]]
    base = _run(plain_eng, [(f"g{i}", p, SamplingParams(max_tokens=40, **GREEDY)) for i, p in enumerate(prompts)])
    reqs = []
    for i, p in enumerate(prompts):
        toks, _, text = base[f"g{i}"][0]
        reqs += [
            (f"s{i}", p, SamplingParams(max_tokens=40, stop=[text[7:10]], **GREEDY)),
            (f"i{i}", p, SamplingParams(max_tokens=40, stop=[text[9:12]], include_stop_str_in_output=True,
                                        **GREEDY)),
            (f"t{i}", p, SamplingParams(max_tokens=40, stop_token_ids=[toks[6]], **GREEDY)),
            (f"m{i}", p, SamplingParams(max_tokens=40, stop_token_ids=[toks[3]], min_tokens=9, **GREEDY)),
            (f"e{i}", p, SamplingParams(max_tokens=40, temperature=0)),  # EOS honoured (id 2)
            (f"l{i}", p, SamplingParams(max_tokens=7, logprobs=2, **GREEDY)),
        ]
    plain = _run(plain_eng, reqs)
    for method, draft in [("draft", "self"), ("ngram", None)]:
        eng = _engine(models, method, draft)
        out = _run_k(eng, reqs, [4] * len(reqs), [0] * len(reqs))
        for rid, _, _ in reqs:
            assert out[rid][0][:3] == plain[rid][0][:3], (method, rid)
        assert eng.stats().num_pages_used == 0
    # logprobs come per token, as in plain decoding
    eng = _engine(models, "draft", "self")
    eng.add_request("lp", prompts[0], SamplingParams(max_tokens=9, logprobs=2, **GREEDY))
    plain_eng.add_request("lp", prompts[0], SamplingParams(max_tokens=9, logprobs=2, **GREEDY))
    got, ref = _logprobs(eng), _logprobs(plain_eng)
    assert [sorted(e) for e in got] == [sorted(e) for e in ref] and len(got) == 9
    for g, r in zip(got, ref):
        for t in r:
            assert abs(g[t] - r[t]) < 1e-4


def _logprobs(engine):
    entries = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            entries += out.outputs[0].logprobs
    return entries


def test_seeded_ngram_sampling_reproduces_plain_sampling(models):
    """Point-mass drafts are verified with the plain sampler's own noise: same seed, same tokens."""
    reqs, _, arrivals = _workload(10, seed=4)
    sps = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=sp.max_tokens + 10, ignore_eos=True,
                          n=1 + i % 2) for i, (_, _, sp) in enumerate(reqs)]
    reqs = [(rid, p, sp) for (rid, p, _), sp in zip(reqs, sps)]
    plain = _run(_engine(models), reqs, arrivals)
    eng = _engine(models, "ngram")
    out = _run(eng, reqs, arrivals)
    assert {r: {i: v[0] for i, v in s.items()} for r, s in out.items()} == \
        {r: {i: v[0] for i, v in s.items()} for r, s in plain.items()}
    assert eng.stats().spec_accepted_tokens > 0


@pytest.mark.parametrize("method,draft", [("ngram", None), ("draft", "close")])
def test_no_compilation_after_warmup_with_speculation(models, method, draft):
    eng = _engine(models, method, draft)
    eng.warmup()
    rng = np.random.default_rng(7)
    reqs = []
    for i in range(14):
        sp = dict(max_tokens=int(rng.integers(1, 25)), seed=i)
        kind = i % 4
        if kind == 0:
            sp.update(temperature=0)
        elif kind == 1:
            sp.update(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, logprobs=3)
        elif kind == 2:
            sp.update(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5)
        else:
            sp.update(temperature=0.7, n=2, min_tokens=3, stop=["e"], stop_token_ids=[7])
        block = rng.integers(3, 300, size=3).tolist()
        reqs.append((f"q{i}", [1] + block * int(rng.integers(1, 30)), SamplingParams(**sp)))
    arrivals = sorted(rng.integers(0, 12, size=len(reqs)).tolist())
    with count_compilations() as events:
        out = _run(eng, reqs, arrivals)
    assert len(out) == len(reqs) and events == []
    assert eng.stats().spec_verified > 0


def test_speculation_errors(models):
    eng = _engine(models, "ngram")
    with pytest.raises(InvalidRequestError):
        eng.add_request("x", [1, 2], SamplingParams(), num_speculative_tokens=5)
    with pytest.raises(InvalidRequestError):
        eng.add_request("x", [1, 2], SamplingParams(presence_penalty=1.0), num_speculative_tokens=2)
    eng.add_request("x", [1, 2], SamplingParams(presence_penalty=1.0))  # defaults to no speculation
    with pytest.raises(InvalidRequestError):
        _engine(models).add_request("y", [1, 2], SamplingParams(), num_speculative_tokens=1)
    for bad in [dict(speculative_method="medusa"), dict(num_speculative_tokens=0),
                dict(speculative_model="x"), dict(ngram_min=3, ngram_max=2)]:
        with pytest.raises(ValueError):
            EngineConfig(**bad)
    with pytest.raises(ValueError, match="speculative_model"):
        Engine(models[1], EngineConfig(**CFG, speculative_method="draft"))


def test_default_model_ngram_greedy_equals_plain(default_llm):
    tok = default_llm.tokenizer
    text = "Count: one two three, one two three, one two three, one two three, one two"
    ids = tok(text)["input_ids"]
    loaded = default_llm.loaded
    cfg = dict(max_model_len=128, max_num_seqs=2, max_num_batched_tokens=32, page_size=16, min_token_bucket=8)
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    reqs = [("a", ids, sp), ("b", ids[:-3], sp)]
    plain = _run(Engine(loaded, EngineConfig(**cfg)), reqs)
    eng = Engine(loaded, EngineConfig(**cfg, speculative_method="ngram", num_speculative_tokens=3))
    out = _run(eng, reqs)
    assert {r: v[0][0] for r, v in out.items()} == {r: v[0][0] for r, v in plain.items()}
    assert eng.stats().spec_mean_acceptance_length > 1.5
