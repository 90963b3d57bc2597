"""The host side of structured output: one llguidance matcher per constrained sequence.

Each step the engine asks for the packed token bitmask of every constrained row that samples
(:meth:`GrammarMatchers.masks`: ``i32[W]`` per row, ``W = ceil(V / 32)``, bit ``t % 32`` of word ``t // 32``
set when token ``t`` is allowed; EOS ids only while the grammar accepts), the sampler masks the logits on the
device, and after the step each sequence's matcher consumes the tokens the sequence accepted
(:meth:`GrammarMatchers.advance`). A preempted sequence keeps its matcher: its outputs are kept and
recomputed as prompt, so the matcher state stays that of its accepted tokens. Constrained sequences do not
speculate (the engine gives them no lookahead), so a matcher never sees an unverified token.

The llguidance tokenizer is built from the engine's HF tokenizer on first use (about a second for a large
vocabulary) and kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import numpy as np

from jaxinfer.errors import InvalidRequestError
from jaxinfer.structured_output import PARAM, StructuredOutputsParams

logger = logging.getLogger(__name__)


def mask_words(vocab_size: int) -> int:
    """``W``: int32 words of one row's packed token bitmask."""
    return (vocab_size + 31) // 32


class GrammarMatchers:
    """Matchers of the constrained sequences of one engine.

    Args:
      tokenizer: the engine's HF fast tokenizer.
      vocab_size: ``V``, the model's logits width (a mask row has ``mask_words(V)`` words).
      eos_token_ids: every id that ends generation (all are allowed exactly when the grammar accepts).
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self.words = mask_words(vocab_size)
        self.eos_token_ids = list(eos_token_ids)
        self._ll = None
        self._ll_lock = threading.Lock()  # compile() may run on another thread than the engine's
        self._executor = None
        self._matchers: dict[str, object] = {}
        self.mask_seconds = 0.0  # host time spent computing masks, since construction
        self.num_masks = 0

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._matchers

    def __len__(self) -> int:
        return len(self._matchers)

    def ll_tokenizer(self):
        """The llguidance tokenizer (built once; thread-safe)."""
        with self._ll_lock:
            if self._ll is None:
                from llguidance.hf import from_tokenizer

                n_vocab = max(self.vocab_size, len(self._hf))
                self._ll = from_tokenizer(self._hf, n_vocab=n_vocab, eos_token=self.eos_token_ids or None)
            return self._ll

    def compile(self, params: StructuredOutputsParams):
        """The llguidance matcher of ``params`` (its grammar compiled for this tokenizer). Thread-safe and
        independent of the engine's state: a server calls it off the engine thread and passes the result
        as ``params.with_compiled(matcher)`` (llguidance releases the GIL while it compiles).

        Raises:
          InvalidRequestError (``structured_outputs``): the grammar does not compile for this tokenizer.
        """
        from llguidance import LLMatcher

        matcher = LLMatcher(self.ll_tokenizer(), params.grammar_spec(), log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"invalid {params.kind}: {matcher.get_error()}", PARAM)
        return matcher

    def create(self, params: StructuredOutputsParams, n: int) -> list:
        """``n`` fresh matchers for ``params``: copies of ``params.compiled`` when it was compiled ahead
        (which stays unadvanced, so several requests may share it), else compiled here.

        Raises:
          InvalidRequestError (``structured_outputs``): the grammar does not compile for this tokenizer.
        """
        if params.compiled is not None:
            return [params.compiled.deep_copy() for _ in range(n)]
        matcher = self.compile(params)
        return [matcher] + [matcher.deep_copy() for _ in range(n - 1)]

    def add(self, seq_id: str, matcher) -> None:
        self._matchers[seq_id] = matcher

    def forget(self, seq_id: str) -> None:
        """The sequence finished or was aborted (not preempted: a preempted sequence keeps its matcher)."""
        self._matchers.pop(seq_id, None)

    def masks(self, seq_ids: Sequence[str]) -> list[np.ndarray]:
        """The packed bitmask ``i32[W]`` of the next token of each sequence (in order)."""
        if not seq_ids:
            return []
        start = time.perf_counter()
        ll_words = mask_words(self.ll_tokenizer().vocab_size)  # >= W: its vocabulary covers the model's
        out = np.zeros((len(seq_ids), ll_words), np.int32)
        matchers = [self._matchers[s] for s in seq_ids]
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(out.ctypes.data, ll_words * 4)
        else:
            from llguidance import LLExecutor

            if self._executor is None:
                self._executor = LLExecutor()
            self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], out.ctypes.data,
                                                   out.shape[1] * 4, len(matchers))
        self.mask_seconds += time.perf_counter() - start
        self.num_masks += len(seq_ids)
        return list(out[:, : self.words])

    def advance(self, seq_id: str, tokens: Sequence[int]) -> bool:
        """Feed the sequence's newly accepted tokens; True when the grammar is complete (nothing but EOS may
        follow) or the matcher refused a token (logged: only a token the mask forbade can do that)."""
        m = self._matchers[seq_id]
        if not m.consume_tokens([int(t) for t in tokens]):
            logger.warning("structured output: sequence %s produced a token its grammar refuses (%s); ending it",
                           seq_id, m.get_error())
            return True
        return m.is_stopped()
