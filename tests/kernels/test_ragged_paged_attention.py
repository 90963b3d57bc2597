"""The XLA (pure jnp) ragged paged attention against an independent float64 numpy oracle, and the
public API's argument checking."""

import zlib

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
    rounded,
    run_impl,
    with_garbage_metadata,
)

from pallas_kernels.ragged_paged_attention import reference
from pallas_kernels.ragged_paged_attention.api import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.pages import KVPages, init_kv_pages
from pallas_kernels.ragged_paged_attention.tuning import XlaBlockSizes


def _run_xla(batch, dtype=jnp.float32, layout="token_major", **opts):
    return run_impl(batch, "xla", dtype, layout, **opts)


@pytest.mark.parametrize(
    "geo,examples", [(GEO_A, 14), (GEO_B, 5), (GEO_C, 4)], ids=["gqa3_d64", "gqa4_d128_p8", "mha"])
def test_xla_matches_float64_oracle(geo, examples):
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None)
    @given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31 - 1))
    def check(kind, seed):
        rng = np.random.default_rng(seed)
        batch = make_batch(rng, geo, draw_lengths(rng, geo, kind))
        check_against_oracle(batch, _run_xla(batch), F32_TOL)

    check()


@pytest.mark.parametrize("window,cap", [(20, None), (9, 3.0)], ids=["window", "window_softcap"])
@pytest.mark.parametrize("kind", ["prefill", "mixed", "decode"])
def test_xla_sliding_window_and_soft_cap(kind, window, cap):
    rng = np.random.default_rng(zlib.crc32(f"{kind}{window}{cap}".encode()))
    batch = make_batch(rng, GEO_A, draw_lengths(rng, GEO_A, kind))
    check_against_oracle(batch, _run_xla(batch, sliding_window=window, soft_cap=cap), F32_TOL,
           sliding_window=window, soft_cap=cap)


@pytest.mark.parametrize("kind", ["mixed", "boundary"])
def test_xla_bf16(kind):
    rng = np.random.default_rng(7)
    batch = rounded(make_batch(rng, GEO_A, draw_lengths(rng, GEO_A, kind)), jnp.bfloat16)
    check_against_oracle(batch, _run_xla(batch, jnp.bfloat16), BF16_TOL)


@pytest.mark.parametrize("kind", ["mixed", "verify"])
def test_xla_head_major_layout(kind):
    rng = np.random.default_rng(11)
    batch = make_batch(rng, GEO_A, draw_lengths(rng, GEO_A, kind))
    check_against_oracle(batch, _run_xla(batch, layout="head_major"), F32_TOL)


GEO_MANY = Geometry(num_tokens=48, max_seqs=24, num_q_heads=9, num_kv_heads=3, head_dim=64, page_size=8,
                    pages_per_seq=8, num_pages=200)  # many sequences: several groups per class


@pytest.mark.parametrize("window", [None, 12], ids=["full", "window"])
@pytest.mark.parametrize("kind", ["decode", "mixed", "verify", "prefill"])
def test_xla_small_groups_sorted_by_length(kind, window):
    """Items are sorted by key range and processed a few at a time: many ragged sequences spread over
    several groups of every class (decode, short, long), each group looping to its own longest item."""
    seed = zlib.crc32(kind.encode())
    while len(lengths := draw_lengths(rng := np.random.default_rng(seed), GEO_MANY, kind)) < 5:
        seed += 1  # deterministic: the first seed from here that draws enough sequences
    batch = make_batch(rng, GEO_MANY, lengths)
    bs = XlaBlockSizes(block_q=8, decode_group=3, prefill_group=2, kv_pages_per_block=2, short_q=4,
                       short_group=2)
    got = reference.ragged_paged_attention_xla(*device_args(batch, jnp.float32), sm_scale=SM_SCALE,
                                               sliding_window=window, block_sizes=bs)
    check_against_oracle(batch, np.asarray(got, np.float64), F32_TOL, sliding_window=window)


def test_xla_ignores_garbage_metadata():
    """Page-table entries past a sequence's pages and everything past num_seqs do not matter."""
    a, b = with_garbage_metadata(3, GEO_A, [(1, 40), (5, 17), (3, 3)], (0, GEO_A.num_pages))
    np.testing.assert_array_equal(_run_xla(a), _run_xla(b))


def test_xla_traced_lengths_no_recompile():
    """num_seqs and lengths are traced: batches of one shape share one executable."""
    rng = np.random.default_rng(5)
    sizes = []
    for lengths in ([(1, 30), (1, 2)], [(4, 50), (1, 9), (2, 2), (1, 128)], [(16, 16)]):
        batch = make_batch(rng, GEO_A, lengths)
        check_against_oracle(batch, _run_xla(batch), F32_TOL)
        sizes.append(reference.ragged_paged_attention_xla._cache_size())
    assert sizes[0] == sizes[-1]


def _args(t=4, hq=9, hkv=3, d=64, s=2, pps=4, layout="token_major"):
    kv = init_kv_pages(8, 16, hkv, d, jnp.float32, layout=layout)
    return (jnp.zeros((t, hq, d)), kv, jnp.ones((s,), jnp.int32), jnp.zeros((s, pps), jnp.int32),
            jnp.arange(s + 1, dtype=jnp.int32), jnp.array([s], jnp.int32))


@pytest.mark.parametrize("change,match", [
    (dict(hq=8), "multiple of num_kv_heads"),
    ("bad_head_dim", "head_dim"),
    ("bad_kv_lens", "kv_lens must have shape"),
    ("bad_cu", "cu_q_lens must have shape"),
    ("bad_num_seqs", "num_seqs must have shape"),
    ("float_lens", "kv_lens must be an integer array"),
    ("q_2d", r"q must be \[T, num_q_heads, head_dim\]"),
])
def test_bad_arguments_raise_value_error(change, match):
    args = list(_args(**change) if isinstance(change, dict) else _args())
    if change == "bad_head_dim":
        args[0] = jnp.zeros((4, 9, 32))
    elif change == "bad_kv_lens":
        args[2] = jnp.ones((3,), jnp.int32)
    elif change == "bad_cu":
        args[4] = jnp.arange(2, dtype=jnp.int32)
    elif change == "bad_num_seqs":
        args[5] = jnp.array(2, jnp.int32)
    elif change == "float_lens":
        args[2] = jnp.ones((2,), jnp.float32)
    elif change == "q_2d":
        args[0] = jnp.zeros((4, 9 * 64))
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*args, sm_scale=0.1, impl="xla")


@pytest.mark.parametrize("opts,match", [
    (dict(impl="cuda"), "unknown kernel impl"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(soft_cap=-1.0), "soft_cap"),
    (dict(impl="pallas_tpu"), "head-major"),
])
def test_bad_options_raise_value_error(opts, match):
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*_args(), sm_scale=0.1, **opts)


def test_gpu_rejects_head_major_and_odd_head_dim():
    with pytest.raises(ValueError, match="token-major"):
        ragged_paged_attention(*_args(layout="head_major"), sm_scale=0.1, impl="pallas_gpu", interpret=True)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        ragged_paged_attention(*_args(d=48), sm_scale=0.1, impl="pallas_gpu", interpret=True)


def test_kv_pages_type_and_scales_checked():
    args = list(_args())
    with pytest.raises(TypeError, match="KVPages"):
        ragged_paged_attention(args[0], (args[1].k, args[1].v), *args[2:], sm_scale=0.1, impl="xla")
    half = args[1]._replace(k_scale=jnp.ones(args[1].k.shape[:3]))
    with pytest.raises(ValueError, match="both"):
        ragged_paged_attention(args[0], half, *args[2:], sm_scale=0.1, impl="xla")
    assert isinstance(args[1], KVPages)
