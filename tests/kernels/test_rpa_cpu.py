"""The C++ CPU kernel (``impl="cpu"``) against the float64 oracle, and how the CPU default picks it.

Tolerances are ``rpa_testlib``'s (the kernel's exp is a polynomial with ~2e-7 relative error, well
inside ``F32_TOL``). ``test_kv_quant`` also runs the kernel on int8 / fp8 caches.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rpa_testlib import (
    BF16_TOL,
    F32_TOL,
    GEO_A,
    GEO_B,
    GEO_C,
    KINDS,
    SM_SCALE,
    Geometry,
    check_against_oracle,
    device_args,
    draw_lengths,
    make_batch,
    quantized_cache,
    rounded,
    run_impl,
    with_garbage_metadata,
)

from pallas_kernels import backend
from pallas_kernels.backend import KernelUnavailableError
from pallas_kernels.ragged_paged_attention import cpu, kv_quant
from pallas_kernels.ragged_paged_attention.api import ragged_paged_attention

# head_dim 48 takes the kernel's generic (runtime head_dim) path; GQA 2.
GEO_D = Geometry(num_tokens=20, max_seqs=5, num_q_heads=4, num_kv_heads=2, head_dim=48, page_size=4,
                 pages_per_seq=12, num_pages=40)
# Enough work items (64 sequences x 3 KV heads) to spread over every pool thread.
GEO_WIDE = Geometry(num_tokens=96, max_seqs=64, num_q_heads=9, num_kv_heads=3, head_dim=64, page_size=16,
                    pages_per_seq=6, num_pages=400)

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the CPU kernel cannot be built")


def _run(batch, dtype=jnp.float32, **opts):
    return run_impl(batch, "cpu", dtype, **opts)


def test_random_batches_match_float64_oracle():
    @settings(max_examples=12, deadline=None, derandomize=True, database=None)
    @given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31 - 1))
    def check(kind, seed):
        rng = np.random.default_rng(seed)
        batch = make_batch(rng, GEO_A, draw_lengths(rng, GEO_A, kind))
        check_against_oracle(batch, _run(batch), F32_TOL)

    check()


@pytest.mark.parametrize("geo", [GEO_B, GEO_C, GEO_D, GEO_WIDE], ids=["gqa4_d128_p8", "mha", "d48", "wide"])
@pytest.mark.parametrize("kind", ["mixed", "prefill", "decode", "boundary"])
def test_other_head_shapes(geo, kind):
    rng = np.random.default_rng(1000 * geo.head_dim + 10 * geo.max_seqs + KINDS.index(kind))
    batch = make_batch(rng, geo, draw_lengths(rng, geo, kind))
    check_against_oracle(batch, _run(batch), F32_TOL)


@pytest.mark.parametrize("kind", ["mixed", "prefill", "boundary"])
def test_bf16_queries_and_cache(kind):
    rng = np.random.default_rng(["mixed", "prefill", "boundary"].index(kind))
    batch = make_batch(rng, GEO_A, draw_lengths(rng, GEO_A, kind))
    check_against_oracle(rounded(batch, jnp.bfloat16), _run(batch, jnp.bfloat16), BF16_TOL)


@pytest.mark.parametrize("window,cap", [(9, None), (9, 3.0), (None, 2.0)], ids=["window", "both", "cap"])
@pytest.mark.parametrize("kind", ["prefill", "mixed", "decode"])
def test_sliding_window_and_soft_cap(kind, window, cap):
    rng = np.random.default_rng(7)
    batch = make_batch(rng, GEO_A, draw_lengths(rng, GEO_A, kind))
    check_against_oracle(batch, _run(batch, sliding_window=window, soft_cap=cap), F32_TOL,
                         sliding_window=window, soft_cap=cap)


@pytest.mark.parametrize("qdtype", [jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("qin", [jnp.float32, jnp.bfloat16])
def test_quantized_cache_uses_stored_values_and_scales(qdtype, qin):
    """The output equals float64 attention over the dequantized cache (``kv_quant.dequantize``)."""
    geo = GEO_A
    rng = np.random.default_rng(11)
    batch = make_batch(rng, geo, draw_lengths(rng, geo, "mixed"))
    kv, _, _ = quantized_cache(batch, geo, qdtype)
    out = ragged_paged_attention(jnp.asarray(batch.q, qin), kv, jnp.asarray(batch.kv_lens),
                                 jnp.asarray(batch.page_indices), jnp.asarray(batch.cu_q_lens),
                                 jnp.asarray(batch.num_seqs), sm_scale=SM_SCALE, impl="cpu")
    deq = dataclasses.replace(
        rounded(batch, qin) if qin == jnp.bfloat16 else batch,
        k_pages=np.asarray(kv_quant.dequantize(kv.k, kv.k_scale), np.float64),
        v_pages=np.asarray(kv_quant.dequantize(kv.v, kv.v_scale), np.float64))
    tol = F32_TOL if qin == jnp.float32 else BF16_TOL
    check_against_oracle(deq, np.asarray(out.astype(jnp.float32), np.float64), tol)


def test_ignores_garbage_metadata():
    """Page-table entries past a sequence's pages and everything past num_seqs do not matter."""
    a, b = with_garbage_metadata(3, GEO_A, [(1, 40), (5, 17), (3, 3)], (-10**6, 10**6))
    np.testing.assert_array_equal(_run(a), _run(b))


def test_out_of_range_metadata_stays_in_bounds():
    """Lengths past the page table, pages past the cache, rows past T: finite output, no crash."""
    rng = np.random.default_rng(4)
    batch = make_batch(rng, GEO_A, [(3, 30), (2, 20)], nan_padding=False)
    batch.kv_lens[:2] = [10**6, 25]
    batch.page_indices[1] = [10**6, -3, 10**9, 2, 1, 0, 5, 7]
    batch.cu_q_lens[2] = 10**6
    batch.num_seqs[0] = 10**6
    got = _run(batch)
    assert np.all(np.isfinite(got))


def test_traced_lengths_compile_once():
    rng = np.random.default_rng(5)
    fn = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=SM_SCALE, impl="cpu"))
    for lengths in ([(1, 30), (1, 2)], [(4, 50), (1, 9), (2, 2), (1, 128)], [(16, 16)]):
        batch = make_batch(rng, GEO_A, lengths)
        check_against_oracle(batch, np.asarray(fn(*device_args(batch, jnp.float32)), np.float64), F32_TOL)
    assert fn._cache_size() == 1


def test_default_on_cpu_is_the_kernel_and_env_forces_xla(monkeypatch):
    monkeypatch.delenv("JAXINFER_KERNEL_IMPL", raising=False)
    assert backend.default_impl("cpu", attention=True) == "cpu"
    assert backend.default_impl("cpu") == "cpu"  # the quantized-matmul kernel (tests/kernels/test_qmm_cpu.py)
    monkeypatch.setenv("JAXINFER_KERNEL_IMPL", "xla")
    assert backend.default_impl("cpu", attention=True) == "xla"
    monkeypatch.setenv("JAXINFER_KERNEL_IMPL", "cpu")
    assert backend.default_impl("cpu", attention=True) == "cpu"
    assert backend.default_impl("cpu") == "cpu"


def test_unsupported_inputs_fall_back_by_default_and_raise_when_asked(monkeypatch):
    monkeypatch.delenv("JAXINFER_KERNEL_IMPL", raising=False)
    rng = np.random.default_rng(6)
    batch = make_batch(rng, GEO_A, draw_lengths(rng, GEO_A, "mixed"))
    args = device_args(batch, jnp.float32, "head_major")
    got = ragged_paged_attention(*args, sm_scale=SM_SCALE)  # default: falls back to the XLA path
    check_against_oracle(batch, np.asarray(got, np.float64), F32_TOL)
    with pytest.raises(ValueError, match="token-major"):
        ragged_paged_attention(*args, sm_scale=SM_SCALE, impl="cpu")
    f16 = device_args(batch, jnp.float16)
    with pytest.raises(ValueError, match="float32 or bfloat16 queries"):
        ragged_paged_attention(*f16, sm_scale=SM_SCALE, impl="cpu")


def test_build_failure_falls_back_to_xla(monkeypatch):
    monkeypatch.delenv("JAXINFER_KERNEL_IMPL", raising=False)
    monkeypatch.setattr(cpu.KERNEL, "state", {"error": "RuntimeError: no C++ compiler found"})
    assert backend.default_impl("cpu", attention=True) == "xla"
    rng = np.random.default_rng(8)
    batch = make_batch(rng, GEO_A, draw_lengths(rng, GEO_A, "decode"))
    with pytest.raises(KernelUnavailableError, match="no C\\+\\+ compiler"):
        ragged_paged_attention(*device_args(batch, jnp.float32), sm_scale=SM_SCALE, impl="cpu")
