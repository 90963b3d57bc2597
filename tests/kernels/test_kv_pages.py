"""KVPages construction, write_kv against a numpy scatter, and write-then-attend through every impl."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rpa_testlib import GEO_A, draw_lengths, make_batch, num_real_rows, oracle, token_major_pages

from pallas_kernels.ragged_paged_attention.api import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.pages import (
    KVLayout,
    default_layout,
    init_kv_pages,
    page_bytes_per_token,
    write_kv,
)

LAYOUTS = ["token_major", "head_major", "head_major_fused"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_init_kv_pages_shapes(layout):
    kv = init_kv_pages(5, 16, 3, 64, jnp.bfloat16, layout=layout)
    want = (5, 16, 3, 64) if layout == "token_major" else (5, 3, 16, 128)
    fused = layout == "head_major_fused"
    assert kv.k.shape == want and kv.k.dtype == jnp.bfloat16
    assert (kv.v is None) if fused else (kv.v.shape == want)
    assert kv.layout is KVLayout(layout) and (kv.page_size, kv.num_kv_heads, kv.num_pages) == (16, 3, 5)
    assert kv.k_scale is None and not np.any(np.asarray(kv.k.astype(jnp.float32)))
    # The layout is static: the pytree's leaves are the arrays only (one when K and V are fused).
    assert len(jax.tree.leaves(kv)) == (1 if fused else 2)


def test_default_layout_and_page_bytes():
    """The TPU kernel's default layout fuses K and V for head_dim <= 64 (half the bytes of 128-lane
    padded head-major pages, the same as token-major); other kernels stay token-major."""
    assert default_layout("pallas_tpu", 64) is KVLayout.HEAD_MAJOR_FUSED
    assert default_layout("pallas_tpu", 32) is KVLayout.HEAD_MAJOR_FUSED
    assert default_layout("pallas_tpu", 128) is KVLayout.HEAD_MAJOR
    assert default_layout("pallas_tpu") is KVLayout.HEAD_MAJOR
    assert default_layout("pallas_gpu", 64) is default_layout("xla", 64) is KVLayout.TOKEN_MAJOR
    per = {lay: page_bytes_per_token(KVLayout(lay), 3, 64, jnp.bfloat16) for lay in LAYOUTS}
    assert per == {"token_major": 768, "head_major": 1536, "head_major_fused": 768}
    assert page_bytes_per_token(KVLayout.HEAD_MAJOR_FUSED, 3, 64, None, jnp.int8) == 3 * (128 + 8)
    with pytest.raises(ValueError, match="head_dim <= 64"):
        init_kv_pages(4, 16, 1, 80, layout="head_major_fused")


def test_init_kv_pages_bad_args():
    with pytest.raises(ValueError, match="power of two"):
        init_kv_pages(4, 12, 1, 64)
    with pytest.raises(ValueError, match="num_pages"):
        init_kv_pages(0, 16, 1, 64)
    with pytest.raises(ValueError, match="unknown KV layout"):
        init_kv_pages(4, 16, 1, 64, layout="paged")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_write_kv_matches_numpy_scatter(layout, dtype):
    rng = np.random.default_rng(0)
    num_pages, ps, hkv, d, t = 6, 8, 2, 64, 20
    kv = init_kv_pages(num_pages, ps, hkv, d, dtype, layout=layout)
    # Pre-fill with a known cache so untouched slots are checked too.
    k0 = rng.standard_normal((num_pages, ps, hkv, d)).astype(np.float32)
    v0 = rng.standard_normal((num_pages, ps, hkv, d)).astype(np.float32)
    slots0 = np.arange(num_pages * ps, dtype=np.int32)
    kv = write_kv(kv, jnp.asarray(k0.reshape(-1, hkv, d)), jnp.asarray(v0.reshape(-1, hkv, d)),
                  jnp.asarray(slots0))
    slots = rng.choice(num_pages * ps, size=t, replace=False).astype(np.int32)
    slots[rng.random(t) < 0.3] = -1  # padding tokens
    k_new = rng.standard_normal((t, hkv, d)).astype(np.float32)
    v_new = rng.standard_normal((t, hkv, d)).astype(np.float32)
    out = write_kv(kv, jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(slots))

    rnd = lambda x: np.array(jnp.asarray(x, dtype).astype(jnp.float32))  # noqa: E731
    want_k, want_v = rnd(k0).reshape(-1, hkv, d), rnd(v0).reshape(-1, hkv, d)
    keep = slots >= 0
    want_k[slots[keep]] = rnd(k_new)[keep]
    want_v[slots[keep]] = rnd(v_new)[keep]
    got_k, got_v = token_major_pages(out, d)
    np.testing.assert_array_equal(got_k.reshape(-1, hkv, d), want_k)
    np.testing.assert_array_equal(got_v.reshape(-1, hkv, d), want_v)
    assert out.layout is kv.layout and out.k.dtype == dtype
    if layout == "head_major":
        assert not np.any(np.asarray(out.k[..., d:].astype(jnp.float32))), "pad lanes stay zero"
    if layout == "head_major_fused":  # K then V, unpadded at head_dim 64
        np.testing.assert_array_equal(np.swapaxes(np.asarray(out.k.astype(jnp.float32)), 1, 2).reshape(-1, hkv, 2 * d),
                                      np.concatenate([want_k, want_v], axis=-1))


def test_write_kv_donated_in_jit():
    kv = init_kv_pages(4, 8, 1, 64)
    step = jax.jit(write_kv, donate_argnums=0)
    kv = step(kv, jnp.ones((3, 1, 64)), jnp.full((3, 1, 64), 2.0), jnp.array([0, -1, 9], jnp.int32))
    k = np.asarray(kv.k).reshape(-1, 64)
    assert np.all(k[[0, 9]] == 1) and np.count_nonzero(k.any(axis=1)) == 2


def test_write_kv_bad_shapes():
    kv = init_kv_pages(4, 8, 2, 64)
    with pytest.raises(ValueError, match="does not match the cache"):
        write_kv(kv, jnp.zeros((3, 1, 64)), jnp.zeros((3, 1, 64)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="k_new and v_new"):
        write_kv(kv, jnp.zeros((3, 2, 64)), jnp.zeros((4, 2, 64)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(kv, jnp.zeros((3, 2, 64)), jnp.zeros((3, 2, 64)), jnp.zeros((4,), jnp.int32))


@pytest.mark.parametrize("impl,layout", [("xla", "token_major"), ("xla", "head_major"),
                                         ("xla", "head_major_fused"), ("pallas_tpu", "head_major"),
                                         ("pallas_tpu", "head_major_fused"), ("pallas_gpu", "token_major")])
def test_write_then_attend_matches_oracle(impl, layout):
    """Fill a fresh cache with write_kv (padding slots included), then attend with the public API and
    the default block sizes of each implementation."""
    geo = GEO_A
    rng = np.random.default_rng(42)
    batch = make_batch(rng, geo, draw_lengths(rng, geo, "mixed"))
    ps, n = geo.page_size, int(batch.num_seqs[0])
    slots, ks, vs = [], [], []
    for s in range(n):
        for j in range(int(batch.kv_lens[s])):
            page = batch.page_indices[s, j // ps]
            slots.append(page * ps + j % ps)
            ks.append(batch.k_pages[page, j % ps])
            vs.append(batch.v_pages[page, j % ps])
    slots += [-1] * 5
    ks += [np.full((geo.num_kv_heads, geo.head_dim), np.nan)] * 5
    vs += [np.full((geo.num_kv_heads, geo.head_dim), np.nan)] * 5
    kv = init_kv_pages(geo.num_pages, ps, geo.num_kv_heads, geo.head_dim, jnp.float32, layout=layout)
    kv = write_kv(kv, jnp.asarray(np.stack(ks), jnp.float32), jnp.asarray(np.stack(vs), jnp.float32),
                  jnp.asarray(slots, jnp.int32))
    out = ragged_paged_attention(jnp.asarray(batch.q, jnp.float32), kv, jnp.asarray(batch.kv_lens),
                                 jnp.asarray(batch.page_indices), jnp.asarray(batch.cu_q_lens),
                                 jnp.asarray(batch.num_seqs), sm_scale=0.125, impl=impl)
    got = np.asarray(out, np.float64)
    np.testing.assert_allclose(got, oracle(batch, 0.125), atol=1e-5, rtol=1e-5)
    assert np.all(got[num_real_rows(batch):] == 0)
