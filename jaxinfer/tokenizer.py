"""Tokenizers and chat templates: ``transformers`` fast tokenizers from an HF directory, or built from a
GGUF file's metadata by :mod:`jaxinfer.gguf_tokenizer` (no torch either way).

Building a tokenizer from a GGUF vocabulary takes a few seconds, so the result is saved in the cache
(keyed by the GGUF file's identity and the builder's version) and reloaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from jaxinfer.compilation_cache import cache_root
from jaxinfer.errors import InvalidRequestError
from jaxinfer.model_registry import ModelSource

logger = logging.getLogger(__name__)

_GGUF_BUILDER_VERSION = 2  # bump when gguf_tokenizer's output changes, so stale cached copies are rebuilt


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:v{_GGUF_BUILDER_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def load_tokenizer(source: ModelSource, gguf_fields: dict | None = None):
    """A ``transformers`` fast tokenizer for the model (chat template included when the model has one).

    ``gguf_fields``: a GGUF source's parsed ``GGUFReader`` fields when the caller already has them.

    Raises:
      UnsupportedModelError: a GGUF tokenizer of a kind or pre-tokenizer jaxinfer does not know.
    """
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # no "PyTorch was not found" notice
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if source.kind in ("hf", "quantized"):  # a quantized checkpoint stores its tokenizer beside it
        return AutoTokenizer.from_pretrained(str(source.path))
    cached = cache_root() / "tokenizers" / _gguf_cache_key(source.path)
    if (cached / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(cached))
    from jaxinfer.gguf_tokenizer import build_gguf_tokenizer

    tok = build_gguf_tokenizer(source.path, gguf_fields)
    try:
        tok.save_pretrained(str(cached))
    except OSError as e:  # a read-only cache is not fatal
        logger.warning("could not cache the converted tokenizer: %s", e)
    return tok


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a plain-text prompt (special tokens such as BOS added as the tokenizer specifies)."""
    if not isinstance(prompt, str):
        raise InvalidRequestError(f"prompt must be a string, got {type(prompt).__name__}", "prompt")
    return list(tokenizer(prompt)["input_ids"])


def encode_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template.

    Messages may carry ``tool_calls`` (assistant) and ``tool_call_id`` / ``name`` (tool), as HF templates
    take them; ``tools`` (OpenAI function specs) are given to the template.

    Raises:
      InvalidRequestError: empty or malformed messages, no chat template, ``tools`` with a template that
        does not render them, or special-token text inside tool definitions / tool calls.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        ok = isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        if not ok:
            raise InvalidRequestError(
                f"messages[{i}] must be an object with string 'role' and 'content'", "messages"
            )
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; use generate() with a plain prompt",
                                  "messages")
    kw = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                         tokenize=False, **kw)
    specials = special_token_texts(tokenizer)
    if tools:
        plain = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                              tokenize=False)
        if plain == text:
            raise InvalidRequestError("this model's chat template does not render tools", "tools")
    for param, obj in (("tools", tools), ("messages", [m.get("tool_calls") for m in messages])):
        dumped = json.dumps(obj, ensure_ascii=False) if obj else ""
        if any(sp in dumped for sp in specials):
            raise InvalidRequestError(f"{param}: tool definitions and tool calls must not contain special-token "
                                      "text", param)
    if not any(sp in m["content"] for m in messages for sp in specials):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return _encode_chat_isolated(tokenizer, messages, add_generation_prompt, text, kw)


def special_token_texts(tokenizer) -> list[str]:
    """The text of the tokenizer's special tokens (``<|im_end|>``, ``<s>``, ...)."""
    out = set()
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for tok in decoder.values():
        if getattr(tok, "special", False) and getattr(tok, "content", ""):
            out.add(tok.content)
    out.update(t for t in getattr(tokenizer, "all_special_tokens", ()) or () if isinstance(t, str) and t)
    return sorted(out)


_SENTINEL = re.compile("\ue000(\\d+)\ue001")


def _encode_chat_isolated(tokenizer, messages, add_generation_prompt: bool, text: str, kw: dict) -> list[int]:
    """Token ids of a conversation whose message content holds special-token text: the template is
    rendered with a placeholder per message, its own text tokenized with special tokens recognised and
    each message's content with special-token text split into plain tokens (``split_special_tokens``),
    so a user typing ``<|im_end|>`` cannot close their turn or open another.

    Raises:
      InvalidRequestError: the template transforms message content in a way the placeholders cannot
        follow (refused rather than letting special-token text through).
    """
    marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, tokenize=False,
                                             **kw)
    pieces = _SENTINEL.split(rendered)  # template, index, template, index, ..., template
    for strip in (False, True):  # some templates trim the content
        contents = [m["content"].strip() if strip else m["content"] for m in messages]
        parts = [contents[int(p)] if i % 2 else p for i, p in enumerate(pieces)]
        if "".join(parts) == text:
            break
    else:
        raise InvalidRequestError("message content contains special-token text that this model's chat template "
                                  "does not render verbatim", "messages")
    ids: list[int] = []
    for i, part in enumerate(parts):
        if not part:
            continue
        if i % 2:
            ids += tokenizer(part, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        else:
            ids += tokenizer(part, add_special_tokens=False)["input_ids"]
    return ids
