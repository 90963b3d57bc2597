"""The layers' row operations (pallas_kernels.norm_act): RMSNorm, residual add + RMSNorm and SwiGLU, the C++
CPU kernel and the jnp path, against float64 numpy.

Tolerances: float32 results within 4e-6 relative of the float64 value (float32 sums in another order, a
polynomial exp); bfloat16 results within one bfloat16 rounding of the float64 value of the same roundings
(2^-8 relative), with the residual sum exact (one rounding of an exact sum). SwiGLU rounds twice, and a silu
within float32 error of a rounding tie may round to the other neighbour (about 1 in 30,000 values with the
kernel's exp): 3 x 2^-8.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cpu_build
from pallas_kernels.norm_act import add_rms_norm, cpu, rms_norm, swiglu

NO_COMPILER = pytest.mark.skipif(cpu_build.compiler() is None, reason="no C++ compiler")
IMPLS = ["xla", pytest.param("cpu", marks=NO_COMPILER)]
DTYPES = [jnp.float32, jnp.bfloat16]
# rows x width: widths with and without a vector tail; 70 x 1000 and 64 x 1536 run on the thread pool
SHAPES = [(5, 576), (3, 7, 33), (70, 1000), (64, 1536), (1, 8)]
EPS = 1e-5


@pytest.fixture(autouse=True)
def _kernel_builds_where_a_compiler_exists():
    """With a compiler the kernel must build: a failed build fails here instead of silently testing jnp."""
    if cpu_build.compiler() is not None:
        assert cpu.available(), [k.state for k in (cpu.RMS_NORM, cpu.ADD_RMS_NORM, cpu.SWIGLU)]


def _data(shape, dtype, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def _f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _rounded(x64: np.ndarray, dtype) -> np.ndarray:
    """float64 values rounded to ``dtype`` (round to nearest even; bfloat16 through float32, which is exact
    for the residual sums here, whose float32 sums are exact, and may double-round a silu value, inside
    the SwiGLU tolerance), back as float64."""
    if dtype == jnp.bfloat16:
        return _f64(jnp.asarray(np.asarray(x64, np.float64), dtype))
    return x64.astype(np.float32).astype(np.float64)


def _norm64(x64: np.ndarray, scale64: np.ndarray) -> np.ndarray:
    return x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + EPS) * scale64


def _close(got, ref64: np.ndarray, dtype, ulps: float = 1.0) -> None:
    rtol = 4e-6 if dtype == jnp.float32 else ulps * 2.0**-8
    np.testing.assert_allclose(_f64(got), ref64, rtol=rtol, atol=1e-30)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(impl, dtype, shape):
    x, scale = _data(shape, dtype), _data(shape[-1:], dtype, seed=1, scale=1.0)
    got = jax.jit(lambda x, s: rms_norm(x, s, EPS, impl))(x, scale)
    assert got.dtype == dtype and got.shape == x.shape
    _close(got, _norm64(_f64(x), _f64(scale)), dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm(impl, dtype, shape):
    x, a = _data(shape, dtype), _data(shape, dtype, seed=2)
    scale = _data(shape[-1:], jnp.float32, seed=1, scale=1.0)
    y, s = jax.jit(lambda x, a, sc: add_rms_norm(x, a, sc, EPS, impl))(x, a, scale)
    s_ref = _rounded(_f64(x) + _f64(a), dtype)
    np.testing.assert_array_equal(_f64(s), s_ref)  # the sum of two values rounded once
    _close(y, _norm64(s_ref, _f64(scale)), dtype)


def _swiglu64(g64: np.ndarray, u64: np.ndarray, dtype) -> np.ndarray:
    with np.errstate(over="ignore"):
        silu = g64 / (1.0 + np.exp(-g64))
    if dtype == jnp.bfloat16:
        silu = _rounded(silu, dtype)
    return silu * u64


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu(impl, dtype, shape):
    g, u = _data(shape, dtype), _data(shape, dtype, seed=3)
    got = jax.jit(lambda g, u: swiglu(g, u, impl))(g, u)
    assert got.dtype == dtype and got.shape == g.shape
    _close(got, _swiglu64(_f64(g), _f64(u), dtype), dtype, ulps=3.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_extremes(impl, dtype):
    """Large gates of either sign (exp far out of range), zero, +inf and NaN; every lane of a vector and a tail."""
    vals = np.array([0.0, 30.0, -30.0, 100.0, -100.0, 88.0, -88.0, 1e-3, -1e-3, np.inf, np.nan, 5.0, -5.0, 0.5,
                     -0.5, 2.0, 7.0], np.float32)
    g = jnp.asarray(vals[None, :], dtype)
    u = jnp.ones_like(g)
    got = _f64(jax.jit(lambda g, u: swiglu(g, u, impl))(g, u))[0]
    ref = _swiglu64(_f64(g), _f64(u), dtype)[0]
    assert np.isnan(got[10]) and got[9] == np.inf
    finite = np.isfinite(ref)
    # silu(-100) ~ -4e-42: the kernel's exp stops at exp(-87), so tiny values are compared absolutely
    np.testing.assert_allclose(got[finite], ref[finite], rtol=3 * 2.0**-8, atol=1e-35)


@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm_of_a_zero_row_is_zero(impl):
    x = jnp.zeros((3, 40), jnp.bfloat16).at[1].set(1.0)
    got = _f64(jax.jit(lambda x: rms_norm(x, jnp.ones(40, jnp.float32), EPS, impl))(x))
    assert np.all(got[[0, 2]] == 0.0)
    np.testing.assert_allclose(got[1], 1.0 / np.sqrt(1.0 + EPS), rtol=2.0**-8)


@NO_COMPILER
def test_other_dtypes_run_the_jnp_path():
    """float16 is not a kernel dtype: ``impl="cpu"`` gives the jnp path's result."""
    x = _data((4, 48), jnp.float16)
    scale = jnp.ones(48, jnp.float16)
    np.testing.assert_array_equal(np.asarray(rms_norm(x, scale, EPS, "cpu")),
                                  np.asarray(rms_norm(x, scale, EPS, "xla")))
    np.testing.assert_array_equal(np.asarray(swiglu(x, x, "cpu")), np.asarray(swiglu(x, x, "xla")))


@NO_COMPILER
def test_kernel_rejects_bad_operands():
    x = _data((4, 48), jnp.bfloat16)
    with pytest.raises(ValueError, match="scale"):
        cpu.rms_norm_cpu(x, jnp.ones(47, jnp.float32), EPS)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu.rms_norm_cpu(x.astype(jnp.float16), jnp.ones(48, jnp.float32), EPS)
    with pytest.raises(ValueError, match="must match"):
        cpu.add_rms_norm_cpu(x, x.astype(jnp.float32), jnp.ones(48, jnp.float32), EPS)
    with pytest.raises(ValueError, match="must match"):
        cpu.swiglu_cpu(x, x[:, :40])


def test_kernels_pick_the_row_kernel_on_a_single_cpu_device(monkeypatch):
    """``Kernels.norm`` is "cpu" where the CPU attention kernel runs on one device (a custom call would make
    a multi-device placement gather its operands), else "xla"."""
    from jax.sharding import Mesh

    from jaxinfer.target import Kernels

    monkeypatch.delenv("JAXINFER_KERNEL_IMPL", raising=False)
    one = Mesh(np.asarray(jax.devices("cpu")[:1]), ("model",))
    assert Kernels.for_mesh(one, attention="cpu").norm == ("cpu" if cpu.buildable() else "xla")
    assert Kernels.for_mesh(one, attention="xla").norm == "xla"
    if len(jax.devices("cpu")) >= 2:
        two = Mesh(np.asarray(jax.devices("cpu")[:2]), ("model",))
        assert Kernels.for_mesh(two, attention="cpu").norm == "xla"
    with pytest.raises(ValueError, match="unknown kernel impl"):
        Kernels("xla", "xla", norm="pallas_tpu")
