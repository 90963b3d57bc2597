"""The TPU kernel under the TPU interpreter (simulated memories, DMAs executed at wait, race detector),
and jax-side lowering of both kernels to Mosaic (TPU) and Triton (GPU) IR from this CPU machine.

Lowering runs every Pallas lowering rule of the kernel for the target dialect; the device compiler
(Mosaic layout passes in libtpu, Triton -> PTX) still only runs on the hardware.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as mosaic_interpret
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from rpa_testlib import Geometry, device_args, make_batch

from pallas_kernels.ragged_paged_attention import gpu, reference, tpu
from pallas_kernels.ragged_paged_attention.pages import init_kv_pages
from pallas_kernels.ragged_paged_attention.tuning import GpuBlockSizes, TpuBlockSizes

RACE_PARAMS = pltpu.InterpretParams(dma_execution_mode="on_wait", detect_races=True)


@pytest.fixture
def tpu_interpreter():
    pltpu.reset_tpu_interpret_mode_state()
    yield
    pltpu.reset_tpu_interpret_mode_state()


@pytest.mark.parametrize("layout", ["head_major", "head_major_fused"])
def test_tpu_kernel_no_dma_races(tpu_interpreter, layout):
    # Two q blocks, one-page KV blocks, sequences crossing the q-block boundary, an empty KV tail:
    # every prefetch path (next KV block, next sequence, first block of a grid step) is exercised.
    geo = Geometry(num_tokens=16, max_seqs=4, num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=8,
                   pages_per_seq=4, num_pages=16)
    batch = make_batch(np.random.default_rng(1), geo, [(1, 9), (1, 17), (5, 24), (3, 3)])
    args = device_args(batch, jnp.float32, layout)
    got = tpu.ragged_paged_attention_tpu(*args, sm_scale=0.125, interpret=RACE_PARAMS,
                                         block_sizes=TpuBlockSizes(block_q=8, kv_pages_per_block=1))
    assert mosaic_interpret.races is not None and not mosaic_interpret.races.races_found
    want = reference.ragged_paged_attention_xla(*device_args(batch, jnp.float32), sm_scale=0.125)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(got)[10:] == 0)


def test_race_detector_catches_a_missing_wait(tpu_interpreter):
    """Control: the same interpreter settings flag a read of a buffer whose DMA was not waited on."""
    def kernel(x_hbm, o_ref, buf, sem):
        copy = pltpu.make_async_copy(x_hbm, buf, sem)
        copy.start()
        o_ref[...] = buf[...]  # reads before the wait: a race
        copy.wait()

    x = jnp.ones((8, 128), jnp.float32)
    pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        scratch_shapes=[pltpu.VMEM(x.shape, x.dtype), pltpu.SemaphoreType.DMA(())],
        interpret=RACE_PARAMS,
    )(x).block_until_ready()
    assert mosaic_interpret.races.races_found


def _lower(fn, platform, hq, hkv, d, dtype, layout, quant=None, t=48, s=8, pps=16):
    kv = init_kv_pages(64, 16, hkv, d, dtype, layout=layout, quant_dtype=quant)
    args = (jnp.zeros((t, hq, d), dtype), kv, jnp.zeros((s,), jnp.int32), jnp.zeros((s, pps), jnp.int32),
            jnp.zeros((s + 1,), jnp.int32), jnp.ones((1,), jnp.int32))
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("hq,hkv,d,dtype,quant,opts,layout", [
    (9, 3, 64, jnp.float32, None, {}, "head_major"),
    (9, 3, 64, jnp.bfloat16, jnp.int8, {}, "head_major_fused"),
    (32, 8, 128, jnp.bfloat16, None, dict(sliding_window=64, soft_cap=30.0), "head_major"),
    (32, 8, 128, jnp.bfloat16, jnp.int8, {}, "head_major"),
], ids=["smollm2_f32", "smollm2_fused_int8_kv", "llama8b_bf16_window_cap", "llama8b_int8_kv"])
def test_tpu_kernel_lowers_to_mosaic(hq, hkv, d, dtype, quant, opts, layout):
    fn = functools.partial(tpu.ragged_paged_attention_tpu, sm_scale=0.1, interpret=False, **opts)
    assert "tpu_custom_call" in _lower(fn, "tpu", hq, hkv, d, dtype, layout, quant)


@pytest.mark.parametrize("hq,hkv,d,dtype,quant,splits", [
    (9, 3, 64, jnp.float32, None, 1),
    (32, 8, 128, jnp.bfloat16, None, 4),
    (32, 8, 128, jnp.bfloat16, jnp.float8_e4m3fn, 2),
], ids=["smollm2_f32", "llama8b_bf16_split4", "llama8b_fp8_kv"])
def test_gpu_kernel_lowers_to_triton(hq, hkv, d, dtype, quant, splits):
    gp = 1 << (hq // hkv - 1).bit_length()
    bs = GpuBlockSizes(block_q=max(1, 16 // gp), block_kv=64, num_splits=splits, num_warps=4, num_stages=2)
    fn = functools.partial(gpu.ragged_paged_attention_gpu, sm_scale=0.1, interpret=False, block_sizes=bs,
                           soft_cap=30.0)
    assert "xla.gpu.triton" in _lower(fn, "cuda", hq, hkv, d, dtype, "token_major", quant)
