"""Sampling features through the engine: seeds, n > 1, logprobs, stop strings, min_tokens, penalties."""

import numpy as np
import pytest
import torch

from jaxinfer.config import EngineConfig
from jaxinfer.engine import Engine
from jaxinfer.sampling import PenaltyState, SamplingTensors, _apply_penalties, sample, update_penalty_state
from jaxinfer.sampling_params import SamplingParams
from tests.engine.test_engine import _loaded, _run


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    path, _ = tiny_model_dir("llama")
    cfg = EngineConfig(max_model_len=160, max_num_seqs=8, max_num_batched_tokens=64, page_size=8)
    return Engine(_loaded(path), cfg)


PROMPT = [1, 17, 42, 99, 7, 120, 33]


def test_seeded_sampling_reproducible_and_batch_independent(engine):
    sp = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=1234, ignore_eos=True)
    alone = _run(engine, [("a", PROMPT, sp)])["a"][0][0]
    again = _run(engine, [("a", PROMPT, sp)])["a"][0][0]
    others = [(f"o{i}", [1, 5 + i, 9, 11 * i + 3], SamplingParams(temperature=0.9, max_tokens=15, seed=i))
              for i in range(5)]
    mixed = _run(engine, others[:2] + [("a", PROMPT, sp)] + others[2:], arrivals=[0, 0, 2, 3, 3, 5])["a"][0][0]
    assert alone == again == mixed
    other_seed = _run(engine, [("a", PROMPT, SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=99,
                                                            ignore_eos=True))])["a"][0][0]
    assert other_seed != alone


def test_n_samples_are_independent_and_reproducible(engine):
    sp = SamplingParams(n=4, temperature=1.2, max_tokens=12, seed=7, ignore_eos=True)
    out = _run(engine, [("r", PROMPT, sp)])["r"]
    assert sorted(out) == [0, 1, 2, 3]
    samples = [tuple(out[i][0]) for i in range(4)]
    assert len(set(samples)) > 1
    assert all(len(s) == 12 for s in samples)
    again = _run(engine, [("r", PROMPT, sp)])["r"]
    assert [tuple(again[i][0]) for i in range(4)] == samples


def test_logprobs_match_hf_log_softmax(engine, tiny_model_dir):
    _, hf = tiny_model_dir("llama")
    sp = SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)
    engine.add_request("lp", PROMPT, sp)
    entries, tokens = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            entries += out.outputs[0].logprobs
            tokens += out.outputs[0].token_ids
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT + tokens])).logits[0].double()
    ref = torch.log_softmax(logits, -1).numpy()
    for i, (tok, entry) in enumerate(zip(tokens, entries)):
        row = ref[len(PROMPT) - 1 + i]
        assert tok in entry and len(entry) == 3  # greedy token is also the top-1 alternative
        top3 = np.argsort(-row)[:3]
        assert set(entry) == set(top3.tolist())
        for t, lp in entry.items():
            assert abs(lp - row[t]) < 1e-4


def test_stop_string_and_stop_token(engine):
    greedy = _run(engine, [("g", PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))])["g"][0]
    text, ids = greedy[2], greedy[0]
    assert len(text) > 6
    stop = text[3:6]
    cut = text.find(stop)
    out = _run(engine, [("s", PROMPT, SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True))])
    toks, reason, got = out["s"][0]
    assert reason == "stop" and got == text[:cut]
    assert ids[: len(toks)] == toks
    stop_tok = ids[5]
    out = _run(engine, [("t", PROMPT, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_tok],
                                                      ignore_eos=True))])
    toks, reason, _ = out["t"][0]
    first = ids.index(stop_tok)
    assert reason == "stop" and toks == ids[: first + 1]


def test_min_tokens_suppresses_eos(engine):
    # EOS (id 2) as a stop token that greedy decoding hits early; min_tokens must hold it back.
    greedy = _run(engine, [("g", PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))])["g"][0][0]
    stop_tok = greedy[2]
    sp = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_tok], min_tokens=10, ignore_eos=True)
    toks, reason, _ = _run(engine, [("m", PROMPT, sp)])["m"][0]
    assert stop_tok not in toks[:10]
    assert len(toks) >= 10


def _numpy_penalties(logits, prompt, outputs, rep, pres, freq):
    x = logits.astype(np.float64).copy()
    counts = np.bincount(outputs, minlength=len(x)) if len(outputs) else np.zeros(len(x))
    seen = counts > 0
    seen[list(prompt)] = True
    x[seen] = np.where(x[seen] > 0, x[seen] / rep, x[seen] * rep)
    return x - freq * counts - pres * (counts > 0)


def test_penalties_match_numpy_reference():
    rng = np.random.default_rng(0)
    v, s, slots = 50, 3, [2, 0, 1]
    logits = rng.normal(size=(s, v)).astype(np.float32) * 3
    prompts = [rng.integers(0, v, 6) for _ in range(s)]
    outputs = [rng.integers(0, v, 9) for _ in range(s)]
    params = [SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=0.7, frequency_penalty=0.4),
              SamplingParams(temperature=0, repetition_penalty=0.8),
              SamplingParams(temperature=0, frequency_penalty=-1.0)]
    st = SamplingTensors.build(params, seeds=[0] * s, steps=[0] * s, num_rows=s, slots=slots, resets=[True] * s)
    tokens = np.concatenate([np.concatenate([p, o]) for p, o in zip(prompts, outputs)]).astype(np.int32)
    token_slot = np.repeat(np.array(slots, np.int32), 15)
    kind = np.tile(np.array([1] * 6 + [2] * 9, np.int32), s)
    state = PenaltyState.zeros(4, v)
    state = state.replace(output_counts=state.output_counts.at[:].set(5))  # stale counts: reset must clear
    state = update_penalty_state(state, st, tokens, token_slot, kind)
    got = np.asarray(_apply_penalties(logits, st, state))
    for i, sp in enumerate(params):
        np.testing.assert_array_equal(np.asarray(state.output_counts)[slots[i]], np.bincount(outputs[i], minlength=v))
        ref = _numpy_penalties(logits[i], prompts[i], outputs[i], sp.repetition_penalty, sp.presence_penalty,
                               sp.frequency_penalty)
        np.testing.assert_allclose(got[i], ref, rtol=1e-6, atol=1e-5)
    chosen = np.asarray(sample(logits, st, state).tokens)
    refs = [_numpy_penalties(logits[i], prompts[i], outputs[i], p.repetition_penalty, p.presence_penalty,
                             p.frequency_penalty) for i, p in enumerate(params)]
    np.testing.assert_array_equal(chosen, [int(np.argmax(r)) for r in refs])
