"""Incremental detokenization with stop strings (pure Python, no jax).

Text is produced by decoding a short window of token ids twice: ``ids[prefix:read]`` (already shown) and
``ids[prefix:]``; the difference is the new text. Decoding a window rather than single tokens keeps the
spacing right for SentencePiece-style tokenizers (the "▁" prefix space is dropped only at the very start
of a decode) and for byte-level BPE (bytes of one character spread over several tokens). While the window
ends in U+FFFD (an incomplete UTF-8 character) nothing is shown; the window moves on only after a clean
emission, so every window starts on a character boundary and the concatenated deltas equal
``tokenizer.decode(all_ids)`` (without ``clean_up_tokenization_spaces``, which cannot be applied
incrementally). Exact for any ids with byte-level BPE, and for streams of valid UTF-8 with
SentencePiece byte fallback (``tokenizers``' ByteFallback decoder turns a whole invalid run of ``<0xNN>``
tokens into U+FFFD, including a leading byte already shown as a character).

Stop strings: text that could still turn into a stop string (a suffix equal to a stop string's prefix) is
held back; a stop string is found even when split across tokens, is never shown (unless
``include_stop_str_in_output``), and the text ends right before it. Among overlapping matches the one
that ends first wins, then the one that starts first. Matching runs an Aho-Corasick automaton over the
stop strings (built once per set of stops), fed only the new characters: a step costs time proportional
to its new text, whatever the number and length of the stop strings or the length of the output.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from functools import lru_cache

from jaxinfer.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 4


def make_decode_fn(tokenizer, skip_special_tokens: bool):
    """``ids -> str`` for a HF tokenizer (fast: its Rust backend; slow: ``decode`` without clean-up) or a
    ``tokenizers.Tokenizer``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    if type(tokenizer).__module__.startswith("tokenizers"):  # a bare tokenizers.Tokenizer
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


class StopMatcher:
    """Aho-Corasick automaton over a set of stop strings (immutable; states are ints, 0 the root).

    For a state reached by feeding text, ``match[state]`` is the length of the longest stop string the
    text ends with (0: none) and ``held[state]`` the length of the longest tail of the text that is a
    proper prefix of some stop string (text that must be held back).
    """

    def __init__(self, stops: tuple[str, ...]):
        goto: list[dict[str, int]] = [{}]
        depth = [0]
        match = [0]
        for s in stops:
            node = 0
            for ch in s:
                nxt = goto[node].get(ch)
                if nxt is None:
                    nxt = len(goto)
                    goto[node][ch] = nxt
                    goto.append({})
                    depth.append(depth[node] + 1)
                    match.append(0)
                node = nxt
            match[node] = len(s)
        fail = [0] * len(goto)
        held = [0] * len(goto)
        queue = deque(goto[0].values())
        while queue:  # breadth first: a node's failure target is shallower, so it is done already
            node = queue.popleft()
            f = fail[node]
            if not match[node]:
                match[node] = match[f]
            held[node] = depth[node] if goto[node] else held[f]
            for ch, child in goto[node].items():
                g = f
                while g and ch not in goto[g]:
                    g = fail[g]
                fail[child] = goto[g].get(ch, 0)
                queue.append(child)
        self._goto, self._fail = goto, fail
        self.match, self.held = match, held

    def feed(self, state: int, ch: str) -> int:
        goto, fail = self._goto, self._fail
        while True:
            nxt = goto[state].get(ch)
            if nxt is not None:
                return nxt
            if state == 0:
                return 0
            state = fail[state]


@lru_cache(maxsize=256)
def stop_matcher(stops: tuple[str, ...]) -> StopMatcher:
    """The (shared, immutable) automaton of a set of stop strings."""
    return StopMatcher(stops)


@dataclass(frozen=True)
class DetokenizerUpdate:
    """Result of :meth:`IncrementalDetokenizer.update`.

    Attributes:
      text: new text to show (may be empty while text is held back).
      stop_string: the stop string that matched, else None. When set and the sequence is still running,
        the engine must call ``scheduler.finish(request_id, "stop", stop_string)``.
      finished: no more text will come (stop string matched or final flush done).
    """

    text: str
    stop_string: str | None
    finished: bool


class IncrementalDetokenizer:
    """Turns a sequence's generated token ids into text deltas.

    Args:
      tokenizer: a HF tokenizer or ``tokenizers.Tokenizer``.
      skip_special_tokens: drop special tokens from the text.
      stop: stop strings.
      include_stop_str_in_output: keep the matched stop string at the end of the text.
      min_tokens: stop strings are only looked for once more than this many tokens were generated.
      prompt_token_ids: the prompt, used as decoding context so the first output token keeps its leading
        space (``text == decode(prompt + output)[len(decode(prompt)):]``); without it
        ``text == decode(output)``.
    """

    def __init__(
        self,
        tokenizer,
        *,
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
        prompt_token_ids: SequenceABC[int] | None = None,
    ):
        self._decode = make_decode_fn(tokenizer, skip_special_tokens)
        self._stops = tuple(s for s in stop if s)
        self._matcher = stop_matcher(self._stops) if self._stops else None
        self._state = 0  # the matcher's state after the whole text
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._ids: list[int] = []
        self._prefix = self._read = 0
        if prompt_token_ids:
            # A few prompt tokens of context; reach further back while they decode to nothing (e.g. only
            # skipped special tokens), so the first output token is not decoded as a text start.
            self._ids = [operator.index(t) for t in prompt_token_ids]  # TypeError for non-ids
            self._read = len(self._ids)
            self._prefix = max(self._read - _CONTEXT_TOKENS, 0)
            while self._prefix > 0 and not self._decode(self._ids[self._prefix : self._read]):
                self._prefix = max(self._prefix - _CONTEXT_TOKENS, 0)
        self._prefix_text: str | None = None
        self._text = ""  # decoded output text (possibly not all shown yet)
        self._shown = 0  # chars of _text returned so far
        self._num_tokens = 0
        self._stop_string: str | None = None
        self._done = False

    @classmethod
    def from_sampling_params(
        cls, tokenizer, params: SamplingParams, prompt_token_ids: SequenceABC[int] | None = None
    ) -> IncrementalDetokenizer:
        return cls(
            tokenizer,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            min_tokens=params.min_tokens,
            prompt_token_ids=prompt_token_ids,
        )

    @property
    def output_text(self) -> str:
        """All text shown so far."""
        return self._text[: self._shown]

    @property
    def stop_string(self) -> str | None:
        return self._stop_string

    @property
    def finished(self) -> bool:
        return self._done

    # ---- decoding ----------------------------------------------------------------------------------
    def _step_text(self) -> str:
        """New clean text after ``ids[read:]`` arrived; moves the window on when there is some."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = None
        return delta

    def _flush_text(self) -> str:
        """Whatever is left in the window, incomplete characters as U+FFFD."""
        if self._read == len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._read = len(self._ids)
        return new_text[len(self._prefix_text) :] if len(new_text) > len(self._prefix_text) else ""

    def _add_text(self, delta: str) -> None:
        """Append ``delta`` and look for a stop string ending inside it."""
        old_len = len(self._text)
        self._text += delta
        m = self._matcher
        if m is None:
            return
        # Only matches ending in the new text count (earlier text was checked, or shown before
        # min_tokens). The match that ends first wins (what a character-by-character matcher would see),
        # then the one that starts first (the longest ending there).
        look = self._num_tokens > self._min_tokens
        state, match = self._state, m.match
        for j, ch in enumerate(delta):
            state = m.feed(state, ch)
            if look and match[state]:
                length = match[state]
                end = old_len + j + 1
                i = end - length
                self._stop_string = self._text[i:end]
                self._text = self._text[:end] if self._include_stop else self._text[:i]
                self._done = True
                break
        self._state = state

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        return 0 if self._matcher is None else min(self._matcher.held[self._state], len(self._text))

    def update(
        self, new_token_ids: Iterable[int], *, final: bool = False, drop_last_token: bool = False
    ) -> DetokenizerUpdate:
        """Feed the tokens generated this step; returns the text to show.

        Args:
          new_token_ids: the step's new tokens (``SeqUpdate.new_token_ids``).
          final: the sequence finished: flush held-back text (and incomplete characters as U+FFFD).
          drop_last_token: the last token is the EOS / stop token that ended the sequence
            (``SeqUpdate.stopped_by_token``); it is counted but not decoded into the text.
        """
        if self._done:
            return DetokenizerUpdate("", self._stop_string, True)
        ids = list(new_token_ids)
        decode_ids = ids[:-1] if drop_last_token and ids else ids
        for token in decode_ids:
            self._ids.append(token)
            self._num_tokens += 1
            delta = self._step_text()
            if delta:
                self._add_text(delta)
                if self._done:
                    break
        self._num_tokens += len(ids) - len(decode_ids)
        if final and not self._done:
            delta = self._flush_text()
            if delta:
                self._add_text(delta)
            self._done = True
        end = len(self._text) if self._done else max(len(self._text) - self._held_back(), self._shown)
        out = self._text[self._shown : end]
        self._shown = max(end, self._shown)
        return DetokenizerUpdate(out, self._stop_string, self._done)
