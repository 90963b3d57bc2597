"""Block manager: property tests against an independent model of pages and a simulated KV memory."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jaxinfer.block_manager import BlockManager, cdiv, hash_page_tokens, root_hash
from jaxinfer.sequence import Sequence

PS = 4

# A few shared prefixes so prompts share full pages; tokens from a tiny alphabet.
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5], []]


def check_accounting(bm: BlockManager, live: list[Sequence]) -> None:
    """Reference counts equal the number of live block tables holding each page; every page is in exactly
    one of used / free / cached-unreferenced; cache registry consistent."""
    expected = [0] * bm.num_pages
    for seq in live:
        assert len(set(seq.block_table)) == len(seq.block_table), "a page twice in one block table"
        for pid in seq.block_table:
            expected[pid] += 1
    for pid in range(bm.num_pages):
        assert bm.ref_count(pid) == expected[pid] >= 0
    free, evictable = set(bm._free), set(bm._evictable)
    used = {p for p in range(bm.num_pages) if expected[p] > 0}
    assert len(free) == len(bm._free), "page twice in the free list"
    assert not free & evictable and not free & used and not evictable & used
    assert len(free) + len(used) + len(evictable) == bm.num_pages
    assert bm.num_used_pages == len(used)
    assert bm.num_free_pages == len(free) + len(evictable)
    assert all(bm.is_cached(p) for p in evictable)
    assert not any(bm.is_cached(p) for p in free)
    assert all(bm._page_hash[p] == key for key, p in bm._hash_to_page.items())
    assert sum(bm.is_cached(p) for p in range(bm.num_pages)) == bm.num_cached_pages


class BlockManagerMachine(RuleBasedStateMachine):
    """Sequences are admitted (with prefix hits), grown and computed chunk by chunk, preempted, finished,
    rolled back, and the cache flushed, while a fake KV memory records what each slot holds."""

    @initialize(num_pages=st.integers(5, 14), caching=st.booleans())
    def setup(self, num_pages, caching):
        self.bm = BlockManager(num_pages, PS, enable_prefix_caching=caching)
        self.kv: dict[int, int] = {}  # slot -> token written there
        self.prefix_of: dict[int, tuple] = {}  # cached page -> token prefix it ends (independent model)
        self.live: list[Sequence] = []  # sequences holding pages
        self.parked: list[Sequence] = []  # preempted: no pages, tokens kept
        self.n = 0

    # -- helpers ------------------------------------------------------------------------------------
    def _write(self, seq: Sequence, n: int) -> None:
        """Simulate a step computing ``n`` tokens: slots must be private, unregistered pages."""
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            pid = seq.block_table[pos // PS]
            assert self.bm.ref_count(pid) == 1, "write into a shared page"
            assert not self.bm.is_cached(pid), "write into a cached page"
            self.kv[pid * PS + pos % PS] = seq.all_token_ids[pos]
        seq.num_computed_tokens += n
        before = {p for p in seq.block_table if self.bm.is_cached(p)}
        self.bm.cache_full_pages(seq)
        for i, pid in enumerate(seq.block_table):
            if self.bm.is_cached(pid) and pid not in before:
                assert (i + 1) * PS <= seq.num_computed_tokens
                self.prefix_of[pid] = tuple(seq.all_token_ids[: (i + 1) * PS])

    def _check_hits(self, seq: Sequence, hits: list[int]) -> None:
        assert len(hits) * PS <= seq.num_tokens - 1, "hit cap violated"
        for i, pid in enumerate(hits):
            assert self.bm.is_cached(pid)
            assert self.prefix_of[pid] == tuple(seq.all_token_ids[: (i + 1) * PS]), "hit with another prefix"
            for off in range(PS):
                assert self.kv.get(pid * PS + off) == seq.all_token_ids[i * PS + off], "stale KV in hit"

    def _admit(self, seq: Sequence, chunk: int, lookahead: int) -> bool:
        bm = self.bm
        hits = bm.find_cached_prefix(seq)
        self._check_hits(seq, hits)
        remaining = seq.num_tokens - len(hits) * PS
        n = min(chunk, remaining)
        free_before = bm.num_free_pages
        adopt_evictable = sum(bm.ref_count(p) == 0 for p in hits)
        need = cdiv(len(hits) * PS + n + lookahead, PS) - len(hits)
        evictions = bm.stats().num_evictions
        ok = bm.allocate_slots(seq, n, cached_pages=hits, num_lookahead=lookahead)
        assert ok == (need <= free_before - adopt_evictable)
        event("admit: " + ("refused" if not ok else "hit" if hits else "miss"))
        if bm.stats().num_evictions > evictions:
            event("admit: evicted")
        if not ok:
            assert seq.block_table == [] and seq.num_computed_tokens == 0
            return False
        assert seq.block_table[: len(hits)] == hits
        assert seq.num_computed_tokens == seq.num_cached_tokens == len(hits) * PS
        assert len(seq.block_table) == len(hits) + need
        self.live.append(seq)
        self._write(seq, n)
        return True

    # -- rules --------------------------------------------------------------------------------------
    @rule(
        prefix=st.sampled_from(range(len(PREFIXES))),
        tail=st.lists(st.integers(1, 3), max_size=9),
        chunk=st.integers(1, 24),
        lookahead=st.integers(0, 3),
    )
    def admit(self, prefix, tail, chunk, lookahead):
        tokens = PREFIXES[prefix] + tail
        if not tokens:
            tokens = [7]
        self.n += 1
        self._admit(Sequence(f"s{self.n}", tokens), chunk, lookahead)

    @precondition(lambda self: self.parked)
    @rule(data=st.data(), chunk=st.integers(1, 24))
    def readmit(self, data, chunk):
        seq = data.draw(st.sampled_from(self.parked))
        if self._admit(seq, chunk, 0):
            self.parked.remove(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.integers(1, 8), new_token=st.integers(1, 3), lookahead=st.integers(0, 2))
    def grow(self, data, chunk, new_token, lookahead):
        seq = data.draw(st.sampled_from(self.live))
        if seq.num_uncomputed_tokens == 0:
            seq.append_token(new_token)  # "sampled" after the chunk that reached the end
        n = min(chunk, seq.num_uncomputed_tokens)
        need = cdiv(seq.num_computed_tokens + n + lookahead, PS) - len(seq.block_table)
        free_before = self.bm.num_free_pages
        table_before = list(seq.block_table)
        ok = self.bm.allocate_slots(seq, n, num_lookahead=lookahead)
        assert ok == (need <= free_before)
        if ok:
            assert seq.block_table[: len(table_before)] == table_before
            self._write(seq, n)
        else:
            assert seq.block_table == table_before

    @precondition(lambda self: self.live)
    @rule(data=st.data(), preempt=st.booleans())
    def free(self, data, preempt):
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free(seq)
        assert seq.block_table == [] and seq.num_computed_tokens == 0
        if preempt:
            self.parked.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), new_tokens=st.lists(st.integers(1, 3), max_size=6))
    def rollback(self, data, new_tokens):
        """Truncate the KV (and the generated tokens), then continue with different tokens."""
        seq = data.draw(st.sampled_from(self.live))
        k = data.draw(st.integers(0, seq.num_tokens))
        shared_tail = bool(k % PS) and len(seq.block_table) >= cdiv(k, PS)
        shared_tail = shared_tail and self.bm.ref_count(seq.block_table[cdiv(k, PS) - 1]) > 1
        valid = self.bm.truncate(seq, k)
        event("rollback: shared partial page dropped" if shared_tail else "rollback")
        assert valid == seq.num_computed_tokens <= k
        assert len(seq.block_table) <= cdiv(k, PS)
        assert len(seq.page_hashes) * PS <= k  # no hash covers a token past k
        if valid % PS:
            assert not self.bm.is_cached(seq.block_table[-1]) and self.bm.ref_count(seq.block_table[-1]) == 1
        if k >= seq.num_prompt_tokens:
            seq.truncate_tokens(k)
            for t in new_tokens:
                seq.append_token(t)

    @rule()
    def flush(self):
        before = self.bm.num_free_pages
        dropped = self.bm.flush()
        assert self.bm.num_cached_unreferenced_pages == 0
        assert self.bm.num_free_pages == before
        assert dropped >= 0

    # -- invariants ---------------------------------------------------------------------------------
    @invariant()
    def accounting(self):
        check_accounting(self.bm, self.live)
        for seq in self.parked:
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        for seq in self.live:
            assert len(seq.block_table) * PS >= seq.num_computed_tokens

    @invariant()
    def cached_pages_hold_their_tokens(self):
        for pid in range(self.bm.num_pages):
            if self.bm.is_cached(pid):
                prefix = self.prefix_of[pid]
                assert [self.kv.get(pid * PS + o) for o in range(PS)] == list(prefix[-PS:])

    def teardown(self):
        for seq in self.live:
            self.bm.free(seq)
        self.live = []
        check_accounting(self.bm, [])
        assert self.bm.num_used_pages == 0
        assert self.bm.num_free_pages == self.bm.num_pages  # no leak


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ---- deterministic cases -----------------------------------------------------------------------------
def _computed(bm: BlockManager, seq: Sequence, hits=()) -> None:
    """Admit ``seq`` whole and mark it computed (one prefill step)."""
    n = seq.num_tokens - len(hits) * bm.page_size
    assert bm.allocate_slots(seq, n, cached_pages=hits)
    seq.num_computed_tokens += n
    bm.cache_full_pages(seq)


@pytest.mark.parametrize("length", [1, 3, 4, 5, 8, 9, 16, 17])
def test_identical_request_reuses_all_full_pages_but_the_cap(length):
    bm = BlockManager(32, PS)
    tokens = list(range(100, 100 + length))
    a = Sequence("a", tokens)
    _computed(bm, a)
    assert bm.num_cached_pages == length // PS  # every full computed page registered
    b = Sequence("b", tokens)
    hits = bm.find_cached_prefix(b)
    expected_pages = (length - 1) // PS  # at least one token is left to compute
    assert hits == a.block_table[:expected_pages]
    assert bm.allocate_slots(b, length - len(hits) * PS, cached_pages=hits)
    assert b.num_cached_tokens == expected_pages * PS
    for pid in hits:
        assert bm.ref_count(pid) == 2
    st = bm.stats()
    assert st.num_query_tokens == 2 * length and st.num_hit_tokens == expected_pages * PS


def test_prefix_hit_requires_the_whole_chain():
    """Same page content after a different prefix is not a hit (the key chains over the prefix)."""
    bm = BlockManager(32, PS)
    _computed(bm, Sequence("a", [1, 2, 3, 4, 5, 6, 7, 8, 0]))
    assert bm.find_cached_prefix(Sequence("b", [9, 9, 9, 9, 5, 6, 7, 8, 0])) == []
    assert len(bm.find_cached_prefix(Sequence("c", [1, 2, 3, 4, 9, 9, 9, 9, 0]))) == 1
    assert hash_page_tokens(b"", [1, 2, 3, 4]) != hash_page_tokens(root_hash("x"), [1, 2, 3, 4])


def test_cache_salt_separates_sequences():
    bm = BlockManager(32, PS)
    _computed(bm, Sequence("a", list(range(9)), cache_salt="tenant-1"))
    assert bm.find_cached_prefix(Sequence("b", list(range(9)))) == []
    assert bm.find_cached_prefix(Sequence("c", list(range(9)), cache_salt="tenant-2")) == []
    assert len(bm.find_cached_prefix(Sequence("d", list(range(9)), cache_salt="tenant-1"))) == 2


def test_finished_pages_stay_cached_and_are_evicted_lru():
    bm = BlockManager(4, PS)
    a, b = Sequence("a", list(range(0, 5))), Sequence("b", list(range(10, 15)))
    _computed(bm, a)
    _computed(bm, b)
    a_first, b_first = a.block_table[0], b.block_table[0]
    bm.free(a)
    bm.free(b)
    assert bm.num_cached_unreferenced_pages == 2 and bm.num_free_pages == 4
    # Two fresh pages come from the free list; the third evicts the least recently freed cached page (a's).
    c = Sequence("c", list(range(20, 29)))
    assert bm.allocate_slots(c, 9)
    assert bm.stats().num_evictions == 1
    assert not bm.is_cached(a_first) and bm.is_cached(b_first)
    assert bm.find_cached_prefix(Sequence("a2", list(range(0, 5)))) == []
    assert bm.find_cached_prefix(Sequence("b2", list(range(10, 15)))) == [b_first]


def test_allocation_is_all_or_nothing_and_counts_adopted_evictable_pages():
    bm = BlockManager(3, PS)
    a = Sequence("a", list(range(9)))
    _computed(bm, a)  # 3 pages, 2 full ones registered
    bm.free(a)
    b = Sequence("b", list(range(8)) + [50, 51, 52, 53, 54])  # hits 2 pages, needs 2 more: only 1 left
    hits = bm.find_cached_prefix(b)
    assert len(hits) == 2
    assert not bm.allocate_slots(b, 5, cached_pages=hits)
    assert b.block_table == [] and all(bm.ref_count(p) == 0 for p in range(3))
    assert bm.allocate_slots(b, 4, cached_pages=hits)  # 2 + 1 pages fit exactly
    assert bm.num_free_pages == 0


def test_prefix_caching_off_registers_nothing():
    bm = BlockManager(8, PS, enable_prefix_caching=False)
    a = Sequence("a", list(range(9)))
    _computed(bm, a)
    assert bm.num_cached_pages == 0
    bm.free(a)
    assert bm.find_cached_prefix(Sequence("b", list(range(9)))) == []
    assert bm.num_free_pages == 8


def test_duplicate_computation_keeps_one_cached_copy():
    bm = BlockManager(8, PS)
    a, b = Sequence("a", list(range(9))), Sequence("b", list(range(9)))
    assert bm.allocate_slots(a, 9) and bm.allocate_slots(b, 9)  # admitted in the same step: no hits
    for s in (a, b):
        s.num_computed_tokens = 9
        bm.cache_full_pages(s)
    assert bm.num_cached_pages == 2
    assert all(bm.is_cached(p) for p in a.block_table[:2]) and not any(bm.is_cached(p) for p in b.block_table)
    bm.free(b)
    assert bm.num_cached_unreferenced_pages == 0  # b's duplicates went back to the free list
    bm.free(a)
    assert bm.num_cached_unreferenced_pages == 2


def test_truncate_private_and_shared_pages():
    bm = BlockManager(16, PS)
    a = Sequence("a", list(range(12)))
    _computed(bm, a)  # pages 0..2 full and registered
    b = Sequence("b", list(range(12)) + [99])
    hits = bm.find_cached_prefix(b)
    assert len(hits) == 3
    _computed(bm, b, hits)
    # a's private registered page becomes partial: un-registered, kept.
    third = a.block_table[2]
    assert bm.ref_count(third) == 2  # shared with b
    # Shared page becoming partial: dropped, its tokens must be recomputed.
    assert bm.truncate(a, 10) == 8
    assert a.block_table == hits[:2] and bm.ref_count(third) == 1 and bm.is_cached(third)
    # Private registered page becoming partial: un-registered.
    b_first_private = b.block_table[3]
    assert bm.truncate(b, 10) == 10
    assert b.block_table == hits[:3] and not bm.is_cached(third) and bm.ref_count(b_first_private) == 0
    assert bm.truncate(b, 0) == 0 and b.block_table == []
    bm.free(a)
    bm.free(b)
    check_accounting(bm, [])
    assert bm.num_free_pages == 16


def test_flush_drops_only_unreferenced_cached_pages():
    bm = BlockManager(16, PS)
    a, b = Sequence("a", list(range(9))), Sequence("b", list(range(50, 59)))
    _computed(bm, a)
    _computed(bm, b)
    bm.free(a)
    assert bm.flush() == 2
    assert bm.num_cached_pages == 2  # b's pages are in use and stay registered
    assert bm.find_cached_prefix(Sequence("a2", list(range(9)))) == []
    assert len(bm.find_cached_prefix(Sequence("b2", list(range(50, 59))))) == 2


def test_bad_construction():
    with pytest.raises(ValueError):
        BlockManager(8, 3)
    with pytest.raises(ValueError):
        BlockManager(0, 4)
