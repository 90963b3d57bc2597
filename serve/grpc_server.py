"""The gRPC server (``serve/protos/jaxinfer.proto``): streaming ``Generate`` and unary ``Health``.

It shares the ``AsyncEngine`` (admission, abort, metrics) with the HTTP server and runs on the same
asyncio loop. A cancelled call (client cancel, deadline, lost connection) cancels the handler; its
``finally`` aborts the engine request, which frees its pages before the engine's next step.

Requests are parsed by the handlers (not by grpc): a malformed message gets INVALID_ARGUMENT. With an
API key, every method but ``Health`` needs ``authorization: Bearer <key>`` metadata (UNAUTHENTICATED).
"""

from __future__ import annotations

import hmac
import json
import logging
import time

import grpc
from google.protobuf.message import DecodeError

from jaxinfer.errors import InvalidRequestError
from jaxinfer.sampling_params import SamplingParams
from serve.async_engine import AsyncEngine
from serve.errors import APIError, BadRequest, ModelNotFound, bad_param, from_exception
from serve.limits import RequestLimits
from serve.prompts import check_token_ids, normalize_messages, resolve_max_tokens, tokenize_chat, tokenize_text
from serve.protos import jaxinfer_pb2 as pb
from serve.protos import jaxinfer_pb2_grpc as pb_grpc
from serve.structured_request import structural_tag_grammar
from serve.tool_calls import call_grammar, parse_tool_calls, parse_tools, parser_for_template

logger = logging.getLogger(__name__)

_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
           404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
           429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}

_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "seed", "logprobs", "prompt_logprobs")


def status_code(err: APIError) -> grpc.StatusCode:
    """The gRPC status for an API error."""
    return _STATUS.get(err.status, grpc.StatusCode.INTERNAL)


def sampling_kwargs(sp: pb.SamplingParameters, limits: RequestLimits | None = None) -> dict:
    """``SamplingParams`` keyword arguments (without max_tokens) from the message; unset = default.
    The server's limits apply as on HTTP (``n``, stop strings); ranges are checked by SamplingParams."""
    limits = limits or RequestLimits()
    kw = {name: getattr(sp, name) for name in _OPTIONAL if sp.HasField(name)}
    kw.setdefault("temperature", 0.0)
    limits.check_n(sp.n or 1)
    limits.check_sequences(sp.n or 1, 1)
    limits.check_stop(list(sp.stop))
    kw.update(n=sp.n or 1, stop=tuple(sp.stop), stop_token_ids=tuple(sp.stop_token_ids), ignore_eos=sp.ignore_eos,
              min_tokens=sp.min_tokens, include_stop_str_in_output=sp.include_stop_str_in_output,
              logit_bias=dict(sp.logit_bias))
    if "seed" in kw:
        kw["seed"] &= 2**63 - 1
    return kw


def structured_spec(so: pb.StructuredOutput) -> dict:
    """``StructuredOutputsParams`` fields of the message (validated and compiled by
    ``AsyncEngine.prepare_structured``, off the engine thread, as on HTTP)."""
    param = "structured_output"
    kind = so.WhichOneof("kind")
    if kind is None:
        raise bad_param("'structured_output' needs one of json_schema, json_object, regex, choice, grammar, "
                        "structural_tag", param)
    if kind == "json_object" and not so.json_object:
        raise bad_param("'structured_output.json_object' must be true when set", param)
    if kind == "structural_tag":
        try:
            tag = json.loads(so.structural_tag)
        except ValueError:
            raise bad_param("'structured_output.structural_tag' is not valid JSON", param, "invalid_type") from None
        spec = {"grammar": structural_tag_grammar(tag, param)}
    else:
        value = getattr(so, kind)
        spec = {{"json_schema": "json"}.get(kind, kind): list(value.choices) if kind == "choice" else value}
    if so.whitespace_pattern:
        spec["whitespace_pattern"] = so.whitespace_pattern
    return spec


class InferenceServicer(pb_grpc.InferenceServicer):
    """``Inference`` service bound to one ``AsyncEngine``."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    async def Health(self, request, context):  # noqa: N802 (gRPC method name)
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        e = self.engine
        ok = e.healthy and not e.draining
        status = "ok" if ok else ("shutting_down" if e.draining else "unhealthy")
        return pb.HealthResponse(ok=ok, status=status, model=e.model_name, requests_in_flight=e.in_flight)

    async def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        arrival = time.perf_counter()
        stream = None
        try:
            if isinstance(request, _Malformed):
                raise BadRequest(request.message, param=None, code="invalid_message")
            stream, prompt_len, tool_parser = await self._submit(request, arrival)
            await stream.wait_accepted()
            completion_tokens = 0
            texts: dict[int, list[str]] = {}  # with tools: each sample's output so far
            async for out in stream:
                prompt_lps = None
                if out.prompt_logprobs is not None:  # prompt tokens 1 .. P-1, with the first message after scoring
                    k = request.sampling.prompt_logprobs
                    prompt_lps = [_token_logprob(t, lp, k) for t, lp in zip(out.prompt_token_ids[1:],
                                                                               out.prompt_logprobs[1:])]
                for j, c in enumerate(out.outputs):
                    completion_tokens += len(c.token_ids)
                    msg = pb.GenerateResponse(
                        request_id=out.request_id, index=c.index, token_ids=c.token_ids, text=c.text,
                        finish_reason=c.finish_reason or "",
                        stop_reason="" if c.stop_reason is None else str(c.stop_reason),
                        logprobs=[_token_logprob(t, lp, request.sampling.logprobs)
                                  for t, lp in zip(c.token_ids, c.logprobs or [])])
                    if j == 0 and prompt_lps is not None:
                        msg.prompt_logprobs.extend(prompt_lps)
                    if tool_parser is not None:
                        texts.setdefault(c.index, []).append(c.text)
                        if c.finish_reason == "stop":
                            _, calls = parse_tool_calls("".join(texts[c.index]), tool_parser)
                            if calls:
                                msg.finish_reason = "tool_calls"
                                msg.tool_calls.extend(pb.ToolCall(id=t["id"], name=t["function"]["name"],
                                                                  arguments=t["function"]["arguments"])
                                                      for t in calls)
                    if out.finished and j == len(out.outputs) - 1:
                        msg.usage.CopyFrom(pb.Usage(prompt_tokens=prompt_len, completion_tokens=completion_tokens,
                                                    total_tokens=prompt_len + completion_tokens))
                    yield msg
        except Exception as e:
            err = from_exception(e)
            if err.status >= 500 and not isinstance(e, APIError):
                logger.error("unexpected error in Generate", exc_info=e)
            self.engine.metrics.request_errors.labels(status=str(err.status)).inc()
            await context.abort(status_code(err), err.message)
        finally:
            if stream is not None:
                stream.abort()

    async def _submit(self, request, arrival: float):
        e = self.engine
        if request.model and request.model not in e.model_aliases:
            raise ModelNotFound(request.model)
        e.check_admission(max(request.sampling.n, 1))
        kind = request.WhichOneof("prompt")
        sp = request.sampling
        tools = parser = None
        if kind == "text":
            ids = await tokenize_text(e, request.text)
        elif kind == "token_ids":
            ids = check_token_ids(list(request.token_ids.ids), "prompt")
        elif kind == "chat":
            ids, tools, parser = await self._chat(request.chat)
        else:
            raise BadRequest("a prompt (text, token_ids or chat) is required", param="prompt")
        requested = sp.max_tokens if sp.HasField("max_tokens") else None
        if requested == 0:
            raise BadRequest("max_tokens must be at least 1", param="max_tokens")
        max_tokens = resolve_max_tokens(e.max_model_len, len(ids), requested, None, prompt_param="prompt",
                                        max_tokens_param="max_tokens")
        if sp.min_tokens > max_tokens:
            raise bad_param(f"min_tokens ({sp.min_tokens}) must be at most max_tokens ({max_tokens})", "min_tokens")
        kw = sampling_kwargs(sp, e.limits)
        if tools is not None and tools.constrains:
            if sp.HasField("structured_output"):
                raise bad_param(f"'structured_output' cannot be combined with tool_choice '{tools.choice}'",
                                "structured_output")
            kw["structured_outputs"] = await e.prepare_structured(call_grammar(tools, parser), "tool_choice")
        elif sp.HasField("structured_output"):
            kw["structured_outputs"] = await e.prepare_structured(structured_spec(sp.structured_output),
                                                                  "structured_output")
        try:
            params = SamplingParams(max_tokens=max_tokens, **kw)
        except InvalidRequestError as exc:
            raise from_exception(exc) from None
        return e.submit(ids, params, arrival_time=arrival), len(ids), parser if tools is not None else None

    async def _chat(self, chat: pb.Chat):
        """``(token ids, ToolRequest or None, tool-call parser or None)`` of a ``Chat`` prompt, validated as
        HTTP's /v1/chat/completions validates its fields."""
        body = {}
        for name in ("messages", "tools", "tool_choice"):
            field = name + "_json"
            text = getattr(chat, field)
            if text:
                try:
                    body[name] = json.loads(text)
                except ValueError:
                    raise bad_param(f"'chat.{field}' is not valid JSON", name, "invalid_type") from None
        if chat.HasField("parallel_tool_calls"):
            body["parallel_tool_calls"] = chat.parallel_tool_calls
        messages = normalize_messages(body.get("messages"))
        tools = parse_tools(body)
        parser = parser_for_template(getattr(self.engine.tokenizer, "chat_template", None))
        if tools is not None and parser is None:
            raise BadRequest("this model's chat template has no tool-call format this server knows (hermes "
                             "<tool_call> or Llama-3 JSON)", param="tools", code="unsupported")
        add = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        ids = await tokenize_chat(self.engine, messages, add, tools.tools if tools is not None else None)
        return ids, tools, parser


def _token_logprob(tid: int, entry: dict, k: int) -> pb.TokenLogprob:
    top = sorted(entry.items(), key=lambda kv: -kv[1])[:k] if k else []
    return pb.TokenLogprob(token_id=tid, logprob=max(float(entry.get(tid, -9999.0)), -9999.0),
                           top=[pb.TopLogprob(token_id=t, logprob=max(float(lp), -9999.0)) for t, lp in top])


class _Malformed:
    """Stands for a request message that did not parse (answered INVALID_ARGUMENT by the handler)."""

    def __init__(self, message: str):
        self.message = message


def _lenient(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except (DecodeError, ValueError, TypeError, RuntimeError):
            return _Malformed(f"the request is not a valid {message_class.DESCRIPTOR.full_name} message")
    return parse


def _handlers(servicer: InferenceServicer) -> dict:
    return {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "Health": grpc.unary_unary_rpc_method_handler(
            servicer.Health, request_deserializer=_lenient(pb.HealthRequest),
            response_serializer=pb.HealthResponse.SerializeToString),
    }


class _APIKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless ``authorization: Bearer <key>`` metadata (constant-time comparison);
    ``Health`` stays open."""

    def __init__(self, api_key: str, on_reject=None):
        self._key = api_key.encode("utf-8")
        self._on_reject = on_reject

    async def intercept_service(self, continuation, details):
        if details.method.endswith("/Health") or self._authorized(details.invocation_metadata or ()):
            return await continuation(details)
        if self._on_reject is not None:
            self._on_reject()

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required "
                                "(metadata 'authorization: Bearer <key>')")
            yield  # pragma: no cover (abort raises)

        return grpc.unary_stream_rpc_method_handler(deny_stream, request_deserializer=lambda b: b,
                                                    response_serializer=pb.GenerateResponse.SerializeToString)

    def _authorized(self, metadata) -> bool:
        given = ""
        for key, value in metadata:
            if key == "authorization":
                given = value if isinstance(value, str) else value.decode("latin-1")
                break
        scheme, _, token = given.partition(" ")
        ok = hmac.compare_digest(token.strip().encode("utf-8", "replace"), self._key)
        return ok and scheme.lower() == "bearer"


def build_grpc_server(engine: AsyncEngine, host: str, port: int, *,
                      api_key: str | None = None) -> tuple[grpc.aio.Server, int]:
    """An (unstarted) ``grpc.aio`` server bound to ``host:port``; returns it and the bound port."""
    interceptors = []
    if api_key:
        interceptors.append(_APIKeyInterceptor(
            api_key, lambda: engine.metrics.request_errors.labels(status="401").inc()))
    server = grpc.aio.server(interceptors=interceptors)
    handlers = _handlers(InferenceServicer(engine))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("jaxinfer.v1.Inference", handlers),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the gRPC server to {host}:{port}")
    return server, bound
