"""Grouped matmul: work items, the XLA path and the Pallas kernels (interpret mode) vs a float64 numpy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.grouped_matmul.metadata import group_of_rows, max_items, work_items
from pallas_kernels.grouped_matmul.reference import grouped_matmul_ragged_dot
from pallas_kernels.grouped_matmul.tpu import grouped_matmul_tpu
from pallas_kernels.grouped_matmul.tuning import check_tpu_blocks, gpu_group_blocks, tpu_blocks, xla_block_m
from pallas_kernels.quantized_matmul.config import as_config
from pallas_kernels.quantized_matmul.experts import abstract_expert_qarray, quantize_experts
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.quantizer import quantize_activations
from pallas_kernels.quantized_matmul.tuning import Blocks, check_gpu_blocks

IMPLS = ["xla", "pallas_tpu", "pallas_gpu"]
G, M = 5, 37  # M is not a multiple of any tile below
# Group sizes: empty groups and padding rows past the sum (32 < 37), one group with every row, all empty,
# and a random split.
SIZES = {
    "mixed": [3, 0, 20, 0, 9],
    "one_group_all": [0, 0, 37, 0, 0],
    "all_empty": [0, 0, 0, 0, 0],
    "random": list(np.random.default_rng(7).multinomial(30, [0.1, 0.3, 0.05, 0.25, 0.3])),
}
# (format or None for float experts, lhs dtype)
CASES = [
    (None, jnp.float32),
    (None, jnp.bfloat16),
    ("int8", jnp.bfloat16),
    ("int4", jnp.bfloat16),
    ("int4-g32", jnp.float32),
    ("int8-g32", jnp.bfloat16),
    ("int4-asym", jnp.float32),
    ("int8-w8a8", jnp.float32),
    ("fp8", jnp.bfloat16),
]


def _case_id(case):
    fmt, dtype = case
    return f"{fmt or 'float'}-{jnp.dtype(dtype).name}"


def _weights(fmt, dtype, k, n, seed=0):
    w = np.random.default_rng(seed).standard_normal((G, k, n)).astype(np.float32) / np.sqrt(k)
    if fmt is None:
        return jnp.asarray(w, dtype)
    return quantize_experts(jnp.asarray(w), fmt)


def _float64_expected(x, rhs, sizes):
    """Per-group ``x @ w[g]`` in float64 from the dequantized weights (W8A8: fake-quantized activations)."""
    if isinstance(rhs, QArray):
        w = np.asarray(rhs.dequantize(jnp.float32), np.float64)
        if rhs.config.act is not None:
            xq, xs = quantize_activations(x, rhs.config.act)
            x = np.asarray(xq.astype(jnp.float32), np.float64) * np.asarray(xs, np.float64)
    else:
        w = np.asarray(rhs.astype(jnp.float32), np.float64)
    x = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
    out = np.zeros((x.shape[0], w.shape[-1]))
    start = 0
    for g, size in enumerate(sizes):
        out[start : start + size] = x[start : start + size] @ w[g]
        start += size
    return out


def _assert_close(y, expected, dtype):
    y = np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64)
    # f32: accumulation order only; bf16: weights rounded to bf16 (dequantized) and a bf16 output
    tol = 2.0**-7 if dtype == jnp.bfloat16 else 1e-5
    scale = max(np.abs(expected).max(), 1.0)
    assert np.abs(y - expected).max() <= tol * scale, (np.abs(y - expected).max(), scale)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_float64(impl, case):
    """Every group-size pattern through one compiled function (fixed shapes), against float64 numpy."""
    fmt, dtype = case
    k, n = 256, 128
    rhs = _weights(fmt, dtype, k, n)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((M, k)), dtype)
    fn = jax.jit(lambda x, w, s: grouped_matmul(x, w, s, impl=impl, interpret=True))
    for name, sizes in SIZES.items():
        y = fn(x, rhs, jnp.asarray(sizes, jnp.int32))
        assert y.shape == (M, n) and y.dtype == dtype
        _assert_close(y, _float64_expected(x, rhs, sizes), dtype)
        assert not np.asarray(y[sum(sizes) :]).any(), f"{name}: padding rows must be zero"
    assert fn._cache_size() == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_unaligned_k_and_n_and_explicit_tiles(impl):
    """K and N that are not multiples of 128 (GPU: masked K / N tails), several tile sizes, float and int8."""
    k, n = 200, 72
    x = jnp.asarray(np.random.default_rng(2).standard_normal((M, k)), jnp.float32)
    sizes = SIZES["mixed"]
    for fmt in (None, "int8"):
        rhs = _weights(fmt, jnp.float32, k, n, seed=3)
        expected = _float64_expected(x, rhs, sizes)
        for bm in (16 if impl == "pallas_gpu" else 8, 64):  # 64 > M: one tile straddles every group
            blocks = Blocks(bm, 128 if impl == "pallas_gpu" else n, 128 if impl == "pallas_gpu" else k)
            y = grouped_matmul(x, rhs, jnp.asarray(sizes), impl=impl, interpret=True, blocks=blocks)
            _assert_close(y, expected, jnp.float32)


def test_xla_path_equals_ragged_dot():
    """The XLA path and ``jax.lax.ragged_dot`` agree on float experts (including padding rows)."""
    rhs = _weights(None, jnp.float32, 64, 48)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((M, 64)), jnp.float32)
    sizes = jnp.asarray(SIZES["mixed"], jnp.int32)
    np.testing.assert_allclose(
        grouped_matmul(x, rhs, sizes, impl="xla"),
        grouped_matmul_ragged_dot(x, rhs, sizes, jnp.float32),
        rtol=1e-5,
        atol=1e-5,
    )


def test_out_dtype_and_rows_past_m():
    """``out_dtype`` is honoured; group sizes summing past M are cut at M."""
    rhs = _weights("int8", jnp.float32, 64, 48)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((M, 64)), jnp.bfloat16)
    y = grouped_matmul(x, rhs, jnp.asarray([10, 0, 30, 5, 0]), impl="xla", out_dtype=jnp.float32)
    assert y.dtype == jnp.float32
    _assert_close(y, _float64_expected(x, rhs, [10, 0, 27, 0, 0]), jnp.bfloat16)


def test_tpu_kernel_in_tpu_simulating_interpreter():
    """The TPU interpreter models VMEM blocks and their write-back: a tile straddling groups is visited by
    consecutive items that fill in its rows in place; no races across grid steps."""
    from jax.experimental.pallas import tpu as pltpu

    from tests.kernels.test_quantized_matmul import _tpu_interpreter_races_found

    rhs = _weights("int4-g32", jnp.float32, 512, 128, seed=6)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((M, 512)), jnp.float32)
    sizes = SIZES["mixed"]
    try:
        y = grouped_matmul_tpu(
            x,
            rhs,
            jnp.asarray(sizes, jnp.int32),
            out_dtype=jnp.float32,
            interpret=pltpu.InterpretParams(detect_races=True),
            blocks=Blocks(8, 128, 256),  # two K steps per item
        )
        assert not _tpu_interpreter_races_found()
    finally:
        pltpu.reset_tpu_interpret_mode_state()
    _assert_close(y, _float64_expected(x, rhs, sizes), jnp.float32)


def test_work_items_cover_every_row_once():
    """Invariants of the on-device work items against a brute-force count, for random sizes and tiles."""
    rng = np.random.default_rng(8)
    for m, tm, g in [(37, 8, 5), (64, 16, 9), (13, 4, 3), (100, 128, 4), (50, 8, 1)]:
        fn = jax.jit(lambda s, m=m, tm=tm: work_items(s, m, tm))
        for trial in range(10):
            total = int(rng.integers(0, m + 1))
            sizes = rng.multinomial(total, np.ones(g) / g)
            if trial % 4 == 0:
                sizes[rng.integers(0, g)] += m  # sum past m: cut at m
            it = jax.tree.map(np.asarray, fn(jnp.asarray(sizes, jnp.int32)))
            n_live = int(it.num_items[0])
            assert it.tile.shape == (max_items(m, tm, g),) and n_live <= it.tile.shape[0]
            assert np.all(np.diff(it.tile) >= 0)
            owner = np.minimum(np.repeat(np.arange(g + 1), np.append(sizes, m)), g)[:m]
            covered = np.zeros(m, int)
            for i in range(it.tile.shape[0]):
                rows = np.arange(it.tile[i] * tm, min(it.tile[i] * tm + tm, m))
                mine = rows[(rows >= it.lo[i]) & (rows < it.hi[i])]
                covered[mine] += 1
                if i >= n_live:
                    assert it.lo[i] == it.hi[i] and it.tile[i] == it.tile[n_live - 1] and not it.compute[i]
                elif it.compute[i]:
                    assert len(mine) and np.all(owner[mine] == it.group[i])
                else:
                    assert len(mine) and np.all(owner[mine] == g)
            assert np.all(covered == 1)
            np.testing.assert_array_equal(np.asarray(group_of_rows(jnp.asarray(sizes), m)), owner)


def test_quantize_experts_matches_per_expert_quantization():
    w = jnp.asarray(np.random.default_rng(9).standard_normal((3, 128, 64)), jnp.float32)
    for fmt in ("int8", "int4", "int4-asym", "fp8"):
        q = quantize_experts(w, fmt)
        assert q.shape == (3, 128, 64) and q.config == as_config(fmt)
        for e in range(3):
            one = QArray.quantize(w[e], fmt)
            for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(one), strict=True):
                np.testing.assert_array_equal(np.asarray(a[e]).view(np.uint8), np.asarray(b).view(np.uint8))
        abstract = abstract_expert_qarray(3, 128, 64, fmt, dtype=jnp.float32)
        assert [(a.shape, a.dtype) for a in jax.tree.leaves(abstract)] == [
            (a.shape, a.dtype) for a in jax.tree.leaves(q)
        ]
    with pytest.raises(ValueError, match=r"\[G, K, N\]"):
        quantize_experts(w[0], "int8")
    with pytest.raises(ValueError, match="divisible"):
        quantize_experts(w[:, :96], "int4")


def test_bad_arguments():
    x = jnp.ones((4, 64))
    w = jnp.ones((G, 64, 32))
    sizes = jnp.asarray([1, 1, 1, 1, 0])
    with pytest.raises(ValueError, match="does not match"):
        grouped_matmul(jnp.ones((4, 65)), w, sizes)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        grouped_matmul(jnp.ones((4, 64), jnp.int32), w, sizes)
    with pytest.raises(TypeError, match="float array or a QArray"):
        grouped_matmul(x, jnp.ones((G, 64, 32), jnp.int8), sizes)
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(x, w, jnp.ones((G + 1,), jnp.int32))
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(x, w, jnp.ones((G,), jnp.float32))
    with pytest.raises(ValueError, match=r"\[G, K, N\]"):
        grouped_matmul(x, jnp.ones((64, 32)), sizes)
    with pytest.raises(ValueError, match="unknown kernel impl"):
        grouped_matmul(x, w, sizes, impl="cuda")
    with pytest.raises(ValueError, match="bk=100"):
        grouped_matmul(x, w, sizes, impl="pallas_tpu", blocks=Blocks(8, 32, 100))
    with pytest.raises(ValueError, match="power of two"):
        grouped_matmul(x, w, sizes, impl="pallas_gpu", blocks=Blocks(8, 32, 64))
    assert grouped_matmul(jnp.zeros((0, 64)), w, sizes).shape == (0, 32)


def test_default_tiles_satisfy_tiling_rules_on_moe_shapes():
    """Default tiles at Qwen3-30B-A3B-, Mixtral- and Qwen2-MoE-like expert shapes, decode to prefill."""
    for g, k, n in [(128, 2048, 1536), (128, 768, 2048), (8, 4096, 28672), (60, 2048, 2816), (64, 1408, 2048)]:
        for m in (8, 256, 4096, 16384):
            for fmt in (None, "int8", "int4", "int8-w8a8"):
                cfg = None if fmt is None else as_config(fmt)
                lhs_dtype = jnp.int8 if fmt == "int8-w8a8" else jnp.bfloat16
                check_tpu_blocks(tpu_blocks(m, k, n, g, cfg, lhs_dtype), m, k, n, cfg, lhs_dtype)
                check_gpu_blocks(gpu_group_blocks(m, k, n, g, cfg), cfg or as_config("int8"))
            assert 8 <= xla_block_m(m, g) <= 128
