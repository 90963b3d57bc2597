"""``LLM``: the offline Python API (``generate``, ``chat``, streaming)."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.compilation_cache import enable_compilation_cache
from jaxinfer.dense_generator import DenseGenerator, RowState
from jaxinfer.errors import InvalidRequestError, PromptTooLongError
from jaxinfer.loader import load_model
from jaxinfer.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.tokenizer import encode_chat, encode_prompt

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype:
    """``"auto"``: float32 on the CPU (XLA:CPU bf16 is ~10x slower), bfloat16 on accelerators."""
    if dtype in (None, "auto"):
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected 'auto' or one of {sorted(_DTYPES)}")
        return jnp.dtype(_DTYPES[dtype])
    return jnp.dtype(dtype)


class _Request:
    """A request being generated: its rows (one per sample) and streaming text state."""

    def __init__(self, request_id, prompt, prompt_ids, params, seeds, tokenizer):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.tokenizer = tokenizer
        self.rows = [RowState(prompt_ids, params, s) for s in seeds]
        self.texts = [""] * len(self.rows)
        self.emitted_text = [0] * len(self.rows)
        self.emitted_tokens = [0] * len(self.rows)
        self.metrics = RequestMetrics(arrival_time=time.perf_counter())

    def update_text(self, j: int) -> None:
        """Re-decode row ``j`` and finish it on a stop string."""
        row, p = self.rows[j], self.params
        text = self.tokenizer.decode(row.output_ids, skip_special_tokens=p.skip_special_tokens)
        if p.stop and row.finish_reason != "stop":
            hits = [(text.find(s), s) for s in p.stop if s in text]
            if hits:
                idx, s = min(hits)
                text = text[: idx + len(s)] if p.include_stop_str_in_output else text[:idx]
                row.finished, row.finish_reason, row.stop_reason = True, "stop", s
                row.finish_time = row.finish_time or time.perf_counter()
        self.texts[j] = text

    def snapshot(self, delta: bool) -> RequestOutput:
        outs = []
        for j, row in enumerate(self.rows):
            text = self.texts[j]
            if delta:
                hold = 0 if row.finished else max([len(s) - 1 for s in self.params.stop] + [0])
                end = len(text) - hold
                while end > self.emitted_text[j] and text[end - 1] == "\ufffd":  # incomplete UTF-8
                    end -= 1
                end = max(end, self.emitted_text[j])
                piece, ids = text[self.emitted_text[j] : end], row.output_ids[self.emitted_tokens[j] :]
                self.emitted_text[j], self.emitted_tokens[j] = end, len(row.output_ids)
            else:
                piece, ids = text, list(row.output_ids)
            lps = None
            if self.params.logprobs is not None:
                lps = row.logprobs[len(row.output_ids) - len(ids) :]
            outs.append(CompletionOutput(j, piece, list(ids), row.finish_reason, row.stop_reason, lps))
        finished = all(r.finished for r in self.rows)
        m = self.metrics
        m.first_token_time = min((r.first_token_time for r in self.rows if r.first_token_time), default=None)
        m.num_generated_tokens = sum(len(r.output_ids) for r in self.rows)
        if finished:
            m.finish_time = max(r.finish_time for r in self.rows)
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_ids), outs, finished, m)


class LLM:
    """Load a model and generate text.

    Args:
      model: registered name, local HF directory, GGUF file or hub id; ``None`` = the default model
        (SmolLM2-135M-Instruct).
      dtype: ``"auto"`` | ``"float32"`` | ``"bfloat16"`` | ``"float16"``: weights and activations.
      max_model_len: context window (prompt + output); defaults to the model's.
      seed: seed for requests that do not set one.
      compilation_cache: persistent XLA compilation cache (``None``: on unless
        ``JAXINFER_COMPILATION_CACHE=0``).
      quantization: ``"gguf"`` keeps a GGUF model's Q8_0 / Q4_0 / Q4_1 weights quantized (default
        ``None``: dequantized to float, the fastest path on the CPU). A quantized checkpoint directory
        (``jaxinfer quantize``) passed as ``model`` always loads quantized.
    """

    def __init__(self, model: str | None = None, *, dtype="auto", max_model_len: int | None = None,
                 seed: int = 0, compilation_cache: bool | None = None, quantization: str | None = None):
        enable_compilation_cache(compilation_cache)
        self.loaded = load_model(model, dtype=resolve_dtype(dtype), quantization=quantization)
        self.config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        limit = self.config.max_position_embeddings
        if max_model_len is not None and not 1 < max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [2, {limit}] for this model, got {max_model_len}")
        self.max_model_len = max_model_len or limit
        eos = set(self.config.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self._generator = DenseGenerator(self.loaded.model, self.loaded.params, self.eos_token_ids)
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()

    # -- input handling ----------------------------------------------------------------------------
    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = encode_prompt(self.tokenizer, prompt)
            text = prompt
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            ids, text = list(prompt), None
        else:
            raise InvalidRequestError("a prompt must be a string or a list of token ids", "prompt")
        if not ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.config.vocab_size})", "prompt")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens but the context window is {self.max_model_len} tokens "
                "(at least one must be left for the output)"
            )
        return text, ids

    def _build(self, prompts, sampling_params, encoded=None) -> list[_Request]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if encoded is None:
            encoded = [self._prompt_ids(p) for p in prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(encoded)
        if len(sampling_params) != len(encoded):
            raise InvalidRequestError("need one SamplingParams per prompt (or a single one)",
                                      "sampling_params")
        reqs = []
        for (text, ids), sp in zip(encoded, sampling_params):
            if not isinstance(sp, SamplingParams):
                raise InvalidRequestError("sampling_params must be SamplingParams", "sampling_params")
            room = self.max_model_len - len(ids)
            if sp.max_tokens > room:  # generation ends with "length" at the context window
                sp = dataclasses.replace(sp, max_tokens=room)
            base = sp.seed if sp.seed is not None else int(self._rng.integers(0, 2**31 - 1))
            seeds = [(base + 1_000_003 * j) & 0x7FFFFFFF for j in range(sp.n)]
            reqs.append(_Request(str(next(self._ids)), text, ids, sp, seeds, self.tokenizer))
        return reqs

    # -- generation --------------------------------------------------------------------------------
    def _run(self, reqs: list[_Request]) -> Iterator[list[_Request]]:
        rows, owners = [], []
        if not reqs:
            return
        for r in reqs:
            for j, row in enumerate(r.rows):
                rows.append(row)
                owners.append((r, j))
        for new in self._generator.run(rows, self.max_model_len):
            changed = {}
            for i, _tok in new:
                r, j = owners[i]
                r.update_text(j)
                changed[id(r)] = r
            yield list(changed.values())

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for one or many prompts (strings or token-id lists), batched together.

        Returns one :class:`RequestOutput` per prompt, in order.
        """
        reqs = self._build(prompts, sampling_params)
        for _ in self._run(reqs):
            pass
        return [r.snapshot(delta=False) for r in reqs]

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
             ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}``) or a list of them."""
        reqs = self._chat_requests(messages, sampling_params)
        for _ in self._run(reqs):
            pass
        return [r.snapshot(delta=False) for r in reqs]

    def stream(self, prompts=None, sampling_params=None, *, messages=None) -> Iterator[RequestOutput]:
        """Yield :class:`RequestOutput` deltas as tokens are generated (pass ``prompts`` or ``messages``)."""
        if messages is not None:
            reqs = self._chat_requests(messages, sampling_params)
        else:
            reqs = self._build(prompts, sampling_params)
        for changed in self._run(reqs):
            for r in changed:
                yield r.snapshot(delta=True)

    def _chat_requests(self, messages, sampling_params) -> list[_Request]:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InvalidRequestError("messages must be a non-empty list", "messages")
        convs = [messages] if isinstance(messages[0], dict) else messages
        encoded = [(None, self._check_len(encode_chat(self.tokenizer, c))) for c in convs]
        return self._build([ids for _, ids in encoded], sampling_params, encoded)

    def _check_len(self, ids: list[int]) -> list[int]:
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"conversation has {len(ids)} tokens but the context window is {self.max_model_len} tokens",
                "messages",
            )
        return ids
