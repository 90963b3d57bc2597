"""The device side of the engine: parameters, the paged KV cache and one pure jitted step.

``step(params, kv_cache, penalty_state, batch) -> (SamplerOutput, kv_cache, penalty_state)`` embeds the
ragged batch, runs every layer (K/V written into pages, ragged paged attention), computes logits only
at each sequence's last scheduled token, folds the inputs into the penalty state and samples on device.
The cache and penalty state are donated (updated in place). Each ``(T, S)`` bucket compiles once;
``compile_all`` does that up front so serving never compiles.
"""

from __future__ import annotations

import logging
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.attention import AttentionMetadata
from jaxinfer.kv_cache import KVCacheSpec, init_kv_cache
from jaxinfer.models.causal_lm import CausalLM
from jaxinfer.sampling import (
    PenaltyState,
    SamplerOutput,
    SamplingTensors,
    sample,
    update_penalty_state,
)
from jaxinfer.sharding import ShardingPlan, make_mesh

logger = logging.getLogger(__name__)


@flax.struct.dataclass
class StepBatch:
    """Device inputs of one step (``T`` tokens, ``S`` sequence rows, ``P`` pages per sequence).

    Attributes:
      tokens, positions, token_slot, token_kind: ``i32[T]``.
      md: :class:`AttentionMetadata` (``cu_q_lens[S+1]``, ``kv_lens[S]``, ``num_seqs[1]``,
        ``slot_mapping[T]``, ``page_indices[S, P]``).
      logits_indices: ``i32[S]`` row of each sequence's last scheduled token.
      sampling: :class:`SamplingTensors` of ``S`` rows.
    """

    tokens: jax.Array
    positions: jax.Array
    token_slot: jax.Array
    token_kind: jax.Array
    md: AttentionMetadata
    logits_indices: jax.Array
    sampling: SamplingTensors


class ModelRunner:
    """Holds parameters, KV cache and penalty state; runs compiled steps.

    Args:
      model, params: the model and its (possibly quantized) parameters.
      kv_spec: paged cache geometry.
      num_slots: penalty-state rows (max running sequences + one trash row for padding).
      impl: attention kernel ("xla", "cpu", "pallas_tpu", "pallas_gpu"; None = backend default).
      plan: the model's sharding plan; the cache is placed by it (KV heads split over "model" when
        attention is), the penalty state replicated, and every step returns both with the same
        shardings, so compiled steps are reused.
    """

    def __init__(self, model: CausalLM, params, kv_spec: KVCacheSpec, num_slots: int, impl: str | None = None,
                 plan: ShardingPlan | None = None):
        self.model = model
        self.params = params
        self.kv_spec = kv_spec
        self.impl = impl
        self.num_slots = num_slots
        plan = plan or model.plan or ShardingPlan(make_mesh())
        self.kv_cache = init_kv_cache(kv_spec, plan)
        self.penalty_state = jax.device_put(PenaltyState.zeros(num_slots, model.config.vocab_size), plan.replicated())
        kv_shardings = jax.tree.map(lambda x: x.sharding, self.kv_cache)
        ps_shardings = jax.tree.map(lambda x: x.sharding, self.penalty_state)
        # Sampler outputs replicated: every process (multi-host) can read them from a local device.
        self._step = jax.jit(self._step_fn, donate_argnums=(1, 2),
                             out_shardings=(plan.replicated(), kv_shardings, ps_shardings))
        self.num_steps = 0

    def _step_fn(self, params, kv_cache, penalty_state, batch: StepBatch):
        logits, kv_cache = self.model.forward(params, batch.tokens, batch.positions, kv_cache, batch.md,
                                              batch.logits_indices)
        penalty_state = update_penalty_state(penalty_state, batch.sampling, batch.tokens, batch.token_slot,
                                             batch.token_kind)
        return sample(logits, batch.sampling, penalty_state), kv_cache, penalty_state

    def dispatch(self, batch: StepBatch) -> SamplerOutput:
        """Launch one step (asynchronously); returns the sampler output still on the device."""
        out, self.kv_cache, self.penalty_state = self._step(self.params, self.kv_cache, self.penalty_state, batch)
        self.num_steps += 1
        return out

    def run(self, batch: StepBatch) -> SamplerOutput:
        """Execute one step; returns the sampler output on the host (one device-to-host copy)."""
        return jax.device_get(self.dispatch(batch))

    def dummy_batch(self, num_tokens: int, num_seqs: int, pages_per_seq: int) -> StepBatch:
        """An all-padding batch of the given bucket (used to compile it)."""
        return padding_batch(num_tokens, num_seqs, pages_per_seq, self.impl, trash_slot=self.num_slots - 1)

    def compile_all(self, shapes, pages_per_seq: int) -> float:
        """Compile the step for every ``(T, S)`` in ``shapes`` by running an all-padding batch."""
        start = time.perf_counter()
        for t, s in shapes:
            self.run(self.dummy_batch(t, s, pages_per_seq))
        self.num_steps = 0
        elapsed = time.perf_counter() - start
        logger.info("compiled %d step shapes in %.1f s", len(shapes), elapsed)
        return elapsed


def padding_batch(num_tokens: int, num_seqs: int, pages_per_seq: int, impl: str | None,
                  trash_slot: int = 0) -> StepBatch:
    """An all-padding :class:`StepBatch` of bucket ``(T, S)`` (nothing written, nothing attended; penalty
    rows point at ``trash_slot``): what warm-up runs to compile a bucket."""
    z = lambda *s: np.zeros(s, np.int32)  # noqa: E731
    md = AttentionMetadata(cu_q_lens=z(num_seqs + 1), kv_lens=z(num_seqs), num_seqs=z(1),
                           slot_mapping=np.full(num_tokens, -1, np.int32),
                           page_indices=z(num_seqs, pages_per_seq), impl=impl)
    st = SamplingTensors.build([], seeds=[], steps=[], num_rows=num_seqs, trash_slot=trash_slot)
    return StepBatch(z(num_tokens), z(num_tokens), np.full(num_tokens, trash_slot, np.int32), z(num_tokens), md,
                     z(num_seqs), st)


def params_bytes(params) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
