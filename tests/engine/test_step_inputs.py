"""Step packing: arrays against a plain-Python construction from the block tables; bucket coverage."""

from __future__ import annotations

import random

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from jaxinfer.scheduler import ScheduledSeq, SchedulerConfig, SchedulerOutput
from jaxinfer.sequence import Sequence
from jaxinfer.step_inputs import StepBuckets, pack_step_inputs


@st.composite
def scheduler_outputs(draw):
    """Random ragged batches: decodes (q_len 1) first, then prefill chunks, random block tables."""
    page_size = draw(st.sampled_from([1, 2, 4, 16]))
    max_model_len = draw(st.integers(8, 96))
    max_seqs = draw(st.integers(1, 12))
    max_tokens = draw(st.integers(max_seqs, 160))
    buckets = StepBuckets.from_limits(
        max_num_batched_tokens=max_tokens,
        max_num_seqs=max_seqs,
        max_model_len=max_model_len,
        page_size=page_size,
        min_token_bucket=draw(st.sampled_from([1, 8, 16])),
    )
    num_pages = buckets.pages_per_seq * max_seqs + 3
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    pages = list(range(num_pages))
    rng.shuffle(pages)
    rows, budget = [], max_tokens
    num_seqs = draw(st.integers(1, max_seqs))
    num_decodes = draw(st.integers(0, num_seqs))
    for i in range(num_seqs):
        if budget == 0:
            break
        total = draw(st.integers(1, max_model_len))
        q = 1 if i < num_decodes else draw(st.integers(1, min(total, budget)))
        start = total - q if draw(st.booleans()) else draw(st.integers(0, total - q))
        seq = Sequence(f"s{i}", [rng.randrange(1, 1000) for _ in range(total)])
        n_pages = min(-(-(start + q + draw(st.integers(0, 5))) // page_size), buckets.pages_per_seq)
        seq.block_table = [pages.pop() for _ in range(n_pages)]
        rows.append(ScheduledSeq(seq, start, q, start + q == total))
        budget -= q
    return SchedulerOutput(scheduled=rows, num_decode_seqs=min(num_decodes, len(rows))), buckets


@settings(max_examples=150, deadline=None)
@given(scheduler_outputs())
def test_pack_matches_plain_python(case):
    out, buckets = case
    x = pack_step_inputs(out, buckets)
    ps, P = buckets.page_size, buckets.pages_per_seq
    rows = out.scheduled
    n = sum(r.num_new_tokens for r in rows)
    T = min(b for b in buckets.token_buckets if b >= n)
    S = min(b for b in buckets.seq_buckets if b >= len(rows))
    assert x.bucket == (T, S) and x.num_tokens == n and x.rows == rows
    assert x.tokens.shape == x.positions.shape == x.slot_mapping.shape == (T,)
    assert x.cu_q_lens.shape == (S + 1,) and x.kv_lens.shape == x.logits_indices.shape == (S,)
    assert x.page_indices.shape == (S, P) and x.num_seqs.tolist() == [len(rows)]
    for name, arr in x.arrays().items():
        assert arr.dtype == (np.bool_ if name == "sample_mask" else np.int32), name

    tokens, positions, slots, cu, kv, table, logits, sample = [], [], [], [0], [], [], [], []
    for r in rows:
        for pos in range(r.start, r.start + r.num_new_tokens):
            tokens.append(r.seq.all_token_ids[pos])
            positions.append(pos)
            slots.append(r.seq.block_table[pos // ps] * ps + pos % ps)
        cu.append(cu[-1] + r.num_new_tokens)
        kv.append(r.start + r.num_new_tokens)
        table.append(r.seq.block_table + [0] * (P - len(r.seq.block_table)))
        logits.append(cu[-1] - 1)
        sample.append(r.samples)
    pad_t, pad_s = T - n, S - len(rows)
    assert x.tokens.tolist() == tokens + [0] * pad_t
    assert x.positions.tolist() == positions + [0] * pad_t
    assert x.slot_mapping.tolist() == slots + [-1] * pad_t
    assert x.cu_q_lens.tolist() == cu + [n] * pad_s
    assert x.kv_lens.tolist() == kv + [0] * pad_s
    assert x.page_indices.tolist() == table + [[0] * P] * pad_s
    assert x.logits_indices.tolist() == logits + [0] * pad_s
    assert x.sample_mask.tolist() == sample + [False] * pad_s
    # The attention op's convention: row i of sequence s is at position kv_len - q_len + i.
    for s in range(len(rows)):
        q = x.cu_q_lens[s + 1] - x.cu_q_lens[s]
        for i in range(q):
            assert x.positions[x.cu_q_lens[s] + i] == x.kv_lens[s] - q + i


def test_bucket_lists():
    b = StepBuckets.from_limits(max_num_batched_tokens=100, max_num_seqs=48, max_model_len=130, page_size=16)
    assert b.token_buckets == (16, 32, 64, 100)
    assert b.seq_buckets == (1, 2, 4, 8, 16, 32, 48)
    assert b.pages_per_seq == 9
    assert b.token_bucket(1) == 16 and b.token_bucket(17) == 32 and b.token_bucket(100) == 100
    assert b.seq_bucket(33) == 48
    with pytest.raises(ValueError):
        b.token_bucket(101)
    small = StepBuckets.from_limits(max_num_batched_tokens=8, max_num_seqs=8, max_model_len=8, page_size=4)
    assert small.token_buckets == (8,) and small.pages_per_seq == 2
    cfg = SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=64, max_model_len=1024, page_size=16)
    b2 = StepBuckets.from_scheduler_config(cfg, min_seq_bucket=8)
    assert b2.token_buckets == (16, 32, 64, 128, 256, 512) and b2.seq_buckets == (8, 16, 32, 64)
    assert b2.pages_per_seq == 64


@pytest.mark.parametrize("limits", [(100, 48, 16), (40, 48, 16), (64, 8, 1), (7, 3, 16), (33, 33, 4)])
def test_shapes_are_exactly_the_reachable_buckets(limits):
    max_tokens, max_seqs, min_tok = limits
    if max_tokens < max_seqs:
        max_seqs = max_tokens
    b = StepBuckets.from_limits(
        max_num_batched_tokens=max_tokens,
        max_num_seqs=max_seqs,
        max_model_len=64,
        page_size=4,
        min_token_bucket=min_tok,
    )
    reachable = {
        (b.token_bucket(t), b.seq_bucket(s))
        for t in range(1, max_tokens + 1)
        for s in range(1, min(t, max_seqs) + 1)
    }
    assert set(b.shapes()) == reachable and len(b.shapes()) == len(reachable)


def test_pack_rejects_bad_batches():
    b = StepBuckets.from_limits(max_num_batched_tokens=16, max_num_seqs=2, max_model_len=16, page_size=4)
    with pytest.raises(ValueError, match="nothing scheduled"):
        pack_step_inputs(SchedulerOutput(), b)
    seq = Sequence("a", list(range(1, 20)))
    seq.block_table = [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="exceed"):
        pack_step_inputs(SchedulerOutput([ScheduledSeq(seq, 0, 17, False)]), b)
    seq.block_table = [0]
    with pytest.raises(ValueError, match="block table"):
        pack_step_inputs(SchedulerOutput([ScheduledSeq(seq, 0, 8, False)]), b)
