"""Quantized matmul: XLA reference vs float64 numpy, Pallas kernels (interpret mode) vs the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quantized_matmul.api import quantized_matmul
from pallas_kernels.quantized_matmul.config import QuantConfig, as_config
from pallas_kernels.quantized_matmul.gpu import quantized_matmul_gpu
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.quantizer import quantize_activations
from pallas_kernels.quantized_matmul.tpu import quantized_matmul_tpu
from pallas_kernels.quantized_matmul.tuning import (
    Blocks,
    check_gpu_blocks,
    check_tpu_blocks,
    gpu_blocks,
    tpu_blocks,
    tpu_k_unit,
)

FORMATS = [
    "int8",
    "int8-g32",
    "int4-g32",
    "int4",
    QuantConfig("int4", group_size=64, symmetric=False),
    "fp8",
    "fp8-w8a8",
    "int8-w8a8",
]
IDS = [as_config(f).name for f in FORMATS]
BF16_ULP = 2.0**-7  # one bf16 ulp relative to the largest output


def _inputs(m, k, n, fmt, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
    return jnp.asarray(x, dtype), QArray.quantize(jnp.asarray(w), fmt)


def _float64_expected(x, w: QArray):
    """dequant(w) @ x in float64 (activations fake-quantized first for W8A8 formats)."""
    if w.config.act is not None:
        xq, xs = quantize_activations(x, w.config.act)
        x64 = np.asarray(xq.astype(jnp.float32), np.float64) * np.asarray(xs, np.float64)
    else:
        x64 = np.asarray(x.astype(jnp.float32), np.float64)
    return x64 @ np.asarray(w.dequantize(jnp.float32), np.float64)


def _assert_close(y, ref, dtype):
    y, ref = np.asarray(y.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32))
    tol = BF16_ULP if dtype == jnp.bfloat16 else 1e-5
    err = np.abs(y - ref).max()
    assert err <= tol * np.abs(ref).max(), (err, np.abs(ref).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_reference_matches_float64(fmt, dtype):
    x, w = _inputs(4, 256, 96, fmt, dtype)
    y = quantized_matmul(x, w, impl="xla")
    assert y.shape == (4, 96) and y.dtype == dtype
    expected = _float64_expected(x, w)
    # f32: accumulation rounding only; bf16: weights rounded to bf16 (group-wise) and a bf16 output
    tol = 2.0**-7 if dtype == jnp.bfloat16 else 1e-5
    assert np.abs(np.asarray(y, np.float64) - expected).max() <= tol * np.abs(expected).max()


def _tail_case(impl, cfg):
    """Shapes that are not multiples of the blocks in M, N and K, with the blocks that force that."""
    g = cfg.group_size
    if impl == "pallas_tpu":
        unit = tpu_k_unit(cfg)
        bm = 32 if cfg.act is not None else 16
        return (37, unit + unit // 2, 200), Blocks(bm, 128, unit)
    bk = 2 * g if g else 64
    return (37, bk + (g or 32), 200), Blocks(16, 64, bk)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_kernel_matches_reference_decode_bf16(impl, fmt):
    """Batch-1 decode, default blocks, bfloat16 activations and output."""
    x, w = _inputs(1, 256, 192, fmt, jnp.bfloat16, seed=1)
    y = quantized_matmul(x, w, impl=impl, interpret=True)
    ref = quantized_matmul(x, w, impl="xla")
    assert y.shape == ref.shape and y.dtype == ref.dtype
    _assert_close(y, ref, jnp.bfloat16)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_kernel_matches_reference_ragged_tails_f32(impl, fmt):
    """Several rows; M, N and K all leave partial tiles; float32 activations."""
    cfg = as_config(fmt)
    (m, k, n), blocks = _tail_case(impl, cfg)
    assert m % blocks.bm and n % blocks.bn and k % blocks.bk  # every dim has a tail
    x, w = _inputs(m, k, n, cfg, jnp.float32, seed=2)
    y = quantized_matmul(x, w, impl=impl, interpret=True, blocks=blocks)
    ref = quantized_matmul(x, w, impl="xla")
    if cfg.act == "int8":  # int32 accumulation is exact: the kernel must be bit-identical
        np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
    _assert_close(y, ref, jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu", "pallas_gpu"])
def test_leading_batch_dims_and_out_dtype(impl):
    x, w = _inputs(6, 128, 64, "int4-g32", jnp.float32, seed=3)
    x3 = x.reshape(2, 3, 128)
    y = quantized_matmul(x3, w, impl=impl, interpret=True, out_dtype=jnp.bfloat16)
    assert y.shape == (2, 3, 64) and y.dtype == jnp.bfloat16
    flat = quantized_matmul(x, w, impl="xla")
    _assert_close(y.reshape(6, 64), flat, jnp.bfloat16)
    empty = quantized_matmul(jnp.zeros((0, 128)), w, impl=impl, interpret=True)
    assert empty.shape == (0, 64)


def _tpu_interpreter_races_found() -> bool:
    from jax.experimental.pallas import tpu as pltpu

    getter = getattr(pltpu, "get_races", None)  # public in newer jax
    if getter is not None:
        return getter().races_found
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    return interpret_pallas_call.races.races_found


def test_tpu_kernel_in_tpu_simulating_interpreter():
    """The TPU interpreter simulates VMEM and DMA ordering (detects races across grid steps)."""
    from jax.experimental.pallas import tpu as pltpu

    x, w = _inputs(8, 512, 256, "int4-g32", jnp.float32, seed=4)
    params = pltpu.InterpretParams(detect_races=True)
    try:
        y = quantized_matmul_tpu(x, w, out_dtype=jnp.float32, interpret=params, blocks=Blocks(8, 128, 256))
        assert not _tpu_interpreter_races_found()
    finally:
        pltpu.reset_tpu_interpret_mode_state()
    _assert_close(y, quantized_matmul(x, w, impl="xla"), jnp.float32)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_kernels_lower_for_tpu_and_gpu(fmt):
    """Mosaic and Triton lowering accepts every format on Llama-sized decode shapes (no compilation)."""
    x = jax.ShapeDtypeStruct((8, 4096), jnp.bfloat16)
    w = jax.eval_shape(lambda: QArray.quantize(jnp.zeros((4096, 1024), jnp.bfloat16), fmt))
    for platform, fn in (("tpu", quantized_matmul_tpu), ("cuda", quantized_matmul_gpu)):
        lowered = (
            jax.jit(lambda x, w, fn=fn: fn(x, w, out_dtype=jnp.bfloat16))
            .trace(x, w)
            .lower(lowering_platforms=(platform,))
        )
        text = lowered.as_text()
        assert ("tpu_custom_call" if platform == "tpu" else "triton") in text


def test_bad_arguments():
    x, w = _inputs(2, 64, 32, "int8", jnp.float32)
    with pytest.raises(ValueError, match="does not match"):
        quantized_matmul(jnp.ones((2, 65)), w)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        quantized_matmul(jnp.ones((2, 64), jnp.int32), w)
    with pytest.raises(TypeError, match="QArray"):
        quantized_matmul(x, jnp.ones((64, 32)))
    with pytest.raises(ValueError, match="unknown kernel impl"):
        quantized_matmul(x, w, impl="cuda")
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), w)
    with pytest.raises(ValueError, match="2-D"):
        quantized_matmul(x, stacked)
    with pytest.raises(ValueError, match="bn=100"):
        quantized_matmul(x, w, impl="pallas_tpu", interpret=True, blocks=Blocks(2, 100, 64))
    with pytest.raises(ValueError, match="power of two"):
        quantized_matmul(x, w, impl="pallas_gpu", interpret=True, blocks=Blocks(16, 48, 64))


def test_default_blocks_satisfy_tiling_rules_on_model_shapes():
    """Default tiles obey Mosaic / Triton constraints for Llama-3-8B and SmolLM2 projection shapes."""
    shapes = [(4096, 4096), (4096, 14336), (14336, 4096), (576, 1536), (1536, 576), (576, 49152)]
    checked = 0
    for fmt in FORMATS:
        cfg = as_config(fmt)
        lhs = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}.get(cfg.act, jnp.bfloat16)
        for k, n in shapes:
            if cfg.group_size and k % cfg.group_size:
                continue
            for m in (1, 7, 256, 1000):
                tb = tpu_blocks(m, k, n, cfg)
                check_tpu_blocks(tb, m, k, n, cfg, lhs)
                assert tb.bk <= k and (cfg.group_size is None or tb.bk % cfg.group_size == 0)
                check_gpu_blocks(gpu_blocks(m, k, n, cfg), cfg)
                checked += 1
    assert checked > 150
