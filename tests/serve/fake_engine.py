"""A deterministic fake of the ``Engine`` interface, for testing the servers without a model.

Tokens are bytes (ids 0..255) plus BOS (256) and EOS (257). Generated text is lowercase letters and
spaces, a function of the prompt and position only under greedy sampling (temperature 0), so a
request's output does not depend on what else runs. Prompt markers steer it: ``[eos:N]`` emits EOS
as the N-th generated token; ``[fail]`` makes ``step()`` raise while that request runs (unless it is
excluded from the step). Stop strings go through jaxinfer's ``IncrementalDetokenizer``, as in the engine.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass, field

from jaxinfer.detokenizer import IncrementalDetokenizer
from jaxinfer.errors import InvalidRequestError, PromptTooLongError
from jaxinfer.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxinfer.sampling_params import SamplingParams

BOS, EOS, VOCAB = 256, 257, 258


class FakeTokenizer:
    """Byte-level tokenizer with a tiny chat template."""

    chat_template = "fake"
    eos_token_id = EOS
    bos_token_id = BOS

    def __len__(self) -> int:
        return VOCAB

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        out = bytearray()
        for t in ids:
            if t < 256:
                out.append(t)
            elif not skip_special_tokens:
                out += b"<s>" if t == BOS else b"</s>"
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    num_pages_total: int = 0
    num_pages_used: int = 0
    prefix_cache_hit_rate: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prefix_cache_pages: int = 0
    prefix_cache_evictions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


@dataclass
class _Sample:
    index: int
    detok: IncrementalDetokenizer
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # shown text not yet emitted
    emitted_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Req:
    rid: str
    prompt: str | None
    ids: list[int]
    sp: SamplingParams
    metrics: RequestMetrics
    samples: list[_Sample]
    seed: int
    eos_at: int | None


def fake_token(prompt_ids: list[int], pos: int, seed: int) -> int:
    """The greedy (seed 0) or seeded token at output position ``pos``: a letter, every 5th a space."""
    if pos % 5 == 4:
        return 32
    h = hashlib.blake2b(bytes(str((prompt_ids, seed)), "ascii"), digest_size=4).digest()
    return 97 + (int.from_bytes(h, "little") + 7 * pos) % 26


def fake_completion(prompt_ids: list[int], max_tokens: int) -> str:
    """The text FakeEngine generates greedily for a prompt (no stop strings, no EOS marker)."""
    return bytes(fake_token(prompt_ids, i, 0) for i in range(max_tokens)).decode()


class FakeEngine:
    """Implements the ``Engine`` interface with fake tokens.

    Args:
      step_delay: seconds each ``step()`` sleeps (simulated device time).
      max_num_seqs: requests running at once; the rest wait.
    """

    def __init__(self, *, max_model_len: int = 512, max_num_seqs: int = 8, step_delay: float = 0.0,
                 page_size: int = 16, num_pages: int = 1024, model_name: str = "fake-model"):
        self.tokenizer = FakeTokenizer()
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.step_delay = step_delay
        self.page_size = page_size
        self.num_pages = num_pages
        self.fail_next_steps = 0
        self.crash = False
        self.step_calls = 0
        self.added = 0
        self._waiting: list[_Req] = []
        self._running: list[_Req] = []
        self._ids: set[str] = set()
        self._pending_aborts: list[RequestOutput] = []
        self._prompt_total = 0
        self._gen_total = 0

    # -- interface -----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt, sampling_params: SamplingParams, *,
                    arrival_time: float | None = None, client: str | None = None) -> None:
        if request_id in self._ids:
            raise InvalidRequestError(f"duplicate request id {request_id!r}", "request_id")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            text, ids = None, list(prompt)
        else:
            raise InvalidRequestError("prompt must be a string or a list of token ids", "prompt")
        if not ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        if min(ids) < 0 or max(ids) >= VOCAB:
            raise InvalidRequestError(f"prompt token ids must be in [0, {VOCAB})", "prompt")
        if sampling_params.logit_bias and sampling_params.logit_bias[-1][0] >= VOCAB:
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {VOCAB})", "logit_bias")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(f"prompt has {len(ids)} tokens; the context window is {self.max_model_len}")
        raw = bytes(t for t in ids if t < 256)
        m = re.search(rb"\[eos:(\d+)\]", raw)
        seed = 0 if sampling_params.greedy else (sampling_params.seed if sampling_params.seed is not None
                                                 else time.perf_counter_ns())
        req = _Req(request_id, text, ids, sampling_params, RequestMetrics(arrival_time or time.perf_counter()),
                   [_Sample(i, IncrementalDetokenizer.from_sampling_params(self.tokenizer, sampling_params))
                    for i in range(sampling_params.n)], seed, int(m.group(1)) if m else None)
        self._ids.add(request_id)
        self._waiting.append(req)
        self.added += 1

    def abort_request(self, request_id: str) -> bool:
        for queue in (self._waiting, self._running):
            for r in queue:
                if r.rid == request_id:
                    queue.remove(r)
                    self._ids.discard(request_id)
                    outs = [CompletionOutput(s.index, "", [], "abort") for s in r.samples if s.finish_reason is None]
                    r.metrics.finish_time = time.perf_counter()
                    self._pending_aborts.append(RequestOutput(r.rid, r.prompt, r.ids, outs, True, r.metrics))
                    return True
        return False

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running or self._pending_aborts)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self._running), num_waiting=len(self._waiting),
                           num_pages_total=self.num_pages, num_pages_used=self._pages_used(),
                           prompt_tokens_total=self._prompt_total, generation_tokens_total=self._gen_total)

    def step(self, exclude=()) -> list[RequestOutput]:
        self.step_calls += 1
        if self.step_delay:
            time.sleep(self.step_delay)
        while self._waiting and len(self._running) < self.max_num_seqs:
            r = self._waiting.pop(0)
            self._running.append(r)
            self._prompt_total += len(r.ids)
        if self.crash:  # not an Exception: ends the engine thread
            raise SystemExit("injected engine thread crash")
        batch = [r for r in self._running if r.rid not in exclude]
        if self.fail_next_steps > 0 or any(b"[fail]" in bytes(t for t in r.ids if t < 256) for r in batch):
            self.fail_next_steps = max(0, self.fail_next_steps - 1)
            raise RuntimeError("injected engine failure")
        outputs, self._pending_aborts = self._pending_aborts, []
        now = time.perf_counter()
        for r in batch:
            out = self._advance(r, now)
            if out is not None:
                outputs.append(out)
        return outputs

    # -- internals -----------------------------------------------------------------------------------
    def _pages_used(self) -> int:
        return sum(math.ceil((len(r.ids) + max(len(s.tokens) for s in r.samples) + 1) / self.page_size)
                   * len(r.samples) for r in self._running)

    def _advance(self, r: _Req, now: float) -> RequestOutput | None:
        sp, changed = r.sp, []
        for s in r.samples:
            if s.finish_reason is not None:
                continue
            pos = len(s.tokens)
            tok = EOS if (r.eos_at is not None and pos + 1 == r.eos_at and not sp.ignore_eos) else \
                fake_token(r.ids, pos, r.seed + 1_000_003 * s.index if r.seed else 0)
            s.tokens.append(tok)
            self._gen_total += 1
            if tok == EOS:
                s.finish_reason = "stop"
            elif tok in sp.stop_token_ids:
                s.finish_reason, s.stop_reason = "stop", tok
            else:
                d = s.detok.update([tok])
                s.text += d.text
                if d.stop_string is not None:
                    s.finish_reason, s.stop_reason = "stop", d.stop_string
            if s.finish_reason is None and (len(s.tokens) >= sp.max_tokens
                                            or len(r.ids) + len(s.tokens) >= self.max_model_len):
                s.finish_reason = "length"
            if s.finish_reason is not None and not isinstance(s.stop_reason, str):
                s.text += s.detok.update([], final=True).text  # flush text held back for a stop string
            changed.append(s)
        if r.metrics.first_token_time is None:
            r.metrics.first_token_time = now
        r.metrics.num_generated_tokens = sum(len(s.tokens) for s in r.samples)
        finished = all(s.finish_reason is not None for s in r.samples)
        if finished:
            r.metrics.finish_time = now
            self._running.remove(r)
            self._ids.discard(r.rid)
        outs = [self._delta(r, s) for s in changed]
        return RequestOutput(r.rid, r.prompt, r.ids, outs, finished, r.metrics)

    def _delta(self, r: _Req, s: _Sample) -> CompletionOutput:
        text, s.text = s.text, ""
        ids, s.emitted_tokens = s.tokens[s.emitted_tokens:], len(s.tokens)
        lps = None
        if r.sp.logprobs is not None:
            lps = []
            for t in ids:
                entry = {t: -0.25}
                alt = 97
                while len(entry) < r.sp.logprobs + 1:
                    if alt != t:
                        entry[alt] = -1.0 - 0.5 * len(entry)
                    alt += 1
                lps.append(entry)
        return CompletionOutput(s.index, text, ids, s.finish_reason, s.stop_reason, lps)
