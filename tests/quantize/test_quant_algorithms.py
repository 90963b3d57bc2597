"""RTN / GPTQ / AWQ / SmoothQuant / calibration: against float64 references and against RTN."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quantized_matmul.api import quantized_matmul
from pallas_kernels.quantized_matmul.config import QuantConfig
from pallas_kernels.quantized_matmul.qarray import QArray
from quantize.awq import awq_search
from quantize.calibration import ActStats, HessianState, accumulate
from quantize.folding import fold_into_linear_output, fold_into_norm, scale_rows
from quantize.gptq import gptq_quantize
from quantize.rtn import rtn_quantize
from quantize.smoothquant import smoothing_scales, smoothquant


def _correlated_inputs(t, k, seed=0, dead=()):
    """Tokens with strongly correlated channels of varied scale (a low-rank-ish covariance)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * (0.9 ** np.arange(k))[None, :]
    x = rng.standard_normal((t, k)) @ mix.T * 0.3 + 0.1 * rng.standard_normal((t, k))
    x = x * np.exp(0.5 * rng.standard_normal(k))[None, :]
    x[:, list(dead)] = 0.0
    return x.astype(np.float32)


def _outlier_inputs(t, k, n_outliers, factor, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, k)).astype(np.float32)
    x[:, rng.choice(k, n_outliers, replace=False)] *= factor
    return x


def _weight(k, n, seed=1):
    return (np.random.default_rng(seed).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)


def _out_err(x, w, w_hat, x_hat=None):
    """Relative output error ||x w - x_hat w_hat|| / ||x w||, in float64."""
    x64 = x.astype(np.float64)
    ref = x64 @ w.astype(np.float64)
    x_hat = x64 if x_hat is None else np.asarray(x_hat, np.float64)
    return np.linalg.norm(ref - x_hat @ np.asarray(w_hat, np.float64)) / np.linalg.norm(ref)


def _hessian(x, batch=256):
    return accumulate(
        HessianState.init(x.shape[1]), (jnp.asarray(x[i : i + batch]) for i in range(0, len(x), batch))
    )


# ---------------------------------------------------------------------------------------------- calibration
def test_calibration_stats_match_numpy():
    x = _correlated_inputs(300, 32, seed=3)
    h = _hessian(x, batch=128)  # uneven last batch
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(
        np.asarray(h.h), 2 * x64.T @ x64 / 300, rtol=1e-5, atol=1e-6 * np.abs(x64).max() ** 2
    )
    assert float(h.count) == 300
    stats = ActStats.init(32)
    for i in range(0, 300, 128):
        stats = stats.update(
            jnp.asarray(x[i : i + 128]).reshape(-1, 2, 32) if i == 0 else jnp.asarray(x[i : i + 128])
        )
    np.testing.assert_allclose(np.asarray(stats.abs_max), np.abs(x).max(0), rtol=1e-7)
    np.testing.assert_allclose(np.asarray(stats.mean_abs), np.abs(x64).mean(0), rtol=1e-5)


def test_folding_identities():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    g, w, wp = rng.random(16).astype(np.float32) + 0.5, _weight(16, 8), _weight(12, 16)
    s = jnp.asarray(rng.random(16) * 3 + 0.1, jnp.float32)
    np.testing.assert_allclose(
        (x * fold_into_norm(g, s)) @ scale_rows(w, s), (x * g) @ w, rtol=1e-4, atol=1e-5
    )
    h = x[:, :12]
    new_wp, new_b = fold_into_linear_output(wp, s, jnp.ones(16))
    np.testing.assert_allclose(
        (h @ new_wp + new_b) @ scale_rows(w, s), (h @ wp + 1) @ w, rtol=1e-4, atol=1e-5
    )


# ---------------------------------------------------------------------------------------------- RTN
def test_rtn_percentile_clipping():
    w = _weight(64, 16, seed=5)
    w[3, 2] = 5.0  # an outlier dominates its group's range
    full = rtn_quantize(w, "int4-g32", percentile=100.0)
    minmax = QArray.quantize(jnp.asarray(w), "int4-g32")
    np.testing.assert_array_equal(
        np.asarray(full.dequantize(jnp.float32)), np.asarray(minmax.dequantize(jnp.float32))
    )
    clipped = rtn_quantize(w, "int4-g32", percentile=90.0)
    expect = np.percentile(np.abs(w).reshape(2, 32, 16), 90.0, axis=1) / 7.5
    np.testing.assert_allclose(np.asarray(clipped.scale), expect, rtol=1e-5)
    deq = np.asarray(clipped.dequantize(jnp.float32))
    assert deq[3, 2] == pytest.approx(7 * float(clipped.scale[0, 2]), rel=1e-6)  # the outlier saturates
    asym = rtn_quantize(w, QuantConfig("int4", 32, symmetric=False), percentile=90.0)
    lo = np.percentile(w.reshape(2, 32, 16), 10.0, axis=1)
    np.testing.assert_allclose(np.asarray(asym.offset), lo, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="percentile"):
        rtn_quantize(w, "int4-g32", percentile=30.0)


# ---------------------------------------------------------------------------------------------- GPTQ
def _gptq_float64(w, h, g, act_order, percdamp=0.01, qmax=7):
    """GPTQ written as the original OBS sequence: quantize one row, update the rest with H^-1, then
    remove that row from H^-1 (no Cholesky, no lazy batches); symmetric grid scale = amax / (qmax+0.5)."""
    w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
    k = w.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0

    def params(rows):
        s = np.abs(rows).max(0) / (qmax + 0.5)
        return np.where(s > 0, s, 1.0)

    scales = {j: params(w[j * g : (j + 1) * g]) for j in range(k // g)} if act_order else {}
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    hinv = np.linalg.inv(h + percdamp * np.mean(np.diag(h)) * np.eye(k))
    q = np.zeros_like(w)
    for idx, r in enumerate(order):
        if not act_order and r % g == 0:
            scales[r // g] = params(w[r : r + g])
        s = scales[r // g]
        q[r] = np.clip(np.round(w[r] / s), -qmax - 1, qmax)
        err = (w[r] - q[r] * s) / hinv[r, r]
        rest = order[idx + 1 :]
        w[rest] -= np.outer(hinv[rest, r], err)
        hinv -= np.outer(hinv[:, r], hinv[r, :]) / hinv[r, r]
    return q, np.stack([scales[j] for j in range(k // g)])


@pytest.mark.parametrize("act_order", [False, True], ids=["dynamic_groups", "act_order_static_groups"])
def test_gptq_matches_float64_obs_reference(act_order):
    x = _correlated_inputs(512, 64, seed=6, dead=(5,))
    w = _weight(64, 32, seed=7)
    h = _hessian(x)
    qa = gptq_quantize(w, h, "int4-g32", act_order=act_order, blocksize=16)  # several lazy-update blocks
    q_ref, s_ref = _gptq_float64(w, np.asarray(h.h), 32, act_order)
    levels = np.asarray(qa.levels())
    # float32 vs float64: a near-tie may round the other way and nudge later rows; allow a few
    assert np.mean(levels == q_ref) >= 0.98
    assert np.mean(np.isclose(np.asarray(qa.scale), s_ref, rtol=1e-4)) >= 0.95
    assert np.all(levels[5] == 0)  # dead input channel
    err, err_ref = _out_err(x, w, qa.dequantize(jnp.float32)), _out_err(x, w, q_ref * np.repeat(s_ref, 32, 0))
    assert abs(err - err_ref) <= 0.01 * err_ref


@pytest.mark.parametrize(
    "fmt, act_order",
    [
        ("int4-g32", False),
        ("int4-g32", True),
        (QuantConfig("int4", 128, symmetric=False), False),
        ("int8", False),
    ],
    ids=["int4-g32", "int4-g32-act_order", "int4-g128-asym", "int8"],
)
def test_gptq_beats_rtn_on_correlated_inputs(fmt, act_order):
    x = _correlated_inputs(1024, 128, seed=8)
    w = _weight(128, 64, seed=9)
    gptq = _out_err(x, w, gptq_quantize(w, _hessian(x), fmt, act_order=act_order).dequantize(jnp.float32))
    rtn = _out_err(x, w, QArray.quantize(jnp.asarray(w), fmt).dequantize(jnp.float32))
    assert gptq < 0.5 * rtn, (gptq, rtn)


def test_gptq_bad_arguments():
    w = _weight(64, 8)
    h = np.eye(64, dtype=np.float32)
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_quantize(w, np.eye(32), "int4-g32")
    with pytest.raises(ValueError, match="percdamp"):
        gptq_quantize(w, h, "int4-g32", percdamp=-1.0)
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize(w, h, "int4-g32", act_order=True, static_groups=False)
    with pytest.raises(ValueError, match="not divisible"):
        gptq_quantize(_weight(48, 8), np.eye(48), "int4-g32")
    with pytest.raises(TypeError, match="float"):
        gptq_quantize(np.ones((64, 8), np.int32), h, "int8")


# ---------------------------------------------------------------------------------------------- AWQ
def test_awq_beats_rtn_on_outlier_channels():
    x = _outlier_inputs(1024, 256, n_outliers=8, factor=30.0, seed=10)
    ws = [_weight(256, 96, seed=11), _weight(256, 64, seed=12)]  # e.g. gate/up sharing an input
    res = awq_search(ws, x, "int4", clip=[True, False])
    assert 0.0 < res.alpha < 1.0
    assert res.loss < 0.7 * res.loss_rtn
    xs = x / np.asarray(res.scales)  # what the folded preceding norm produces
    for w, q in zip(ws, res.qarrays):
        assert q.shape == w.shape and q.config == QuantConfig("int4", 128)
        awq = _out_err(x, w, q.dequantize(jnp.float32), x_hat=xs)
        rtn = _out_err(x, w, QArray.quantize(jnp.asarray(w), "int4").dequantize(jnp.float32))
        assert awq < 0.8 * rtn, (awq, rtn)
    # the kernel path computes the same product on the scaled input
    y = quantized_matmul(jnp.asarray(xs[:4]), res.qarrays[0], impl="xla")
    np.testing.assert_allclose(
        np.asarray(y), xs[:4] @ np.asarray(res.qarrays[0].dequantize(jnp.float32)), rtol=1e-4, atol=1e-4
    )


def test_awq_clip_search_does_not_hurt_and_bad_arguments():
    x = _outlier_inputs(512, 128, n_outliers=4, factor=20.0, seed=13)
    w = _weight(128, 64, seed=14)
    w[np.arange(0, 128, 9), 3] *= 8.0  # weight outliers make clipping worthwhile
    plain = awq_search([w], x, "int4-g32", clip=False, n_grid=10)
    clipped = awq_search([w], x, "int4-g32", clip=True, n_grid=10)
    xs = x / np.asarray(plain.scales)
    e_plain = _out_err(x, w, plain.qarrays[0].dequantize(jnp.float32), x_hat=xs)
    e_clip = _out_err(x, w, clipped.qarrays[0].dequantize(jnp.float32), x_hat=xs)
    assert e_clip <= e_plain * 1.001
    with pytest.raises(ValueError, match="channels"):
        awq_search([w], x[:, :64], "int4")
    with pytest.raises(ValueError, match="clip flags"):
        awq_search([w], x, "int4", clip=[True, False])
    with pytest.raises(ValueError, match="K="):
        awq_search([w, _weight(64, 8)], x, "int4")


# ---------------------------------------------------------------------------------------------- SmoothQuant
def test_smoothquant_beats_naive_w8a8_on_outlier_channels():
    x = _outlier_inputs(256, 128, n_outliers=4, factor=60.0, seed=15)
    ws = [_weight(128, 96, seed=16), _weight(128, 32, seed=17)]
    stats = ActStats.init(128).update(jnp.asarray(x))
    res = smoothquant(ws, stats.abs_max, alpha=0.5)
    w_max = np.abs(np.concatenate(ws, axis=1)).max(1)
    np.testing.assert_allclose(np.asarray(res.scales), np.sqrt(np.abs(x).max(0)) / np.sqrt(w_max), rtol=1e-5)
    xs = jnp.asarray(x) / res.scales  # what the folded preceding norm produces
    for w, q in zip(ws, res.qarrays):
        assert q.config.act == "int8"
        ref = x.astype(np.float64) @ w.astype(np.float64)
        rel = lambda y, ref=ref: np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref)
        smooth = rel(quantized_matmul(xs, q, impl="xla"))  # dynamic per-token int8 activations
        naive = rel(
            quantized_matmul(jnp.asarray(x), QArray.quantize(jnp.asarray(w), "int8-w8a8"), impl="xla")
        )
        assert smooth < 0.5 * naive, (smooth, naive)
    with pytest.raises(ValueError, match="alpha"):
        smoothing_scales(stats.abs_max, ws, alpha=1.5)
    zero_channel = smoothing_scales(stats.abs_max.at[7].set(0.0), ws)
    assert float(zero_channel[7]) == 1.0
