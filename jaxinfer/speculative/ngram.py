"""N-gram (prompt-lookup) proposals: no extra model (pure Python, no jax).

For a sequence whose history (prompt + outputs) ends in the n-gram ``g``, the proposal is what followed
the most recent earlier occurrence of ``g``, longest ``n`` first (``ngram_max`` down to ``ngram_min``).
The copy continues through its own proposals, so a repeated block of period ``P`` is proposed in full
even when ``P < k``. Each sequence keeps an index ``n-gram -> end of its latest occurrence``, updated
incrementally as tokens arrive (``O(ngram_max)`` dictionary work per new token and per proposal).
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC


class _Index:
    """Latest end position (exclusive) of every n-gram that has at least one token after it."""

    __slots__ = ("ends", "upto")

    def __init__(self, n_min: int, n_max: int):
        self.ends = {n: {} for n in range(n_min, n_max + 1)}
        self.upto = 0  # n-grams ending at positions < upto are indexed

    def update(self, tokens: SequenceABC[int]) -> None:
        last = len(tokens) - 1  # an n-gram ending here has no continuation yet
        for e in range(max(self.upto, 1), last + 1):
            for n, table in self.ends.items():
                if e >= n:
                    table[tuple(tokens[e - n : e])] = e
        self.upto = max(self.upto, last + 1)


class NgramProposer:
    """Prompt-lookup proposer.

    Args:
      ngram_min, ngram_max: n-gram lengths to match (longest first).
    """

    def __init__(self, ngram_min: int = 1, ngram_max: int = 4):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max
        self._index: dict[str, _Index] = {}

    def propose(self, seq_id: str, tokens: SequenceABC[int], k: int) -> list[int]:
        """Up to ``k`` tokens continuing ``tokens`` (the sequence's whole history); ``[]`` without a match."""
        if k <= 0:
            return []
        index = self._index.get(seq_id)
        if index is None or index.upto > len(tokens):
            index = self._index[seq_id] = _Index(self.ngram_min, self.ngram_max)
        index.update(tokens)
        num = len(tokens)
        for n in range(min(self.ngram_max, num - 1), self.ngram_min - 1, -1):
            end = index.ends[n].get(tuple(tokens[num - n :]))
            if end is None:
                continue
            out: list[int] = []
            for i in range(k):
                j = end + i
                out.append(tokens[j] if j < num else out[j - num])
            return out
        return []

    def forget(self, seq_id: str) -> None:
        """Drop a finished or preempted sequence's index."""
        self._index.pop(seq_id, None)
