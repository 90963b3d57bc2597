"""The CPU kernel's decode path (``cpu_decode.h``) against the float64 oracle.

Row items (``q_len * group < 16``) with head_dim 64, 128 or 256 and at most 16 query vectors per KV
head run on the decode path: all KV heads of a sequence per item when there are at least 16 row
items (batches of 18 sequences here), one KV head per item otherwise (3 sequences). Contexts are not
multiples of the page or of the 16-key block, some sequences have 2-5 rows (up to 15 query vectors
per head at GQA 3), and bfloat16 queries on a bf16 cache take the ``vdpbf16ps`` Q K^T where the CPU
has AVX512-BF16. Tolerances are ``rpa_testlib``'s: ``F32_TOL`` for float32 queries, ``BF16_TOL``
for bfloat16 outputs.
"""


import jax.numpy as jnp
import numpy as np
import pytest
from rpa_testlib import (
    SM_SCALE,
    Geometry,
    check_against_oracle,
    make_batch,
    quantized_cache,
    run_cpu_on_cache,
)

from pallas_kernels.ragged_paged_attention import cpu
from pallas_kernels.ragged_paged_attention.api import ragged_paged_attention

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the CPU kernel cannot be built")

# Geometry(T, S, Hq, Hkv, D, page_size, pages_per_seq, num_pages)
GEOS = {
    "gqa1_d64": Geometry(40, 20, 4, 4, 64, 16, 5, 120),
    "gqa3_d64": Geometry(40, 20, 9, 3, 64, 16, 5, 120),
    "gqa4_d128": Geometry(40, 20, 8, 2, 128, 8, 10, 120),
    "gqa8_d128": Geometry(40, 20, 8, 1, 128, 16, 5, 120),
    "gqa2_d256": Geometry(40, 20, 4, 2, 256, 16, 5, 120),
}
CACHES = ["f32", "bf16", "int8", "fp8"]  # float32 queries on f32 and int8, bfloat16 on bf16 and fp8


def _lengths(geo: Geometry, n: int, seed: int) -> list[tuple[int, int]]:
    """n sequences: mostly one decode row, a few short chunks (q_len * group < 16), contexts 1-79."""
    rng = np.random.default_rng(seed)
    g = geo.num_q_heads // geo.num_kv_heads
    max_q = max(1, min(5, 15 // g))
    out = []
    for i in range(n):
        q_len = 1 if i % 3 else int(rng.integers(1, max_q + 1))
        out.append((q_len, int(rng.integers(q_len, 80))))
    return out


QUANT = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


def _run(batch, geo, cache, **opts):
    """The kernel on ``batch`` with the given cache; returns (oracle batch, float64 output, tolerance)."""
    qdtype = jnp.float32 if cache in ("f32", "int8") else jnp.bfloat16
    return run_cpu_on_cache(batch, geo, qdtype, QUANT.get(cache), **opts)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("geo", list(GEOS.values()), ids=list(GEOS))
def test_decode_matches_float64_oracle(geo, cache):
    for n in (18, 3):  # all KV heads per item; one KV head per item
        batch = make_batch(np.random.default_rng(geo.head_dim + geo.num_q_heads + n), geo, _lengths(geo, n, n))
        ref, got, tol = _run(batch, geo, cache)
        check_against_oracle(ref, got, tol)


@pytest.mark.parametrize("window,cap", [(20, None), (20, 3.0), (None, 2.0)], ids=["window", "both", "cap"])
@pytest.mark.parametrize("cache", ["f32", "bf16", "int8"])
def test_decode_sliding_window_and_soft_cap(cache, window, cap):
    geo = GEOS["gqa3_d64"]
    batch = make_batch(np.random.default_rng(5), geo, _lengths(geo, 18, 5))
    ref, got, tol = _run(batch, geo, cache, sliding_window=window, soft_cap=cap)
    check_against_oracle(ref, got, tol, sliding_window=window, soft_cap=cap)


def test_decode_out_of_range_metadata_stays_in_bounds():
    """Lengths past the page table, pages past the cache and kv_len < q_len give finite output."""
    geo = GEOS["gqa4_d128"]
    batch = make_batch(np.random.default_rng(6), geo, _lengths(geo, 18, 6), nan_padding=False)
    kv, _, _ = quantized_cache(batch, geo, jnp.int8)
    kv_lens, pages = batch.kv_lens.copy(), batch.page_indices.copy()
    kv_lens[:3] = [10**6, 0, 50]
    pages[2] = [10**6, -3, 10**9, 2, 1, 0, 5, 7, 9, 11]
    out = ragged_paged_attention(jnp.asarray(batch.q, jnp.float32), kv, jnp.asarray(kv_lens), jnp.asarray(pages),
                                 jnp.asarray(batch.cu_q_lens), jnp.asarray(batch.num_seqs), sm_scale=SM_SCALE,
                                 impl="cpu")
    assert np.all(np.isfinite(np.asarray(out)))
