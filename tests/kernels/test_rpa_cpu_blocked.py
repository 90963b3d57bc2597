"""The CPU kernel's blocked prefill path against the float64 oracle.

A sequence with ``q_len * group >= 16`` query lanes per KV head runs on the blocked path (items of
one KV head and up to 64 lanes; bfloat16 queries on a 16- or 8-bit cache use bf16 dot products where
the CPU has AVX512-BF16), the rest on the row path; these batches mix both. The shapes give row
blocks that are not a multiple of anything (70 rows: 2 x 35 at GQA 1, 4 x 18 at GQA 3, 5 x 14 at
GQA 4), partial key blocks, chunked prefill (kv_len > q_len) and head_dim 48 (an odd number of
vectors). Tolerances are ``rpa_testlib``'s: ``F32_TOL`` for float32 math, ``BF16_TOL`` for bfloat16
outputs (which also covers the bf16 rounding of the softmax weights, <= 2^-9 relative, before P V).
"""


import jax.numpy as jnp
import numpy as np
import pytest
from rpa_testlib import (
    Geometry,
    check_against_oracle,
    make_batch,
    run_cpu_on_cache,
    with_garbage_metadata,
)

from pallas_kernels.ragged_paged_attention import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the CPU kernel cannot be built")

# (q_len, kv_len): chunked prefill, a whole prompt, a decode row, a short chunk on the row path.
LENGTHS = [(70, 100), (26, 26), (1, 30), (3, 20)]
GEOS = {
    "gqa1_d64": Geometry(100, 4, 4, 4, 64, 16, 7, 40),
    "gqa3_d64": Geometry(100, 4, 9, 3, 64, 16, 7, 40),
    "gqa4_d128": Geometry(100, 4, 8, 2, 128, 16, 7, 40),
    "gqa2_d48": Geometry(100, 4, 4, 2, 48, 8, 13, 60),
}


def _run(batch, geo, cache, **opts):
    """The kernel on ``batch`` with ``cache`` in f32 / bf16 / int8; returns (oracle batch, output, tol)."""
    qdtype = jnp.float32 if cache == "f32" else jnp.bfloat16
    return run_cpu_on_cache(batch, geo, qdtype, jnp.int8 if cache == "int8" else None, **opts)


@pytest.mark.parametrize("cache", ["f32", "bf16", "int8"])
@pytest.mark.parametrize("geo", list(GEOS.values()), ids=list(GEOS))
def test_blocked_prefill_matches_float64_oracle(geo, cache):
    batch = make_batch(np.random.default_rng(geo.head_dim + geo.num_q_heads), geo, LENGTHS)
    ref, got, tol = _run(batch, geo, cache)
    check_against_oracle(ref, got, tol)


@pytest.mark.parametrize("window,cap", [(20, None), (20, 3.0), (None, 2.0)], ids=["window", "both", "cap"])
@pytest.mark.parametrize("cache", ["f32", "int8"])
def test_blocked_sliding_window_and_soft_cap(cache, window, cap):
    geo = GEOS["gqa3_d64"]
    batch = make_batch(np.random.default_rng(3), geo, LENGTHS)
    ref, got, tol = _run(batch, geo, cache, sliding_window=window, soft_cap=cap)
    check_against_oracle(ref, got, tol, sliding_window=window, soft_cap=cap)


def test_blocked_ignores_garbage_metadata_and_stays_in_bounds():
    """Page-table entries past a sequence's pages do not matter; lengths past the page table, pages past
    the cache, kv_len < q_len and rows past T give finite output without a crash."""
    geo = GEOS["gqa3_d64"]
    a, b = with_garbage_metadata(5, geo, [(30, 40), (20, 20)], (-10**6, 10**6))
    np.testing.assert_array_equal(_run(a, geo, "f32")[1], _run(b, geo, "f32")[1])
    batch = make_batch(np.random.default_rng(6), geo, [(30, 60), (20, 30), (40, 50)], nan_padding=False)
    batch.kv_lens[:3] = [10**6, 8, 50]  # past the page table; kv_len < q_len
    batch.page_indices[2] = [10**6, -3, 10**9, 2, 1, 0, 5]
    batch.cu_q_lens[3] = 10**6
    got = _run(batch, geo, "f32")[1]
    assert np.all(np.isfinite(got))
