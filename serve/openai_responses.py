"""OpenAI response bodies and stream chunks built from engine output deltas."""

from __future__ import annotations

import json
import time

from jaxinfer.outputs import CompletionOutput


class TokenText:
    """Token id -> its text (cached), for logprobs ``token`` fields."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, tid: int) -> str:
        s = self._cache.get(tid)
        if s is None:
            s = self._tok.decode([tid], skip_special_tokens=False)
            if len(self._cache) < 200_000:
                self._cache[tid] = s
        return s


def _top(entry: dict, k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k] if k else []


def _top_by_text(entry: dict, k: int, text: TokenText) -> dict[str, float]:
    """Legacy ``top_logprobs``: text -> logprob of the ``k`` best; tokens sharing a text keep the best one."""
    out: dict[str, float] = {}
    for t, lp in _top(entry, k):
        out.setdefault(text(t), lp)
    return out


def completion_logprobs(c: CompletionOutput, k: int, text: TokenText, offset: int) -> dict:
    """Legacy completions ``logprobs`` for one delta (``offset``: characters emitted before it)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, entry in zip(c.token_ids, c.logprobs or []):
        s = text(tid)
        tokens.append(s)
        token_lps.append(_lp(entry, tid))
        tops.append(_top_by_text(entry, k, text) if k else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs_text_len(prompt_ids: list[int], text: TokenText) -> int:
    """Characters of the prompt's token texts (where an echoed completion's ``text_offset`` continues)."""
    return sum(len(text(t)) for t in prompt_ids)


def echo_prompt_logprobs(prompt_ids: list[int], prompt_lps: list | None, k: int, text: TokenText) -> dict:
    """Legacy completions ``logprobs`` of an echoed prompt: ``token_logprobs`` / ``top_logprobs`` null for the
    first token (and for every token when ``prompt_lps`` is ``None``: the prompt was never scored);
    ``text_offset`` counts the token texts from 0."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    for j, tid in enumerate(prompt_ids):
        s = text(tid)
        entry = prompt_lps[j] if prompt_lps is not None and j < len(prompt_lps) else None
        tokens.append(s)
        token_lps.append(None if entry is None else _lp(entry, tid))
        tops.append(_top_by_text(entry, k, text) if entry is not None and k else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def vllm_prompt_logprobs(prompt_ids: list[int], prompt_lps: list, k: int, text: TokenText) -> list:
    """vLLM's ``prompt_logprobs``: ``None`` for the first token, then ``{"token id": {"logprob", "rank",
    "decoded_token"}}`` holding the prompt token (its rank in the vocabulary) and its ``k`` most likely
    alternatives (ranks 1 .. k)."""
    out = [None]
    for tid, entry in zip(prompt_ids[1:], prompt_lps[1:]):
        top = _top(entry, k)
        ranks = {t: i + 1 for i, (t, _) in enumerate(top)}
        ranks[tid] = getattr(entry, "rank", None) or ranks.get(tid)
        keep = {tid: entry.get(tid, -9999.0), **dict(top)}
        out.append({str(t): {"logprob": max(float(lp), -9999.0), "rank": ranks.get(t), "decoded_token": text(t)}
                    for t, lp in keep.items()})
    return out


def chat_logprobs(c: CompletionOutput, k: int, text: TokenText) -> dict:
    """Chat ``logprobs`` for one delta: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for tid, entry in zip(c.token_ids, c.logprobs or []):
        s = text(tid)
        content.append({"token": s, "logprob": _lp(entry, tid), "bytes": list(s.encode("utf-8")),
                        "top_logprobs": [{"token": text(t), "logprob": lp, "bytes": list(text(t).encode("utf-8"))}
                                         for t, lp in _top(entry, k)]})
    return {"content": content}


def _lp(entry: dict, tid: int) -> float:
    lp = entry.get(tid)
    if lp is None:  # the engine always includes the sampled token; be lenient anyway
        return -9999.0
    return max(float(lp), -9999.0)  # JSON has no -inf


def merge_logprobs(into: dict | None, new: dict) -> dict:
    """Concatenate two logprobs objects of the same kind (for non-streamed responses)."""
    if into is None:
        return new
    for key, value in new.items():
        into[key].extend(value)
    return into


def sse(obj) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class ResponseBuilder:
    """Response envelopes for one request (id, created, model and object names per endpoint)."""

    def __init__(self, kind: str, request_id: str, model: str):
        self.kind = kind
        self.id = request_id
        self.model = model
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, usage: dict | None, with_usage: bool) -> dict:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if with_usage:
            body["usage"] = usage
        return body

    def response(self, choices: list, usage: dict) -> dict:
        """The non-streamed body."""
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return self._envelope(obj, choices, usage, True)

    def chunk(self, choices: list, *, include_usage: bool, usage: dict | None = None) -> dict:
        """A stream chunk (``usage`` is null on every chunk but the last when usage is requested)."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._envelope(obj, choices, usage, include_usage)

    def choice(self, index: int, text: str | None, logprobs, finish_reason, stop_reason=None, *,
               delta: bool = False, role: str | None = None, tool_calls: list[dict] | None = None) -> dict:
        """One choice: chat ``message`` / ``delta`` or completion ``text``; chat ``tool_calls`` (OpenAI shape;
        in a delta each call also carries its ``index``)."""
        if self.kind == "chat":
            if delta:
                d = {}
                if role:
                    d["role"] = role
                if text is not None:
                    d["content"] = text
                if tool_calls:
                    d["tool_calls"] = [{"index": k, **call} for k, call in enumerate(tool_calls)]
                out = {"index": index, "delta": d}
            else:
                out = {"index": index, "message": {"role": "assistant", "content": text}}
                if tool_calls:
                    out["message"]["tool_calls"] = tool_calls
        else:
            out = {"index": index, "text": text or ""}
        out["logprobs"] = logprobs
        out["finish_reason"] = finish_reason
        out["stop_reason"] = stop_reason
        return out
