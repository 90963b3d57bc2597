"""The C++ CPU quantized-matmul kernel (impl="cpu") against the float64 numpy oracle.

Covers every format it takes (int8 per channel and group-wise, int4 symmetric / asymmetric, GGUF's
Q8_0 / Q4_0 / Q4_1 layouts with float16 scales, bfloat16 scales), both paths (streaming decode path for
small M, dequantized panels for larger M, the bfloat16 dot there for bfloat16 activations), M tails
(rows not a multiple of 4 / 6), N tails (columns not a multiple of 16 / 64), K = one group or many, the
dispatcher's default and its fallbacks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import backend
from pallas_kernels.backend import KernelUnavailableError
from pallas_kernels.quantized_matmul import cpu
from pallas_kernels.quantized_matmul.api import quantized_matmul
from pallas_kernels.quantized_matmul.config import QuantConfig, as_config
from pallas_kernels.quantized_matmul.qarray import QArray

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the CPU kernel cannot be built")

FORMATS = [
    "int8",
    "int8-g32",
    QuantConfig("int8", group_size=64, scale_dtype="bfloat16"),
    "int4",
    "int4-g32",
    "int4-g64",
    "int4-asym",
    QuantConfig("int8", group_size=32, scale_dtype="float16"),  # GGUF Q8_0
    QuantConfig("int4", group_size=32, scale_dtype="float16"),  # GGUF Q4_0
    QuantConfig("int4", group_size=32, symmetric=False, scale_dtype="float16"),  # GGUF Q4_1
]
IDS = [as_config(f).name + "-" + as_config(f).scale_dtype for f in FORMATS]
# (M, K, N): decode path with M tails (1, 3, 5 = 4 + 1) and column ranges wider than one block (N = 2128:
# 33 blocks + 16 columns), panel path with row-block tails (9, 37) and rows split across items (50 rows,
# one column block), N tails (40: 2 vectors + 8 columns; 200: 3 blocks + 8 columns), K of one group or several;
# and a wide panel case (N = 19224: 300 blocks + 24 columns) whose items take several column blocks each on
# a pool of up to 18 threads (their panels built in one pass over the packed rows, and on AMX each 32-row
# block of x, then the 13-row tail, multiplied into all of them), the last with the tail;
# and a decode case of 6 rows over two column ranges (N = 2056 > the 2048-column item) whose K is split
# into slices of groups added up after the parallel loop, the last range ending in an 8-column tail.
SHAPES = [(1, 256, 64), (3, 128, 40), (5, 256, 200), (2, 128, 2128), (9, 256, 144), (37, 384, 100),
          (50, 128, 40), (45, 128, 19224), (6, 512, 2056)]
F32_TOL = 1e-5  # accumulation order only
BF16_TOL = 2.0**-7  # bf16 output rounding and (reference and kernel alike) bf16-rounded weights


def _case(m, k, n, fmt, dtype, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32), dtype)
    w = QArray.quantize(jnp.asarray(rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)), fmt)
    return x, w


def _oracle(x, w):
    return np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(w.dequantize(jnp.float32), np.float64)


def _check(y, expected, tol):
    err = np.abs(np.asarray(y.astype(jnp.float32), np.float64) - expected).max()
    assert err <= tol * np.abs(expected).max(), (err, np.abs(expected).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_kernel_matches_float64(fmt, dtype):
    for i, (m, k, n) in enumerate(SHAPES):
        x, w = _case(m, k, n, fmt, dtype, seed=i)
        y = quantized_matmul(x, w, impl="cpu")
        assert y.shape == (m, n) and y.dtype == dtype
        _check(y, _oracle(x, w), BF16_TOL if dtype == jnp.bfloat16 else F32_TOL)


@pytest.mark.parametrize("fmt", ["int8", "int4-asym"])
def test_both_paths_agree_at_every_m(fmt):
    """The streaming and panel paths give the same result for the same M (the switch is only speed)."""
    for m in (1, 4, 7, 13):
        x, w = _case(m, 128, 80, fmt, jnp.float32, seed=m)
        gemv = cpu.quantized_matmul_cpu(x, w, jnp.float32, gemv_max_m=64)
        panel = cpu.quantized_matmul_cpu(x, w, jnp.float32, gemv_max_m=0)
        expected = _oracle(x, w)
        _check(gemv, expected, F32_TOL)
        _check(panel, expected, F32_TOL)


@pytest.mark.parametrize("fmt", ["int8-g32", "int4-g64", QuantConfig("int4", group_size=32, symmetric=False,
                                                                     scale_dtype="float16")], ids=["i8", "i4", "q4_1"])
def test_decode_path_split_over_k(fmt):
    """The streaming path with every product on the pool (K split into slices of groups when there are few
    column ranges) at each register-block height 1-8, against the float64 oracle."""
    for m in range(1, 9):
        x, w = _case(m, 1024, 600 + 16 * m + m % 3, fmt, jnp.float32, seed=40 + m)
        y = cpu.quantized_matmul_cpu(x, w, jnp.float32, parallel_min_bytes=0)
        _check(y, _oracle(x, w), F32_TOL)


def test_batched_leading_dims_out_dtype_and_jit():
    x, w = _case(6, 128, 48, "int4-g32", jnp.bfloat16, seed=3)
    x3 = x.reshape(2, 3, 128)
    y = jax.jit(lambda a, b: quantized_matmul(a, b, impl="cpu", out_dtype=jnp.float32))(x3, w)
    assert y.shape == (2, 3, 48) and y.dtype == jnp.float32
    _check(y.reshape(6, 48), _oracle(x, w), 2.0**-8)  # f32 output: only the bf16-rounded weights
    f16 = quantized_matmul(x, w, impl="cpu", out_dtype=jnp.float16)
    assert f16.dtype == jnp.float16
    _check(f16, _oracle(x, w), 2.0**-9)


def test_default_on_cpu_is_the_kernel(monkeypatch):
    monkeypatch.delenv("JAXINFER_KERNEL_IMPL", raising=False)
    assert backend.default_impl("cpu") == "cpu"
    monkeypatch.setenv("JAXINFER_KERNEL_IMPL", "xla")
    assert backend.default_impl("cpu") == "xla"


def test_unsupported_operands_run_the_xla_path():
    for fmt, dtype in (("fp8", jnp.float32), ("int8-w8a8", jnp.float32), ("int8", jnp.float16)):
        x, w = _case(3, 128, 32, fmt, dtype, seed=4)
        assert cpu.unsupported_reason(x, w) is not None
        got = quantized_matmul(x, w, impl="cpu")
        want = quantized_matmul(x, w, impl="xla")
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
        with pytest.raises(ValueError, match="impl='cpu' takes"):
            cpu.quantized_matmul_cpu(x, w, dtype)


def test_build_failure_falls_back_to_xla(monkeypatch):
    monkeypatch.delenv("JAXINFER_KERNEL_IMPL", raising=False)
    monkeypatch.setattr(cpu.KERNEL, "state", {"error": "RuntimeError: no C++ compiler found"})
    assert backend.default_impl("cpu") == "xla"
    x, w = _case(2, 128, 32, "int8", jnp.float32, seed=5)
    _check(quantized_matmul(x, w), _oracle(x, w), F32_TOL)
    with pytest.raises(KernelUnavailableError, match="no C\\+\\+ compiler"):
        quantized_matmul(x, w, impl="cpu")


_AMX_SCRIPT = """
import sys
import jax.numpy as jnp, numpy as np
from pallas_kernels.quantized_matmul import cpu
from pallas_kernels.quantized_matmul.qarray import QArray
inputs = np.load(sys.argv[2])
x = jnp.asarray(inputs["x"], jnp.bfloat16)
w = QArray.quantize(jnp.asarray(inputs["w"]), "int4-g32")
np.save(sys.argv[1], np.asarray(cpu.quantized_matmul_cpu(x, w, jnp.float32)))
print(int(cpu.amx_enabled()))
"""


def test_amx_tiles_on_amx_cpus_and_same_numbers_as_the_bf16_dot(tmp_path):
    """The bfloat16 panel path multiplies on AMX tiles exactly where the CPU has AMX-BF16 (not on other
    CPUs), and with ``JAXINFER_CPU_AMX=0`` runs the vdpbf16ps dot: both against the float64 oracle of the
    bf16-rounded weights (a 45-row tail of a 32-row block, 200 columns: a 64-column block's tail), and
    within float32 summation order of each other. A CPU without AVX512-BF16 runs neither: both runs take
    the float32 panel (float32 weights, not rounded; the module docstring), checked against that oracle."""
    import os
    import subprocess
    import sys

    flags = cpu.cpu_build.cpu_flags().split()
    if cpu.buildable():
        assert cpu.amx_enabled() == ("amx_bf16" in flags and "avx512_bf16" in flags)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((45, 384)).astype(np.float32)
    w_float = rng.standard_normal((384, 200)).astype(np.float32) / np.sqrt(384)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=x, w=w_float)
    runs = {}
    for amx in ("1", "0"):
        env = {**os.environ, "JAXINFER_CPU_AMX": amx, "JAX_PLATFORMS": "cpu"}
        out = tmp_path / f"y{amx}.npy"
        proc = subprocess.run([sys.executable, "-c", _AMX_SCRIPT, str(out), str(inputs)], env=env,
                              capture_output=True, text=True, timeout=300, check=True)
        runs[amx] = (proc.stdout.strip().splitlines()[-1] == "1", np.load(out).astype(np.float64))
    assert runs["0"][0] is False and runs["1"][0] == cpu.amx_enabled()
    w = QArray.quantize(jnp.asarray(w_float), "int4-g32")
    w_dtype = jnp.bfloat16 if "avx512_bf16" in flags else jnp.float32
    ref = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64) @ np.asarray(
        w.dequantize(w_dtype).astype(jnp.float32), np.float64)
    scale = np.abs(ref).max()
    for _, y in runs.values():
        assert np.abs(y - ref).max() <= 1e-5 * scale
    assert np.abs(runs["1"][1] - runs["0"][1]).max() <= 1e-5 * scale
