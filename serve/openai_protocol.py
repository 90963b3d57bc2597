"""Parse and validate OpenAI ``/v1/completions`` and ``/v1/chat/completions`` request bodies.

Every problem becomes a ``BadRequest`` naming the field. Supported fields (OpenAI, plus vLLM's
extensions): model, prompt / messages, max_tokens (chat: max_completion_tokens wins), temperature,
top_p, top_k, min_p, presence_penalty, frequency_penalty, repetition_penalty, seed, stop,
stop_token_ids, n, logprobs (completions: int; chat: bool + top_logprobs), stream,
stream_options.include_usage, ignore_eos, min_tokens, skip_special_tokens,
include_stop_str_in_output, echo (completions; with logprobs the logprobs cover the prompt too, and
max_tokens 0 returns the prompt alone), prompt_logprobs (completions, vLLM's extension),
add_generation_prompt (chat).
logit_bias (token-id strings -> [-100, 100], at most ``MAX_LOGIT_BIAS`` tokens).
Structured output: response_format (text / json_object / json_schema), vLLM's structured_outputs and
guided_json / guided_regex / guided_choice / guided_grammar (:mod:`serve.structured_request`). Chat:
tools / tool_choice (:mod:`serve.tool_calls`).
Refused with 400 (not silently ignored): suffix, best_of != n, functions, structural_tag, non-text
message content. Other unknown fields are ignored, as OpenAI does.
Counts are bounded by the server's ``RequestLimits`` (n, prompts, n x prompts, stop strings).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from jaxinfer.errors import InvalidRequestError
from jaxinfer.sampling_params import MAX_LOGPROBS, SamplingParams
from serve.errors import BadRequest, bad_param
from serve.limits import RequestLimits
from serve.prompts import is_token_ids, normalize_messages
from serve.structured_request import structured_outputs_from_body
from serve.tool_calls import ToolRequest, parse_tools

MAX_SEED = 2**63 - 1
DEFAULT_LIMITS = RequestLimits()


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object; 400 for invalid UTF-8, malformed JSON or a non-object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"The request body is not valid UTF-8 (byte {e.start}).", code="invalid_utf8") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as e:
        raise BadRequest(f"The request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("The request body is nested too deeply.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    for key, value in body.items():  # lone surrogates ("\ud800") decode fine but are not text
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad_param(f"'{key}' contains invalid Unicode (a lone surrogate).", key, "invalid_utf8") from None
        except (ValueError, RecursionError):
            raise bad_param(f"'{key}' is nested too deeply.", key) from None
    return body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# -- typed field readers ----------------------------------------------------------------------------
def _type_error(name: str, what: str, value) -> BadRequest:
    return bad_param(f"'{name}' must be {what}, got {json.dumps(value)[:80]}", name, "invalid_type")


def get_int(body: dict, name: str, default=None, *, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise _type_error(name, "an integer", v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise bad_param(f"'{name}' must be in {rng}, got {v}", name)
    return v


def get_number(body: dict, name: str, default=None):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise _type_error(name, "a finite number", v)
    return float(v)


def get_bool(body: dict, name: str, default=None):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _type_error(name, "a boolean", v)
    return v


def get_str(body: dict, name: str, default=None):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise _type_error(name, "a string", v)
    return v


@dataclass
class GenerationRequest:
    """A validated completions or chat request, before tokenization.

    ``prompts`` holds strings or token-id lists (completions) or one normalized message list (chat).
    ``sampling`` holds the ``SamplingParams`` keyword arguments except ``max_tokens``.
    """

    kind: str  # "completion" | "chat"
    model: str | None
    prompts: list
    sampling: dict
    max_tokens: int | None
    max_tokens_param: str
    default_max_tokens: int | None
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    add_generation_prompt: bool = True
    logprobs: int | None = None  # top alternatives per token; None = no logprobs
    extra: dict = field(default_factory=dict)
    tools: ToolRequest | None = None  # chat tools (None: none, or tool_choice "none")
    structured_param: str | None = None  # the request field the output constraint came from
    structured_spec: dict | None = None  # its StructuredOutputsParams fields (built by the server, off the loop)
    prompt_logprobs: int | None = None  # vLLM's field: choices[].prompt_logprobs with this many alternatives

    @property
    def echo_logprobs(self) -> bool:
        """``echo`` with ``logprobs``: the logprobs object covers the prompt, then the completion."""
        return self.echo and self.logprobs is not None

    @property
    def echo_only(self) -> bool:
        """``echo`` with ``max_tokens`` 0: the prompt (and its logprobs) alone; the engine generates one token
        that is not returned."""
        return self.echo and self.max_tokens == 0

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """``SamplingParams.prompt_logprobs``: what both ways of asking for prompt logprobs need."""
        ks = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        return max(ks) if ks else None

    @property
    def n(self) -> int:
        return self.sampling.get("n", 1)

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """Build (and validate) the ``SamplingParams``; errors name the request field."""
        min_tokens = self.sampling.get("min_tokens", 0)
        if isinstance(min_tokens, int) and min_tokens > max_tokens:
            raise bad_param(f"'min_tokens' ({min_tokens}) must be at most '{self.max_tokens_param}' ({max_tokens})",
                            "min_tokens")
        try:
            return SamplingParams(max_tokens=max_tokens, prompt_logprobs=self.engine_prompt_logprobs,
                                  **self.sampling)
        except InvalidRequestError as e:
            param = {"max_tokens": self.max_tokens_param, "structured_outputs": self.structured_param,
                     "logprobs": "top_logprobs" if self.kind == "chat" else "logprobs"}.get(e.param, e.param)
            raise bad_param(str(e), param) from None


def _logit_bias(body: dict) -> dict[int, float]:
    """OpenAI's ``{"token id": bias}`` (string keys) as ints; ranges checked by SamplingParams."""
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _type_error("logit_bias", "an object mapping token ids to numbers", v)
    out = {}
    for key, bias in v.items():
        k = key.strip() if isinstance(key, str) else ""
        if not (k.isascii() and k.lstrip("-").isdigit()) or len(k) > 12:
            raise bad_param(f"'logit_bias' keys must be token ids, got {json.dumps(key)[:40]}", "logit_bias")
        if not isinstance(bias, (int, float)) or isinstance(bias, bool):
            raise _type_error("logit_bias", "an object mapping token ids to numbers", bias)
        out[int(k)] = bias
    return out


def _common(body: dict, kind: str, limits: RequestLimits) -> dict:
    """The sampling fields shared by both endpoints (type-checked; ranges checked by SamplingParams)."""
    n = get_int(body, "n", 1, lo=1)
    limits.check_n(n)
    best_of = get_int(body, "best_of")
    if best_of is not None and best_of != n:
        raise bad_param("'best_of' different from 'n' is not supported", "best_of", "unsupported")
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _type_error("stop", "a string or an array of strings", stop)
        limits.check_stop(stop)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and not (isinstance(stop_ids, list) and (not stop_ids or is_token_ids(stop_ids))):
        raise _type_error("stop_token_ids", "an array of integers", stop_ids)
    kw = {
        "n": n,
        "temperature": get_number(body, "temperature", 1.0),
        "top_p": get_number(body, "top_p", 1.0),
        "top_k": get_int(body, "top_k", 0),
        "min_p": get_number(body, "min_p", 0.0),
        "presence_penalty": get_number(body, "presence_penalty", 0.0),
        "frequency_penalty": get_number(body, "frequency_penalty", 0.0),
        "repetition_penalty": get_number(body, "repetition_penalty", 1.0),
        "seed": get_int(body, "seed", None, lo=-(2**63), hi=MAX_SEED),
        "stop": tuple(stop or ()),
        "stop_token_ids": tuple(stop_ids or ()),
        "ignore_eos": get_bool(body, "ignore_eos", False),
        "min_tokens": get_int(body, "min_tokens", 0, lo=0),
        "skip_special_tokens": get_bool(body, "skip_special_tokens", True),
        "include_stop_str_in_output": get_bool(body, "include_stop_str_in_output", False),
        "logit_bias": _logit_bias(body),
    }
    if kw["seed"] is not None and kw["seed"] < 0:  # keep the int64 bit pattern, as a non-negative seed
        kw["seed"] += 2**64
        kw["seed"] &= MAX_SEED
    return kw


def _stream_fields(body: dict) -> tuple[bool, bool]:
    stream = get_bool(body, "stream", False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise bad_param("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(opts, dict):
            raise _type_error("stream_options", "an object", opts)
        include_usage = get_bool(opts, "include_usage", False)
    return stream, include_usage


def _max_tokens(body: dict, name: str, lowest: int = 1, hint: str = "") -> int | None:
    v = get_int(body, name)
    if v is not None and v < lowest:
        raise bad_param(f"'{name}' must be at least {lowest}{hint}, got {v}", name)
    return v


def parse_completion_request(body: dict, limits: RequestLimits = DEFAULT_LIMITS) -> GenerationRequest:
    """Validate a ``/v1/completions`` body."""
    model = get_str(body, "model")
    if body.get("suffix") is not None:
        raise bad_param("'suffix' is not supported", "suffix", "unsupported")
    prompt = body.get("prompt")
    if isinstance(prompt, str) or is_token_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_token_ids(p) for p in prompt):
        prompts = list(prompt)
    elif prompt is None:
        raise bad_param("'prompt' is required", "prompt", "missing_required_parameter")
    else:
        raise _type_error("prompt", "a string, an array of strings, an array of token ids or an array of those",
                          prompt)
    if len(prompts) > limits.max_prompts:
        raise bad_param(f"at most {limits.max_prompts} prompts per request on this server", "prompt")
    kw = _common(body, "completion", limits)
    limits.check_sequences(kw["n"], len(prompts))
    structured_spec, structured_param = structured_outputs_from_body(body)
    logprobs = get_int(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS)
    kw["logprobs"] = logprobs
    echo = get_bool(body, "echo", False)
    prompt_logprobs = get_int(body, "prompt_logprobs", None, lo=0, hi=MAX_LOGPROBS)
    stream, include_usage = _stream_fields(body)
    max_tokens = _max_tokens(body, "max_tokens", 0 if echo else 1, "" if echo else " (0 only with 'echo')")
    return GenerationRequest("completion", model, prompts, kw, max_tokens, "max_tokens", 16, stream, include_usage,
                             echo, True, logprobs, structured_param=structured_param, prompt_logprobs=prompt_logprobs,
                             structured_spec=structured_spec)


def parse_chat_request(body: dict, limits: RequestLimits = DEFAULT_LIMITS) -> GenerationRequest:
    """Validate a ``/v1/chat/completions`` body."""
    model = get_str(body, "model")
    if "messages" not in body:
        raise bad_param("'messages' is required", "messages", "missing_required_parameter")
    messages = normalize_messages(body.get("messages"))
    tools = parse_tools(body)
    kw = _common(body, "chat", limits)
    limits.check_sequences(kw["n"], 1)
    structured_spec, structured_param = structured_outputs_from_body(body)
    if tools is not None and tools.constrains and structured_param is not None:
        raise bad_param(f"'{structured_param}' cannot be combined with tool_choice '{tools.choice}'", structured_param)
    want = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs", None, lo=0, hi=MAX_LOGPROBS)
    if top is not None and not want:
        raise bad_param("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    logprobs = (top or 0) if want else None
    kw["logprobs"] = logprobs
    mct = _max_tokens(body, "max_completion_tokens")
    mt = _max_tokens(body, "max_tokens")
    stream, include_usage = _stream_fields(body)
    prompt_logprobs = get_int(body, "prompt_logprobs", None, lo=0, hi=MAX_LOGPROBS)
    if prompt_logprobs is not None and stream:  # as vLLM: a top-level field of the whole response
        raise bad_param("'prompt_logprobs' is not supported with 'stream' on /v1/chat/completions",
                        "prompt_logprobs")
    return GenerationRequest("chat", model, [messages], kw, mct if mct is not None else mt,
                             "max_completion_tokens" if mct is not None else "max_tokens", None, stream,
                             include_usage, False, get_bool(body, "add_generation_prompt", True), logprobs,
                             tools=tools, structured_param=structured_param, structured_spec=structured_spec,
                             prompt_logprobs=prompt_logprobs)
