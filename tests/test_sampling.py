"""On-device sampler against numpy references: filters, seeds, frequencies."""

import jax
import numpy as np
import pytest
from scipy import stats

from jaxinfer.sampling import SamplingTensors, sample, warp_logits
from jaxinfer.sampling_params import SamplingParams
from pallas_kernels import cpu_build

sample_jit = jax.jit(sample)


def _run(logits, params, seeds, steps):
    st = SamplingTensors.from_params(params, seeds, steps)
    out = sample_jit(np.asarray(logits, np.float32), st)
    return np.asarray(out.tokens), np.asarray(out.logprobs)


def _allowed(logits, sp):
    """numpy reference of the support after temperature -> min-p -> top-k -> top-p."""
    x = np.asarray(logits, np.float64) / sp.temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    keep = p >= sp.min_p * p.max()
    order = np.argsort(-x, kind="stable")
    if sp.top_k > 0:
        keep[order[sp.top_k:]] = False
    q = np.where(keep, p, 0)
    q /= q.sum()
    mass = 0.0
    for i in order:
        if not keep[i]:
            continue
        if mass >= sp.top_p:
            keep[i] = False
        mass += q[i]
    return keep


def test_greedy_and_logprobs():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 50)) * 3
    toks, lps = _run(logits, [SamplingParams(temperature=0)] * 5, [0] * 5, [0] * 5)
    np.testing.assert_array_equal(toks, logits.argmax(-1))
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(lps, ref[np.arange(5), toks], atol=1e-5)


@pytest.mark.parametrize("sp", [
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.7, top_p=0.6),
    SamplingParams(temperature=1.3, min_p=0.2),
    SamplingParams(temperature=1.0, top_k=8, top_p=0.8, min_p=0.05),
])
def test_filters_never_emit_excluded_tokens(sp):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(64, 40)) * 2
    allowed = np.stack([_allowed(row, sp) for row in logits])
    for step in range(20):
        toks, _ = _run(logits, [sp] * 64, list(range(64)), [step] * 64)
        assert allowed[np.arange(64), toks].all()


def test_seeded_rows_reproducible_and_batch_independent():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(8, 100))
    sp = SamplingParams(temperature=1.0, top_p=0.9)
    others = [SamplingParams(temperature=0), SamplingParams(temperature=2.0, top_k=3)]
    alone, _ = _run(logits[3:4], [sp], [1234], [7])
    mixed_params = [others[i % 2] for i in range(8)]
    mixed_params[3] = sp
    seeds = list(range(100, 108))
    seeds[3] = 1234
    steps = [0] * 8
    steps[3] = 7
    mixed, _ = _run(logits, mixed_params, seeds, steps)
    assert mixed[3] == alone[0]
    again, _ = _run(logits, mixed_params, seeds, steps)
    np.testing.assert_array_equal(mixed, again)


def test_temperature_sampling_frequencies_match_softmax():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temp = 0.8
    n = 4096
    sp = SamplingParams(temperature=temp)
    toks, _ = _run(np.tile(logits, (n, 1)), [sp] * n, list(range(n)), [0] * n)
    p = np.exp(logits / temp)
    p /= p.sum()
    counts = np.bincount(toks, minlength=len(p))
    chi2, pval = stats.chisquare(counts, p * n)
    assert pval > 1e-3, (counts, p * n)


def test_logit_bias_per_row_on_device():
    """logit_bias travels as fixed-width per-row arrays: one compiled sampler serves any bias mix."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.sampling import SamplingTensors, sample
    from jaxinfer.sampling_params import SamplingParams

    logits = jnp.tile(jnp.arange(8, dtype=jnp.float32)[None, :], (3, 1))  # argmax 7 everywhere
    params = [SamplingParams(temperature=0, logit_bias={2: 100}),
              SamplingParams(temperature=0, logit_bias={7: -100, 6: -100}),
              SamplingParams(temperature=0)]
    run = jax.jit(sample)
    out = run(logits, SamplingTensors.from_params(params, [0, 0, 0], [0, 0, 0]))
    assert out.tokens.tolist() == [2, 5, 7]
    compiled = run._cache_size()  # jit caches are shared per function: other tests may have filled it
    out = run(logits, SamplingTensors.from_params(params[::-1], [0, 0, 0], [0, 0, 0]))
    assert out.tokens.tolist() == [7, 5, 2] and run._cache_size() == compiled


def test_row_argmax_matches_jnp_argmax():
    """The sampler's argmax equals jnp.argmax: random rows, ties (first index), -inf, NaN (first NaN wins),
    a 3-D batch, and the integer-index path of vocabularies beyond 2**24 (a narrow slice checked)."""
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.logits_rows import row_argmax

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1000)).astype(np.float32)
    x[1, [5, 700]] = 50.0  # tie: first index
    x[2] = -np.inf
    x[3, [9, 400]] = np.nan
    x[4, 999] = 1e30
    x[5] = np.round(x[5])  # many ties
    np.testing.assert_array_equal(np.asarray(row_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))
    y = rng.integers(-3, 3, (2, 3, 77)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(row_argmax(jnp.asarray(y))), np.argmax(y, axis=-1))
    big = jnp.zeros((1, (1 << 24) + 8), jnp.bfloat16).at[0, (1 << 24) + 5].set(1.0)
    assert int(row_argmax(big)[0]) == (1 << 24) + 5


@pytest.mark.skipif(cpu_build.compiler() is None, reason="no C++ compiler")
def test_cpu_row_kernel_sampler_equals_the_jnp_sampler():
    """Kernels.sampler = "cpu" (the C++ argmax / log-sum-exp) draws the same tokens as the jnp path for greedy,
    seeded temperature and top-p rows, with log-probabilities within float32 summation-order error; with a
    compiler the kernel must build (a failed build fails here instead of testing the jnp path twice)."""
    from pallas_kernels.logits_rows import cpu

    assert cpu.available(), "the CPU row kernel failed to build"
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(8, 49152)) * 4).astype(np.float32)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=5),
              SamplingParams(temperature=1.0, top_p=0.9, seed=6), SamplingParams(temperature=0, logprobs=3)] * 2
    st = SamplingTensors.from_params(params, list(range(8)), [2] * 8)
    outs = {impl: jax.jit(lambda x, st, impl=impl: sample(x, st, impl=impl))(logits, st) for impl in ("xla", "cpu")}
    np.testing.assert_array_equal(np.asarray(outs["cpu"].tokens), np.asarray(outs["xla"].tokens))
    np.testing.assert_array_equal(np.asarray(outs["cpu"].top_ids), np.asarray(outs["xla"].top_ids))
    for field in ("logprobs", "top_logprobs"):
        np.testing.assert_allclose(np.asarray(getattr(outs["cpu"], field)), np.asarray(getattr(outs["xla"], field)),
                                   rtol=0, atol=2e-5)


def test_kernels_pick_the_cpu_sampler_where_the_cpu_attention_kernel_runs(monkeypatch):
    from jax.sharding import Mesh

    from jaxinfer.target import Kernels
    from pallas_kernels.logits_rows import cpu

    mesh = Mesh(np.asarray(jax.devices("cpu")[:1]), ("model",))
    monkeypatch.delenv("JAXINFER_KERNEL_IMPL", raising=False)
    assert Kernels.for_mesh(mesh, attention="cpu").sampler == ("cpu" if cpu.buildable() else "xla")
    assert Kernels.for_mesh(mesh, attention="xla").sampler == "xla"
    with pytest.raises(ValueError, match="unknown kernel impl"):
        Kernels("xla", "xla", sampler="pallas_tpu")


@pytest.mark.parametrize("vocab", [40, 49152])
def test_filter_support_equals_the_float64_reference(vocab):
    """The sort-free threshold search keeps exactly the reference support (continuous random logits: no
    ties, no mass within float32 rounding of a top-p boundary), row by row, with mixed filters."""
    rng = np.random.default_rng(5)
    rows = 12
    logits = rng.normal(size=(rows, vocab)) * rng.uniform(0.5, 4.0, size=(rows, 1))
    params = [SamplingParams(temperature=float(t), top_k=int(k), top_p=float(p), min_p=float(m))
              for t, k, p, m in zip(rng.uniform(0.5, 1.5, rows), rng.choice([0, 1, 7, 50, 3000], rows),
                                    rng.choice([1.0, 0.3, 0.8, 0.95, 0.999], rows),
                                    rng.choice([0.0, 0.0, 0.01, 0.2], rows))]
    st = SamplingTensors.from_params(params, [0] * rows, [0] * rows)
    x = jax.jit(warp_logits)(np.asarray(logits, np.float32), st)
    got = np.isfinite(np.asarray(x))
    for i, sp in enumerate(params):
        ref = _allowed(logits[i], sp)
        assert (got[i] == ref).all(), (i, sp, got[i].sum(), ref.sum())
