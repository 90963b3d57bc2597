"""The engine: requests in, token deltas out, one scheduled batch per ``step()``.

Single-threaded and free of I/O (servers run it in a thread of their own). Each step:
schedule (continuous batching, chunked prefill, prefix cache, preemption) -> pack the ragged batch at
a fixed bucket -> one jitted device step (paged attention, sampling on device) -> one device-to-host
copy -> scheduler update (stop conditions, page bookkeeping) -> incremental detokenization and stop
strings -> :class:`RequestOutput` deltas.

The engine core is add / abort / step over the scheduler and the runner; request bookkeeping,
detokenization, stop strings and output assembly are the :class:`~jaxinfer.output_processor.OutputProcessor`'s.
A request with ``n > 1`` runs as ``n`` sequences over the same prompt. Every running sequence owns a
*slot*: a row of the on-device penalty state. A structured-output sequence also owns a grammar matcher
(:mod:`jaxinfer.grammar_matcher`): its token mask goes into each step it samples in, it consumes the
sequence's accepted tokens after the step, and a complete grammar finishes the sequence ("stop").
Engines are built by :func:`jaxinfer.engine_factory.create_engine`, which loads the model once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass

import jax
import numpy as np

from jaxinfer.block_manager import BlockManagerStats
from jaxinfer.config import EngineConfig, resolve_int8_activations
from jaxinfer.device_batch import BatchBuilder, RowInfo
from jaxinfer.errors import InvalidRequestError, UnsupportedModelError
from jaxinfer.grammar_matcher import GrammarMatchers
from jaxinfer.kv_cache import plan_kv_cache
from jaxinfer.loader import LoadedModel
from jaxinfer.output_processor import OutputProcessor
from jaxinfer.outputs import RequestOutput, acceptance_length
from jaxinfer.prompt_logprobs import entries, prompt_spans
from jaxinfer.runner import ModelRunner, params_bytes
from jaxinfer.sampling import logprob_entry
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import Scheduler, SchedulerConfig
from jaxinfer.scheduler_types import SeqUpdate
from jaxinfer.sequence import Sequence
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


def size_kv_cache(config: EngineConfig, mc, max_model_len: int, dtype, kernels: Kernels, plan, *,
                  memory: int | str | None = None, params_bytes: int = 0, extra_bytes_per_token: int = 0):
    """The :class:`~jaxinfer.kv_cache.KVCacheSpec` an engine with ``config`` gets for model config ``mc``
    placed by ``plan`` (the budget is per device; ``memory`` overrides ``config.kv_cache_memory``; the CPU's
    default budget is for the whole mesh)."""
    shards = plan.tp if plan is not None and plan.shard_attention else 1
    devices = plan.mesh.size if plan is not None else 1
    return plan_kv_cache(mc, page_size=config.page_size, dtype=dtype, kv_cache_dtype=config.kv_cache_dtype,
                         memory=config.kv_cache_memory if memory is None else memory,
                         memory_fraction=config.kv_cache_memory_fraction, params_bytes=params_bytes,
                         impl=kernels.attention, min_tokens=min(max_model_len, config.max_num_batched_tokens),
                         max_useful_tokens=2 * config.max_num_seqs * max_model_len,
                         extra_bytes_per_token=extra_bytes_per_token, kv_shards=shards, devices=devices)


def scheduler_config(config: EngineConfig, max_model_len: int, num_pages: int) -> SchedulerConfig:
    """The scheduler settings of an engine with ``config`` over ``num_pages`` KV pages."""
    return SchedulerConfig(
        max_num_batched_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
        max_model_len=max_model_len, num_pages=num_pages, page_size=config.page_size,
        enable_prefix_caching=config.enable_prefix_caching, enable_chunked_prefill=config.enable_chunked_prefill,
        max_running_seqs_per_request=config.max_running_seqs_per_request,
        max_step_tokens_per_request=config.max_step_tokens_per_request,
    )


def step_buckets(config: EngineConfig, sched_cfg: SchedulerConfig) -> StepBuckets:
    """The ``(T, S)`` step shapes an engine with ``config`` compiles."""
    return StepBuckets.from_scheduler_config(sched_cfg, min_token_bucket=config.min_token_bucket, coupled=True)


class Engine:
    """Continuous-batching inference over a paged KV cache.

    Args:
      loaded: the loaded model (:func:`jaxinfer.loader.load_model`; :func:`~jaxinfer.engine_factory.create_engine`
        loads it from a name).
      config: :class:`EngineConfig` (its loading fields, e.g. ``quantization``, were used by the loader).
      draft: the loaded draft model, required for ``speculative_method="draft"``.
      model_name: the name front ends report (default: the model source's name).
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None, *, draft: LoadedModel | None = None,
                 model_name: str | None = None):
        self.config = config = config or EngineConfig()
        self.loaded = loaded
        self.model_config = mc = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.model_name = model_name or self.loaded.source.name
        limit = mc.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's {limit}")
        self.max_model_len = config.max_model_len or limit
        eos = set(mc.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_token_ids = tuple(sorted(eos))
        kernels = Kernels.for_mesh(self.loaded.mesh, config.attention_impl)
        self.kernels = dataclasses.replace(kernels, matmul_int8_activations=resolve_int8_activations(
            config.int8_activations, kernels.matmul, self.loaded.model.dtype))
        self.draft_loaded = self._check_draft(draft)
        self.eagle_head = self._load_eagle_head()
        spec = size_kv_cache(config, mc, self.max_model_len, self.loaded.model.dtype, self.kernels, self.loaded.plan,
                             params_bytes=params_bytes(self.loaded.params),
                             extra_bytes_per_token=self._draft_bytes_per_token(config.page_size))
        self.kv_spec = spec
        sched_cfg = scheduler_config(config, self.max_model_len, spec.num_pages)
        self.scheduler = Scheduler(sched_cfg, self.eos_token_ids)
        self.buckets = step_buckets(config, sched_cfg)
        self._trash_slot = config.max_num_seqs
        k = config.num_speculative_tokens if config.speculative_method is not None else 0
        self.batches = BatchBuilder(self.buckets, self._trash_slot, self.eos_token_ids, k)
        self.runner = ModelRunner(self.loaded.model, self.loaded.params, spec, config.max_num_seqs + 1,
                                  self.kernels, self.batches, self.loaded.plan)
        self.spec = self._build_speculative()
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self._slot: dict[str, int] = {}
        self._fresh: set[str] = set()  # sequences whose slot must be cleared at their next step
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler.finish)
        self.grammars = GrammarMatchers(self.tokenizer, mc.vocab_size, self.eos_token_ids)
        self._rng = np.random.default_rng(config.seed)

    # ---- speculative decoding ----------------------------------------------------------------------
    def _check_draft(self, draft: LoadedModel | None) -> LoadedModel | None:
        if self.config.speculative_method != "draft":
            return None
        if draft is None:
            raise ValueError("speculative_method='draft' needs a loaded draft model (create_engine loads "
                             "speculative_model)")
        tv, dv = self.model_config.vocab_size, draft.config.vocab_size
        if abs(tv - dv) > 1024:  # padded vocabularies of one family differ by a little
            raise UnsupportedModelError(f"the draft model's vocabulary ({dv}) does not match the target's ({tv})")
        return draft

    def _load_eagle_head(self):
        """``(EagleHeadConfig, params)`` for the EAGLE methods (see :func:`jaxinfer.speculative.eagle.resolve_head`)."""
        if self.config.speculative_method not in ("eagle", "ngram+eagle"):
            return None
        if self.loaded.plan is not None and self.loaded.plan.tp > 1:
            raise UnsupportedModelError("EAGLE speculation runs on one device per model replica; it does not "
                                        "support tensor_parallel_size > 1 yet")
        from jaxinfer.speculative.eagle import resolve_head

        return resolve_head(self.config.speculative_model, self.model_config, self.loaded.source.name)

    def _draft_bytes_per_token(self, page_size: int) -> int:
        if self.eagle_head is not None:
            from jaxinfer.speculative.eagle import eagle_bytes_per_token

            return eagle_bytes_per_token(self.eagle_head[0], page_size, self.loaded.model.dtype,
                                         self.config.kv_cache_dtype, self.kernels.attention)
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
        if self.eagle_head is not None:
            import jax.numpy as jnp

            from jaxinfer.speculative.eagle import EagleHead, eagle_kv_spec

            hcfg, hparams = self.eagle_head
            dtype = self.loaded.model.dtype
            hparams = jax.tree.map(lambda a: jnp.asarray(a, jnp.int32 if a.dtype.kind in "iu" else dtype), hparams)
            self.runner.attach_eagle(EagleHead(hcfg, np.asarray(hparams["d2t"]), dtype, self.kernels), hparams,
                                     eagle_kv_spec(hcfg, self.kv_spec), cfg.num_speculative_tokens)
        return SpeculativeDecoder(cfg.speculative_method, cfg.num_speculative_tokens, self.batches, self.runner,
                                  ngram_min=cfg.ngram_min, ngram_max=cfg.ngram_max, max_num_seqs=cfg.max_num_seqs,
                                  eagle_threshold=cfg.eagle_draft_threshold)

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                    *, arrival_time: float | None = None, num_speculative_tokens: int | None = None,
                    client: str | None = None, speculative_method: str | None = None) -> None:
        """Queue a request (``prompt``: text, tokenized as is, or token ids).

        ``client``: the client request this one is part of (a server's batch of prompts): the scheduler
        shares slots and steps fairly between clients (default: this request alone).

        ``num_speculative_tokens``: draft tokens verified per step for this request (``None``: the engine's
        ``num_speculative_tokens``, or 0 with penalties; 0: no speculation; at most the engine's).
        ``speculative_method``: this request's proposer (``None``: the engine's ``speculative_method``); one
        the engine can run: "ngram" on any speculating engine, "eagle" / "ngram+eagle" with an EAGLE head,
        "draft" with a draft model.

        Raises:
          InvalidRequestError / PromptTooLongError: nothing is queued then.
        """
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string", "request_id")
        if request_id in self.outputs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params must be a SamplingParams", "sampling_params")
        k = resolve_num_speculative_tokens(num_speculative_tokens, params, self.config.speculative_method,
                                           self.config.num_speculative_tokens)
        if speculative_method is not None and (self.spec is None or speculative_method not in self.spec.methods()):
            can = "none (speculation is off)" if self.spec is None else ", ".join(self.spec.methods())
            raise InvalidRequestError(f"speculative_method {speculative_method!r} is not available on this engine "
                                      f"(available: {can})", "speculative_method")
        text, ids = self._encode(prompt)
        vocab = self.model_config.vocab_size
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab})", "logit_bias")
        penalties = params.repetition_penalty != 1 or params.presence_penalty or params.frequency_penalty
        base = params.seed if params.seed is not None else int(self._rng.integers(0, 2**31 - 1))
        seeds = [(base + 1_000_003 * i) & 0x7FFFFFFF for i in range(params.n)]
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        # The sample that scores prompt logprobs computes its whole prompt (cached pages have no logits).
        scores = params.prompt_logprobs is not None
        seqs = [Sequence(f"{i}:{request_id}", ids, params, use_cached_prefix=not (penalties or (scores and i == 0)),
                         num_lookahead=k, group=request_id, client=client) for i in range(params.n)]
        matchers = self.grammars.create(params.structured_outputs, params.n) if params.structured_outputs else ()
        added = []
        try:
            for seq in seqs:
                self.scheduler.add(seq)
                added.append(seq)
        except Exception:
            for seq in added:
                self.scheduler.abort(seq.request_id)
            raise
        for seq, matcher in zip(seqs, matchers):
            self.grammars.add(seq.request_id, matcher)
        if speculative_method is not None:
            for seq in seqs:
                self.spec.set_method(seq.request_id, speculative_method)
        self.outputs.add(request_id, text, ids, params, seqs, seeds, arrival)

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
        running = self.outputs.abort(request_id)
        if running is None:
            return False
        for seq_id in running:
            self.scheduler.abort(seq_id)
            self._release_slot(seq_id)
            self.grammars.forget(seq_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.outputs.has_unfinished()

    # ---- the step ----------------------------------------------------------------------------------
    def step(self, exclude: Collection[str] = ()) -> list[RequestOutput]:
        """Run one scheduled batch; return the deltas of every request that changed.

        ``exclude``: request ids that must not run in this step (they stay queued / running, untouched):
        a server isolating the request whose inputs make a step fail re-runs it without suspects.
        """
        return self.finish_step(self.start_step(exclude))

    def start_step(self, exclude: Collection[str] = ()):
        """Schedule and launch a step on the device without waiting for it (see :meth:`finish_step`)."""
        outputs = self.outputs.take_pending()
        sched = self.scheduler.schedule(exclude_groups=exclude)
        for seq in sched.preempted:
            self._release_slot(seq.request_id, finished=False)
        if sched.is_empty:
            return outputs, None
        rows = sched.scheduled
        infos = self._row_infos(rows)
        try:
            drafts = self.spec.propose(rows, infos) if self.spec is not None else None
            if drafts is not None and any(drafts):
                return outputs, (sched, infos, self.spec.dispatch_verify(rows, drafts, infos))
            x = pack_step_inputs(sched, self.buckets)
            launched = self.runner.dispatch(self.batches.plain(x, infos))
            if self.spec is not None:
                self.spec.target_step(x.rows, x.cu_q_lens)
            return outputs, (sched, infos, launched)
        except BaseException:
            # Nothing ran: the rows keep their state for a retry (a fresh slot is still cleared), and the
            # aborts' final outputs are reported by the next step.
            self._fresh.update(r.seq.request_id for r, info in zip(rows, infos) if info.reset)
            self.outputs.restore_pending(outputs)
            raise

    def finish_step(self, started) -> list[RequestOutput]:
        """Wait for a step launched by :meth:`start_step` and turn its samples into output deltas."""
        outputs, launched = started
        if launched is None:
            return outputs
        sched, infos, device_out = launched
        rows = sched.scheduled
        spec_res = None
        spans = prompt_spans(rows, [info.score_from for info in infos])
        if self.spec is not None and self.spec.is_verify(device_out):
            spec_res = self.spec.collect(device_out)
            sampled, logprobs = spec_res.tokens, spec_res.logprobs
            prompt_out = device_out.output.prompt
        else:
            res = jax.device_get(device_out if spans else device_out.replace(prompt=None))
            sampled = [[int(t)] for t in res.tokens[: len(rows)]]
            logprobs = [None if info.params.logprobs is None else [logprob_entry(res, i, info.params.logprobs)]
                        for i, info in enumerate(infos)]
            prompt_out = res.prompt
        if spans:
            prompt_out = jax.device_get(prompt_out)
            for sp in spans:
                self.outputs.add_prompt_logprobs(sp.seq.request_id, sp.first,
                                                 entries(prompt_out, sp, infos[sp.row].params.prompt_logprobs))
        row_of = {r.seq.request_id: i for i, r in enumerate(rows)}
        updates = self._advance_grammars(self.scheduler.update(sched, sampled))
        deltas, finished = self.outputs.process(updates, row_of, logprobs, spec_res)
        for seq_id in finished:
            self._release_slot(seq_id)
            self.grammars.forget(seq_id)
        return outputs + deltas

    def _advance_grammars(self, updates: list[SeqUpdate]) -> list[SeqUpdate]:
        """Feed each constrained sequence's new tokens to its matcher; a complete grammar ends the sequence."""
        if not len(self.grammars):
            return updates
        out = []
        for u in updates:
            sid = u.seq.request_id
            if sid in self.grammars and u.new_token_ids and self.grammars.advance(sid, u.new_token_ids) \
                    and not u.finished:
                self.scheduler.finish(sid, "stop")
                u = SeqUpdate(u.seq, u.new_token_ids, True, False)
            out.append(u)
        return out

    def _row_infos(self, rows) -> list[RowInfo]:
        """Slot, seed, step, parameters and token mask of each scheduled row (a sequence gets a slot at its
        first step)."""
        constrained = [r.seq.request_id for r in rows if r.samples and r.seq.request_id in self.grammars]
        masks = dict(zip(constrained, self.grammars.masks(constrained)))
        infos = []
        for r in rows:
            seq = r.seq
            sid = seq.request_id
            if sid not in self._slot:
                self._slot[sid] = self._free_slots.pop()
                self._fresh.add(sid)
            infos.append(RowInfo(self._slot[sid], self.outputs.seed(sid), seq.num_output_tokens,
                                 seq.sampling_params, sid in self._fresh, masks.get(sid),
                                 self.outputs.score_from(sid)))
            self._fresh.discard(sid)
        return infos

    def _release_slot(self, seq_id: str, finished: bool = True) -> None:
        if self.spec is not None:
            self.spec.forget(seq_id, finished)
        slot = self._slot.pop(seq_id, None)
        if slot is not None:
            self._free_slots.append(slot)
        self._fresh.discard(seq_id)

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
        model_shapes = self.spec.draft_shapes(token_counts)
        eagle = self.runner.eagle is not None
        return self.runner.compile_all(shapes, self.spec.verify_shapes(token_counts), [] if eagle else model_shapes,
                                       model_shapes if eagle else [])

    def stats(self) -> EngineStats:
        s = self.scheduler.stats()
        bm: BlockManagerStats = s.block_manager
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, num_pages_total=bm.num_pages,
            num_pages_used=bm.num_used_pages, prefix_cache_hit_rate=bm.hit_rate,
            prefix_cache_queries=bm.num_query_tokens, prefix_cache_hits=bm.num_hit_tokens,
            num_preemptions=s.num_preemptions, prefix_cache_pages=bm.num_cached_pages,
            prefix_cache_evictions=bm.num_evictions, prompt_tokens_total=self.outputs.prompt_tokens,
            generation_tokens_total=self.outputs.generated_tokens,
            kv_cache_capacity_tokens=self.kv_spec.capacity_tokens,
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
        return self.outputs.new_request_id()
