"""On-device rejection sampling of speculative drafts: the output follows the target's distribution.

The verify step scores ``L`` logits rows: for a sequence with ``k`` drafts, rows ``j = 0 .. k`` hold the
target logits at output index ``step + j``; row ``j < k`` checks draft token ``d_j``, row ``k`` gives
the bonus token. Each row is warped exactly as :func:`jaxinfer.sampling.sample` does (``min_tokens``
suppression, penalties, temperature, min-p, top-k, top-p) to the target distribution ``p``; draft
probabilities ``q`` were warped the same way by the draft step.

* Greedy rows (temperature 0): accept while ``d_j == argmax``; the row's emitted token is the argmax.
* Draft model (``q`` given): accept ``d_j`` with probability ``min(1, p(d_j) / q(d_j))``; on rejection
  emit a sample of ``normalize(max(0, p - q))``. The bonus row samples ``p``.
* Point-mass drafts (n-gram: ``q = one_hot(d_j)``): draw ``t ~ p`` with the ordinary sampler's noise and
  accept iff ``t == d_j``, else emit ``t``. ``P(accept) = p(d_j)`` and a rejected draw is ``p``
  conditioned on ``t != d_j`` = ``normalize(max(0, p - one_hot(d_j)))``: the same rule, and the tokens
  equal those of non-speculative sampling with the same seed.

Randomness is keyed by ``(seed, output index, stream)`` only (``fold_in``), so results do not depend on
the batch: the ordinary sampler's Gumbel noise (stream-free key) for ``t`` and bonus tokens, and separate
streams for the draft model's own draws, the acceptance uniforms and the residual draws. A position that
is verified again after an earlier rejection reuses its keys; that is sound because no key of an output
index influenced which prefix that index is verified under.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxinfer.sampling import (
    PenaltyState,
    SamplingTensors,
    gumbel_draw,
    process_logits,
    token_logprobs,
    warp_logits,
)
from pallas_kernels.logits_rows import row_argmax

DRAFT_STREAM, ACCEPT_STREAM, RESIDUAL_STREAM = 1, 2, 3
POINT_MASS = 2**30  # a q_index past every draft-probability buffer: the row's draft is a point mass


def stream_key(seed: jax.Array, step: jax.Array, stream: int) -> jax.Array:
    """Key of one row's draws in ``stream`` at output index ``step`` (independent of the plain sampler's
    ``fold_in(key(seed), step)``)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), stream)


def stream_gumbel(st: SamplingTensors, stream: int, vocab: int) -> jax.Array:
    """``f32[S, vocab]`` Gumbel noise of ``stream`` for every row of ``st``."""
    return jax.vmap(lambda s, t: jax.random.gumbel(stream_key(s, t, stream), (vocab,), jnp.float32))(
        st.seed, st.step)


def residual_distribution(p: jax.Array, q: jax.Array) -> jax.Array:
    """Unnormalised distribution a rejected position is resampled from: ``max(0, p - q)`` (``[L, V]``)."""
    return jnp.maximum(p - q, 0.0)


@flax.struct.dataclass
class VerifyInputs:
    """Draft-side inputs of a verify step (``L`` logits rows, ``S`` sequence rows, ``K`` = max drafts).

    Attributes:
      draft_tokens: ``i32[L]`` draft token checked by each row (0 where ``has_draft`` is False).
      has_draft: ``bool[L]`` the row checks a draft (False: bonus row, plain sampling row, padding).
      q_index: ``i32[L]`` row of the flattened draft-probability buffer holding ``q`` for the row
        (:data:`POINT_MASS`: ``q = one_hot(draft)``, an n-gram draft among draft-model rows).
      row_map: ``i32[S, K + 1]`` logits row of each sequence's ``j``-th verified position (padding 0).
      num_drafts: ``i32[S]`` drafts of each sequence (0 for plain rows and padding).
    """

    draft_tokens: jax.Array
    has_draft: jax.Array
    q_index: jax.Array
    row_map: jax.Array
    num_drafts: jax.Array


@flax.struct.dataclass
class VerifyOutput:
    """``tokens i32[L]``: the token each row emits if its sequence gets that far (the draft when accepted,
    else the correction / bonus); ``num_accepted i32[S]``: leading accepted drafts per sequence, so a
    sequence emits rows ``0 .. num_accepted``. ``logprobs f32[L]`` of the emitted tokens and top
    ``top_ids`` / ``top_logprobs [L, MAX_LOGPROBS]`` under the raw target logits; ``prompt``: the step's
    :class:`~jaxinfer.prompt_logprobs.PromptLogprobs` (set by the runner)."""

    tokens: jax.Array
    num_accepted: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array
    prompt: object = None


def rejection_sample(logits: jax.Array, st: SamplingTensors, penalty_state: PenaltyState | None,
                     vin: VerifyInputs, draft_probs: jax.Array | None = None, impl: str = "xla") -> VerifyOutput:
    """Verify drafts against the target (see the module docstring).

    Args:
      logits: ``f32[L, V]`` raw target logits of the verified rows.
      st: ``L`` rows of sampling parameters (``step`` = the row's output index).
      penalty_state: token statistics (``None``: no penalties).
      vin: :class:`VerifyInputs`.
      draft_probs: ``f32[N, V]`` warped draft probabilities (``q``) indexed by ``vin.q_index``; ``None``
        for point-mass drafts (n-gram).
      impl: how the row argmax and log-normaliser run (``Kernels.sampler``: ``"xla"`` or ``"cpu"``).
    """
    logits = jnp.asarray(logits, jnp.float32)
    v = logits.shape[-1]
    x = process_logits(logits, st, penalty_state)
    greedy = row_argmax(x, impl)
    is_greedy = st.temperature <= 0
    d = vin.draft_tokens

    if draft_probs is None:
        def sampled():
            t = jnp.where(is_greedy, greedy, gumbel_draw(warp_logits(x, st), st, impl))
            return t, t == d
    else:
        def sampled():
            y = warp_logits(x, st)
            t = gumbel_draw(y, st, impl)
            p = jax.nn.softmax(y, axis=-1)
            n_q = draft_probs.shape[0]
            q = jnp.where((vin.q_index >= n_q)[:, None], jax.nn.one_hot(d, v, dtype=jnp.float32),
                          draft_probs[jnp.minimum(vin.q_index, n_q - 1)])
            p_d = jnp.take_along_axis(p, d[:, None], axis=-1)[:, 0]
            q_d = jnp.take_along_axis(q, d[:, None], axis=-1)[:, 0]
            u = jax.vmap(lambda s, k: jax.random.uniform(stream_key(s, k, ACCEPT_STREAM)))(st.seed, st.step)
            accept = u * q_d < p_d
            r = residual_distribution(p, q)
            r_log = jnp.where(r > 0, jnp.log(jnp.where(r > 0, r, 1.0)), -jnp.inf)
            resampled = jnp.argmax(r_log + stream_gumbel(st, RESIDUAL_STREAM, v), axis=-1).astype(jnp.int32)
            # p == q up to rounding leaves no residual mass: then rejection is a rounding artefact, use t
            fix = jnp.where(jnp.any(r > 0, axis=-1), resampled, t)
            emit = jnp.where(vin.has_draft & accept, d, jnp.where(vin.has_draft, fix, t))
            return jnp.where(is_greedy, greedy, emit), jnp.where(is_greedy, greedy == d, accept)

    tokens, accept = jax.lax.cond(jnp.all(is_greedy), lambda: (greedy, greedy == d), sampled)
    accept = accept & vin.has_draft
    kmax = vin.row_map.shape[1]
    ok = accept[vin.row_map] & (jnp.arange(kmax)[None, :] < vin.num_drafts[:, None])
    num_accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    chosen, top_ids, top_lps = token_logprobs(logits, tokens, st.num_logprobs, impl)
    return VerifyOutput(tokens, num_accepted, chosen, top_ids, top_lps)
