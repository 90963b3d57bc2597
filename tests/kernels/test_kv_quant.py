"""Quantized (int8 / fp8) KV pages: write_kv quantization and attention through every implementation.

Two checks per implementation: against the float64 oracle on the *dequantized* cache (tight: the
kernels must apply the scales exactly), and against the oracle on the original float K/V with a
tolerance derived from the quantization step (what quantization may cost at most).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from rpa_testlib import GEO_A, draw_lengths, make_batch, num_real_rows, oracle, quantized_cache, token_major_pages

from pallas_kernels.ragged_paged_attention import cpu, kv_quant
from pallas_kernels.ragged_paged_attention.api import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.pages import init_kv_pages, write_kv

SM_SCALE = 0.125
# Half a quantization step relative to the per-(token, head) absmax: int8 steps are absmax / 127;
# e4m3 keeps 3 mantissa bits (half an ulp <= 2^-4 of the value, values <= absmax).
HALF_STEP = {jnp.dtype(jnp.int8): 1 / 254, jnp.dtype(jnp.float8_e4m3fn): 2.0**-4}


def _dequantized_token_major(kv, head_dim):
    return token_major_pages(kv, head_dim)


@pytest.mark.parametrize("layout", ["token_major", "head_major", "head_major_fused"])
@pytest.mark.parametrize("qdtype", [jnp.int8, jnp.float8_e4m3fn])
def test_write_kv_quantizes_per_token_and_head(layout, qdtype):
    rng = np.random.default_rng(0)
    num_pages, ps, hkv, d, t = 4, 8, 2, 64, 12
    kv = init_kv_pages(num_pages, ps, hkv, d, layout=layout, quant_dtype=qdtype)
    want_scale = (num_pages, ps, hkv) if layout == "token_major" else (num_pages, hkv * ps)  # one row per page
    assert kv.k.dtype == qdtype and kv.k_scale.shape == want_scale and kv.k_scale.dtype == jnp.float32
    x = rng.standard_normal((t, hkv, d)).astype(np.float32) * rng.uniform(0.1, 10, size=(t, hkv, 1))
    x[3] = 0.0  # an all-zero token decodes to exactly zero
    slots = rng.choice(num_pages * ps, size=t, replace=False).astype(np.int32)
    slots[5] = -1
    out = write_kv(kv, jnp.asarray(x), jnp.asarray(-x), jnp.asarray(slots))
    k, v = _dequantized_token_major(out, d)
    k, v = k.reshape(-1, hkv, d), v.reshape(-1, hkv, d)
    keep = slots >= 0
    absmax = np.abs(x).max(-1, keepdims=True)
    bound = absmax * HALF_STEP[jnp.dtype(qdtype)] * (1 + 1e-5)
    assert np.all(np.abs(k[slots[keep]] - x[keep]) <= bound[keep])
    assert np.all(np.abs(v[slots[keep]] + x[keep]) <= bound[keep])
    assert np.all(k[slots[3]] == 0)
    untouched = np.setdiff1d(np.arange(num_pages * ps), slots[keep])
    assert not np.any(k[untouched]) and not np.any(v[untouched])
    scales = np.asarray(out.k_scale)
    if layout != "token_major":
        scales = np.swapaxes(scales.reshape(num_pages, hkv, ps), 1, 2)
    np.testing.assert_allclose(scales.reshape(-1, hkv)[slots[keep]],
                               absmax[keep, :, 0] / kv_quant.qmax(qdtype), rtol=1e-6)


@pytest.mark.parametrize("layout,ps,hkv", [("head_major", 16, 8), ("head_major_fused", 32, 4),
                                            ("head_major", 8, 2)])  # 16-lane rows: the XLA scatter
def test_tpu_scale_row_write_equals_the_scatter(layout, ps, hkv):
    """With impl="pallas_tpu" the scale rows of a head-major / fused cache are written in place by the
    tpu_scales kernel (interpret mode here): tokens sharing a page (adjacent or not), padding tokens and
    untouched rows give exactly the numpy scatter's rows, and the values exactly the XLA path's."""
    rng = np.random.default_rng(3)
    num_pages, d = 12, 64
    kv = init_kv_pages(num_pages, ps, hkv, d, layout=layout, quant_dtype=jnp.int8)
    old = rng.uniform(0.5, 2.0, size=kv.k_scale.shape).astype(np.float32)  # rows already holding scales
    kv = kv._replace(k_scale=jnp.asarray(old), v_scale=jnp.asarray(2 * old))
    slots = np.array([5 * ps + 1, 5 * ps + 2, 2 * ps, 9 * ps + ps - 1, -1, 5 * ps + 7, 2 * ps + 3, -1, 0, 11 * ps],
                     np.int32)  # page 5 three times (split by page 2), pages 2, 9, 0, 11, two padding tokens
    x = rng.standard_normal((len(slots), hkv, d)).astype(np.float32) * rng.uniform(0.1, 10, (len(slots), hkv, 1))
    args = (kv, jnp.asarray(x), jnp.asarray(-2 * x), jnp.asarray(slots))
    got = write_kv(*args, impl="pallas_tpu", interpret=True)
    ref = write_kv(*args, impl="xla")
    want = old.copy()
    keep = slots >= 0
    for s, row in zip(slots[keep], np.abs(x[keep]).max(-1) / 127):
        want[s // ps, np.arange(hkv) * ps + s % ps] = row
    np.testing.assert_allclose(np.asarray(got.k_scale), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got.v_scale), np.where(want == old, 2 * old, 2 * want), rtol=1e-6)
    for name in ("k", "v", "k_scale", "v_scale"):
        if getattr(ref, name) is not None:
            np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(ref, name)))


@pytest.mark.parametrize("qdtype", [jnp.int8, jnp.float8_e4m3fn])
@pytest.mark.parametrize("impl,layout,group", [
    ("xla", "token_major", 1), ("xla", "head_major_fused", 1), ("xla", "head_major_fused", 8),
    ("pallas_tpu", "head_major", 1), ("pallas_tpu", "head_major_fused", 1), ("pallas_tpu", "head_major", 8),
    ("pallas_tpu", "head_major_fused", 8), ("pallas_gpu", "token_major", 1),
    pytest.param("cpu", "token_major", 1, marks=pytest.mark.skipif(
        not cpu.available(), reason="no C++ compiler: the CPU kernel cannot be built"))])
def test_attention_on_quantized_cache(impl, layout, group, qdtype):
    """``group``: pages per head-major scale row (8: 3 heads x 16 tokens x 8 = 384 lanes, written by the
    TPU scale-row kernel when ``impl="pallas_tpu"``, and each page's scales picked out of its row)."""
    geo = GEO_A
    rng = np.random.default_rng(9)
    batch = make_batch(rng, geo, draw_lengths(rng, geo, "mixed"))
    kv, k_tok, v_tok = quantized_cache(batch, geo, qdtype, layout, group, impl=impl if impl == "pallas_tpu" else None)
    assert kv.scale_pages_per_row == group
    out = ragged_paged_attention(jnp.asarray(batch.q, jnp.float32), kv, jnp.asarray(batch.kv_lens),
                                 jnp.asarray(batch.page_indices), jnp.asarray(batch.cu_q_lens),
                                 jnp.asarray(batch.num_seqs), sm_scale=SM_SCALE, impl=impl)
    got = np.asarray(out, np.float64)
    assert np.all(got[num_real_rows(batch):] == 0)

    # 1) Exact use of the stored values and scales.
    k_deq, v_deq = _dequantized_token_major(kv, geo.head_dim)
    deq_batch = dataclasses.replace(batch, k_pages=k_deq, v_pages=v_deq)
    np.testing.assert_allclose(got, oracle(deq_batch, SM_SCALE), atol=2e-5, rtol=2e-5)

    # 2) Against float K/V: scores move by at most eps = sm_scale * sum|q| * max half-step of K, so
    #    softmax weights by a factor within exp(+-2 eps); values move by at most their half-step.
    half = HALF_STEP[jnp.dtype(qdtype)]
    eps = SM_SCALE * np.abs(batch.q[:num_real_rows(batch)]).sum(-1).max() * half * np.abs(k_tok).max()
    tol = (np.exp(2 * eps) - 1) * np.abs(v_tok).max() + half * np.abs(v_tok).max()
    err = np.abs(got - oracle(batch, SM_SCALE)).max()
    assert err <= tol, (err, tol)


def test_quantized_cache_argument_errors():
    with pytest.raises(ValueError, match="unsupported KV quantization dtype"):
        init_kv_pages(4, 8, 2, 64, quant_dtype=jnp.float16)
    kv = init_kv_pages(4, 8, 2, 64, quant_dtype=jnp.int8)
    bad = kv._replace(k_scale=jnp.zeros((4, 8), jnp.float32))
    with pytest.raises(ValueError, match="k_scale must be float32 of shape"):
        write_kv(bad, jnp.zeros((1, 2, 64)), jnp.zeros((1, 2, 64)), jnp.zeros((1,), jnp.int32))
