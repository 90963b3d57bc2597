"""Paged KV-cache bookkeeping: reference-counted pages and automatic prefix caching (pure Python, no jax).

Every page is in exactly one of three states:

* **used**: ``ref_count > 0`` (in some sequence's block table; shared pages have ``ref_count > 1``);
* **free**: ``ref_count == 0`` and not in the prefix cache;
* **cached, unreferenced**: ``ref_count == 0`` and registered in the prefix cache; kept in an LRU list and
  evicted (least recently freed first) only when a page is needed and no free page is left.

so ``num_free + num_used + num_cached_unreferenced == num_pages`` at all times.

Prefix caching works on FULL pages. Page ``i`` of a sequence is keyed by a chained digest
``sha256(key(i - 1) || page tokens)`` (the chain makes the key depend on the whole prefix; SHA-256 makes
collisions practically impossible, so a hit never maps to a page holding other tokens). A page is
registered once it is full AND its K/V is computed (:meth:`BlockManager.cache_full_pages`, called after
the step that filled it). On admission :meth:`BlockManager.find_cached_prefix` returns the longest run of
cached pages, capped so that at least one prompt token is left to compute (the step needs it for logits):
at most ``(num_tokens - 1) // page_size`` pages. Cached pages are never written: writes only go to
positions ``>= num_computed_tokens``, which lie in private, unregistered pages.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass

from jaxinfer.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    """Ceiling division for non-negative ints."""
    return -(-a // b)


def hash_page_tokens(parent: bytes, token_ids: SequenceABC[int]) -> bytes:
    """Digest of one full page: SHA-256 over the parent page's digest and the page's token ids (int64)."""
    h = hashlib.sha256(parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def root_hash(cache_salt: str | None) -> bytes:
    """Parent digest of a sequence's first page (sequences with different salts never share pages)."""
    if cache_salt is None:
        return b""
    return hashlib.sha256(b"salt:" + cache_salt.encode("utf-8")).digest()


@dataclass(frozen=True)
class BlockManagerStats:
    """A snapshot for metrics. ``hit_rate = num_hit_tokens / num_query_tokens`` (0 when nothing queried).

    ``num_query_tokens`` counts the tokens of every admission (prompt, plus outputs for a preempted
    sequence recomputed), ``num_hit_tokens`` those served from the prefix cache.
    """

    num_pages: int
    page_size: int
    num_free_pages: int  # allocatable: free + cached unreferenced
    num_used_pages: int
    num_cached_pages: int  # registered in the prefix cache (referenced or not)
    num_cached_unreferenced_pages: int
    num_query_tokens: int
    num_hit_tokens: int
    num_evictions: int

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0

    @property
    def usage(self) -> float:
        """Fraction of pages in use by sequences (0..1)."""
        return self.num_used_pages / self.num_pages


class BlockManager:
    """Allocates KV pages to sequences, with reference counts and an automatic prefix cache.

    Args:
      num_pages: pages in the KV cache (page ids are ``0 .. num_pages - 1``).
      page_size: tokens per page, a power of two.
      enable_prefix_caching: register full computed pages and reuse them across sequences (default on).

    The block manager edits ``seq.block_table``, ``seq.num_computed_tokens`` (only when cached pages are
    adopted or pages dropped), ``seq.num_cached_tokens``, ``seq.page_hashes`` and
    ``seq.num_registered_pages``; nothing else.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages must be an integer >= 1, got {num_pages!r}")
        if not isinstance(page_size, int) or page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size!r}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._ref = [0] * num_pages
        self._page_hash: list[bytes | None] = [None] * num_pages
        self._hash_to_page: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU: oldest first
        self._num_query_tokens = 0
        self._num_hit_tokens = 0
        self._num_evictions = 0

    # ---- accounting --------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can take now: free ones plus cached unreferenced ones (evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_pages(self) -> int:
        """Pages referenced by at least one sequence."""
        return self.num_pages - len(self._free) - len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        """Pages registered in the prefix cache (referenced or not)."""
        return len(self._hash_to_page)

    @property
    def num_cached_unreferenced_pages(self) -> int:
        return len(self._evictable)

    def ref_count(self, page_id: int) -> int:
        return self._ref[page_id]

    def is_cached(self, page_id: int) -> bool:
        """True when the page is registered in the prefix cache (its content must never change)."""
        return self._page_hash[page_id] is not None

    def stats(self) -> BlockManagerStats:
        return BlockManagerStats(
            num_pages=self.num_pages,
            page_size=self.page_size,
            num_free_pages=self.num_free_pages,
            num_used_pages=self.num_used_pages,
            num_cached_pages=self.num_cached_pages,
            num_cached_unreferenced_pages=len(self._evictable),
            num_query_tokens=self._num_query_tokens,
            num_hit_tokens=self._num_hit_tokens,
            num_evictions=self._num_evictions,
        )

    # ---- page primitives ---------------------------------------------------------------------------
    def _take_page(self) -> int:
        if self._free:
            pid = self._free.popleft()
        else:
            pid, _ = self._evictable.popitem(last=False)
            self._unregister(pid)
            self._num_evictions += 1
        self._ref[pid] = 1
        return pid

    def _incref(self, pid: int) -> None:
        if self._ref[pid] == 0:
            del self._evictable[pid]
        self._ref[pid] += 1

    def _decref(self, pid: int) -> None:
        if self._ref[pid] <= 0:
            raise RuntimeError(f"page {pid} freed more often than allocated")
        self._ref[pid] -= 1
        if self._ref[pid] == 0:
            if self._page_hash[pid] is not None:
                self._evictable[pid] = None  # most recently used end
            else:
                self._free.append(pid)

    def _unregister(self, pid: int) -> None:
        key = self._page_hash[pid]
        if key is not None:
            del self._hash_to_page[key]
            self._page_hash[pid] = None

    def _page_hashes(self, seq: Sequence, num_pages: int) -> list[bytes]:
        """``seq.page_hashes`` extended to at least ``num_pages`` full pages (memoized on the sequence)."""
        hashes = seq.page_hashes
        ps = self.page_size
        tokens = seq.all_token_ids
        while len(hashes) < num_pages:
            i = len(hashes)
            parent = hashes[-1] if hashes else root_hash(seq.cache_salt)
            hashes.append(hash_page_tokens(parent, tokens[i * ps : (i + 1) * ps]))
        return hashes

    # ---- sequence operations -----------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Page ids of the longest cached prefix of ``seq``'s tokens (full pages only; changes nothing).

        At most ``(seq.num_tokens - 1) // page_size`` pages, so at least one token is left to compute.
        Returns ``[]`` when prefix caching is off. Pass the result straight to :meth:`allocate_slots`.
        """
        if not self.enable_prefix_caching:
            return []
        max_pages = (seq.num_tokens - 1) // self.page_size
        pages: list[int] = []
        for i in range(max_pages):
            pid = self._hash_to_page.get(self._page_hashes(seq, i + 1)[i])
            if pid is None:
                break
            pages.append(pid)
        return pages

    def pending_page_keys(self, seq: Sequence) -> list[bytes]:
        """Keys of ``seq``'s full pages whose K/V is not computed yet (they are cached once computed).

        Empty when prefix caching is off. The scheduler uses them to hold back a waiting sequence whose
        next page another sequence is about to compute, instead of computing the same page twice.
        """
        if not self.enable_prefix_caching:
            return []
        first, full = seq.num_computed_tokens // self.page_size, seq.num_tokens // self.page_size
        return self._page_hashes(seq, full)[first:full] if full > first else []

    def next_page_key(self, seq: Sequence, num_cached_pages: int) -> bytes | None:
        """Key of the page after a cached prefix of ``num_cached_pages`` pages, when that page could itself
        be served from the cache (a full page before the last prompt token); else ``None``."""
        if not self.enable_prefix_caching or num_cached_pages >= (seq.num_tokens - 1) // self.page_size:
            return None
        return self._page_hashes(seq, num_cached_pages + 1)[num_cached_pages]

    def num_pages_needed(
        self, seq: Sequence, num_new_tokens: int, cached_pages: SequenceABC[int] = (), num_lookahead: int = 0
    ) -> int:
        """New pages :meth:`allocate_slots` would take (cached pages excluded)."""
        total = seq.num_computed_tokens + len(cached_pages) * self.page_size + num_new_tokens + num_lookahead
        return max(cdiv(total, self.page_size) - len(seq.block_table) - len(cached_pages), 0)

    def allocate_slots(
        self,
        seq: Sequence,
        num_new_tokens: int,
        cached_pages: SequenceABC[int] = (),
        num_lookahead: int = 0,
    ) -> bool:
        """Grow ``seq.block_table`` to hold ``num_computed_tokens + num_new_tokens + num_lookahead`` slots.

        ``cached_pages`` (from :meth:`find_cached_prefix`, only for a sequence without pages) are adopted
        first: their ref counts go up and ``seq.num_computed_tokens`` / ``seq.num_cached_tokens`` become
        ``len(cached_pages) * page_size``. All or nothing: returns False and changes nothing when too few
        pages can be freed up (free + evictable, minus evictable pages that are themselves being adopted).
        """
        if num_new_tokens < 0 or num_lookahead < 0:
            raise ValueError("num_new_tokens and num_lookahead must be >= 0")
        if cached_pages and (seq.block_table or seq.num_computed_tokens):
            raise ValueError("cached pages can only be adopted by a sequence without pages")
        needed = self.num_pages_needed(seq, num_new_tokens, cached_pages, num_lookahead)
        adopt_evictable = sum(1 for pid in cached_pages if self._ref[pid] == 0)
        if needed > self.num_free_pages - adopt_evictable:
            return False
        admission = not seq.block_table and seq.num_computed_tokens == 0
        for pid in cached_pages:
            self._incref(pid)
        seq.block_table.extend(cached_pages)
        seq.block_table.extend(self._take_page() for _ in range(needed))
        if admission:
            hit = len(cached_pages) * self.page_size
            seq.num_computed_tokens = hit
            seq.num_cached_tokens = hit
            seq.num_registered_pages = len(cached_pages)
            self._num_query_tokens += seq.num_tokens
            self._num_hit_tokens += hit
        return True

    def cache_full_pages(self, seq: Sequence) -> int:
        """Register ``seq``'s full, computed pages in the prefix cache; returns how many were added.

        Call after each step that advanced ``seq.num_computed_tokens``. A page whose key is already cached
        (another sequence computed the same tokens at the same time) stays private and is freed normally.
        """
        if not self.enable_prefix_caching:
            return 0
        num_full = min(seq.num_computed_tokens // self.page_size, len(seq.block_table))
        start = seq.num_registered_pages
        if num_full <= start:
            return 0
        hashes = self._page_hashes(seq, num_full)
        added = 0
        for i in range(start, num_full):
            pid, key = seq.block_table[i], hashes[i]
            if self._page_hash[pid] is None and key not in self._hash_to_page:
                self._page_hash[pid] = key
                self._hash_to_page[key] = pid
                added += 1
        seq.num_registered_pages = num_full
        return added

    def free(self, seq: Sequence) -> None:
        """Release all of ``seq``'s pages (finish, abort, preemption); its KV is gone.

        Cached pages stay in the prefix cache (unreferenced ones become evictable, the sequence's last pages
        first, so a shared prefix outlives the tails). ``seq.num_computed_tokens`` becomes 0; the page hashes
        are kept (they depend only on the tokens), so a preempted sequence finds its own pages again.
        """
        for pid in reversed(seq.block_table):
            self._decref(pid)
        seq.block_table.clear()
        seq.num_computed_tokens = 0
        seq.num_registered_pages = 0

    def truncate(self, seq: Sequence, num_tokens: int) -> int:
        """Shrink ``seq``'s KV to its first ``num_tokens`` token slots (speculative-decoding rollback).

        Pages past ``ceil(num_tokens / page_size)`` are released (a shared page only loses this reference).
        If the new last page is partial and registered in the prefix cache, later tokens would overwrite its
        tail: a private page is un-registered; a shared one is dropped too and its tokens must be recomputed.
        ``seq.num_computed_tokens`` is clamped to the slots whose K/V is still valid, which is returned.
        The caller trims ``seq``'s token ids itself if the tokens change.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        ps = self.page_size
        keep = cdiv(num_tokens, ps)
        table = seq.block_table
        for pid in reversed(table[keep:]):
            self._decref(pid)
        del table[keep:]
        valid = min(num_tokens, len(table) * ps)
        if valid % ps and table and self._page_hash[table[-1]] is not None:
            pid = table[-1]
            if self._ref[pid] == 1:
                self._unregister(pid)
            else:
                self._decref(pid)
                table.pop()
                valid = len(table) * ps
        full = valid // ps
        del seq.page_hashes[full:]
        seq.num_registered_pages = min(seq.num_registered_pages, full)
        seq.num_computed_tokens = min(seq.num_computed_tokens, valid)
        return seq.num_computed_tokens

    def flush(self) -> int:
        """Drop every cached page no sequence references (they become free); returns how many.

        Pages in use stay registered. Use between benchmark runs to start from a cold prefix cache.
        """
        dropped = len(self._evictable)
        while self._evictable:
            pid, _ = self._evictable.popitem(last=False)
            self._unregister(pid)
            self._free.append(pid)
        return dropped
