"""Structured output, tools and gRPC logit_bias through the servers on a real engine: a tiny random Qwen2
model (sampled at temperature 1 its output is garbage) whose tokenizer carries a Qwen-style chat template
that renders tools (written here). Every constrained output parses and validates (jsonschema), through the
official ``openai`` client too (``chat.completions.parse`` with a pydantic model sends langchain's
``with_structured_output`` request shape: ``json_schema`` with ``strict``); unconstrained requests running
at the same time are unchanged; forced tool calls come back as OpenAI ``tool_calls`` (streamed and not);
tool calls and tool results in the history reach the prompt."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import httpx
import jsonschema
import openai
import pydantic
import pytest

from jaxinfer.config import EngineConfig
from jaxinfer.engine import Engine
from jaxinfer.loader import load_model
from jaxinfer.tokenizer import encode_chat
from serve.protos import jaxinfer_pb2 as pb
from serve.protos import jaxinfer_pb2_grpc as pb_grpc
from serve.server import ServerOptions, ServerThread
from tests.tiny_models import make_tiny_model

TOOL_TEMPLATE = (
    "{% if tools %}<s>system: tools:{% for t in tools %} {{ t.function | tojson }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<s>assistant: {{ m.content }}{% for c in m.tool_calls %}"
    "<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>"
    "{% endfor %}\n"
    "{% elif m.role == 'tool' %}<s>tool: <tool_response>{{ m.content }}</tool_response>\n"
    "{% else %}<s>{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {},
                                                                          "additionalProperties": False}}}]
USER = [{"role": "user", "content": "The quick brown fox?"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools_model") / "qwen2"
    make_tiny_model("qwen2", path, max_position_embeddings=1024)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    engine = Engine(load_model(str(path)), EngineConfig(max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=128,
                                                        page_size=16))
    assert engine.tokenizer.chat_template == TOOL_TEMPLATE
    server = ServerThread(engine, ServerOptions(port=0, grpc_port=0), max_num_seqs=8, max_waiting_requests=64).start()
    yield server
    server.stop()


def _post(srv, path, body):
    r = httpx.post(srv.http_url + path, json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_response_format_and_guided_fields_validate(srv):
    chat = {"messages": USER, "temperature": 1.0, "max_tokens": 120, "n": 3}
    bodies = [
        ("/v1/chat/completions", {**chat, "seed": 1, "response_format": {
            "type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}}}),
        ("/v1/completions", {"prompt": "fox", "temperature": 1.0, "max_tokens": 120, "n": 3, "seed": 2,
                             "guided_json": SCHEMA}),
        ("/v1/completions", {"prompt": "fox", "temperature": 1.0, "max_tokens": 120, "n": 3, "seed": 3,
                             "structured_outputs": {"json": SCHEMA}}),
        ("/v1/completions", {"prompt": "fox", "temperature": 1.0, "max_tokens": 120, "n": 3, "seed": 4,
                             "response_format": {"type": "json_schema",
                                                 "json_schema": {"name": "t", "schema": SCHEMA}}}),
    ]
    for path, body in bodies:
        for choice in _post(srv, path, body)["choices"]:
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            jsonschema.validate(json.loads(text), SCHEMA)
            assert choice["finish_reason"] == "stop"
    regex = _post(srv, "/v1/completions", {"prompt": "fox", "temperature": 1.0, "max_tokens": 40, "n": 3, "seed": 5,
                                           "guided_regex": "[a-f]{2,5}@[0-9]"})
    assert all(re.fullmatch("[a-f]{2,5}@[0-9]", c["text"]) for c in regex["choices"])
    choice = _post(srv, "/v1/chat/completions", {**chat, "seed": 6, "guided_choice": ["yes", "no", "maybe"]})
    assert all(c["message"]["content"] in ("yes", "no", "maybe") for c in choice["choices"])


def test_openai_client_parse_with_pydantic(srv):
    """``chat.completions.parse(response_format=Model)``: the client sends ``json_schema`` with
    ``strict: true`` (what langchain's ``with_structured_output`` sends) and parses the answer itself."""

    class Trip(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        city: str = pydantic.Field(max_length=6)
        days: int = pydantic.Field(ge=1, le=9)

    client = openai.OpenAI(base_url=srv.http_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    for seed in range(3):
        r = client.chat.completions.parse(model=srv.async_engine.model_name, messages=USER, response_format=Trip,
                                          temperature=1.0, max_tokens=120, seed=seed)
        assert isinstance(r.choices[0].message.parsed, Trip)


def test_unconstrained_requests_unchanged_by_constrained_neighbours(srv):
    free = [{"prompt": f"brown fox {i}", "temperature": 1.0, "max_tokens": 24, "seed": 40 + i} for i in range(3)]
    alone = [_post(srv, "/v1/completions", b)["choices"][0]["text"] for b in free]
    constrained = {"prompt": "fox", "temperature": 1.0, "max_tokens": 120, "n": 4, "seed": 9, "guided_json": SCHEMA}

    async def together():
        async with httpx.AsyncClient(base_url=srv.http_url, timeout=300) as c:
            rs = await asyncio.gather(*[c.post("/v1/completions", json=b) for b in [constrained, *free, constrained]])
        return [r.json() for r in rs]

    out = asyncio.run(together())
    assert [r["choices"][0]["text"] for r in out[1:4]] == alone
    for r in (out[0], out[4]):
        for c in r["choices"]:
            jsonschema.validate(json.loads(c["text"]), SCHEMA)


def _check_calls(calls, names):
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] in names
        args = json.loads(call["function"]["arguments"])
        schema = SCHEMA if call["function"]["name"] == "weather" else TOOLS[1]["function"]["parameters"]
        jsonschema.validate(args, schema)


def test_tool_choice_required_and_named(srv):
    """A forced call, at temperature 1 (one call: with parallel calls allowed a random model rarely stops
    adding calls; the grammar for them is covered by the parser test)."""
    base = {"messages": USER, "tools": TOOLS, "temperature": 1.0, "max_tokens": 200}
    for seed in range(3):
        r = _post(srv, "/v1/chat/completions", {**base, "tool_choice": "required", "parallel_tool_calls": False,
                                                "seed": seed})["choices"][0]
        assert r["finish_reason"] == "tool_calls"
        _check_calls(r["message"]["tool_calls"], {"weather", "noop"})
        named = _post(srv, "/v1/chat/completions", {**base, "seed": seed, "tool_choice": {
            "type": "function", "function": {"name": "weather"}}})["choices"][0]
        assert named["finish_reason"] == "tool_calls"
        _check_calls(named["message"]["tool_calls"], {"weather"})


def test_tool_calls_streamed_through_the_openai_client(srv):
    client = openai.OpenAI(base_url=srv.http_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    kw = dict(model=srv.async_engine.model_name, messages=USER, tools=TOOLS, temperature=1.0, max_tokens=200, seed=11,
              tool_choice={"type": "function", "function": {"name": "weather"}})
    plain = client.chat.completions.create(**kw)
    calls, reason = {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            reason = ch.finish_reason or reason
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
    assert reason == "tool_calls" == plain.choices[0].finish_reason
    want = [{"name": c.function.name, "arguments": c.function.arguments} for c in plain.choices[0].message.tool_calls]
    assert [calls[i] for i in sorted(calls)] == want
    _check_calls([{"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": c.function.arguments}}
                  for c in plain.choices[0].message.tool_calls], {"weather"})


def test_tool_history_reaches_the_prompt(srv):
    """An assistant message with tool_calls and a tool result are rendered by the template: the server's
    prompt is the one encode_chat renders with them (usage.prompt_tokens), and that prompt holds both."""
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = _post(srv, "/v1/chat/completions", {"messages": history, "tools": TOOLS, "max_tokens": 4, "temperature": 0})
    tok = srv.async_engine.tokenizer
    from serve.prompts import normalize_messages

    ids = encode_chat(tok, normalize_messages(history), True, TOOLS)
    assert r["usage"]["prompt_tokens"] == len(ids)
    text = tok.decode(ids)
    assert '"city": "Paris"' in text and "<tool_response>sunny</tool_response>" in text and '"name": "weather"' in text
    without = encode_chat(tok, [m for m in normalize_messages(history) if m["role"] == "user"], True, TOOLS)
    assert len(without) < len(ids)


def test_auto_tool_choice_without_call_is_content(srv):
    r = _post(srv, "/v1/chat/completions", {"messages": USER, "tools": TOOLS, "max_tokens": 8, "temperature": 0})
    c = r["choices"][0]
    assert "tool_calls" not in c["message"] and c["finish_reason"] in ("stop", "length")


def test_grpc_logit_bias(srv):
    with grpc.insecure_channel(srv.grpc_target) as channel:
        stub = pb_grpc.InferenceStub(channel)

        def run(**kw):
            msgs = list(stub.Generate(pb.GenerateRequest(text="fox", sampling=pb.SamplingParameters(
                max_tokens=6, ignore_eos=True, **kw)), timeout=120))
            return [t for m in msgs for t in m.token_ids]

        plain = run()
        forced = next(t for t in range(40, 60) if t not in plain)
        assert run(logit_bias={forced: 100.0}) == [forced] * 6
        banned = run(logit_bias={plain[0]: -100.0})
        assert banned[0] != plain[0]
        for bias, needle in [({5: 101.0}, "logit_bias"), ({10**6: 1.0}, "logit_bias"), ({-3: 1.0}, "logit_bias"),
                             ({i: 1.0 for i in range(129)}, "logit_bias")]:
            with pytest.raises(grpc.RpcError) as e:
                run(logit_bias=bias)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()


def test_structural_tag(srv):
    """vLLM's structural_tag response_format: every trigger in the text continues as a structure whose JSON
    validates (jsonschema). logit_bias pushes the tiny model to type the trigger's characters often."""
    tok = srv.async_engine.tokenizer
    bias = {str(t): 30 for t in {*tok.encode("<f="), *(tok.encode(c)[0] for c in "<f=")}}
    fmt = {"type": "structural_tag", "triggers": ["<f="],
           "structures": [{"begin": "<f=weather>", "schema": SCHEMA, "end": "</f>"}]}
    text = ""
    for body in ({"response_format": fmt}, {"structured_outputs": {"structural_tag": json.dumps(fmt)}}):
        r = _post(srv, "/v1/completions", {"prompt": "fox", "max_tokens": 250, "temperature": 1.0, "seed": 5,
                                          "logit_bias": bias, **body})
        text = r["choices"][0]["text"]
        parts = text.split("<f=")[1:]
        complete = [p for p in parts if "</f>" in p]
        assert complete, text  # the constraint was exercised (the bias made the model type the trigger)
        assert len(parts) - len(complete) <= 1 and (parts[-1] in complete or "weather>".startswith(parts[-1][:8]))
        for part in complete:  # every trigger became a whole structure (the last may be cut by max_tokens)
            assert part.startswith("weather>"), part
            payload, _, _ = part[len("weather>"):].partition("</f>")
            jsonschema.validate(json.loads(payload), SCHEMA)
    bad = httpx.post(srv.http_url + "/v1/completions", timeout=60, json={
        "prompt": "x", "response_format": {"type": "structural_tag", "format": {"type": "const_string"}}})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unsupported"
    bad = httpx.post(srv.http_url + "/v1/completions", timeout=60, json={
        "prompt": "x", "response_format": {**fmt, "triggers": ["<g="]}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"


def test_grpc_structured_output_matches_http(srv):
    """gRPC ``structured_output``: the same constrained greedy output as the HTTP path for each kind, and the
    JSON one validates (jsonschema)."""
    cases = [  # (gRPC StructuredOutput fields, the HTTP structured_outputs object)
        ({"json_schema": json.dumps(SCHEMA)}, {"json": SCHEMA}),
        ({"json_object": True}, {"json_object": True}),
        ({"regex": "[a-z]{2,5}-[0-9]{3}"}, {"regex": "[a-z]{2,5}-[0-9]{3}"}),
        ({"choice": pb.Choices(choices=["alpha", "beta", "gamma"])}, {"choice": ["alpha", "beta", "gamma"]}),
        ({"grammar": 'start: "x" ("y" | "z")+'}, {"grammar": 'start: "x" ("y" | "z")+'}),
    ]
    with grpc.insecure_channel(srv.grpc_target) as ch:
        stub = pb_grpc.InferenceStub(ch)

        def run(**so):
            sp = pb.SamplingParameters(max_tokens=60, structured_output=pb.StructuredOutput(**so))
            return "".join(m.text for m in stub.Generate(pb.GenerateRequest(text="fox", sampling=sp), timeout=120))

        for so, http in cases:
            text = run(**so)
            ref = _post(srv, "/v1/completions", {"prompt": "fox", "max_tokens": 60, "temperature": 0,
                                                "structured_outputs": http})["choices"][0]["text"]
            assert text == ref, (so, text, ref)
            if "json_schema" in so:
                jsonschema.validate(json.loads(text), SCHEMA)
        assert re.fullmatch("[a-z]{2,5}-[0-9]{3}", run(regex="[a-z]{2,5}-[0-9]{3}"))
        for so, needle in [({"json_schema": "{not json"}, "structured_output"), ({"regex": "("}, "structured_output"),
                           ({"structural_tag": json.dumps({"structures": [], "triggers": []})}, "structures"),
                           ({}, "structured_output")]:
            with pytest.raises(grpc.RpcError) as e:
                run(**so)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()


def test_grpc_chat_tools_match_http(srv):
    """gRPC ``chat`` with tools: the same prompt as HTTP (usage), a forced call parsed into ``tool_calls`` equal
    to HTTP's (greedy) with arguments valid against the tool's schema (jsonschema)."""
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "noop", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"},
    ]
    with grpc.insecure_channel(srv.grpc_target) as ch:
        stub = pb_grpc.InferenceStub(ch)

        def run(choice, **chat):
            req = pb.GenerateRequest(chat=pb.Chat(messages_json=json.dumps(history), tools_json=json.dumps(TOOLS),
                                                  tool_choice_json=json.dumps(choice), **chat),
                                     sampling=pb.SamplingParameters(max_tokens=200))
            return list(stub.Generate(req, timeout=120))

        for choice in ({"type": "function", "function": {"name": "weather"}}, "required"):
            msgs = run(choice, parallel_tool_calls=False)
            ref = _post(srv, "/v1/chat/completions", {"messages": history, "tools": TOOLS, "tool_choice": choice,
                                                      "parallel_tool_calls": False, "temperature": 0,
                                                      "max_tokens": 200})
            assert msgs[-1].usage.prompt_tokens == ref["usage"]["prompt_tokens"]
            last = msgs[-1]
            assert last.finish_reason == "tool_calls" == ref["choices"][0]["finish_reason"]
            calls = [{"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
                     for t in last.tool_calls]
            _check_calls(calls, {"weather"} if isinstance(choice, dict) else {"weather", "noop"})
            want = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                    for c in ref["choices"][0]["message"]["tool_calls"]]
            assert [(t.name, json.loads(t.arguments)) for t in last.tool_calls] == want
        plain = run("none")
        assert not plain[-1].tool_calls and plain[-1].finish_reason in ("stop", "length")
        for chat, needle in [({"messages_json": "[{"}, "messages"), ({"messages_json": "[]"}, "messages"),
                             ({"messages_json": json.dumps(USER), "tool_choice_json": '"required"'}, "tools")]:
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(pb.GenerateRequest(chat=pb.Chat(**chat)), timeout=60))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details(), e.value.details()
