"""Quality of quantized models: perplexity, KL divergence and top-1 agreement against the float model.

Protocol (``evaluate``): the text is tokenized once; the ids are cut into non-overlapping windows of
``seq_len`` tokens (the tail that does not fill a window is dropped); every window is run as an
independent sequence from position 0 (no context carried across windows). In a window, the logits at
position ``j`` predict token ``j + 1``; positions ``j`` in ``[score_start, seq_len - 1)`` are scored
(``score_start = 0``: ``seq_len - 1`` tokens per window; ``score_start = seq_len // 2`` is llama.cpp's
``perplexity`` protocol, which scores only the second half of each window so every scored token has at
least half a window of context). For the same scored tokens:

* perplexity ``exp(mean_t -log q(x_t))``;
* KL divergence ``mean_t KL(p_ref(. | ctx_t) || p_q(. | ctx_t))`` over the whole vocabulary;
* top-1 agreement ``mean_t [argmax p_q = argmax p_ref]``.

Log-softmax runs in float32 on the device; per-token values are summed in float64 on the host.

The reference always runs over the dense float KV cache. A :class:`Variant` may instead run over the
paged KV cache (``kv_cache_dtype``: ``"auto"`` float pages, ``"int8"`` or ``"fp8"`` pages with per-token,
per-head absmax scales, see ``jaxinfer.kv_cache``): each window is one prefill whose keys and values are
written into the pages and attended from there, so KV quantization affects every scored token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinfer.attention import AttentionMetadata, init_dense_cache
from jaxinfer.errors import QuantizationError


@dataclass
class EvalResult:
    """Scores of one parameter set over the scored tokens (see the module docstring)."""

    name: str
    perplexity: float
    nll: float
    kl: float
    top1: float
    num_tokens: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def token_windows(ids, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Non-overlapping windows ``i32[W, seq_len]`` of ``ids[:max_tokens]`` (the partial tail is dropped).

    Raises:
      QuantizationError: fewer than ``seq_len`` tokens, or ``seq_len < 2``.
    """
    ids = np.asarray(ids, np.int32).reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if seq_len < 2:
        raise QuantizationError(f"seq_len must be >= 2, got {seq_len}")
    w = len(ids) // seq_len
    if w < 1:
        raise QuantizationError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return ids[: w * seq_len].reshape(w, seq_len)


@dataclass
class Variant:
    """A parameter tree to score, optionally over a paged KV cache of ``kv_cache_dtype``
    (``"auto"``, ``"int8"``, ``"fp8"``; ``None``: the dense float cache), optionally through another
    ``model`` of the same architecture (e.g. the model computing in bfloat16; ``None``: the reference's),
    optionally with explicit ``kernels`` (a :class:`jaxinfer.target.Kernels`, e.g. the C++ CPU matmul's int8
    activations; ``None``: the model's defaults)."""

    params: dict
    kv_cache_dtype: str | None = None
    model: object | None = None
    kernels: object | None = None


PAGE_SIZE = 16


class _Scorer:
    """Jitted forward over ``B`` windows of ``L`` tokens (one cache slot / page run each) -> per-token stats."""

    def __init__(self, model, batch: int, seq_len: int, kv_cache_dtype: str | None = None, kernels=None):
        c = model.config
        self.model = model
        self.kernels = kernels
        b, length = batch, seq_len
        self.positions = jnp.asarray(np.tile(np.arange(length, dtype=np.int32), b))
        cu = (np.arange(b + 1) * length).astype(np.int32)
        lens, n, slots = np.full(b, length, np.int32), np.array([b], np.int32), np.arange(b * length, dtype=np.int32)
        self.kv_spec = None
        if kv_cache_dtype is None:
            self.md = AttentionMetadata(cu, lens, n, slots, max_q_len=length)
        else:
            from jaxinfer.kv_cache import KV_CACHE_DTYPES, KVCacheSpec
            from pallas_kernels.ragged_paged_attention.pages import default_layout

            if kv_cache_dtype not in KV_CACHE_DTYPES:
                raise QuantizationError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}")
            per_window = -(-length // PAGE_SIZE)
            table = np.arange(b * per_window, dtype=np.int32).reshape(b, per_window)
            slots = (table[:, :, None] * PAGE_SIZE + np.arange(PAGE_SIZE)).reshape(b, -1)[:, :length].reshape(-1)
            self.md = AttentionMetadata(cu, lens, n, slots.astype(np.int32), table, max_q_len=length)
            self.kv_spec = KVCacheSpec(c.num_layers, b * per_window, PAGE_SIZE, c.num_kv_heads, c.head_dim,
                                       jnp.dtype(model.dtype), KV_CACHE_DTYPES[kv_cache_dtype], default_layout())
        self.cache_shape = (c.num_layers, b, length, c.num_kv_heads, c.head_dim)
        self.ref = jax.jit(self._ref)
        self.variant = jax.jit(self._variant)

    def _caches(self):
        if self.kv_spec is None:
            return init_dense_cache(*self.cache_shape, self.model.dtype)
        from pallas_kernels.ragged_paged_attention.pages import init_kv_pages

        sp = self.kv_spec
        one = lambda: init_kv_pages(sp.num_pages, sp.page_size, sp.num_kv_heads, sp.head_dim, sp.dtype,
                                    layout=sp.layout, quant_dtype=sp.quant_dtype)
        return tuple(one() for _ in range(sp.num_layers))

    def _logp(self, params, tokens):
        caches = self._caches()
        logits, _ = self.model.forward(params, tokens, self.positions, caches, self.md, kernels=self.kernels)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    def _ref(self, params, tokens, targets):
        logp = self._logp(params, tokens)
        nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
        return logp, jnp.exp(logp), nll, jnp.argmax(logp, axis=-1)  # p once per window, not per variant

    def _variant(self, params, tokens, targets, ref_logp, ref_p, ref_top):
        logq = self._logp(params, tokens)
        nll = -jnp.take_along_axis(logq, targets[:, None], axis=-1)[:, 0]
        kl = jnp.sum(ref_p * (ref_logp - logq), axis=-1)
        return nll, kl, jnp.argmax(logq, axis=-1) == ref_top


@dataclass
class EvalProgress:
    """Running sums of :func:`evaluate` after its first ``windows_done`` windows (JSON-able, for resuming).

    ``sums[name]`` is ``[sum nll, sum kl, top-1 matches]`` over ``count`` scored tokens;
    ``seconds[name]`` the time spent on that parameter set so far.
    """

    windows_done: int = 0
    count: int = 0
    sums: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> EvalProgress:
        return cls(int(d["windows_done"]), int(d["count"]), {k: [float(x) for x in v] for k, v in d["sums"].items()},
                   {k: float(v) for k, v in d["seconds"].items()})


def evaluate(model, ref_params, variants: Mapping[str, dict | Variant], windows: np.ndarray, *, score_start: int = 0,
             batch: int = 1, ref_name: str = "float", progress: bool = True, resume: EvalProgress | None = None,
             checkpoint: Callable[[EvalProgress], None] | None = None,
             checkpoint_every_s: float = 60.0) -> dict[str, EvalResult]:
    """Score ``ref_params`` and every variant on identical token windows.

    Args:
      model: the :class:`~jaxinfer.models.causal_lm.CausalLM` (all parameter sets share it).
      ref_params: the reference (unquantized) parameters.
      variants: name -> parameter tree (quantized or not), or a :class:`Variant` (KV cache choice).
      windows: ``i32[W, L]`` token windows (:func:`token_windows`).
      score_start: first scored position in a window (see the module docstring).
      batch: windows per forward call (a ragged step of ``batch`` sequences).
      ref_name: key of the reference's own result.
      resume: sums over the first ``resume.windows_done`` windows from an earlier, interrupted call with
        the same arguments (:class:`EvalProgress`); scoring continues after them.
      checkpoint: called with the running :class:`EvalProgress` at most every ``checkpoint_every_s``
        seconds and once at the end (e.g. to save it for ``resume``).

    Returns:
      name -> :class:`EvalResult` (the reference's KL is 0 and its top-1 agreement 1).

    Raises:
      QuantizationError: bad ``score_start``, or ``resume`` names other parameter sets or more windows.
    """
    windows = np.asarray(windows, np.int32)
    w, length = windows.shape
    if not 0 <= score_start < length - 1:
        raise QuantizationError(f"score_start must be in [0, {length - 1}), got {score_start}")
    batch = max(1, min(batch, w))
    variants = {n: v if isinstance(v, Variant) else Variant(v) for n, v in variants.items()}
    for v in variants.values():
        if v.model is not None and v.model.config != model.config:
            raise QuantizationError("a variant's model must have the reference model's configuration")
    models = {id(model): model} | {id(v.model): v.model for v in variants.values() if v.model is not None}
    key = lambda v: (v.kv_cache_dtype, id(v.model if v.model is not None else model), v.kernels)  # noqa: E731
    scorers = {k: _Scorer(models[k[1]], batch, length, k[0], k[2])
               for k in {(None, id(model), None)} | {key(v) for v in variants.values()}}
    scorer = scorers[(None, id(model), None)]
    names = [ref_name, *variants]
    state = resume or EvalProgress(0, 0, {n: [0.0, 0.0, 0.0] for n in names}, dict.fromkeys(names, 0.0))
    if sorted(state.sums) != sorted(names) or not 0 <= state.windows_done <= w:
        raise QuantizationError(f"cannot resume: saved progress covers {sorted(state.sums)} after "
                                f"{state.windows_done} windows, this call scores {sorted(names)} on {w} windows")
    sums = {n: np.asarray(state.sums[n], np.float64) for n in names}
    secs = dict(state.seconds)
    count = state.count
    scored = np.zeros(length, bool)
    scored[score_start: length - 1] = True
    last_save = time.monotonic()
    starts = range(state.windows_done, w, batch)
    for b0 in tqdm(starts, desc="evaluating", disable=not progress, leave=False):
        chunk = windows[b0: b0 + batch]
        n_real = len(chunk)
        if n_real < batch:  # pad the last step with repeats; their rows are not counted
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n_real, axis=0)])
        targets = np.concatenate([chunk[:, 1:], chunk[:, -1:]], axis=1)  # position j predicts j + 1
        mask = np.zeros((batch, length), bool)
        mask[:n_real] = scored[None, :]
        mask = mask.reshape(-1)
        tokens, tgt = jnp.asarray(chunk.reshape(-1)), jnp.asarray(targets.reshape(-1))
        t0 = time.perf_counter()
        ref_logp, ref_p, ref_nll, ref_top = scorer.ref(ref_params, tokens, tgt)
        sums[ref_name][0] += np.asarray(ref_nll, np.float64)[mask].sum()
        secs[ref_name] += time.perf_counter() - t0
        for name, v in variants.items():
            t0 = time.perf_counter()
            nll, kl, top = jax.device_get(scorers[key(v)].variant(v.params, tokens, tgt, ref_logp, ref_p,
                                                                            ref_top))
            sums[name] += [np.asarray(nll, np.float64)[mask].sum(), np.asarray(kl, np.float64)[mask].sum(),
                           np.asarray(top)[mask].sum()]
            secs[name] += time.perf_counter() - t0
        count += int(mask.sum())
        done = b0 + n_real
        if checkpoint is not None and (done == w or time.monotonic() - last_save >= checkpoint_every_s):
            checkpoint(EvalProgress(done, count, {n: [float(x) for x in sums[n]] for n in names}, dict(secs)))
            last_save = time.monotonic()
    if count == 0:
        raise QuantizationError("no scored tokens")
    out = {}
    for name in names:
        nll, kl, top = sums[name] / count
        if name == ref_name:
            kl, top = 0.0, 1.0
        out[name] = EvalResult(name, math.exp(nll), float(nll), float(kl), float(top), count,
                               round(secs[name], 2))
    return out
