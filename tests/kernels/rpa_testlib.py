"""Test helpers for ragged paged attention: random ragged batches and an independent float64 oracle.

The oracle loops over sequences and query rows with explicit positions and reads keys straight from
the numpy page arrays; it shares no code with the library.
"""

from __future__ import annotations

import dataclasses

import numpy as np

KINDS = ("decode", "prefill", "mixed", "verify", "single", "boundary")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static shapes of one test configuration (each one compiles once per implementation)."""

    num_tokens: int  # T
    max_seqs: int  # S
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    pages_per_seq: int
    num_pages: int


@dataclasses.dataclass
class Batch:
    """A ragged batch with its float64 token-major cache contents (numpy)."""

    q: np.ndarray  # [T, Hq, D] float64 (padding rows are NaN)
    k_pages: np.ndarray  # [P, ps, Hkv, D] float64 (unused slots hold NaN)
    v_pages: np.ndarray
    kv_lens: np.ndarray  # int32[S]
    page_indices: np.ndarray  # int32[S, pages_per_seq]
    cu_q_lens: np.ndarray  # int32[S + 1]
    num_seqs: np.ndarray  # int32[1]


def draw_lengths(rng: np.random.Generator, geo: Geometry, kind: str) -> list[tuple[int, int]]:
    """(q_len, kv_len) per real sequence for a batch kind; fits the token, sequence and page budgets."""
    max_kv = geo.pages_per_seq * geo.page_size
    ps = geo.page_size
    out: list[tuple[int, int]] = []
    tokens_left = geo.num_tokens
    pages_left = geo.num_pages
    n_target = int(rng.integers(1, geo.max_seqs + 1))
    if kind == "single":
        n_target = 1
    for i in range(n_target):
        if kind == "decode" or (kind == "mixed" and i < n_target // 2) or kind == "single":
            q_len = 1
        elif kind == "verify":
            q_len = int(rng.integers(2, 9))
        elif kind == "boundary":
            q_len = int(rng.integers(1, 4))
        else:
            q_len = int(rng.integers(2, max(3, geo.num_tokens // 2)))
        q_len = min(q_len, tokens_left, max_kv)
        if q_len <= 0:
            break
        if kind == "mixed" and i == n_target - 1 and i > 0 and rng.random() < 0.3:
            q_len = 0  # a sequence with no query rows this step
        if kind == "boundary":
            # End exactly on a page boundary or one past it.
            n_full = int(rng.integers(1, geo.pages_per_seq + (0 if i % 2 else 1)))
            kv_len = n_full * ps + (i % 2)
            kv_len = max(min(kv_len, max_kv), q_len)
        elif kind == "prefill":
            kv_len = int(rng.integers(q_len, max_kv + 1)) if rng.random() < 0.5 else q_len
        else:
            kv_len = int(rng.integers(max(q_len, 1), max_kv + 1))
        need = -(-kv_len // ps)
        if need > pages_left:
            break
        pages_left -= need
        tokens_left -= q_len
        out.append((q_len, kv_len))
    if not out:
        out = [(1, 1)]
    return out


def make_batch(rng: np.random.Generator, geo: Geometry, lengths: list[tuple[int, int]],
               nan_padding: bool = True) -> Batch:
    """Random q / pages for the given lengths; pages are shuffled, unused entries are garbage."""
    t, s, ps = geo.num_tokens, geo.max_seqs, geo.page_size
    d, hq, hkv = geo.head_dim, geo.num_q_heads, geo.num_kv_heads
    n = len(lengths)
    fill = np.nan if nan_padding else 0.0
    k_pages = np.full((geo.num_pages, ps, hkv, d), fill)
    v_pages = np.full((geo.num_pages, ps, hkv, d), fill)
    perm = rng.permutation(geo.num_pages)
    page_indices = rng.integers(0, geo.num_pages, size=(s, geo.pages_per_seq)).astype(np.int32)
    kv_lens = rng.integers(0, 10_000, size=s).astype(np.int32)  # garbage beyond num_seqs
    cu = np.zeros(s + 1, np.int32)
    cu[1:] = rng.integers(0, 10_000, size=s)  # garbage beyond num_seqs
    cursor = 0
    next_page = 0
    for i, (q_len, kv_len) in enumerate(lengths):
        cu[i + 1] = cu[i] + q_len
        kv_lens[i] = kv_len
        need = -(-kv_len // ps)
        page_indices[i, :need] = perm[next_page:next_page + need]
        next_page += need
        for j in range(kv_len):
            page, off = page_indices[i, j // ps], j % ps
            k_pages[page, off] = rng.standard_normal((hkv, d))
            v_pages[page, off] = rng.standard_normal((hkv, d))
        cursor += q_len
    q = rng.standard_normal((t, hq, d))
    q[cursor:] = fill
    return Batch(q, k_pages, v_pages, kv_lens, page_indices, cu, np.array([n], np.int32))


def oracle(batch: Batch, sm_scale: float, sliding_window: int | None = None,
           soft_cap: float | None = None) -> np.ndarray:
    """float64 attention, one sequence and one query row at a time. Padding rows are 0."""
    t, hq, d = batch.q.shape
    ps = batch.k_pages.shape[1]
    hkv = batch.k_pages.shape[2]
    group = hq // hkv
    out = np.zeros((t, hq, d))
    for s in range(int(batch.num_seqs[0])):
        q0, q1 = int(batch.cu_q_lens[s]), int(batch.cu_q_lens[s + 1])
        kv_len = int(batch.kv_lens[s])
        keys = np.stack([batch.k_pages[batch.page_indices[s, j // ps], j % ps] for j in range(kv_len)])
        vals = np.stack([batch.v_pages[batch.page_indices[s, j // ps], j % ps] for j in range(kv_len)])
        for i in range(q1 - q0):
            pos = kv_len - (q1 - q0) + i
            lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
            for h in range(hq):
                kh = keys[lo:pos + 1, h // group]  # [n, D]
                logits = kh @ batch.q[q0 + i, h] * sm_scale
                if soft_cap is not None:
                    logits = soft_cap * np.tanh(logits / soft_cap)
                w = np.exp(logits - logits.max())
                out[q0 + i, h] = (w / w.sum()) @ vals[lo:pos + 1, h // group]
    return out


def to_head_major(pages: np.ndarray, padded_dim: int) -> np.ndarray:
    """[P, ps, Hkv, D] -> [P, Hkv, ps, padded_dim] (zero pad lanes), in numpy."""
    hm = np.swapaxes(pages, 1, 2)
    pad = padded_dim - hm.shape[-1]
    return np.pad(hm, ((0, 0), (0, 0), (0, 0), (0, pad))) if pad else hm


# Static configurations used across the kernel tests (each compiles once per implementation).
GEO_A = Geometry(num_tokens=32, max_seqs=6, num_q_heads=9, num_kv_heads=3, head_dim=64, page_size=16,
                 pages_per_seq=8, num_pages=40)  # SmolLM2-135M heads, GQA 3
GEO_B = Geometry(num_tokens=24, max_seqs=4, num_q_heads=8, num_kv_heads=2, head_dim=128, page_size=8,
                 pages_per_seq=8, num_pages=24)  # GQA 4, head_dim 128, page 8
GEO_C = Geometry(num_tokens=16, max_seqs=4, num_q_heads=4, num_kv_heads=4, head_dim=64, page_size=16,
                 pages_per_seq=4, num_pages=16)  # MHA


def device_args(batch: Batch, dtype, layout: str = "token_major"):
    """(q, KVPages, kv_lens, page_indices, cu_q_lens, num_seqs) as jax arrays for the library."""
    import jax.numpy as jnp

    from pallas_kernels.ragged_paged_attention.pages import KVLayout, KVPages

    k, v = batch.k_pages, batch.v_pages
    if layout == "head_major":
        dp = -(-k.shape[-1] // 128) * 128
        k, v = to_head_major(k, dp), to_head_major(v, dp)
    if layout == "head_major_fused":  # K in lanes [0, 64), V in [64, 128)
        k, v = np.concatenate([to_head_major(k, 64), to_head_major(v, 64)], axis=-1), None
    kv = KVPages(jnp.asarray(k, dtype), None if v is None else jnp.asarray(v, dtype), layout=KVLayout(layout))
    return (jnp.asarray(batch.q, dtype), kv, jnp.asarray(batch.kv_lens), jnp.asarray(batch.page_indices),
            jnp.asarray(batch.cu_q_lens), jnp.asarray(batch.num_seqs))


def token_major_pages(kv, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A cache's K and V as float64 token-major ``[P, ps, Hkv, head_dim]`` (dequantized), any layout."""
    import jax.numpy as jnp

    from pallas_kernels.ragged_paged_attention import kv_quant
    from pallas_kernels.ragged_paged_attention.pages import page_scales

    def deq(x, scale):
        return np.asarray((x.astype(jnp.float32) if scale is None else kv_quant.dequantize(x, scale)), np.float64)

    ks, vs = kv.k_scale, kv.v_scale
    if ks is not None and kv.layout.value != "token_major":  # rows of G pages -> [P, Hkv, ps]
        ks, vs = (page_scales(kv, x) for x in (ks, vs))
    if kv.layout.value == "head_major_fused":
        both = deq(kv.k, None)
        k, v = both[..., :64], both[..., 64:]
        if ks is not None:
            k, v = k * np.asarray(ks)[..., None], v * np.asarray(vs)[..., None]
    else:
        k, v = deq(kv.k, ks), deq(kv.v, vs)
    if kv.layout.value != "token_major":
        k, v = np.swapaxes(k, 1, 2), np.swapaxes(v, 1, 2)
    return k[..., :head_dim], v[..., :head_dim]


def rounded(batch: Batch, dtype) -> Batch:
    """The batch with q / pages rounded through ``dtype`` (so a float64 oracle sees what a kernel sees)."""
    import jax.numpy as jnp

    def r(x):
        return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)

    return dataclasses.replace(batch, q=r(batch.q), k_pages=r(batch.k_pages), v_pages=r(batch.v_pages))


def num_real_rows(batch: Batch) -> int:
    return int(batch.cu_q_lens[int(batch.num_seqs[0])])


# Shared by the attention tests: f32 math inside, so 1e-5 against float64 on O(1) outputs; bf16
# outputs are rounded to 2^-8 relative (the math inside is f32).
SM_SCALE = 0.125
F32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = dict(atol=1.5e-2, rtol=1.5e-2)


def run_impl(batch: Batch, impl: str, dtype=None, layout: str = "token_major", **opts) -> np.ndarray:
    """``ragged_paged_attention(impl=...)`` on the batch; float64 numpy output (dtype / shape checked)."""
    import jax.numpy as jnp

    from pallas_kernels.ragged_paged_attention.api import ragged_paged_attention

    dtype = dtype or jnp.float32
    out = ragged_paged_attention(*device_args(batch, dtype, layout), sm_scale=SM_SCALE, impl=impl, **opts)
    assert out.dtype == dtype and out.shape == batch.q.shape
    return np.asarray(out.astype(jnp.float32), np.float64)


def check_against_oracle(batch: Batch, got: np.ndarray, tol: dict, **opts) -> None:
    """``got`` equals the float64 oracle within ``tol``; padding rows (NaN queries) are exactly zero."""
    np.testing.assert_allclose(got, oracle(batch, SM_SCALE, **opts), **tol)
    assert np.all(got[num_real_rows(batch):] == 0), "padding rows must be exactly zero"


def with_garbage_metadata(seed: int, geo: Geometry, lengths: list[tuple[int, int]],
                          page_range: tuple[int, int]) -> tuple[Batch, Batch]:
    """Two batches with equal real contents; the second has random page-table entries (drawn from
    ``page_range``) past each sequence's pages and random lengths past ``num_seqs``."""
    rng = np.random.default_rng(seed)
    a = make_batch(rng, geo, lengths)
    b = make_batch(np.random.default_rng(seed), geo, lengths)
    n = len(lengths)
    lo, hi = page_range
    b.page_indices = a.page_indices.copy()
    for s, (_, kv_len) in enumerate(lengths):
        used = -(-kv_len // geo.page_size)
        b.page_indices[s, used:] = rng.integers(lo, hi, size=geo.pages_per_seq - used)
    b.page_indices[n:] = rng.integers(lo, hi, size=(geo.max_seqs - n, geo.pages_per_seq))
    b.kv_lens[n:] = rng.integers(min(lo, 0), 10_000, size=geo.max_seqs - n)
    b.cu_q_lens[n + 1:] = rng.integers(-5, 10_000, size=geo.max_seqs - n)
    return a, b


def quantized_cache(batch: Batch, geo: Geometry, quant_dtype, layout: str = "token_major", scale_pages_per_row: int = 1,
                    impl: str | None = None):
    """The batch's real keys / values written with ``write_kv`` (for ``impl``) into a fresh quantized cache
    (head-major scale rows of ``scale_pages_per_row`` pages).

    Returns ``(kv, k_tok, v_tok)``: the cache and the float64 ``[N, Hkv, D]`` rows written into it.
    """
    import jax.numpy as jnp

    from pallas_kernels.ragged_paged_attention.pages import init_kv_pages, write_kv

    ps, n = geo.page_size, int(batch.num_seqs[0])
    slots = np.asarray([batch.page_indices[s, j // ps] * ps + j % ps
                        for s in range(n) for j in range(batch.kv_lens[s])], np.int32)
    kv = init_kv_pages(geo.num_pages, ps, geo.num_kv_heads, geo.head_dim, layout=layout,
                       quant_dtype=quant_dtype, scale_pages_per_row=scale_pages_per_row)
    k_tok = batch.k_pages.reshape(-1, geo.num_kv_heads, geo.head_dim)[slots]
    v_tok = batch.v_pages.reshape(-1, geo.num_kv_heads, geo.head_dim)[slots]
    kv = write_kv(kv, jnp.asarray(k_tok, jnp.float32), jnp.asarray(v_tok, jnp.float32), jnp.asarray(slots),
                  impl=impl)
    return kv, k_tok, v_tok


def run_cpu_on_cache(batch: Batch, geo: Geometry, qdtype, quant_dtype=None, **opts):
    """The C++ CPU kernel on ``batch`` with ``qdtype`` queries over float pages of ``qdtype`` or, with
    ``quant_dtype`` (int8 / fp8), a quantized cache written by ``write_kv``.

    Returns ``(oracle batch, float64 output, tolerance)``: the oracle batch sees the queries rounded to
    ``qdtype`` and the pages as the kernel reads them (rounded, or dequantized); the tolerance is
    ``F32_TOL`` for float32 queries, ``BF16_TOL`` for bfloat16 outputs.
    """
    import jax.numpy as jnp

    from pallas_kernels.ragged_paged_attention import kv_quant
    from pallas_kernels.ragged_paged_attention.api import ragged_paged_attention

    base = batch if qdtype == jnp.float32 else rounded(batch, qdtype)
    if quant_dtype is not None:
        kv, _, _ = quantized_cache(batch, geo, quant_dtype)
        ref = dataclasses.replace(base, k_pages=np.asarray(kv_quant.dequantize(kv.k, kv.k_scale), np.float64),
                                  v_pages=np.asarray(kv_quant.dequantize(kv.v, kv.v_scale), np.float64))
        out = ragged_paged_attention(jnp.asarray(batch.q, qdtype), kv, jnp.asarray(batch.kv_lens),
                                     jnp.asarray(batch.page_indices), jnp.asarray(batch.cu_q_lens),
                                     jnp.asarray(batch.num_seqs), sm_scale=SM_SCALE, impl="cpu", **opts)
    else:
        ref = base
        out = ragged_paged_attention(*device_args(batch, qdtype), sm_scale=SM_SCALE, impl="cpu", **opts)
    assert out.dtype == qdtype
    return ref, np.asarray(out.astype(jnp.float32), np.float64), F32_TOL if qdtype == jnp.float32 else BF16_TOL
