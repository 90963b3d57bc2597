"""Shared-prefix (cascade) grouping in the XLA ragged paged attention: decode rows whose page tables
share leading pages are attended to those pages as a group and merged with their own keys. Checked
against the independent float64 oracle (which reads every key through each sequence's own page
table), with the grouping asserted to be active, so a test cannot pass by never grouping."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rpa_testlib import Geometry, device_args, make_batch, num_real_rows, oracle

from pallas_kernels.ragged_paged_attention import metadata, reference, shared_prefix, tuning
from pallas_kernels.ragged_paged_attention.tuning import XlaBlockSizes

SM_SCALE = 0.125
F32_TOL = dict(atol=1e-5, rtol=1e-5)
GEO = Geometry(num_tokens=48, max_seqs=24, num_q_heads=9, num_kv_heads=3, head_dim=64, page_size=8,
               pages_per_seq=8, num_pages=200)


def _sizes(min_pages: int, rows: int = 2, group: int = 2) -> XlaBlockSizes:
    return XlaBlockSizes(block_q=8, decode_group=3, prefill_group=2, kv_pages_per_block=2, short_q=4,
                         short_group=2, shared_prefix_min_pages=min_pages, shared_prefix_rows=rows,
                         shared_prefix_group=group)


def _share(batch, dst: int, src: int, pages: int) -> None:
    """Point ``dst``'s first ``pages`` page-table slots at ``src``'s pages (a cached shared prefix)."""
    batch.page_indices[dst, :pages] = batch.page_indices[src, :pages]


def _structured_batch():
    """Decode groups with different shared depths, a prefill chunk and a verify row on shared pages,
    a sequence sharing too little, and boundary lengths (query right after the prefix, on a page edge)."""
    ps = GEO.page_size
    lengths = [(1, 45), (1, 40), (1, 33), (1, 50), (1, 64),  # group led by 0 (seq 3 shares 2 pages)
               (1, 30), (1, 25), (4, 31), (3, 29),  # group led by 5 + prefill and verify rows on it
               (1, 20), (1, 12), (1, 1), (1, 3 * ps + 1), (1, 4 * ps)]
    batch = make_batch(np.random.default_rng(0), GEO, lengths)
    for dst in (1, 2, 4):
        _share(batch, dst, 0, 4)
    _share(batch, 3, 0, 2)
    for dst in (6, 7, 8):
        _share(batch, dst, 5, 3)
    _share(batch, 9, 0, 1)  # one shared page: below min_pages 2
    _share(batch, 12, 0, 3)  # kv_len = 3 pages + 1: its query is the first key after the prefix
    _share(batch, 13, 0, 3)  # kv_len = 4 pages: the query's key ends its own 4th page
    return batch


def _groups(batch, min_pages: int):
    args = device_args(batch, jnp.float32)
    table = metadata.seq_table(args[2], args[4], args[5])
    return shared_prefix.find_groups(table, args[3], GEO.page_size, min_pages, GEO.num_tokens)


def _run(batch, bs, layout="token_major", **opts):
    out = reference.ragged_paged_attention_xla(*device_args(batch, jnp.float32, layout), sm_scale=SM_SCALE,
                                               block_sizes=bs, **opts)
    return np.asarray(out, np.float64)


def test_grouping_of_the_structured_batch():
    """Which rows are grouped, and from which key each one's own pass starts."""
    g = _groups(_structured_batch(), 2)
    ps = GEO.page_size
    key_start = np.asarray(g.key_start)
    # Group of 0: members 0-4, 12, 13 (decode, >= 2 shared pages with 0); prefix min(4, 2, 3) pages.
    # Group of 5: member 6 and 5 itself (7 and 8 are multi-token rows).
    want = {0: 2, 1: 2, 2: 2, 3: 2, 4: 2, 12: 2, 13: 2, 5: 3, 6: 3}
    for s in range(len(key_start)):
        assert key_start[s] == want.get(s, 0) * ps, s
    assert int(g.num_rows) == len(want)
    assert np.asarray(g.table.q_len)[[0, 5]].tolist() == [7, 2]
    assert int(np.asarray(g.table.q_len).sum()) == len(want)


@pytest.mark.parametrize("layout", ["token_major", "head_major"])
@pytest.mark.parametrize("min_pages,rows,group", [(1, 2, 2), (2, 2, 1), (3, 8, 2)])
def test_structured_batch_matches_oracle(min_pages, rows, group, layout):
    batch = _structured_batch()
    assert int(_groups(batch, min_pages).num_rows) >= 2
    got = _run(batch, _sizes(min_pages, rows, group), layout)
    np.testing.assert_allclose(got, oracle(batch, SM_SCALE), **F32_TOL)
    assert np.all(got[num_real_rows(batch):] == 0)
    # Same result as the ungrouped path, to float32 rounding.
    np.testing.assert_allclose(got, _run(batch, _sizes(0), layout), atol=2e-6, rtol=2e-6)


def test_soft_cap_with_grouping_and_window_disables_it():
    batch = _structured_batch()
    got = _run(batch, _sizes(2), soft_cap=3.0)
    np.testing.assert_allclose(got, oracle(batch, SM_SCALE, soft_cap=3.0), **F32_TOL)
    got = _run(batch, _sizes(2), sliding_window=11)  # grouping is skipped with a sliding window
    np.testing.assert_allclose(got, oracle(batch, SM_SCALE, sliding_window=11), **F32_TOL)


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2**31 - 1), min_pages=st.integers(1, 3))
def test_random_sharing_matches_oracle(seed, min_pages):
    """Random decode / verify mixes where random sequences adopt random-depth prefixes of others."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 16))
    lengths = [(1 if rng.random() < 0.8 else int(rng.integers(2, 4)), int(rng.integers(1, 64)))
               for _ in range(n)]
    batch = make_batch(rng, GEO, lengths)
    ps = GEO.page_size
    for dst in range(1, n):
        src = int(rng.integers(0, dst))
        can = min((lengths[dst][1] - 1) // ps, lengths[src][1] // ps)
        if can >= 1 and rng.random() < 0.7:
            _share(batch, dst, src, int(rng.integers(1, can + 1)))
    got = _run(batch, _sizes(min_pages))
    np.testing.assert_allclose(got, oracle(batch, SM_SCALE), **F32_TOL)


def test_default_sizes_group_engine_like_prefixes():
    """The production block sizes turn grouping on: four groups of eight rows sharing 512 tokens."""
    geo = dataclasses.replace(GEO, num_tokens=32, max_seqs=32, page_size=16, pages_per_seq=40, num_pages=1200)
    rng = np.random.default_rng(1)
    lengths = [(1, 512 + int(rng.integers(2, 80))) for _ in range(32)]
    batch = make_batch(rng, geo, lengths, nan_padding=False)
    for g in range(4):
        for m in range(1, 8):
            _share(batch, 8 * g + m, 8 * g, 32)
    bs = tuning.xla_block_sizes(32, 32, 16, 40)
    assert bs.shared_prefix_min_pages > 0
    args = device_args(batch, jnp.float32)
    table = metadata.seq_table(args[2], args[4], args[5])
    groups = shared_prefix.find_groups(table, args[3], 16, bs.shared_prefix_min_pages, 32)
    assert int(groups.num_rows) == 32 and np.all(np.asarray(groups.key_start)[:32] == 512)
    got = np.asarray(reference.ragged_paged_attention_xla(*args, sm_scale=SM_SCALE), np.float64)
    np.testing.assert_allclose(got, oracle(batch, SM_SCALE), **F32_TOL)
