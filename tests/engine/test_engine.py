"""The engine end to end on tiny random models (and the default model): continuous batching equals
running each request alone, preemption and abort lose nothing, no compilation after warm-up."""

import contextlib

import jax
import numpy as np
import torch

from jaxinfer.config import EngineConfig
from jaxinfer.engine import Engine
from jaxinfer.loader import load_model
from jaxinfer.sampling_params import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


def _engine(tiny_model_dir, arch="llama", **kw):
    path, _ = tiny_model_dir(arch)
    cfg = dict(max_model_len=160, max_num_seqs=8, max_num_batched_tokens=64, page_size=8)
    cfg.update(kw)
    return Engine(_loaded(path), EngineConfig(**cfg))


_LOADED = {}


def _loaded(path):
    if path not in _LOADED:
        _LOADED[path] = load_model(str(path))
    return _LOADED[path]


def _run(engine, requests, arrivals=None):
    """Add ``requests`` ([(id, prompt, params)]) at the given step numbers; run to completion.

    Returns ``{id: (token_ids per sample, finish_reasons, text per sample)}``.
    """
    arrivals = arrivals or [0] * len(requests)
    pending = sorted(zip(arrivals, range(len(requests))))
    toks, reasons, texts = {}, {}, {}
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, i = pending.pop(0)
            engine.add_request(*requests[i])
        for out in engine.step():
            for c in out.outputs:
                key = (out.request_id, c.index)
                toks.setdefault(key, []).extend(c.token_ids)
                texts[key] = texts.get(key, "") + c.text
                if c.finish_reason:
                    reasons[key] = c.finish_reason
        step += 1
    result = {}
    for (rid, idx), t in toks.items():
        result.setdefault(rid, {})[idx] = (t, reasons.get((rid, idx)), texts[(rid, idx)])
    return result


def _workload(n, seed=0, vocab=300):
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        plen = int(rng.integers(1, 90))
        prompt = [1] + rng.integers(3, vocab, size=plen).tolist()
        reqs.append((f"r{i}", prompt, SamplingParams(max_tokens=int(rng.integers(1, 40)), **GREEDY)))
    arrivals = sorted(rng.integers(0, 30, size=n).tolist())
    return reqs, arrivals


def test_mixed_workload_equals_each_request_alone(tiny_model_dir):
    reqs, arrivals = _workload(32)
    batched = _run(_engine(tiny_model_dir), reqs, arrivals)
    solo_engine = _engine(tiny_model_dir)
    for rid, prompt, sp in reqs:
        alone = _run(solo_engine, [(rid, prompt, sp)])
        assert batched[rid][0][0] == alone[rid][0][0], rid
        assert len(batched[rid][0][0]) == sp.max_tokens and batched[rid][0][1] == "length"


def test_batched_greedy_equals_hf(tiny_model_dir):
    path, hf = tiny_model_dir("qwen3")
    reqs, arrivals = _workload(6, seed=3)
    out = _run(_engine(tiny_model_dir, "qwen3"), reqs, arrivals)
    for rid, prompt, sp in reqs:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=sp.max_tokens, min_new_tokens=sp.max_tokens,
                              eos_token_id=None, pad_token_id=0)
        assert out[rid][0][0] == ref[0, len(prompt):].tolist(), rid


def test_preemption_under_tiny_page_budget_changes_nothing(tiny_model_dir):
    reqs, arrivals = _workload(16, seed=1)
    roomy = _run(_engine(tiny_model_dir), reqs, arrivals)
    # 2 layers x 2 (k, v) x 2 kv heads x 16 dims x 4 bytes = 512 B per token: 72 pages of 8 tokens
    tight_engine = _engine(tiny_model_dir, kv_cache_memory=72 * 8 * 512)
    tight = _run(tight_engine, reqs, arrivals)
    assert tight_engine.stats().num_preemptions > 0
    assert {r: v[0][0] for r, v in tight.items()} == {r: v[0][0] for r, v in roomy.items()}
    assert tight_engine.stats().num_pages_used == 0


def test_abort_frees_pages_and_reports(tiny_model_dir):
    eng = _engine(tiny_model_dir, enable_prefix_caching=False)
    reqs, _ = _workload(8, seed=2)
    for r in reqs:
        eng.add_request(r[0], r[1], SamplingParams(max_tokens=30, **GREEDY))
    for _ in range(3):
        eng.step()
    assert eng.stats().num_pages_used > 0
    aborted = {"r1", "r4", "r6"}
    for rid in aborted:
        assert eng.abort_request(rid)
    assert not eng.abort_request("r1") and not eng.abort_request("nope")
    finals = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0].finish_reason
    assert {r for r, why in finals.items() if why == "abort"} == aborted
    assert len(finals) == 8
    assert eng.stats().num_pages_used == 0 and eng.stats().num_running == 0


@contextlib.contextmanager
def count_compilations():
    events = []

    def listener(name, *_args, **_kw):
        if name in ("/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration"):
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_no_compilation_after_warmup(tiny_model_dir):
    eng = _engine(tiny_model_dir, "mistral")
    eng.warmup()
    rng = np.random.default_rng(7)
    reqs = []
    for i in range(24):
        kind = i % 6
        sp = dict(max_tokens=int(rng.integers(1, 25)), seed=i)
        if kind == 0:
            sp.update(temperature=0)
        elif kind == 1:
            sp.update(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05)
        elif kind == 2:
            sp.update(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3)
        elif kind == 3:
            sp.update(temperature=0.7, n=3, logprobs=5, prompt_logprobs=2)
        elif kind == 4:
            sp.update(temperature=0, min_tokens=3, stop=["e"], stop_token_ids=[7])
        else:  # structured output: a token mask on the device, same compiled step
            sp.update(temperature=1.0, structured_outputs={"regex": "[a-z]{2,12}"})
        prompt = [1] + rng.integers(3, 300, size=int(rng.integers(1, 120))).tolist()
        reqs.append((f"q{i}", prompt, SamplingParams(**sp)))
    arrivals = sorted(rng.integers(0, 20, size=len(reqs)).tolist())
    with count_compilations() as events:
        out = _run(eng, reqs, arrivals)
    assert len(out) == len(reqs)
    assert events == []
