"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``) against HF transformers' ``log_softmax``
(float64 over the float32 torch model's logits), through chunked prefill, prefix caching, preemption,
``n > 1``, speculative verify steps and mixed batches whose other rows must not change.

Tolerance: the engine computes in float32 (XLA on the CPU); measured differences from the float64
reference are ~1e-5 on these tiny models, asserted at 1e-4 absolute.
"""

import numpy as np
import pytest
import torch

from jaxinfer.config import EngineConfig
from jaxinfer.engine import Engine
from jaxinfer.errors import InvalidRequestError
from jaxinfer.llm import LLM
from jaxinfer.prompt_logprobs import PromptSpan, buffer_rows, entries, prompt_spans
from jaxinfer.sampling_params import SamplingParams
from tests.engine.test_engine import _loaded, _run

TOL = 1e-4
GREEDY = dict(temperature=0, ignore_eos=True)


def _engine(tiny_model_dir, arch="llama", **kw):
    path, _ = tiny_model_dir(arch)
    cfg = dict(max_model_len=160, max_num_seqs=8, max_num_batched_tokens=64, page_size=8)
    cfg.update(kw)
    return Engine(_loaded(path), EngineConfig(**cfg))


def _reference(hf, prompt) -> np.ndarray:
    """``f64[len(prompt), V]``: log_softmax of the HF model's logits at every prompt position."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def _check(pl, prompt, ref, k):
    """``pl`` is vLLM-shaped and equals the reference: ``None`` first, then ``{prompt token: lp, top-k...}``."""
    assert pl is not None and len(pl) == len(prompt) and pl[0] is None
    for j in range(1, len(prompt)):
        e, tid, row = pl[j], prompt[j], ref[j - 1]
        assert next(iter(e)) == tid and len(e) in (max(k, 1), k + 1), (j, e)
        for t, lp in e.items():
            assert abs(lp - row[t]) <= TOL, (j, t, lp, row[t])
        if k:
            top = np.sort(row)[::-1][:k]
            np.testing.assert_allclose(sorted(e.values(), reverse=True)[:k], top, atol=TOL)


def _prompt_lps(engine, requests, arrivals=None) -> dict:
    """Run ``requests`` and collect each request's ``prompt_logprobs`` (asserting it is sent once)."""
    got = {}
    pending = sorted(zip(arrivals or [0] * len(requests), range(len(requests))))
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            engine.add_request(*requests[pending.pop(0)[1]])
        for out in engine.step():
            if out.prompt_logprobs is not None:
                assert out.request_id not in got, "prompt logprobs sent twice"
                got[out.request_id] = out.prompt_logprobs
        step += 1
    return got


@pytest.mark.parametrize("arch", ["llama", "llama_mha_tied"])
def test_equal_hf_through_chunked_prefill_in_mixed_batches(tiny_model_dir, arch):
    _, hf = tiny_model_dir(arch)
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(3, 300, size=n).tolist() for n in (120, 4, 0, 70, 30)]
    ks = [5, 0, 3, 20, None]  # the last one does not ask: other rows of the same steps
    reqs = [
        (f"p{i}", p, SamplingParams(max_tokens=4, prompt_logprobs=k, **GREEDY))
        for i, (p, k) in enumerate(zip(prompts, ks))
    ]
    eng = _engine(tiny_model_dir, arch)  # 64-token steps: the 121- and 71-token prompts span several steps
    got = _prompt_lps(eng, reqs, [0, 0, 1, 2, 2])
    assert set(got) == {"p0", "p1", "p2", "p3"}
    for rid, p, sp in reqs[:4]:
        _check(got[rid], p, _reference(hf, p), sp.prompt_logprobs)
    assert got["p2"] == [None]  # a one-token prompt has nothing to score
    # the generated tokens are those of a run without prompt logprobs
    plain = [(rid, p, SamplingParams(max_tokens=4, **GREEDY)) for rid, p, _ in reqs]
    with_lp, without = _run(_engine(tiny_model_dir, arch), reqs), _run(eng, plain)
    assert {r: v[0][0] for r, v in with_lp.items()} == {r: v[0][0] for r, v in without.items()}


def test_prefix_cache_hits_are_still_scored(tiny_model_dir):
    _, hf = tiny_model_dir("llama")
    prompt = [1] + list(range(10, 10 + 60))  # 61 tokens: 7 full pages cached by the first request
    eng = _engine(tiny_model_dir)
    _run(eng, [("warm", prompt, SamplingParams(max_tokens=3, **GREEDY))])
    hits = eng.stats().prefix_cache_hits
    sp = SamplingParams(max_tokens=3, n=3, prompt_logprobs=2, **GREEDY)
    got = _prompt_lps(eng, [("lp", prompt, sp)])
    _check(got["lp"], prompt, _reference(hf, prompt), 2)
    assert eng.stats().prefix_cache_hits > hits  # the other samples still used the cache
    assert eng.stats().num_pages_used == 0


def test_preemption_does_not_repeat_or_lose_positions(tiny_model_dir):
    _, hf = tiny_model_dir("llama")
    rng = np.random.default_rng(4)
    reqs = []
    for i in range(12):
        p = [1] + rng.integers(3, 300, size=int(rng.integers(20, 90))).tolist()
        reqs.append((f"r{i}", p, SamplingParams(max_tokens=int(rng.integers(10, 40)), prompt_logprobs=1, **GREEDY)))
    # 512 B of KV per token: 40 pages of 8 tokens for 12 requests of up to 130 tokens
    tight = _engine(tiny_model_dir, kv_cache_memory=40 * 8 * 512)
    got = _prompt_lps(tight, reqs, sorted(rng.integers(0, 6, size=12).tolist()))
    assert tight.stats().num_preemptions > 0
    for rid, p, _ in reqs:
        _check(got[rid], p, _reference(hf, p), 1)


def test_speculative_engine(tiny_model_dir):
    """n-gram speculation: prompt chunks may ride in verify steps; the scores are the same."""
    _, hf = tiny_model_dir("llama")
    loop = [1] + [5, 6, 7, 8] * 10  # repetitive: the n-gram proposer drafts for it
    rng = np.random.default_rng(5)
    prompt = [1] + rng.integers(3, 300, size=80).tolist()
    eng = _engine(tiny_model_dir, speculative_method="ngram", num_speculative_tokens=3)
    reqs = [
        ("loop", loop, SamplingParams(max_tokens=30, **GREEDY)),
        ("lp", prompt, SamplingParams(max_tokens=4, prompt_logprobs=4, **GREEDY)),
    ]
    got = _prompt_lps(eng, reqs, [0, 3])
    assert eng.stats().spec_verified > 0
    _check(got["lp"], prompt, _reference(hf, prompt), 4)


def test_llm_generate_and_validation(tiny_model_dir):
    path, hf = tiny_model_dir("llama")
    llm = LLM(str(path), max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, page_size=8)
    prompts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France;"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=2, prompt_logprobs=1, **GREEDY))
    for out in outs:
        _check(out.prompt_logprobs, out.prompt_token_ids, _reference(hf, out.prompt_token_ids), 1)
    assert llm.generate(prompts[0], SamplingParams(max_tokens=2))[0].prompt_logprobs is None
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(prompt_logprobs=bad)
        assert e.value.param == "prompt_logprobs"


class _Seq:
    def __init__(self, ids, n_prompt):
        self.all_token_ids, self.num_prompt_tokens, self.request_id = ids, n_prompt, "s"


class _Row:
    def __init__(self, seq, start, n):
        self.seq, self.start, self.num_new_tokens = seq, start, n


def test_spans_and_buffer_rows():
    seq = _Seq(list(range(100, 120)), 10)  # 10 prompt tokens (positions 0..9), then outputs
    rows = [_Row(seq, 0, 4), _Row(seq, 4, 8), _Row(seq, 12, 1), _Row(seq, 2, 3)]
    spans = prompt_spans(rows, [0, 5, 0, None])
    # row 0 scores positions 0..3; row 1 covers 4..11 but starts scoring at 5 and stops at the last prompt
    # position before the prompt's end (8 scores token 9); row 2 is a decode row; row 3 does not score
    assert spans == [PromptSpan(0, seq, 0, 0, 4), PromptSpan(1, seq, 4, 5, 4)]
    assert [buffer_rows(t) for t in (16, 64, 100, 128, 1000)] == [16, 64, 128, 128, 1024]

    class Out:
        logprobs = np.arange(8, dtype=np.float32) * -1
        ranks = np.arange(8, dtype=np.int32) + 10
        top_ids = np.tile(np.array([[7, 105, 3]]), (8, 1))
        top_logprobs = np.tile(np.array([[-0.1, -0.2, -0.3]], np.float32), (8, 1))

    e = entries(Out, spans[1], 2)
    assert [list(x) for x in e] == [[106, 7, 105], [107, 7, 105], [108, 7, 105], [109, 7, 105]]
    assert e[0][106] == -4.0 and e[1][7] == pytest.approx(-0.1)
    assert [x.rank for x in e] == [14, 15, 16, 17]
