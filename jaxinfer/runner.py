"""The device side of the engine: parameters, KV caches and every jitted step over them.

Steps (each a pure function, caches and penalty state donated, so they are updated in place):

- the target step ``(params, kv_cache, penalty_state, batch) -> (SamplerOutput, kv_cache, penalty_state)``:
  embeds the ragged batch, runs every layer (K/V written into pages, ragged paged attention), computes
  logits only at the batch's logits rows, folds the inputs into the penalty state and samples on device;
  the prompt rows the batch asks to score (prompt logprobs, :mod:`jaxinfer.prompt_logprobs`) go through the
  LM head block by block, only when there are any;
- the verify step (speculative decoding): the same forward pass with rejection sampling of the drafts;
- the draft step (draft-model speculation): the draft model's forward pass over its own cache, one draft
  token per row, the draft distribution kept in a device buffer for the verify step;
- the EAGLE step (:mod:`jaxinfer.speculative.eagle`): the head's forward pass over its own one-layer cache,
  fed with the target's last hidden states. With an EAGLE head attached, the target and verify steps also
  return the last decoder layer's output (before the final norm) of all their tokens, padded to the largest
  token bucket and kept on the device (:attr:`EagleState.hidden`).

The runner carries the kernel choice (:class:`~jaxinfer.target.Kernels`) and applies it to every step, and
places each batch's structured-output token mask (:meth:`ModelRunner.place_mask`).
Each ``(T, S)`` bucket of each step compiles once; :meth:`ModelRunner.compile_all` does that up front so
serving never compiles.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.device_batch import BatchBuilder, StepBatch, VerifyBatch
from jaxinfer.kv_cache import KVCacheSpec, abstract_kv_cache, init_kv_cache
from jaxinfer.models.causal_lm import CausalLM
from jaxinfer.prompt_logprobs import score
from jaxinfer.sampling import PenaltyState, SamplerOutput, sample, update_penalty_state
from jaxinfer.sharding import ShardingPlan, make_mesh
from jaxinfer.speculative.draft import draft_sample, fit_vocab
from jaxinfer.speculative.rejection import VerifyInputs, VerifyOutput, rejection_sample
from jaxinfer.target import Kernels

logger = logging.getLogger(__name__)


@dataclass
class DraftState:
    """The draft model's device state: its parameters, its paged cache (the target's page ids) and the
    draft-probability buffer ``f32[num_slots * K, V]`` (row ``slot * K + j`` holds draft ``j``'s
    distribution ``q``; the verify step reads it)."""

    model: CausalLM
    params: object
    kv_cache: object
    probs: jax.Array


@dataclass
class EagleState:
    """The EAGLE head's device state: the head (its forward functions), parameters, one-layer paged cache
    (the target's page ids), the draft-probability buffer (as :class:`DraftState`'s) and ``hidden``: the last
    target step's hidden states ``[T_max, D]`` (row = token row of that step)."""

    head: object
    params: object
    kv_cache: object
    probs: jax.Array
    hidden: jax.Array


class ModelRunner:
    """Holds parameters, KV cache and penalty state (and a draft model's); runs compiled steps.

    Args:
      model, params: the model and its (possibly quantized) parameters.
      kv_spec: paged cache geometry.
      num_slots: penalty-state rows (max running sequences + one trash row for padding).
      kernels: the attention and matmul kernels every step runs with.
      batches: builds the padding batches that compile each bucket.
      plan: the model's sharding plan; the cache is placed by it (KV heads split over "model" when
        attention is), the penalty state split over the vocabulary as the logits are, and every step
        returns both with the same shardings, so compiled steps are reused.
      abstract: hold ``ShapeDtypeStruct`` state instead of arrays (``params`` abstract too): nothing is
        allocated, and :meth:`lower` compiles steps for the plan's devices, which may be a TPU or GPU
        topology this machine does not have (:mod:`pallas_kernels.targets`).
    """

    def __init__(self, model: CausalLM, params, kv_spec: KVCacheSpec, num_slots: int, kernels: Kernels,
                 batches: BatchBuilder, plan: ShardingPlan | None = None, *, abstract: bool = False):
        self.model = model
        self.params = params
        self.kv_spec = kv_spec
        self.kernels = kernels
        self.batches = batches
        self.num_slots = num_slots
        self.plan = plan or model.plan or ShardingPlan(make_mesh())
        rep = self.plan.replicated()
        zeros = lambda: PenaltyState.zeros(num_slots, model.config.vocab_size)  # noqa: E731
        # The penalty state is split over the vocabulary as the LM head's logits are (replicated when they
        # are), so the sampler reads and updates each chip's part in place: kept replicated, the compiled
        # step would gather the whole [slots, V] state back onto every chip after each update.
        ps = self.plan.sharding((None, "vocab"))
        if abstract:
            self.kv_cache = abstract_kv_cache(kv_spec, self.plan)
            self.penalty_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=ps),
                                              jax.eval_shape(zeros))
        else:
            self.kv_cache = init_kv_cache(kv_spec, self.plan)
            self.penalty_state = jax.device_put(zeros(), ps)
        kv_sh = jax.tree.map(lambda x: x.sharding, self.kv_cache)
        ps_sh = jax.tree.map(lambda x: x.sharding, self.penalty_state)
        # Sampler outputs replicated: every process (multi-host) can read them from a local device.
        self._step = jax.jit(self._step_fn, donate_argnums=(1, 2), out_shardings=(rep, kv_sh, ps_sh))
        self._verify = jax.jit(self._verify_fn, donate_argnums=(1, 2), out_shardings=(rep, kv_sh, ps_sh))
        self.draft: DraftState | None = None
        self._draft_step = None
        self.eagle: EagleState | None = None
        self._eagle_step = None
        self.num_steps = 0
        self._abstract = abstract
        self._all_allowed: dict[int, jax.Array] = {}  # rows -> all-ones token mask kept on the device

    # ---- the target step ---------------------------------------------------------------------------
    def _forward(self, params, kv_cache, batch: StepBatch):
        """``(logits, kv_cache, PromptLogprobs, hidden)`` of one batch; ``hidden``: with an EAGLE head, the
        last layer's output of every token row padded to ``[T_max, D]``, else ``None``."""
        indices = batch.prompt.indices
        t = batch.tokens.shape[0]
        if self.eagle is not None:  # every token row, then the prompt rows
            indices = jnp.concatenate([jnp.arange(t, dtype=jnp.int32), indices.astype(jnp.int32)])
        logits, kv_cache, hidden = self.model.forward(params, batch.tokens, batch.positions, kv_cache, batch.md,
                                                      batch.logits_indices, kernels=self.kernels,
                                                      hidden_indices=indices)
        rows = None
        if self.eagle is not None:
            rows, hidden = hidden[:t], hidden[t:]
            rows = jnp.pad(rows, ((0, self.batches.buckets.token_buckets[-1] - t), (0, 0)))
        prompt = score(lambda h: self.model.logits(params, h, self.kernels), hidden, batch.prompt)
        return logits, kv_cache, prompt, rows

    def _with_hidden(self, outputs, hidden):
        return outputs if self.eagle is None else (*outputs, hidden)

    def _step_fn(self, params, kv_cache, penalty_state, batch: StepBatch):
        logits, kv_cache, prompt, hidden = self._forward(params, kv_cache, batch)
        penalty_state = update_penalty_state(penalty_state, batch.sampling, batch.tokens, batch.token_slot,
                                             batch.token_kind)
        out = sample(logits, batch.sampling, penalty_state, self.kernels.sampler).replace(prompt=prompt)
        return self._with_hidden((out, kv_cache, penalty_state), hidden)

    def _run_target(self, fn, *args):
        """Call a compiled target / verify step; keeps the hidden states it returns with an EAGLE head."""
        res = fn(self.params, self.kv_cache, self.penalty_state, *args)
        if self.eagle is not None:
            *res, self.eagle.hidden = res
        out, self.kv_cache, self.penalty_state = res
        self.num_steps += 1
        return out

    def place_mask(self, batch: StepBatch) -> StepBatch:
        """The batch with its token mask ``i32[L, W]`` on the device, replicated: the host array when some
        row is constrained (one transfer), else an all-ones array kept on the device (no transfer). Always
        the same sharding, so the step's compiled program is the same either way."""
        st = batch.sampling
        rep = self.plan.replicated()
        rows = st.temperature.shape[0]
        if st.token_mask is not None and not self._abstract:
            return batch.replace(sampling=st.replace(token_mask=jax.device_put(st.token_mask, rep)))
        shape = (rows, (self.model.config.vocab_size + 31) // 32)
        if self._abstract:
            mask = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rep)
        else:
            mask = self._all_allowed.get(rows)
            if mask is None:
                mask = self._all_allowed[rows] = jax.device_put(np.full(shape, -1, np.int32), rep)
        return batch.replace(sampling=st.replace(token_mask=mask))

    def dispatch(self, batch: StepBatch) -> SamplerOutput:
        """Launch one step (asynchronously); returns the sampler output still on the device."""
        return self._run_target(self._step, self.place_mask(batch))

    def run(self, batch: StepBatch) -> SamplerOutput:
        """Execute one step; returns the sampler output on the host (one device-to-host copy)."""
        return jax.device_get(self.dispatch(batch))

    # ---- the verify step ---------------------------------------------------------------------------
    def _verify_fn(self, params, kv_cache, penalty_state, batch: StepBatch, vin: VerifyInputs, draft_probs):
        logits, kv_cache, prompt, hidden = self._forward(params, kv_cache, batch)
        penalty_state = update_penalty_state(penalty_state, batch.sampling, batch.tokens, batch.token_slot,
                                             batch.token_kind)
        out = rejection_sample(logits, batch.sampling, penalty_state, vin, draft_probs,
                               self.kernels.sampler).replace(prompt=prompt)
        return self._with_hidden((out, kv_cache, penalty_state), hidden)

    def dispatch_verify(self, vb: VerifyBatch) -> VerifyOutput:
        """Launch one verify step (asynchronously; drafts with the draft model's or the EAGLE head's
        probabilities when there is one, else as point masses); the output stays on the device."""
        probs = self.draft.probs if self.draft is not None else self.eagle.probs if self.eagle is not None else None
        return self._run_target(self._verify, self.place_mask(vb.batch), vb.vin, probs)

    # ---- the draft step ----------------------------------------------------------------------------
    def attach_draft(self, model: CausalLM, params, kv_spec: KVCacheSpec, num_speculative_tokens: int,
                     plan: ShardingPlan | None = None) -> None:
        """Give the runner a draft model (its cache over the target's page ids, see
        :func:`jaxinfer.speculative.draft.draft_kv_spec`) for draft-model speculation."""
        plan = plan or model.plan or self.plan
        rep = plan.replicated()
        vocab = self.model.config.vocab_size
        probs = jax.device_put(jnp.zeros((self.num_slots * num_speculative_tokens, vocab), jnp.float32), rep)
        self.draft = DraftState(model, params, init_kv_cache(kv_spec, plan), probs)
        kv_sh = jax.tree.map(lambda a: a.sharding, self.draft.kv_cache)
        self._draft_step = jax.jit(self._draft_fn, donate_argnums=(1, 2), out_shardings=(rep, kv_sh, rep))

    def _draft_fn(self, params, kv_cache, probs, batch: StepBatch, q_rows):
        logits, kv_cache = self.draft.model.forward(params, batch.tokens, batch.positions, kv_cache, batch.md,
                                                    batch.logits_indices, kernels=self.kernels)
        tokens, q = draft_sample(fit_vocab(logits, self.model.config.vocab_size), batch.sampling)
        return tokens, kv_cache, probs.at[q_rows].set(q, mode="drop")

    def run_draft(self, batch: StepBatch, q_rows: np.ndarray) -> np.ndarray:
        """One draft step; ``q_rows i32[S]``: buffer row for each row's ``q`` (out of range: not kept).
        Returns the drafted tokens ``i32[S]`` on the host."""
        d = self.draft
        tokens, d.kv_cache, d.probs = self._draft_step(d.params, d.kv_cache, d.probs, self.place_mask(batch), q_rows)
        return np.asarray(jax.device_get(tokens))

    @property
    def num_draft_rows(self) -> int:
        """Rows of the draft-probability buffer (a ``q_rows`` entry this large is dropped)."""
        state = self.draft if self.draft is not None else self.eagle
        return 0 if state is None else int(state.probs.shape[0])

    # ---- the EAGLE step ----------------------------------------------------------------------------
    def attach_eagle(self, head, params, kv_spec: KVCacheSpec, num_speculative_tokens: int) -> None:
        """Give the runner an EAGLE head (:class:`jaxinfer.speculative.eagle.EagleHead`, its parameters and
        its cache geometry, :func:`jaxinfer.speculative.eagle.eagle_kv_spec`); from now on the target and
        verify steps also return their hidden states."""
        rep = self.plan.replicated()
        vocab = self.model.config.vocab_size
        width = (self.batches.buckets.token_buckets[-1], self.model.config.hidden_size)
        probs = jax.device_put(jnp.zeros((self.num_slots * num_speculative_tokens, vocab), jnp.float32), rep)
        zeros = jax.device_put(jnp.zeros(width, self.model.dtype), rep)
        self.eagle = EagleState(head, jax.device_put(params, rep), init_kv_cache(kv_spec, self.plan), probs, zeros)
        kv_sh = jax.tree.map(lambda x: x.sharding, self.kv_cache)
        ps_sh = jax.tree.map(lambda x: x.sharding, self.penalty_state)
        self._step = jax.jit(self._step_fn, donate_argnums=(1, 2), out_shardings=(rep, kv_sh, ps_sh, rep))
        self._verify = jax.jit(self._verify_fn, donate_argnums=(1, 2), out_shardings=(rep, kv_sh, ps_sh, rep))
        ekv_sh = jax.tree.map(lambda a: a.sharding, self.eagle.kv_cache)
        self._eagle_step = jax.jit(self._eagle_fn, donate_argnums=(2, 3), out_shardings=(rep, rep, ekv_sh, rep))

    def _eagle_fn(self, hparams, embed_table, kv_cache, probs, source, batch: StepBatch, source_rows, q_rows, chain,
                  chain_q_rows, active, num_steps, threshold):
        drafts, counts, kv_cache, probs = self.eagle.head.draft(
            hparams, embed_table, kv_cache[0], probs, source, batch, source_rows, q_rows, chain, chain_q_rows,
            active, num_steps, threshold)
        return drafts, counts, kv_cache, probs

    def run_eagle(self, batch: StepBatch, source_rows: np.ndarray, q_rows: np.ndarray, chain: StepBatch,
                  chain_q_rows: np.ndarray, active: np.ndarray, num_steps: int, threshold: float
                  ) -> tuple[np.ndarray, np.ndarray]:
        """The EAGLE catch-up step over ``batch`` (entry ``t`` of a row at the slot of position ``t``, token
        ``x_{t+1}``, input states the last target step's ``source_rows i32[T]``) and up to ``num_steps`` further
        draft steps ``chain`` (stacked ``[K - 1, ...]``), all in one call
        (:meth:`jaxinfer.speculative.eagle.EagleHead.draft`).

        Returns:
          ``(drafts i32[S, K], counts i32[S])`` on the host: row ``n`` proposes ``drafts[n, :counts[n]]``.
        """
        e = self.eagle
        chain = chain.replace(sampling=chain.sampling.replace(token_mask=None))
        drafts, counts, e.kv_cache, e.probs = self._eagle_step(
            e.params, self.params["embed_tokens"], e.kv_cache, e.probs, e.hidden, self.place_mask(batch),
            source_rows, q_rows, chain, chain_q_rows, active, np.int32(num_steps), np.float32(threshold))
        drafts, counts = jax.device_get((drafts, counts))
        return np.asarray(drafts), np.asarray(counts)

    def padding_chain(self, num_seqs: int) -> StepBatch:
        """The all-padding chain (``K - 1`` steps) that goes with an EAGLE step of ``num_seqs`` rows."""
        b = self.batches.padding(*self.batches.buckets.bucket(num_seqs, num_seqs))
        k = self.eagle.probs.shape[0] // self.num_slots
        return jax.tree.map(lambda *xs: np.stack(xs), *([b] * (k - 1))) if k > 1 else jax.tree.map(
            lambda x: np.zeros((0, *np.shape(x)), np.asarray(x).dtype), b)

    # ---- compilation -------------------------------------------------------------------------------
    def lower(self, num_tokens: int, num_seqs: int):
        """The target step of bucket ``(T, S)`` lowered for the plan's devices (``.compile()`` it); works on
        an abstract runner, nothing runs."""
        rep = self.plan.replicated()
        batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=rep),
                             self.batches.padding(num_tokens, num_seqs))
        batch = self.place_mask(batch)
        return self._step.lower(self.params, self.kv_cache, self.penalty_state, batch)

    def compile_all(self, shapes=(), verify_shapes=(), draft_shapes=(), eagle_shapes=()) -> float:
        """Compile every step for its ``(T, S)`` buckets by running all-padding batches (the step
        counter is reset afterwards). Returns the seconds spent."""
        start = time.perf_counter()
        b = self.batches
        for t, s in shapes:
            self.run(b.padding(t, s))
        for t, s in verify_shapes:
            jax.device_get(self.dispatch_verify(b.padding_verify(t, s)))
        for t, s in draft_shapes:
            self.run_draft(b.padding(t, s), np.full(s, self.num_draft_rows, np.int32))
        for t, s in eagle_shapes:  # one program per catch-up bucket (its chain's bucket follows from it)
            chain = self.padding_chain(s)
            k1, s2 = chain.logits_indices.shape
            self.run_eagle(b.padding(t, s), np.zeros(t, np.int32), np.full(s, self.num_draft_rows, np.int32), chain,
                           np.full((k1, s2), self.num_draft_rows, np.int32), np.zeros((k1, s), bool), 0, 0.0)
        self.num_steps = 0
        elapsed = time.perf_counter() - start
        logger.info("compiled %d step, %d verify, %d draft and %d EAGLE shapes in %.1f s", len(shapes),
                    len(verify_shapes), len(draft_shapes), len(eagle_shapes), elapsed)
        return elapsed


def params_bytes(params) -> int:
    """Bytes of a parameter pytree."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
