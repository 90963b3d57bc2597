"""Automatic prefix caching through the engine: identical outputs with the cache on and off, full-page
reuse asserted through the stats, sharing under preemption and abort."""

import numpy as np

from jaxinfer.config import EngineConfig
from jaxinfer.engine import Engine
from jaxinfer.sampling_params import SamplingParams
from tests.engine.test_engine import _loaded, _run

PAGE = 8


def _engine(tiny_model_dir, **kw):
    path, _ = tiny_model_dir("llama")
    cfg = dict(max_model_len=200, max_num_seqs=8, max_num_batched_tokens=64, page_size=PAGE)
    cfg.update(kw)
    return Engine(_loaded(path), EngineConfig(**cfg))


def _shared_prefix_workload(seed=0):
    """System prompts shared by groups, multi-turn continuations, prompts diverging mid-page."""
    rng = np.random.default_rng(seed)
    sys_a = [1] + rng.integers(3, 300, size=37).tolist()  # 38 tokens: ends mid-page
    sys_b = [1] + rng.integers(3, 300, size=47).tolist()  # 48 tokens: ends on a page boundary
    reqs = []
    for g, system in enumerate((sys_a, sys_b)):
        for i in range(5):
            question = rng.integers(3, 300, size=int(rng.integers(2, 12))).tolist()
            reqs.append((f"g{g}q{i}", system + question, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)))
    # multi-turn: turn 2 extends turn 1's prompt (plus a reply-like continuation)
    turn1 = sys_a + [5, 6, 7, 8, 9, 10, 11]
    reqs.append(("t1", turn1, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)))
    reqs.append(("t2", turn1 + [40, 41, 42, 43, 44, 45, 46, 47, 48, 49], SamplingParams(temperature=0, max_tokens=8,
                                                                                        ignore_eos=True)))
    # diverging mid-page from sys_a's prefix
    reqs.append(("d", sys_a[:20] + [77] * 10, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)))
    arrivals = [0, 1, 2, 3, 4, 0, 2, 4, 6, 8, 10, 20, 5]
    return reqs, arrivals


def test_outputs_identical_with_cache_on_and_off(tiny_model_dir):
    reqs, arrivals = _shared_prefix_workload()
    on_engine = _engine(tiny_model_dir)
    on = _run(on_engine, reqs, arrivals)
    off = _run(_engine(tiny_model_dir, enable_prefix_caching=False), reqs, arrivals)
    assert {r: v[0][0] for r, v in on.items()} == {r: v[0][0] for r, v in off.items()}
    stats = on_engine.stats()
    assert stats.prefix_cache_hits > 0 and 0 < stats.prefix_cache_hit_rate < 1
    assert stats.num_pages_used == 0


def test_second_identical_request_reuses_all_full_pages(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    prompt = [1] + list(range(10, 10 + 44))  # 45 tokens: 5 full pages + 5 tokens
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    first = _run(eng, [("a", prompt, sp)])
    before = eng.stats()
    second = _run(eng, [("b", prompt, sp)])
    after = eng.stats()
    assert first["a"][0][0] == second["b"][0][0]
    assert after.prefix_cache_queries - before.prefix_cache_queries == len(prompt)
    assert after.prefix_cache_hits - before.prefix_cache_hits == (len(prompt) - 1) // PAGE * PAGE  # 40 tokens
    # finished requests leave their full pages cached: 45 prompt + 4 fed-back output tokens = 6 full pages
    assert before.prefix_cache_pages == after.prefix_cache_pages == (len(prompt) + 4) // PAGE
    assert eng.flush_prefix_cache() == after.prefix_cache_pages
    assert eng.stats().prefix_cache_pages == 0 and eng.stats().prefix_cache_evictions == 0
    third = _run(eng, [("c", prompt, sp)])
    assert eng.stats().prefix_cache_hits == after.prefix_cache_hits  # flushed: no new hits
    assert third["c"][0][0] == first["a"][0][0]


def test_sharing_survives_preemption_and_abort(tiny_model_dir):
    reqs, arrivals = _shared_prefix_workload(seed=1)
    ref = _run(_engine(tiny_model_dir, enable_prefix_caching=False), reqs, arrivals)
    # ~24 pages: forces preemption while pages are shared
    tight = _engine(tiny_model_dir, kv_cache_memory=24 * PAGE * 512)
    tight.add_request("victim", reqs[0][1] + [9, 9, 9], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    tight.step()
    tight.abort_request("victim")
    got = _run(tight, reqs, arrivals)
    assert tight.stats().num_preemptions > 0
    assert tight.stats().prefix_cache_evictions > 0  # 24 pages: cached pages of finished requests reclaimed
    assert {r: v[0][0] for r, v in got.items() if r != "victim"} == {r: v[0][0] for r, v in ref.items()}
    assert tight.stats().num_pages_used == 0


def test_grouped_decode_over_shared_prefixes_identical_outputs(tiny_model_dir, monkeypatch):
    """Decode rows sharing cached prefix pages are attended to them as a group (the XLA path's
    shared-prefix pass): outputs equal the cache-off run, and the grouping is checked to be active."""
    import jax.numpy as jnp

    import jaxinfer.engine as engine_mod
    from pallas_kernels.ragged_paged_attention import metadata, shared_prefix, tuning

    rng = np.random.default_rng(5)
    systems = ([1] + rng.integers(3, 300, size=69).tolist(), [1] + rng.integers(3, 300, size=79).tolist())
    reqs, arrivals = [], []
    for g, system in enumerate(systems):  # 70 tokens (mid-page) and 80 (page boundary)
        for i in range(4):
            question = rng.integers(3, 300, size=int(rng.integers(2, 12))).tolist()
            reqs.append((f"g{g}q{i}", system + question, SamplingParams(temperature=0, max_tokens=10,
                                                                        ignore_eos=True)))
            arrivals.append(i)
    steps = []
    real_pack = engine_mod.pack_step_inputs
    monkeypatch.setattr(engine_mod, "pack_step_inputs", lambda *a: steps.append(real_pack(*a)) or steps[-1])
    on = _run(_engine(tiny_model_dir), reqs, arrivals)
    monkeypatch.undo()
    off = _run(_engine(tiny_model_dir, enable_prefix_caching=False), reqs, arrivals)
    assert {r: v[0][0] for r, v in on.items()} == {r: v[0][0] for r, v in off.items()}
    bs = tuning.xla_block_sizes(64, 8, PAGE, -(-200 // PAGE))
    grouped = 0
    for x in steps:
        table = metadata.seq_table(jnp.asarray(x.kv_lens), jnp.asarray(x.cu_q_lens), jnp.asarray(x.num_seqs))
        g = shared_prefix.find_groups(table, jnp.asarray(x.page_indices), PAGE, bs.shared_prefix_min_pages,
                                      len(x.tokens))
        grouped = max(grouped, int(g.num_rows))
    assert grouped >= 4


def test_llm_reset_prefix_cache(tiny_model_dir):
    from jaxinfer import LLM

    path, _ = tiny_model_dir("llama")
    llm = LLM(str(path), max_model_len=64)
    prompt = [1] + list(range(10, 10 + 20))  # 21 tokens: at least one full page at any page size <= 16
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = llm.generate([prompt], sp)[0].outputs[0].token_ids
    held = llm.engine.stats().prefix_cache_pages
    assert held > 0
    assert llm.reset_prefix_cache() == held
    assert llm.engine.stats().prefix_cache_pages == 0
    hits = llm.engine.stats().prefix_cache_hits
    assert llm.generate([prompt], sp)[0].outputs[0].token_ids == first
    assert llm.engine.stats().prefix_cache_hits == hits  # nothing left to reuse after the reset
