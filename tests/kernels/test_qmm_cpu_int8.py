"""The C++ CPU quantized matmul's int8 dot path (``int8_activations=True``, AVX512-VNNI) against a float64
numpy oracle of exactly its numerics.

The oracle quantizes each row of x per block of 32 along K the way the kernel does (float32
``d = max|x| / 127``, ``xq = rint(x * float32(1 / d))``), takes the exact integer dot of xq with the weight's
integer levels per block, and combines the blocks in float64:
``sum_b dot_b * d_b * scale_{group(b)} (+ offset_{group(b)} * d_b * sum(xq_b))``. The integer part is exact
and the activation rounding is reproduced bit for bit, so the only difference left is the kernel's float32
accumulation: ``INT8_TOL`` relative to the output's largest magnitude. Covers every format the path takes
(int8 per channel and g32, int4 symmetric / asymmetric g32 and g64, float32 / float16 / bfloat16 scales,
GGUF Q8_0 / Q4_0 / Q4_1 as their QuantConfigs), M tails (rows not a multiple of the 3-row register block,
M = 9 and 512), N tails (N not a multiple of 16 / 64), float32 and bfloat16 activations, and the float
path taken where the int8 path must not run (K % 32 != 0, M <= INT8_GEMV_MAX_M: the streaming path).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.models.layers import matmul_options
from jaxinfer.models.ops import linear
from jaxinfer.target import Kernels
from pallas_kernels.quantized_matmul import cpu
from pallas_kernels.quantized_matmul.api import quantized_matmul
from pallas_kernels.quantized_matmul.config import QuantConfig, as_config
from pallas_kernels.quantized_matmul.qarray import QArray

pytestmark = [
    pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the CPU kernel cannot be built"),
]

FORMATS = [
    "int8",
    "int8-g32",
    "int4-g32",
    "int4-g64",
    "int4-asym",  # g128
    QuantConfig("int4", group_size=64, symmetric=False, scale_dtype="bfloat16"),
    QuantConfig("int8", group_size=64, scale_dtype="bfloat16"),
    QuantConfig("int4", group_size=32, scale_dtype="bfloat16"),
    QuantConfig("int8", group_size=32, scale_dtype="float16"),  # GGUF Q8_0
    QuantConfig("int4", group_size=32, scale_dtype="float16"),  # GGUF Q4_0
    QuantConfig("int4", group_size=32, symmetric=False, scale_dtype="float16"),  # GGUF Q4_1
]
IDS = [as_config(f).name + "-" + as_config(f).scale_dtype for f in FORMATS]
# (M, K, N): M = 9 (3 register blocks of 3 rows), 14 (tail of 2), 31 (tail of 1), 512, 5 (the smallest M on
# the int8 path); N tails 40 (2 vectors + 8 columns), 200 (3 blocks + 8), 72 (one block + 8), 16 (one
# vector); K of one 128-group or several.
SHAPES = [(9, 128, 40), (14, 128, 200), (31, 256, 16), (512, 384, 72), (5, 128, 64)]
INT8_TOL = 2e-6  # float32 accumulation of exactly computed block products


def _case(m, k, n, fmt, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block: d = 0
    x = jnp.asarray(x, dtype)
    w = QArray.quantize(jnp.asarray(rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)), fmt)
    return x, w


def int8_oracle(x, w) -> np.ndarray:
    """float64 ``[M, N]`` of the int8 path's numerics (module docstring)."""
    xf = np.asarray(x.astype(jnp.float32), np.float32)
    m, k = xf.shape
    xb = xf.reshape(m, k // 32, 32)
    d = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    xq = np.rint((xb * inv[..., None]).astype(np.float32)).astype(np.int64)  # [M, KB, 32]
    assert np.abs(xq).max() <= 127
    cfg = w.config
    q = np.asarray(w.levels(), np.int64)  # [K, N]
    g = cfg.group_size or k
    n = q.shape[1]
    dots = np.einsum("mbt,btn->mbn", xq, q.reshape(k // 32, 32, n))  # exact integer block dots
    group = np.arange(k // 32) * 32 // g
    scale = np.asarray(w.scale.astype(jnp.float32), np.float64)[group]  # [KB, N]
    d64 = d.astype(np.float64)
    y = np.einsum("mbn,mb,bn->mn", dots.astype(np.float64), d64, scale)
    if not cfg.symmetric:
        offset = np.asarray(w.offset.astype(jnp.float32), np.float64)[group]
        y += np.einsum("mb,bn->mn", d64 * xq.sum(-1), offset)
    return y


def _float_oracle(x, w):
    return np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(w.dequantize(jnp.float32), np.float64)


def _err(y, expected):
    return np.abs(np.asarray(y.astype(jnp.float32), np.float64) - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_int8_path_matches_its_oracle(fmt, dtype):
    """On a CPU with AVX512-VNNI the int8 path against its oracle; without it (no int8 path is compiled) the
    same calls must give the float path's result bit for bit."""
    for i, (m, k, n) in enumerate(SHAPES):
        x, w = _case(m, k, n, fmt, dtype, seed=i)
        y = cpu.quantized_matmul_cpu(x, w, jnp.float32, int8_activations=True)
        if not cpu.has_vnni():
            assert not cpu.int8_path_taken(k, w, m)
            np.testing.assert_array_equal(np.asarray(y), np.asarray(cpu.quantized_matmul_cpu(x, w, jnp.float32)))
            continue
        assert cpu.int8_path_taken(k, w, m)
        assert y.shape == (m, n) and y.dtype == jnp.float32
        expected = int8_oracle(x, w)
        assert _err(y, expected) <= INT8_TOL, (m, k, n)
        # It is a different computation from the float path: the activation rounding shows.
        assert _err(y, _float_oracle(x, w)) > 10 * INT8_TOL
        yb = quantized_matmul(x, w, impl="cpu", out_dtype=jnp.bfloat16, int8_activations=True)
        assert _err(yb, expected) <= 2.0**-8  # + the bfloat16 output rounding


@pytest.mark.parametrize("fmt,k,m", [("int8", 96 + 16, 9), ("int4-g32", 64, cpu.INT8_GEMV_MAX_M), ("int8", 128, 1)],
                         ids=["k-not-32-multiple", "m-at-gemv-max", "m-1"])
def test_float_path_where_int8_cannot_run(fmt, k, m):
    """K % 32 != 0, or M on the streaming path: int8_activations=True gives the float path's result bit for bit."""
    x, w = _case(m, k, 48, fmt, jnp.bfloat16, seed=7)
    assert not cpu.int8_path_taken(k, w, m)
    y8 = cpu.quantized_matmul_cpu(x, w, jnp.float32, int8_activations=True)
    yf = cpu.quantized_matmul_cpu(x, w, jnp.float32)
    np.testing.assert_array_equal(np.asarray(y8), np.asarray(yf))


def test_int8_path_taken_rules():
    w = QArray.quantize(jnp.ones((128, 32), jnp.float32), "int8-g32")
    assert cpu.int8_path_taken(128, w, 9) == cpu.has_vnni()
    assert not cpu.int8_path_taken(128, w, cpu.INT8_GEMV_MAX_M)
    assert cpu.int8_path_taken(128, w, cpu.INT8_GEMV_MAX_M + 1) == cpu.has_vnni()
    assert not cpu.int8_path_taken(112, QArray.quantize(jnp.ones((112, 32), jnp.float32), "int8"), 64)


def test_model_linear_follows_the_kernels_switch():
    """Kernels.matmul_int8_activations reaches the kernel through the model's linear(); only with matmul='cpu'."""
    x, w = _case(12, 128, 40, "int4-g32", jnp.bfloat16, seed=8)
    on = linear(x, w, **matmul_options(Kernels("cpu", "cpu", matmul_int8_activations=True)))
    off = linear(x, w, **matmul_options(Kernels("cpu", "cpu")))
    want_on = cpu.quantized_matmul_cpu(x, w, jnp.bfloat16, int8_activations=True)
    np.testing.assert_array_equal(np.asarray(on.astype(jnp.float32)), np.asarray(want_on.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(off.astype(jnp.float32)),
                                  np.asarray(cpu.quantized_matmul_cpu(x, w, jnp.bfloat16).astype(jnp.float32)))
    with pytest.raises(ValueError, match="matmul='cpu'"):
        Kernels("xla", "xla", matmul_int8_activations=True)
