"""Tool calling on ``/v1/chat/completions``: the ``tools`` / ``tool_choice`` fields, the grammar that forces a
call, and the parsers that turn a model's tool-call text into OpenAI ``tool_calls``.

The parser follows the model family, recognised from its chat template:

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Qwen2 / Qwen2.5 /
  Qwen3, Hermes, and other templates that render ``<tool_call>``);
- ``llama3_json``: a bare JSON object ``{"name": ..., "parameters": {...}}`` (optionally after
  ``<|python_tag|>``, several separated by ``;``), as Llama 3.1+ templates ask for.

A template that renders no tools (the default SmolLM2 model's) gets 400 ``unsupported`` for ``tools``.
``tool_choice``: ``none`` (tools are not rendered, nothing is parsed), ``auto`` (the model decides; its
output is parsed), ``required`` / a named function (generation is constrained by a grammar to one or more
calls of the allowed tools, each with arguments valid against the tool's JSON schema).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from serve.errors import bad_param

HERMES, LLAMA3 = "hermes", "llama3_json"
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclass(frozen=True)
class ToolRequest:
    """Validated ``tools`` (OpenAI shape, for the template) and ``tool_choice`` (``none`` / ``auto`` /
    ``required`` / a function name)."""

    tools: list
    choice: str
    named: str | None = None
    parallel: bool = True  # ``parallel_tool_calls``: several calls allowed under ``required``

    @property
    def parses(self) -> bool:
        return self.choice != "none"

    @property
    def constrains(self) -> bool:
        return self.choice in ("required", "named")


def parse_tools(body: dict) -> ToolRequest | None:
    """The request's tools, or ``None`` when it has none (or ``tool_choice`` is ``none``)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if body.get("functions"):
        raise bad_param("'functions' is deprecated and not supported; use 'tools'", "functions", "unsupported")
    if tools is None:
        if choice not in (None, "none"):
            raise bad_param("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise bad_param("'tools' must be a non-empty array", "tools", "invalid_type")
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not (isinstance(t, dict) and t.get("type") == "function" and isinstance(fn, dict)):
            raise bad_param(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise bad_param(f"tools[{i}].function.name must match {_NAME.pattern}", "tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_param(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        names.append(name)
    if len(set(names)) != len(names):
        raise bad_param("tool names must be unique", "tools")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad_param("'parallel_tool_calls' must be a boolean", "parallel_tool_calls", "invalid_type")
    if choice is None or choice in ("auto", "none", "required"):
        choice = choice or "auto"
        return None if choice == "none" else ToolRequest(tools, choice, None, parallel)
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(fn, dict)):
        raise bad_param("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                        "{'name': ...}}", "tool_choice")
    if fn.get("name") not in names:
        raise bad_param(f"'tool_choice' names {fn.get('name')!r}, which is not in 'tools'", "tool_choice")
    return ToolRequest(tools, "named", fn["name"], False)


def parser_for_template(template: str | None) -> str | None:
    """The tool-call format a chat template asks for (``None``: not one this server parses)."""
    if not template:
        return None
    if "<tool_call>" in template:
        return HERMES
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return None


def call_grammar(req: ToolRequest, parser: str) -> dict:
    """The constraint of ``required`` / named ``tool_choice`` (``StructuredOutputsParams`` fields, built
    off the event loop like every constraint): one call (named, or ``parallel_tool_calls`` false) or one
    or more calls, each of an allowed tool with arguments valid against its schema, in the parser's
    format."""
    calls = []
    for t in req.tools:
        fn = t["function"]
        if req.named is not None and fn["name"] != req.named:
            continue
        args = fn.get("parameters") or {"type": "object", "properties": {}}
        key = "arguments" if parser == HERMES else "parameters"
        calls.append({"type": "object", "properties": {"name": {"const": fn["name"]}, key: args},
                      "required": ["name", key], "additionalProperties": False})
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    # json.dumps's separators and no other whitespace (a small model would otherwise pad with it)
    schema = {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}
    body = f"%json {json.dumps(schema)}"
    if parser == HERMES:  # <tool_call>\n{...}\n</tool_call>, calls separated by a newline
        rules = ['call: "<tool_call>\\n" obj "\\n</tool_call>"', f"obj: {body}"]
        start = 'start: call ("\\n" call)*' if req.parallel else "start: call"
    else:  # {...}; {...}
        rules = [f"call: {body}"]
        start = 'start: call ("; " call)*' if req.parallel else "start: call"
    lark = "\n".join([start, *rules]) + "\n"
    return {"grammar": lark}


def parse_tool_calls(text: str, parser: str) -> tuple[str | None, list[dict]]:
    """``(content, tool_calls)`` of a finished output; text that is not a well-formed call stays content."""
    if parser == HERMES:
        calls, content = [], text
        for m in re.finditer(r"<tool_call>(.*?)(?:</tool_call>|$)", text, re.S):
            call = _call(m.group(1), "arguments")
            if call is None:
                return text, []
            calls.append(call)
        if calls:
            content = text[: text.index("<tool_call>")].strip() or None
        return content, calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    calls = [_call(part, "parameters") for part in body.split(";")] if ";" in body else [_call(body, "parameters")]
    if any(c is None for c in calls):
        whole = _call(body, "parameters")  # a ";" inside an argument string
        return (None, [whole]) if whole is not None else (text, [])
    return None, calls


def _call(text: str, key: str) -> dict | None:
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def stream_split(text: str, parser: str) -> int:
    """How many leading characters of a growing output can be streamed as content: everything before a
    (possibly partial) tool-call opening."""
    if parser == HERMES:
        marker = "<tool_call>"
        at = text.find(marker)
        if at >= 0:
            return at
        for k in range(min(len(marker) - 1, len(text)), 0, -1):  # a partial marker at the end is held back
            if text.endswith(marker[:k]):
                return len(text) - k
        return len(text)
    stripped = text.lstrip()
    if not stripped or stripped.startswith("{") or "<|python_tag|>".startswith(stripped[:14]) or \
            stripped.startswith("<|python_tag|>"):
        return 0  # a Llama-3 call starts the output: hold everything until it is known
    return len(text)


class ToolStream:
    """One streamed choice's text split into content deltas and, at the end, its tool calls."""

    def __init__(self, parser: str):
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of text already streamed as content

    def feed(self, delta: str, finished: bool) -> tuple[str, list[dict]]:
        """``(content to stream now, tool calls)``; tool calls only once the choice finished."""
        self.text += delta
        if not finished:
            upto = max(stream_split(self.text, self.parser), self.sent)
            out, self.sent = self.text[self.sent : upto], upto
            return out, []
        content, calls = parse_tool_calls(self.text, self.parser)
        if not calls:
            out, self.sent = self.text[self.sent :], len(self.text)
            return out, []
        head = content or ""
        out = head[self.sent :] if len(head) > self.sent else ""
        self.sent = len(self.text)
        return out, calls
