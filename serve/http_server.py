"""The OpenAI-compatible HTTP server (Starlette app).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/{model}``, ``GET /health``, ``GET /metrics``. Optional API key (401), CORS allow-list,
415 for a non-JSON body on the JSON endpoints, 408 for a body that does not arrive in time. Errors are
OpenAI-style bodies
``{"error": {"message", "type", "param", "code"}}``: 400 bad input, 404 unknown model (as OpenAI
answers; a request without ``model`` uses the served model), 413 body too large, 429 waiting queue
full, 503 shutting down, 500 engine failure. Streams are server-sent events ending with
``data: [DONE]``; an error after the stream started is sent as a ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve.asgi_io import ClientGone, EventStreamResponse, check_json_content_type, read_body, until_disconnect
from serve.async_engine import AsyncEngine
from serve.errors import (
    APIError,
    BadRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    Unauthorized,
    from_exception,
)
from serve.generation import Generation
from serve.openai_protocol import GenerationRequest, parse_chat_request, parse_completion_request, parse_json_body
from serve.openai_responses import (
    SSE_DONE,
    ResponseBuilder,
    TokenText,
    chat_logprobs,
    completion_logprobs,
    echo_prompt_logprobs,
    merge_logprobs,
    prompt_logprobs_text_len,
    sse,
    vllm_prompt_logprobs,
)
from serve.prompts import check_token_ids, resolve_max_tokens, tokenize_chat, tokenize_text
from serve.tool_calls import ToolStream, call_grammar, parse_tool_calls, parser_for_template

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 2**20
DEFAULT_BODY_TIMEOUT_S = 30.0


class OpenAIServer:
    """Request handlers bound to one ``AsyncEngine``."""

    def __init__(self, engine: AsyncEngine, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 body_timeout_s: float | None = DEFAULT_BODY_TIMEOUT_S):
        self.engine = engine
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.token_text = TokenText(engine.tokenizer)
        self.tool_parser = parser_for_template(getattr(engine.tokenizer, "chat_template", None))

    def error(self, exc: BaseException) -> JSONResponse:
        err = from_exception(exc)
        if err.status >= 500 and not isinstance(exc, APIError):
            logger.error("unexpected error handling a request", exc_info=exc)
        self.engine.metrics.request_errors.labels(status=str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status)

    # -- info routes ---------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.engine.model_aliases:
            return self.error(ModelNotFound(name))
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        e = self.engine
        return {"id": e.model_name, "object": "model", "created": e.created, "owned_by": "jaxinfer",
                "max_model_len": e.max_model_len}

    async def health(self, request: Request) -> Response:
        e = self.engine
        ok = e.healthy and not e.draining
        status = "ok" if ok else ("shutting_down" if e.draining else "unhealthy")
        return JSONResponse({"status": status, "requests_in_flight": e.in_flight}, status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        from serve.metrics import CONTENT_TYPE

        return Response(self.engine.metrics.render(), media_type=CONTENT_TYPE)

    # -- generation routes ---------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion_request)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, parse_chat_request)

    async def _generate(self, request: Request, parse) -> Response:
        arrival = time.perf_counter()
        gen = None
        try:
            check_json_content_type(request)
            body = parse_json_body(await read_body(request, self.max_body_bytes, self.body_timeout_s))
            req: GenerationRequest = parse(body, self.engine.limits)
            self._constrain_tools(req)
            if req.model is not None and req.model not in self.engine.model_aliases:
                raise ModelNotFound(req.model)
            self.engine.check_admission(len(req.prompts) * req.n)  # cheap early 429 / 503, before tokenizing
            prompts = await until_disconnect(request, self._tokenize(req))
            if req.structured_spec is not None:  # validated and compiled off the loop and the engine thread
                req.sampling["structured_outputs"] = await until_disconnect(
                    request, self.engine.prepare_structured(req.structured_spec, req.structured_param))
            params = [req.sampling_params(resolve_max_tokens(
                self.engine.max_model_len, len(ids), 1 if req.echo_only else req.max_tokens, req.default_max_tokens,
                prompt_param=req.prompt_param, max_tokens_param=req.max_tokens_param)) for ids in prompts]
            gen = Generation(self.engine, prompts, params, prefix="chatcmpl" if req.kind == "chat" else "cmpl",
                             arrival_time=arrival)
            await until_disconnect(request, gen.wait_accepted())
            builder = ResponseBuilder(req.kind, gen.id, self.engine.model_name)
            echo = [self._echo_text(req, i, ids) for i, ids in enumerate(prompts)] if req.echo else None
            if req.stream:
                stream_gen, gen = gen, None  # the response owns it from here
                return EventStreamResponse(self._stream(req, stream_gen, builder, echo), on_close=stream_gen.abort)
            return JSONResponse(await until_disconnect(request, self._collect(req, gen, builder, echo)))
        except ClientGone:
            logger.info("client disconnected before the response; aborted")
            return Response(status_code=499)
        except Exception as e:
            return self.error(e)
        finally:
            if gen is not None:
                gen.abort()

    def _constrain_tools(self, req: GenerationRequest) -> None:
        """Tools need a template whose tool-call format is known; ``required`` / named ``tool_choice``
        constrain the output to calls (the grammar replaces any other constraint, refused with it)."""
        if req.tools is None:
            return
        if self.tool_parser is None:
            raise BadRequest("this model's chat template has no tool-call format this server knows (hermes "
                             "<tool_call> or Llama-3 JSON)", param="tools", code="unsupported")
        if req.tools.constrains:
            req.structured_spec = call_grammar(req.tools, self.tool_parser)
            req.structured_param = "tool_choice"

    async def _tokenize(self, req: GenerationRequest) -> list[list[int]]:
        if req.kind == "chat":
            tools = req.tools.tools if req.tools is not None else None
            return [await tokenize_chat(self.engine, req.prompts[0], req.add_generation_prompt, tools)]
        out = []
        for p in req.prompts:
            out.append(await tokenize_text(self.engine, p) if isinstance(p, str) else check_token_ids(p, "prompt"))
        return out

    def _echo_text(self, req: GenerationRequest, i: int, ids: list[int]) -> str:
        p = req.prompts[i]
        return p if isinstance(p, str) else self.engine.tokenizer.decode(ids)

    def _logprobs(self, req: GenerationRequest, c, offset: int):
        if req.logprobs is None or c.logprobs is None:
            return None
        if req.kind == "chat":
            return chat_logprobs(c, req.logprobs, self.token_text)
        return completion_logprobs(c, req.logprobs, self.token_text, offset)

    def _prompt_parts(self, req: GenerationRequest, gen: Generation, pi: int, prompt_lps) -> tuple[dict | None, list]:
        """``(legacy logprobs of the echoed prompt or None, vLLM prompt_logprobs or None)`` of prompt ``pi``."""
        ids = gen.prompts[pi]
        echo_lp = echo_prompt_logprobs(ids, prompt_lps, req.logprobs, self.token_text) if req.echo_logprobs else None
        vllm = None
        if req.prompt_logprobs is not None and prompt_lps is not None:
            vllm = vllm_prompt_logprobs(ids, prompt_lps, req.prompt_logprobs, self.token_text)
        return echo_lp, vllm

    def _start_offset(self, req: GenerationRequest, gen: Generation, pi: int, echo) -> int:
        """``text_offset`` of a choice's first generated token."""
        if req.echo_logprobs:
            return prompt_logprobs_text_len(gen.prompts[pi], self.token_text)
        return len(echo[pi]) if echo else 0

    def _usage(self, req: GenerationRequest, gen: Generation) -> dict:
        usage = gen.usage()
        if req.echo_only:  # the one token generated to run the step is not returned
            usage.update(completion_tokens=0, total_tokens=usage["prompt_tokens"])
        return usage

    async def _collect(self, req: GenerationRequest, gen: Generation, b: ResponseBuilder, echo) -> dict:
        n = gen.n
        total = len(gen.streams) * n
        texts = [[echo[i // n]] if echo else [] for i in range(total)]
        offsets = [self._start_offset(req, gen, i // n, echo) for i in range(total)]
        lps = [None] * total
        reasons = [(None, None)] * total
        prompt_lps = [None] * len(gen.streams)
        async with contextlib.aclosing(gen.events()) as events:
            async for pi, out in events:
                if out.prompt_logprobs is not None:
                    prompt_lps[pi] = out.prompt_logprobs
                for c in out.outputs:
                    i = pi * n + c.index
                    if c.finish_reason is not None:
                        reasons[i] = ("length", None) if req.echo_only else (c.finish_reason, c.stop_reason)
                    if req.echo_only:
                        continue
                    texts[i].append(c.text)
                    lp = self._logprobs(req, c, offsets[i])
                    if lp is not None:
                        lps[i] = merge_logprobs(lps[i], lp)
                    offsets[i] += len(c.text)
        choices = []
        for i in range(total):
            text, calls, (reason, stop_reason) = "".join(texts[i]), None, reasons[i]
            if req.tools is not None and reason == "stop":
                text, calls = parse_tool_calls(text, self.tool_parser)
                reason = "tool_calls" if calls else reason
            echo_lp, vllm = self._prompt_parts(req, gen, i // n, prompt_lps[i // n])
            lp = merge_logprobs(echo_lp, lps[i]) if echo_lp is not None and lps[i] is not None else echo_lp or lps[i]
            choice = b.choice(i, text, lp if req.logprobs is not None else None, reason, stop_reason,
                              tool_calls=calls or None)
            if req.prompt_logprobs is not None and req.kind != "chat":
                choice["prompt_logprobs"] = vllm
            choices.append(choice)
        body = b.response(choices, self._usage(req, gen))
        if req.prompt_logprobs is not None and req.kind == "chat":  # vLLM: one list for the chat's one prompt
            body["prompt_logprobs"] = self._prompt_parts(req, gen, 0, prompt_lps[0])[1]
        return body

    async def _stream(self, req: GenerationRequest, gen: Generation, b: ResponseBuilder, echo):
        n, chat, usage_on = gen.n, req.kind == "chat", req.include_usage
        total = len(gen.streams) * n
        # With prompt logprobs a prompt's deltas wait for its scores (they come with its first token), and
        # each choice's first chunk carries the echo and the prompt's logprobs.
        wait_prompt = req.echo_logprobs or req.prompt_logprobs is not None
        offsets = [self._start_offset(req, gen, i // n, echo) for i in range(total)]
        first = [wait_prompt] * total
        held: dict[int, list] = {}
        prompt_lps: dict[int, list | None] = {}
        tool_streams = [ToolStream(self.tool_parser) for _ in range(total)] if req.tools is not None else None
        try:
            if chat:
                for i in range(total):
                    yield sse(b.chunk([b.choice(i, "", None, None, delta=True, role="assistant")],
                                      include_usage=usage_on))
            elif echo and not wait_prompt:
                for i in range(total):
                    yield sse(b.chunk([b.choice(i, echo[i // n], None, None)], include_usage=usage_on))
            async with contextlib.aclosing(gen.events()) as events:
                async for pi, out in events:
                    ready = [out]
                    if wait_prompt and pi not in prompt_lps:
                        held.setdefault(pi, []).append(out)
                        if out.prompt_logprobs is None and not out.finished:
                            continue
                        prompt_lps[pi] = out.prompt_logprobs
                        ready = held.pop(pi)
                    choices = []
                    for o in ready:
                        choices += self._stream_choices(req, gen, b, echo, pi, o, offsets, first, prompt_lps,
                                                        tool_streams)
                    if choices:
                        yield sse(b.chunk(choices, include_usage=usage_on))
            if usage_on:
                yield sse(b.chunk([], include_usage=True, usage=self._usage(req, gen)))
        except APIError as e:
            self.engine.metrics.request_errors.labels(status=str(e.status)).inc()
            yield sse(e.body())
        yield SSE_DONE

    def _stream_choices(self, req, gen, b, echo, pi, out, offsets, first, prompt_lps, tool_streams) -> list:
        n, chat = gen.n, req.kind == "chat"
        choices = []
        for c in out.outputs:
            i = pi * n + c.index
            lp = self._logprobs(req, c, offsets[i])
            offsets[i] += len(c.text)
            text, reason, calls, stop = c.text, c.finish_reason, None, c.stop_reason
            if tool_streams is not None:
                text, calls = tool_streams[i].feed(c.text, reason is not None)
                reason = "tool_calls" if calls and reason == "stop" else reason
            if req.echo_only:
                text, lp, stop = "", ({k: [] for k in lp} if lp else lp), None
                reason = "length" if reason else None
            vllm = None
            if first[i]:
                first[i] = False
                echo_lp, vllm = self._prompt_parts(req, gen, pi, prompt_lps.get(pi))
                if echo:
                    text = echo[pi] + text
                if echo_lp is not None:
                    lp = merge_logprobs(echo_lp, lp) if lp is not None else echo_lp
            elif not text and reason is None and not calls and not (lp and c.token_ids):
                continue  # nothing to show yet (text held back for a stop string or a partial char)
            choice = b.choice(i, text if (text or not chat) else None, lp, reason, stop, delta=True,
                              tool_calls=calls or None)
            if req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = vllm
            choices.append(choice)
        return choices


def build_app(engine: AsyncEngine, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, *,
              body_timeout_s: float | None = DEFAULT_BODY_TIMEOUT_S, api_key: str | None = None,
              auth_open_paths: tuple[str, ...] = ("/health", "/metrics"),
              allowed_origins: tuple[str, ...] = ()) -> Starlette:
    """The Starlette app serving ``engine`` (start the engine with ``await engine.start()`` first).

    ``api_key``: required as ``Authorization: Bearer <key>`` on every route but ``auth_open_paths`` (401
    otherwise). ``allowed_origins``: browser origins that get CORS headers (none by default: no CORS).
    """
    s = OpenAIServer(engine, max_body_bytes, body_timeout_s)
    routes = [
        Route("/v1/completions", s.completions, methods=["POST"]),
        Route("/v1/chat/completions", s.chat_completions, methods=["POST"]),
        Route("/v1/models", s.models, methods=["GET"]),
        Route("/v1/models/{model:path}", s.model, methods=["GET"]),
        Route("/health", s.health, methods=["GET"]),
        Route("/metrics", s.metrics, methods=["GET"]),
    ]

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return s.error(NotFound(f"No route {request.method} {request.url.path}.", code="not_found"))
        if exc.status_code == 405:
            return s.error(MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.",
                                            code="method_not_allowed"))
        return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error",
                                       "param": None, "code": None}}, status_code=exc.status_code)

    async def unexpected(request: Request, exc: Exception) -> Response:
        return s.error(exc)

    middleware = []
    if allowed_origins:  # outermost: preflights are answered before the API key is asked for
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                                     max_age=600))
    if api_key:
        middleware.append(Middleware(APIKeyMiddleware, api_key=api_key, open_paths=auth_open_paths,
                                     on_reject=lambda: engine.metrics.request_errors.labels(status="401").inc()))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: http_error, Exception: unexpected})


class APIKeyMiddleware:
    """Pure ASGI: 401 unless ``Authorization: Bearer <api_key>`` (constant-time comparison), except on
    ``open_paths``."""

    def __init__(self, app, api_key: str, open_paths: tuple[str, ...] = (), on_reject=None):
        self.app = app
        self._key = api_key.encode("utf-8")
        self._open = frozenset(open_paths)
        self._on_reject = on_reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self._open and not self._authorized(scope):
            if self._on_reject is not None:
                self._on_reject()
            response = JSONResponse(Unauthorized().body(), status_code=401,
                                    headers={"WWW-Authenticate": 'Bearer realm="jaxinfer"'})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.partition(b" ")
        ok = hmac.compare_digest(token.strip(), self._key)  # compared even for a wrong scheme: same time
        return ok and scheme.lower() == b"bearer"
