"""Pallas kernels (TPU and GPU dialects, interpret mode on the CPU) against the XLA reference.

Block sizes are set small so every run crosses several query blocks, KV blocks and (GPU) KV splits.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rpa_testlib import GEO_A, GEO_B, GEO_C, KINDS, device_args, draw_lengths, make_batch, num_real_rows

from pallas_kernels.backend import needs_interpret
from pallas_kernels.ragged_paged_attention import gpu, reference, tpu
from pallas_kernels.ragged_paged_attention.pages import default_layout
from pallas_kernels.ragged_paged_attention.tuning import GpuBlockSizes, TpuBlockSizes

SM_SCALE = 0.125
TOL = {jnp.float32: dict(atol=1e-5, rtol=1e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}

# (geometry, TPU blocks, GPU blocks): TPU block_q * G must be a multiple of 8; GPU block_q * Gp a
# power of two >= 16.
CONFIGS = {
    "gqa3_d64": (GEO_A, TpuBlockSizes(block_q=16, kv_pages_per_block=2),
                 GpuBlockSizes(block_q=4, block_kv=32, num_splits=2, num_warps=4, num_stages=2)),
    "gqa4_d128_p8": (GEO_B, TpuBlockSizes(block_q=8, kv_pages_per_block=2),
                     GpuBlockSizes(block_q=4, block_kv=16, num_splits=1, num_warps=4, num_stages=2)),
    "mha": (GEO_C, TpuBlockSizes(block_q=8, kv_pages_per_block=1),
            GpuBlockSizes(block_q=16, block_kv=16, num_splits=1, num_warps=4, num_stages=2)),
}


def _kernel_out(impl, batch, dtype, config, **opts):
    geo, tpu_bs, gpu_bs = CONFIGS[config]
    if impl == "pallas_tpu":  # the engine's layout: fused K|V rows at head_dim 64, head-major at 128
        args = device_args(batch, dtype, default_layout(impl, geo.head_dim).value)
        out = tpu.ragged_paged_attention_tpu(*args, sm_scale=SM_SCALE, block_sizes=tpu_bs,
                                             interpret=needs_interpret(impl, None), **opts)
    else:
        args = device_args(batch, dtype, "token_major")
        out = gpu.ragged_paged_attention_gpu(*args, sm_scale=SM_SCALE, block_sizes=gpu_bs,
                                             interpret=needs_interpret(impl, None), **opts)
    assert out.dtype == dtype and out.shape == batch.q.shape
    return np.asarray(out.astype(jnp.float32))


def _reference_out(batch, dtype, **opts):
    args = device_args(batch, dtype, "token_major")
    out = reference.ragged_paged_attention_xla(*args, sm_scale=SM_SCALE, **opts)
    return np.asarray(out.astype(jnp.float32))


def _compare(impl, batch, dtype, config, **opts):
    got = _kernel_out(impl, batch, dtype, config, **opts)
    want = _reference_out(batch, dtype, **opts)
    np.testing.assert_allclose(got, want, **TOL[dtype])
    assert np.all(got[num_real_rows(batch):] == 0), "padding rows must be exactly zero"


IMPLS = ["pallas_tpu", "pallas_gpu"]


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_matches_reference_random_batches(impl):
    """Hypothesis over batch kinds on the default model's head shapes (GQA 3, head_dim 64), f32."""
    @settings(max_examples=8, deadline=None, derandomize=True, database=None)
    @given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31 - 1))
    def check(kind, seed):
        rng = np.random.default_rng(seed)
        batch = make_batch(rng, GEO_A, draw_lengths(rng, GEO_A, kind))
        _compare(impl, batch, jnp.float32, "gqa3_d64")

    check()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config,kinds", [("gqa4_d128_p8", ("mixed", "boundary", "verify")),
                                          ("mha", ("decode", "prefill"))])
def test_kernel_other_head_shapes(impl, config, kinds):
    geo = CONFIGS[config][0]
    for i, kind in enumerate(kinds):
        rng = np.random.default_rng(100 + i)
        _compare(impl, make_batch(rng, geo, draw_lengths(rng, geo, kind)), jnp.float32, config)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_bf16(impl):
    for i, kind in enumerate(("mixed", "prefill", "boundary")):
        rng = np.random.default_rng(200 + i)
        _compare(impl, make_batch(rng, GEO_A, draw_lengths(rng, GEO_A, kind)), jnp.bfloat16, "gqa3_d64")


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_sliding_window_and_soft_cap(impl):
    for i, kind in enumerate(("prefill", "mixed", "decode")):
        rng = np.random.default_rng(300 + i)
        batch = make_batch(rng, GEO_A, draw_lengths(rng, GEO_A, kind))
        _compare(impl, batch, jnp.float32, "gqa3_d64", sliding_window=9, soft_cap=3.0)
