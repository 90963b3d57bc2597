"""Host side of speculative decoding, no jax: the n-gram proposer against a brute-force search, and
scheduler lookahead + rollback driven by a fake model that checks every sequence's K/V through its page
table (page accounting after every step, no leaks, outputs equal plain sequential generation)."""

import random

import numpy as np
import pytest

from jaxinfer.errors import InvalidRequestError
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from jaxinfer.sequence import Sequence
from jaxinfer.speculative.ngram import NgramProposer
from jaxinfer.speculative.params import resolve_num_speculative_tokens
from jaxinfer.step_inputs import StepBuckets, pack_rows
from tests.engine.host_sim import EOS, VOCAB, check_accounting, fake_next_token, random_requests, reference_generate


def _brute_ngram(tokens, k, n_min, n_max):
    num = len(tokens)
    for n in range(min(n_max, num - 1), n_min - 1, -1):
        suffix = tokens[num - n :]
        for end in range(num - 1, n - 1, -1):  # most recent earlier occurrence with a continuation
            if tokens[end - n : end] == suffix:
                ext = list(tokens)
                for i in range(k):
                    ext.append(ext[end + i])
                return ext[num:]
    return []


@pytest.mark.parametrize("seed", range(4))
def test_ngram_matches_brute_force(seed):
    rng = random.Random(seed)
    prop = NgramProposer(rng.randint(1, 2), rng.randint(2, 4))
    tokens = [rng.randrange(6) for _ in range(rng.randint(1, 5))]
    for _ in range(120):  # grow incrementally, as a sequence does (several tokens at a time after a verify)
        k = rng.randint(1, 5)
        assert prop.propose("s", tokens, k) == _brute_ngram(tokens, k, prop.ngram_min, prop.ngram_max)
        tokens += [rng.randrange(6) for _ in range(rng.randint(1, 3))]
    prop.forget("s")
    assert prop.propose("s", [1, 2, 3, 1, 2], 3) == [3, 1, 2]
    assert prop.propose("t", [1, 2, 3], 3) == []


def test_num_speculative_tokens_validation():
    sp, pen = SamplingParams(), SamplingParams(repetition_penalty=1.2)
    assert resolve_num_speculative_tokens(None, sp, "ngram", 4) == 4
    assert resolve_num_speculative_tokens(None, pen, "ngram", 4) == 0
    assert resolve_num_speculative_tokens(None, sp, None, 4) == 0
    assert resolve_num_speculative_tokens(2, sp, "draft", 4) == 2
    assert resolve_num_speculative_tokens(0, pen, None, 4) == 0
    for bad, method, params in [(5, "ngram", sp), (-1, "ngram", sp), (True, "ngram", sp), (1.0, "ngram", sp),
                                (2, None, sp), (2, "ngram", pen)]:
        with pytest.raises(InvalidRequestError) as e:
            resolve_num_speculative_tokens(bad, params, method, 4)
        assert e.value.param == "num_speculative_tokens"


class SpecFakeDevice:
    """Writes every fed token (drafts too) into a flat KV memory, checks each row's context read back
    through its page table (accepted tokens + this step's drafts), and verifies drafts against the fake
    model: accept while the draft is the model's next token, then emit the model's token."""

    def __init__(self, num_pages, page_size):
        self.ps = page_size
        self.kv = np.full(num_pages * page_size, -1, np.int64)

    def step(self, x, drafts, bm):
        n = x.num_tokens
        slots = x.slot_mapping[:n]
        assert (slots >= 0).all() and len(set(slots.tolist())) == n
        for slot in slots.tolist():
            assert bm.ref_count(slot // self.ps) == 1 and not bm.is_cached(slot // self.ps)
        self.kv[slots] = x.tokens[:n]
        out = []
        for s, (row, d) in enumerate(zip(x.rows, drafts)):
            kv_len = int(x.kv_lens[s])
            pos = np.arange(kv_len)
            ctx = self.kv[x.page_indices[s][pos // self.ps] * self.ps + pos % self.ps].tolist()
            known = kv_len - len(d)
            assert ctx == row.seq.all_token_ids[:known] + d, f"KV of {row.seq.request_id} is wrong"
            if not x.sample_mask[s]:
                out.append([])
                continue
            emitted = []
            for j in range(len(d) + 1):
                t = fake_next_token(ctx[: known + j])
                emitted.append(t)
                if j == len(d) or d[j] != t:
                    break
            out.append(emitted)
        return out


def _propose(rng, seq, k):
    """k drafts: the model's true continuation, corrupted at a random point (or not at all)."""
    ctx = list(seq.all_token_ids)
    good = rng.choice([0, 1, k, k, rng.randint(0, k)])
    out = []
    for j in range(k):
        t = fake_next_token(ctx) if j < good else rng.randrange(VOCAB)
        out.append(t)
        ctx.append(t)
    return out


@pytest.mark.parametrize("seed,tight,caching", [(0, False, True), (1, True, True), (2, True, False),
                                                (3, False, False), (4, True, True), (5, True, True)])
def test_speculative_rollback_page_accounting(seed, tight, caching):
    rng = random.Random(seed)
    cfg = SchedulerConfig(max_num_batched_tokens=48, max_num_seqs=6, max_model_len=96,
                          num_pages=22 if tight else 96, page_size=4, enable_prefix_caching=caching)
    sched = Scheduler(cfg, (EOS,))
    buckets = StepBuckets.from_scheduler_config(cfg)
    dev = SpecFakeDevice(cfg.num_pages, cfg.page_size)
    shared = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(4, 12))] for _ in range(3)]
    reqs = random_requests(rng, 24, 30, shared, max_tokens=30, spread=20)
    seqs = {r.rid: Sequence(r.rid, r.prompt, r.params, num_lookahead=rng.choice([0, 1, 3, 5]))
            for r in reqs}
    pending = sorted(reqs, key=lambda r: r.arrive)
    result, step, accepted = {}, 0, 0
    while pending or sched.has_unfinished():
        while pending and pending[0].arrive <= step:
            sched.add(seqs[pending.pop(0).rid])
        out = sched.schedule()
        step += 1
        if out.is_empty:
            continue
        assert out.num_scheduled_tokens + sum(r.num_lookahead for r in out.scheduled) <= cfg.max_num_batched_tokens
        drafts, rows, given = [], [], []
        for r in out.scheduled:
            assert r.num_lookahead == 0 or (r.num_new_tokens == 1 and r.samples)
            assert r.num_lookahead <= r.seq.num_lookahead
            k = rng.randint(0, r.num_lookahead)
            d = _propose(rng, r.seq, k) if k else []
            drafts.append(d)
            rows.append(ScheduledSeq(r.seq, r.start, r.num_new_tokens + k, r.samples, r.num_lookahead))
            given.append(r.seq.all_token_ids[r.start : r.start + r.num_new_tokens] + d if d else None)
        x = pack_rows(rows, buckets, given)
        emitted = dev.step(x, drafts, sched.block_manager)
        accepted += sum(max(len(e) - 1, 0) for e in emitted)
        for u in sched.update(out, emitted):
            if u.finished:
                assert not u.seq.block_table
                result[u.seq.request_id] = (list(u.seq.output_token_ids), u.seq.finish_reason)
        check_accounting(sched)
        for r in out.scheduled:  # rolled back: a verified sequence keeps pages for its known tokens only
            if r.num_lookahead and not r.seq.is_finished and r.seq.num_computed_tokens:
                assert len(r.seq.block_table) <= -(-r.seq.num_tokens // cfg.page_size)
                assert r.seq.num_computed_tokens == r.seq.num_tokens - 1
        assert step < 3000
    bm = sched.block_manager
    assert bm.num_used_pages == 0 and bm.num_free_pages == bm.num_pages
    assert accepted > 0
    if tight:
        assert sched.stats().num_preemptions > 0
    for r in reqs:
        assert result[r.rid] == reference_generate(r.prompt, r.params, cfg.max_model_len), r.rid
