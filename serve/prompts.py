"""Prompt preparation shared by the HTTP and gRPC servers: tokenize, check the context window,
resolve ``max_tokens``."""

from __future__ import annotations

import json

from jaxinfer.errors import InvalidRequestError
from jaxinfer.tokenizer import encode_chat, encode_prompt
from serve.errors import APIError, BadRequest, bad_param, from_exception

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def is_token_ids(x) -> bool:
    """A non-empty list of non-bool ints."""
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def check_token_ids(ids: list[int], param: str) -> list[int]:
    """Validate a client-supplied token-id prompt (the engine checks the vocabulary bound)."""
    if not ids:
        raise bad_param("prompt is empty", param)
    if any(t < 0 or t > 2**31 - 1 for t in ids):
        raise bad_param("prompt token ids must be non-negative 32-bit integers", param)
    return ids


async def tokenize_text(engine, text: str, param: str = "prompt") -> list[int]:
    """Token ids of a plain-text prompt (tokenized off the event loop)."""
    try:
        ids = await engine.run_tokenizer(encode_prompt, engine.tokenizer, text)
    except InvalidRequestError as e:
        raise from_exception(e) from None
    if not ids:
        raise bad_param("prompt is empty (it has no tokens)", param)
    return ids


def normalize_messages(messages) -> list[dict]:
    """Chat messages as ``[{"role", "content": str}]``; content parts of type text are joined. Assistant
    ``tool_calls`` are kept with their arguments as objects (what HF chat templates render), tool messages
    keep ``tool_call_id`` and ``name``.

    Raises:
      BadRequest naming ``messages`` for a missing / empty list, an unknown role, non-text content or a
      malformed tool call.
    """
    if not isinstance(messages, list) or not messages:
        raise bad_param("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_param(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad_param(f"messages[{i}].role must be one of {list(CHAT_ROLES)}, got {role!r}", "messages")
        content = m.get("content")
        if content is None and role in ("assistant", "tool"):
            content = ""
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise bad_param(f"messages[{i}].content[{j}]: only text content parts are supported", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise bad_param(f"messages[{i}].content must be a string or an array of text parts", "messages")
        msg = {"role": "system" if role == "developer" else role, "content": content}
        if role == "assistant" and m.get("tool_calls") is not None:
            msg["tool_calls"] = _tool_calls(m["tool_calls"], i)
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if m.get(key) is not None:
                    if not isinstance(m[key], str):
                        raise bad_param(f"messages[{i}].{key} must be a string", "messages")
                    msg[key] = m[key]
        out.append(msg)
    return out


def _tool_calls(calls, i: int) -> list[dict]:
    """An assistant message's OpenAI ``tool_calls`` with ``arguments`` (a JSON string) parsed to an object."""
    if not isinstance(calls, list):
        raise bad_param(f"messages[{i}].tool_calls must be an array", "messages")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
            raise bad_param(f"messages[{i}].tool_calls[{j}] must have a function with a name", "messages")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise bad_param(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON",
                                "messages") from None
        if not isinstance(args, dict):
            raise bad_param(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object", "messages")
        call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out


async def tokenize_chat(engine, messages: list[dict], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template (given ``tools``, if any)."""
    try:
        return await engine.run_tokenizer(encode_chat, engine.tokenizer, messages, add_generation_prompt, tools)
    except InvalidRequestError as e:
        raise from_exception(e) from None
    except APIError:
        raise
    except Exception as e:  # a template that rejects the conversation (e.g. role order)
        raise BadRequest(f"the chat template could not render these messages: {e}", param="messages",
                         code="invalid_value") from None


def resolve_max_tokens(max_model_len: int, prompt_len: int, requested: int | None, default: int | None,
                       *, prompt_param: str, max_tokens_param: str) -> int:
    """The number of tokens to generate, checked against the context window.

    ``requested`` (what the client asked for) must fit: ``prompt_len + requested <= max_model_len``;
    ``default`` (``None`` = all the room left) is clamped to the room left.

    Raises:
      BadRequest (``context_length_exceeded``) naming the prompt when the prompt alone fills the
      window, or ``max_tokens_param`` when the prompt plus the requested tokens do not fit.
    """
    room = max_model_len - prompt_len
    if room < 1:
        raise BadRequest(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has {prompt_len} "
            "tokens (at least one must be left for the completion). Please shorten the prompt.",
            param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return room if default is None else max(1, min(default, room))
    if isinstance(requested, int) and not isinstance(requested, bool) and requested > room:
        raise BadRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
            f"Please reduce the prompt or '{max_tokens_param}'.",
            param=max_tokens_param, code="context_length_exceeded")
    return requested
