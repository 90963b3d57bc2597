"""``LLM``: the offline Python API (``generate``, ``chat``, streaming) on top of the engine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from jaxinfer.config import EngineConfig
from jaxinfer.engine_factory import create_engine
from jaxinfer.errors import InvalidRequestError, PromptTooLongError
from jaxinfer.outputs import CompletionOutput, RequestOutput
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.tokenizer import encode_chat


class LLM:
    """Load a model and generate text with continuous batching.

    Args:
      model: registered name, local HF directory, GGUF file or hub id; ``None`` = the default model
        (SmolLM2-135M-Instruct).
      dtype: ``"auto"`` | ``"float32"`` | ``"bfloat16"`` | ``"float16"``: weights and activations.
      max_model_len: context window (prompt + output); defaults to the model's.
      seed: seed for requests that do not set one.
      compilation_cache: persistent XLA compilation cache (``None``: on unless
        ``JAXINFER_COMPILATION_CACHE=0``).
      quantization: ``EngineConfig.quantization``: ``"gguf"`` keeps a GGUF model's Q8_0 / Q4_0 / Q4_1
        weights quantized (default ``None``: dequantized to float, the fastest path on the CPU). A quantized
        checkpoint directory (``jaxinfer quantize``) passed as ``model`` always loads quantized.
      speculative_config: vLLM-style ``{"method": ..., "model": ..., "num_speculative_tokens": k}`` (also
        ``"ngram_min"`` / ``"ngram_max"``; ``"prompt_lookup_min"`` / ``"prompt_lookup_max"``): the same as the
        ``speculative_method`` / ``speculative_model`` / ``num_speculative_tokens`` options.
      **engine_options: further :class:`~jaxinfer.config.EngineConfig` fields (``max_num_seqs``,
        ``max_num_batched_tokens``, ``kv_cache_memory``, ``kv_cache_dtype``, ``enable_prefix_caching``,
        ``speculative_method="eagle"`` ...).
    """

    def __init__(self, model: str | None = None, *, dtype="auto", max_model_len: int | None = None,
                 seed: int = 0, compilation_cache: bool | None = None, quantization: str | None = None,
                 speculative_config: dict | None = None, **engine_options):
        if speculative_config is not None:
            engine_options.update(_speculative_options(speculative_config, engine_options))
        config = EngineConfig(max_model_len=max_model_len, dtype=dtype, seed=seed, quantization=quantization,
                              **engine_options)
        self.engine = create_engine(model, config, compilation_cache=compilation_cache)
        first = getattr(self.engine, "replicas", [self.engine])[0]
        self.loaded = first.loaded
        self.config = self.engine.model_config
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len

    # -- requests ----------------------------------------------------------------------------------
    def _add_all(self, prompts: list, params: list[SamplingParams]) -> list[str]:
        """Add every request or none (an invalid one aborts those already added)."""
        ids = []
        try:
            for prompt, sp in zip(prompts, params):
                rid = self.engine.new_request_id()
                self.engine.add_request(rid, prompt, sp)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            while self.engine.has_unfinished_requests():
                self.engine.step()
            raise
        return ids

    @staticmethod
    def _params_list(sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if len(sampling_params) != n:
            raise InvalidRequestError("need one SamplingParams per prompt (or a single one)", "sampling_params")
        return list(sampling_params)

    @staticmethod
    def _prompt_list(prompts) -> list:
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], int)):
            return [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise InvalidRequestError("prompts must be a string, a list of strings or token-id lists", "prompt")
        return list(prompts)

    def _chat_prompts(self, messages) -> list[list[int]]:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InvalidRequestError("messages must be a non-empty list", "messages")
        convs = [messages] if isinstance(messages[0], dict) else messages
        out = []
        for conv in convs:
            ids = encode_chat(self.tokenizer, conv)
            if len(ids) > self.max_model_len:
                raise PromptTooLongError(
                    f"conversation has {len(ids)} tokens but the context window is {self.max_model_len} tokens",
                    "messages")
            out.append(ids)
        return out

    # -- generation --------------------------------------------------------------------------------
    def _deltas(self, request_ids: list[str]) -> Iterator[RequestOutput]:
        pending = set(request_ids)
        while pending:
            for out in self.engine.step():
                if out.request_id in pending:
                    if out.finished:
                        pending.discard(out.request_id)
                    yield out

    def _collect(self, request_ids: list[str]) -> list[RequestOutput]:
        state: dict[str, RequestOutput] = {}
        for d in self._deltas(request_ids):
            acc = state.get(d.request_id)
            if acc is None:
                acc = state[d.request_id] = RequestOutput(d.request_id, d.prompt, d.prompt_token_ids, [], False,
                                                          d.metrics)
            by_index = {c.index: c for c in acc.outputs}
            for c in d.outputs:
                cur = by_index.get(c.index)
                if cur is None:
                    cur = by_index[c.index] = CompletionOutput(c.index, "", [], None, None,
                                                               [] if c.logprobs is not None else None)
                cur.text += c.text
                cur.token_ids.extend(c.token_ids)
                if c.logprobs is not None:
                    cur.logprobs.extend(c.logprobs)
                cur.finish_reason, cur.stop_reason = c.finish_reason, c.stop_reason
            acc.outputs = [by_index[i] for i in sorted(by_index)]
            acc.finished, acc.metrics = d.finished, d.metrics
            if d.prompt_logprobs is not None:
                acc.prompt_logprobs = d.prompt_logprobs
        return [state[r] for r in request_ids]

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for one or many prompts (strings or token-id lists), batched together.

        Returns one :class:`RequestOutput` per prompt, in order.
        """
        prompts = self._prompt_list(prompts)
        return self._collect(self._add_all(prompts, self._params_list(sampling_params, len(prompts))))

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
             ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}``) or a list of them."""
        prompts = self._chat_prompts(messages)
        return self._collect(self._add_all(prompts, self._params_list(sampling_params, len(prompts))))

    def stream(self, prompts=None, sampling_params=None, *, messages=None) -> Iterator[RequestOutput]:
        """Yield :class:`RequestOutput` deltas as tokens are generated (pass ``prompts`` or ``messages``)."""
        prompts = self._chat_prompts(messages) if messages is not None else self._prompt_list(prompts)
        ids = self._add_all(prompts, self._params_list(sampling_params, len(prompts)))
        yield from self._deltas(ids)

    def reset_prefix_cache(self) -> int:
        """Drop every cached KV page no running request uses (the automatic prefix cache); returns how many
        pages were dropped. Later requests recompute those prompt pages."""
        return self.engine.flush_prefix_cache()


_SPEC_KEYS = {"method": "speculative_method", "model": "speculative_model",
              "num_speculative_tokens": "num_speculative_tokens", "ngram_min": "ngram_min", "ngram_max": "ngram_max",
              "prompt_lookup_min": "ngram_min", "prompt_lookup_max": "ngram_max"}


def _speculative_options(spec: dict, given: dict) -> dict:
    """EngineConfig fields of a vLLM-style ``speculative_config`` (unknown keys and conflicts are errors)."""
    if not isinstance(spec, dict):
        raise ValueError(f"speculative_config must be a dict, got {type(spec).__name__}")
    out = {}
    for key, value in spec.items():
        field = _SPEC_KEYS.get(key)
        if field is None:
            raise ValueError(f"speculative_config: unknown key {key!r} (known: {', '.join(_SPEC_KEYS)})")
        if field in given and given[field] != value:
            raise ValueError(f"speculative_config[{key!r}] = {value!r} conflicts with {field}={given[field]!r}")
        out[field] = value
    return out
