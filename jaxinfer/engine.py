"""The engine: requests in, token deltas out, one scheduled batch per ``step()``.

Single-threaded and free of I/O (servers run it in a thread of their own). Each step:
schedule (continuous batching, chunked prefill, prefix cache, preemption) -> pack the ragged batch at
a fixed bucket -> one jitted device step (paged attention, sampling on device) -> one device-to-host
copy -> scheduler update (stop conditions, page bookkeeping) -> incremental detokenization and stop
strings -> :class:`RequestOutput` deltas.

A request with ``n > 1`` runs as ``n`` sequences over the same prompt. Every running sequence owns a
*slot*: a row of the on-device penalty state.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import jax
import numpy as np

from jaxinfer.block_manager import BlockManagerStats
from jaxinfer.compilation_cache import enable_compilation_cache
from jaxinfer.config import EngineConfig, resolve_dtype
from jaxinfer.detokenizer import IncrementalDetokenizer
from jaxinfer.device_batch import BatchBuilder, RowInfo
from jaxinfer.errors import InvalidRequestError, UnsupportedModelError
from jaxinfer.kv_cache import plan_kv_cache
from jaxinfer.loader import LoadedModel, load_model
from jaxinfer.outputs import CompletionOutput, RequestMetrics, RequestOutput, acceptance_length
from jaxinfer.runner import ModelRunner, params_bytes
from jaxinfer.sampling import logprob_entry
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import Scheduler, SchedulerConfig
from jaxinfer.sequence import Sequence
from jaxinfer.sharding import make_mesh
from jaxinfer.speculative.params import resolve_num_speculative_tokens
from jaxinfer.step_inputs import StepBuckets, pack_step_inputs
from jaxinfer.target import Kernels
from jaxinfer.tokenizer import encode_prompt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics endpoints."""

    num_running: int
    num_waiting: int
    num_pages_total: int
    num_pages_used: int
    prefix_cache_hit_rate: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prefix_cache_pages: int  # pages registered in the prefix cache (in use or evictable)
    prefix_cache_evictions: int  # cached pages reclaimed for new allocations, since start
    prompt_tokens_total: int
    generation_tokens_total: int
    kv_cache_capacity_tokens: int
    num_steps: int
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verified: int = 0

    @property
    def spec_mean_acceptance_length(self) -> float:
        """Tokens per speculating sequence-step (accepted drafts + 1); 0 before any verify."""
        return acceptance_length(self.spec_accepted_tokens, self.spec_verified) or 0.0


class _Request:
    """One user request: its ``n`` sequences, their detokenizers and what was already reported."""

    def __init__(self, request_id, prompt, prompt_ids, params, seqs, detoks, seeds, arrival):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.seqs = seqs
        self.detoks = detoks
        self.seeds = seeds
        self.metrics = RequestMetrics(arrival_time=arrival)
        self.done = [False] * len(seqs)

    @property
    def finished(self) -> bool:
        return all(self.done)


class Engine:
    """Continuous-batching inference over a paged KV cache.

    Args:
      model: registered name, HF directory, GGUF file or hub id (``None``: the default model).
      config: :class:`EngineConfig`.
      loaded: an already loaded model (skips loading ``model``; ``config.quantization`` is then not used).
      draft: an already loaded draft model for ``speculative_method="draft"`` (skips loading
        ``config.speculative_model``).
      compilation_cache: persistent XLA cache switch (``None``: environment default, on).
    """

    def __init__(self, model: str | None = None, config: EngineConfig | None = None, *,
                 loaded: LoadedModel | None = None, draft: LoadedModel | None = None,
                 compilation_cache: bool | None = None):
        enable_compilation_cache(compilation_cache)
        self.config = config = config or EngineConfig()
        dtype = resolve_dtype(config.dtype)
        self.loaded = loaded or load_model(model, dtype=dtype, mesh=make_mesh(config.tensor_parallel_size),
                                           quantization=config.quantization)
        self.model_config = mc = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.model_name = str(model) if model is not None else self.loaded.source.name
        limit = mc.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's {limit}")
        self.max_model_len = config.max_model_len or limit
        eos = set(mc.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_token_ids = tuple(sorted(eos))
        self.kernels = Kernels.for_mesh(self.loaded.mesh, config.attention_impl)
        self.draft_loaded = self._load_draft(draft, dtype)
        spec = plan_kv_cache(mc, page_size=config.page_size, dtype=self.loaded.model.dtype,
                             kv_cache_dtype=config.kv_cache_dtype, memory=config.kv_cache_memory,
                             memory_fraction=config.kv_cache_memory_fraction,
                             params_bytes=params_bytes(self.loaded.params), impl=self.kernels.attention,
                             min_tokens=min(self.max_model_len, config.max_num_batched_tokens),
                             max_useful_tokens=2 * config.max_num_seqs * self.max_model_len,
                             extra_bytes_per_token=self._draft_bytes_per_token(config.page_size))
        self.kv_spec = spec
        sched_cfg = SchedulerConfig(
            max_num_batched_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len, num_pages=spec.num_pages, page_size=config.page_size,
            enable_prefix_caching=config.enable_prefix_caching,
            enable_chunked_prefill=config.enable_chunked_prefill,
        )
        self.scheduler = Scheduler(sched_cfg, self.eos_token_ids)
        self.buckets = StepBuckets.from_scheduler_config(sched_cfg, min_token_bucket=config.min_token_bucket,
                                                         coupled=True)
        self._trash_slot = config.max_num_seqs
        k = config.num_speculative_tokens if config.speculative_method is not None else 0
        self.batches = BatchBuilder(self.buckets, self._trash_slot, self.eos_token_ids, k)
        self.runner = ModelRunner(self.loaded.model, self.loaded.params, spec, config.max_num_seqs + 1,
                                  self.kernels, self.batches, self.loaded.plan)
        self.spec = self._build_speculative()
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self._slot: dict[str, int] = {}
        self._fresh: set[str] = set()  # sequences whose slot must be cleared at their next step
        self._requests: dict[str, _Request] = {}
        self._owner: dict[str, tuple[_Request, int]] = {}
        self._pending: list[RequestOutput] = []
        self._rng = np.random.default_rng(config.seed)
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._ids = itertools.count()

    # ---- speculative decoding ----------------------------------------------------------------------
    def _load_draft(self, draft: LoadedModel | None, dtype) -> LoadedModel | None:
        cfg = self.config
        if cfg.speculative_method != "draft":
            return None
        if draft is None:
            if cfg.speculative_model is None:
                raise ValueError("speculative_method='draft' needs speculative_model (or a loaded draft)")
            draft = load_model(cfg.speculative_model, dtype=dtype, mesh=self.loaded.mesh, load_tokenizer_too=False)
        tv, dv = self.model_config.vocab_size, draft.config.vocab_size
        if abs(tv - dv) > 1024:  # padded vocabularies of one family differ by a little
            raise UnsupportedModelError(f"the draft model's vocabulary ({dv}) does not match the target's ({tv})")
        return draft

    def _draft_bytes_per_token(self, page_size: int) -> int:
        if self.draft_loaded is None:
            return 0
        from jaxinfer.speculative.draft import draft_bytes_per_token

        return draft_bytes_per_token(self.draft_loaded.config, page_size, self.loaded.model.dtype,
                                     self.config.kv_cache_dtype, self.kernels.attention)

    def _build_speculative(self):
        cfg = self.config
        if cfg.speculative_method is None:
            return None
        from jaxinfer.speculative.decoder import SpeculativeDecoder
        from jaxinfer.speculative.draft import draft_kv_spec

        d = self.draft_loaded
        if d is not None:
            self.runner.attach_draft(d.model, d.params, draft_kv_spec(d.config, self.kv_spec),
                                     cfg.num_speculative_tokens, d.plan)
        return SpeculativeDecoder(cfg.speculative_method, cfg.num_speculative_tokens, self.batches, self.runner,
                                  ngram_min=cfg.ngram_min, ngram_max=cfg.ngram_max, max_num_seqs=cfg.max_num_seqs)

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                    *, arrival_time: float | None = None, num_speculative_tokens: int | None = None) -> None:
        """Queue a request (``prompt``: text, tokenized as is, or token ids).

        ``num_speculative_tokens``: draft tokens verified per step for this request (``None``: the engine's
        ``num_speculative_tokens``, or 0 with penalties; 0: no speculation; at most the engine's).

        Raises:
          InvalidRequestError / PromptTooLongError: nothing is queued then.
        """
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string", "request_id")
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params must be a SamplingParams", "sampling_params")
        k = resolve_num_speculative_tokens(num_speculative_tokens, params, self.config.speculative_method,
                                           self.config.num_speculative_tokens)
        text, ids = self._encode(prompt)
        penalties = params.repetition_penalty != 1 or params.presence_penalty or params.frequency_penalty
        base = params.seed if params.seed is not None else int(self._rng.integers(0, 2**31 - 1))
        seeds = [(base + 1_000_003 * i) & 0x7FFFFFFF for i in range(params.n)]
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        seqs = [Sequence(f"{i}:{request_id}", ids, params, use_cached_prefix=not penalties, num_lookahead=k)
                for i in range(params.n)]
        added = []
        try:
            for seq in seqs:
                self.scheduler.add(seq)
                added.append(seq)
        except Exception:
            for seq in added:
                self.scheduler.abort(seq.request_id)
            raise
        detoks = [IncrementalDetokenizer.from_sampling_params(self.tokenizer, params, ids) for _ in seqs]
        req = _Request(request_id, text, ids, params, seqs, detoks, seeds, arrival)
        self._requests[request_id] = req
        for i, seq in enumerate(seqs):
            self._owner[seq.request_id] = (req, i)
        self._prompt_tokens += len(ids)

    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids, text = encode_prompt(self.tokenizer, prompt), prompt
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int | np.integer) and not isinstance(t, bool)
                                                       for t in prompt):
            ids, text = [int(t) for t in prompt], None
        else:
            raise InvalidRequestError("prompt must be a string or a list of token ids", "prompt")
        if not ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        return text, ids

    def abort_request(self, request_id: str) -> bool:
        """Abort a request: its pages are freed now; its final output (reason "abort") comes from the next
        ``step()``. Returns False when the id is unknown or already finished."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        outs = []
        for i, seq in enumerate(req.seqs):
            if req.done[i]:
                continue
            self.scheduler.abort(seq.request_id)
            self._release_slot(seq.request_id)
            req.done[i] = True
            outs.append(CompletionOutput(i, "", [], "abort", None, [] if req.params.logprobs is not None else None))
        self._pending.append(self._output(req, outs))
        self._forget(req)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    # ---- the step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return the deltas of every request that changed."""
        return self.finish_step(self.start_step())

    def start_step(self):
        """Schedule and launch a step on the device without waiting for it (see :meth:`finish_step`)."""
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        for seq in sched.preempted:
            self._release_slot(seq.request_id)
        if sched.is_empty:
            return outputs, None
        rows = sched.scheduled
        infos = self._row_infos(rows)
        drafts = self.spec.propose(rows, infos) if self.spec is not None else None
        if drafts is not None and any(drafts):
            return outputs, (sched, infos, self.spec.dispatch_verify(rows, drafts, infos))
        x = pack_step_inputs(sched, self.buckets)
        return outputs, (sched, infos, self.runner.dispatch(self.batches.plain(x, infos)))

    def finish_step(self, started) -> list[RequestOutput]:
        """Wait for a step launched by :meth:`start_step` and turn its samples into output deltas."""
        outputs, launched = started
        if launched is None:
            return outputs
        sched, infos, device_out = launched
        rows = sched.scheduled
        spec_res = None
        if self.spec is not None and self.spec.is_verify(device_out):
            spec_res = self.spec.collect(device_out)
            sampled, logprobs = spec_res.tokens, spec_res.logprobs
        else:
            res = jax.device_get(device_out)
            sampled = [[int(t)] for t in res.tokens[: len(rows)]]
            logprobs = [None if info.params.logprobs is None else [logprob_entry(res, i, info.params.logprobs)]
                        for i, info in enumerate(infos)]
        now = time.perf_counter()
        row_of = {r.seq.request_id: i for i, r in enumerate(rows)}
        updates = self.scheduler.update(sched, sampled)
        changed: dict[str, list[CompletionOutput]] = {}
        for u in updates:
            req, i = self._owner[u.seq.request_id]
            row = row_of[u.seq.request_id]
            if spec_res is not None and spec_res.num_drafts[row]:
                req.metrics.num_draft_tokens += spec_res.num_drafts[row]
                req.metrics.num_accepted_tokens += spec_res.num_accepted[row]
                req.metrics.num_spec_steps += 1
            new_ids, text = self._detokenize(req, i, u)
            seq = u.seq
            finished = seq.is_finished
            if new_ids and req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            self._generated_tokens += len(new_ids)
            lps = None
            if req.params.logprobs is not None:
                lps = (logprobs[row] or [])[: len(new_ids)]
            changed.setdefault(req.request_id, []).append(CompletionOutput(
                i, text, new_ids, seq.finish_reason if finished else None,
                seq.stop_reason if finished else None, lps))
            if finished:
                req.done[i] = True
                self._release_slot(seq.request_id)
        for rid, outs in changed.items():
            req = self._requests[rid]
            if req.finished:
                req.metrics.finish_time = now
            outputs.append(self._output(req, outs))
            if req.finished:
                self._forget(req)
        return outputs

    def _detokenize(self, req: _Request, i: int, u) -> tuple[list[int], str]:
        """Feed an update's tokens to the detokenizer; a stop string ends the sequence at the token that
        completes it (later tokens of an accepted speculative run are dropped). Returns the tokens kept and
        the new text."""
        detok, seq, ids = req.detoks[i], u.seq, list(u.new_token_ids)
        if len(ids) <= 1:
            d = detok.update(ids, final=u.finished, drop_last_token=u.stopped_by_token)
            if d.stop_string is not None and not u.finished:
                self.scheduler.finish(seq.request_id, "stop", d.stop_string)
            return ids, d.text
        text = ""
        for j, token in enumerate(ids):
            last = j == len(ids) - 1
            d = detok.update([token], final=u.finished and last, drop_last_token=u.stopped_by_token and last)
            text += d.text
            if d.stop_string is None:
                continue
            if not seq.is_finished:
                self.scheduler.finish(seq.request_id, "stop", d.stop_string)
            elif not last:  # finished by a later token: the stop string came first
                seq.set_finished("stop", d.stop_string)
            if not last:
                seq.truncate_tokens(seq.num_tokens - (len(ids) - j - 1))
            return ids[: j + 1], text
        return ids, text

    def _row_infos(self, rows) -> list[RowInfo]:
        """Slot, seed, step and parameters of each scheduled row (a sequence gets a slot at its first step)."""
        infos = []
        for r in rows:
            seq = r.seq
            sid = seq.request_id
            if sid not in self._slot:
                self._slot[sid] = self._free_slots.pop()
                self._fresh.add(sid)
            req, i = self._owner[sid]
            infos.append(RowInfo(self._slot[sid], req.seeds[i], seq.num_output_tokens, seq.sampling_params,
                                 sid in self._fresh))
            self._fresh.discard(sid)
        return infos

    def _release_slot(self, seq_id: str) -> None:
        if self.spec is not None:
            self.spec.forget(seq_id)
        slot = self._slot.pop(seq_id, None)
        if slot is not None:
            self._free_slots.append(slot)
        self._fresh.discard(seq_id)

    def _output(self, req: _Request, outs: list[CompletionOutput]) -> RequestOutput:
        m = req.metrics
        m.num_generated_tokens = sum(s.num_output_tokens for s in req.seqs)
        if req.finished and m.finish_time is None:
            m.finish_time = time.perf_counter()
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, req.finished, m)

    def _forget(self, req: _Request) -> None:
        self._requests.pop(req.request_id, None)
        for seq in req.seqs:
            self._owner.pop(seq.request_id, None)

    # ---- warm-up and stats -------------------------------------------------------------------------
    def warmup(self, token_counts: list[int] | None = None) -> float:
        """Compile step shapes now (returns the seconds spent).

        With no argument every shape is compiled and afterwards no request mix compiles; ``token_counts``
        compiles only the buckets of steps with those token counts (e.g. ``[1]``: single-sequence decode).
        """
        shapes = self.buckets.shapes()
        if token_counts is not None:
            shapes = sorted({self.buckets.bucket(n, 1) for n in token_counts})
        if self.spec is None:
            return self.runner.compile_all(shapes)
        return self.runner.compile_all(shapes, self.spec.verify_shapes(token_counts),
                                       self.spec.draft_shapes(token_counts))

    def stats(self) -> EngineStats:
        s = self.scheduler.stats()
        bm: BlockManagerStats = s.block_manager
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, num_pages_total=bm.num_pages,
            num_pages_used=bm.num_used_pages, prefix_cache_hit_rate=bm.hit_rate,
            prefix_cache_queries=bm.num_query_tokens, prefix_cache_hits=bm.num_hit_tokens,
            num_preemptions=s.num_preemptions, prefix_cache_pages=bm.num_cached_pages,
            prefix_cache_evictions=bm.num_evictions, prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generated_tokens, kv_cache_capacity_tokens=self.kv_spec.capacity_tokens,
            num_steps=self.runner.num_steps,
            **({} if self.spec is None else dict(spec_draft_tokens=self.spec.stats.num_draft_tokens,
                                                 spec_accepted_tokens=self.spec.stats.num_accepted_tokens,
                                                 spec_verified=self.spec.stats.num_verified)),
        )

    def flush_prefix_cache(self) -> int:
        """Drop every cached page no running request uses; returns how many."""
        return self.scheduler.block_manager.flush()

    def new_request_id(self) -> str:
        """A fresh request id (for front ends that do not bring their own)."""
        while True:
            rid = f"req-{next(self._ids)}"
            if rid not in self._requests:
                return rid
