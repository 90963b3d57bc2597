"""The sampler's row argmax and log-sum-exp (pallas_kernels.logits_rows): the C++ CPU kernel and the jnp
path against float64 numpy, including NaN / +-inf rows, ties and widths that are not whole vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cpu_build
from pallas_kernels.logits_rows import cpu, row_argmax, row_logsumexp

NO_COMPILER = pytest.mark.skipif(cpu_build.compiler() is None, reason="no C++ compiler")
IMPLS = ["xla", pytest.param("cpu", marks=NO_COMPILER)]


@pytest.fixture(autouse=True)
def _kernel_builds_where_a_compiler_exists():
    """With a compiler the kernel must build: a failed build fails here instead of silently testing jnp."""
    if cpu_build.compiler() is not None:
        assert cpu.available(), cpu.ARGMAX.state or cpu.LOGSUMEXP.state


def _rows(v: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((12, v)) * 6).astype(np.float32)
    x[1, v // 3] = np.nan                       # a NaN: argmax gives it, logsumexp is NaN
    x[1, v - 1] = np.nan
    x[2, :] = -np.inf                           # all masked: argmax 0, logsumexp -inf
    x[3, v // 2] = np.inf                       # +inf: argmax there, logsumexp +inf
    x[4, :] = 2.5                               # all tied: the first index
    x[5, [v // 4, v // 2, v - 1]] = 40.0        # a tie at three places, one in the tail
    x[6, v - 1] = 50.0                          # the maximum in the last element
    x[7, :] = -np.inf
    x[7, v - 2] = -3.0                          # one finite token in a masked row
    x[8, : v // 2] = -np.inf                    # half masked (a structured-output row)
    x[9, 0] = 30.0                              # the maximum first
    x[10, :] = -0.0
    x[10, v // 2] = 0.0                         # -0 == +0: the first index
    return x


def _ref_argmax(x: np.ndarray) -> np.ndarray:
    out = []
    for row in x:
        nan = np.flatnonzero(np.isnan(row))
        out.append(nan[0] if nan.size else np.flatnonzero(row == row.max())[0])
    return np.asarray(out, np.int32)


def _ref_logsumexp(x: np.ndarray) -> np.ndarray:
    out = []
    for row in x.astype(np.float64):
        if np.isnan(row).any():
            out.append(np.nan)
            continue
        m = row.max()
        if not np.isfinite(m):
            out.append(m)
            continue
        out.append(np.log(np.exp(row - m).sum()) + m)
    return np.asarray(out)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("v", [5, 16, 40, 1000, 49152])
def test_row_argmax_matches_numpy(impl, v):
    x = _rows(v)
    got = np.asarray(jax.jit(lambda y: row_argmax(y, impl))(jnp.asarray(x)))
    np.testing.assert_array_equal(got, _ref_argmax(x))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("v", [5, 16, 40, 1000, 49152])
def test_row_logsumexp_matches_float64(impl, v):
    """float32 sums in another order than float64: within 2e-6 relative (plus 1e-6 absolute)."""
    x = _rows(v)
    got = np.asarray(jax.jit(lambda y: row_logsumexp(y, impl))(jnp.asarray(x)), np.float64)
    ref = _ref_logsumexp(x)
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    inf = np.isinf(ref)
    np.testing.assert_array_equal(got[inf], ref[inf])
    fin = np.isfinite(ref)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=2e-6, atol=1e-6)


@NO_COMPILER
def test_cpu_kernel_matches_the_jnp_path_on_random_logits():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((64, 49152)).astype(np.float32) * 4)
    np.testing.assert_array_equal(np.asarray(cpu.row_argmax_cpu(x)), np.asarray(row_argmax(x, "xla")))
    np.testing.assert_allclose(np.asarray(cpu.row_logsumexp_cpu(x)), np.asarray(row_logsumexp(x, "xla")),
                               rtol=2e-6)


@NO_COMPILER
def test_cpu_kernel_rejects_a_non_matrix():
    with pytest.raises(ValueError, match="expected logits"):
        cpu.row_argmax_cpu(jnp.zeros((2, 3, 4)))
