"""``linear`` / ``unembed`` on plain float weights (16-bit inputs, tied LM head contracted over the stored
table), checked against float64 numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.models.ops import embed, lane_strip_rows, linear, tpu_vocab_minor, unembed


def _bf16_round(a: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)


def test_bf16_linear_matches_float64():
    # K = 4096 products of bf16-exact inputs, summed with a float32 (or wider) accumulator.
    rng = np.random.default_rng(0)
    x = _bf16_round(rng.standard_normal((8, 4096)))
    w = _bf16_round(rng.standard_normal((4096, 16)))
    y = linear(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and y.shape == (8, 16)
    ref = x @ w
    # the only error left is the final rounding of the output to bf16 (relative 2**-9)
    np.testing.assert_allclose(np.asarray(y, np.float64), _bf16_round(ref), rtol=0, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unembed_float_table_gives_float32_logits(dtype):
    rng = np.random.default_rng(1)
    table = _bf16_round(rng.standard_normal((300, 64)))  # [V, E]
    x = _bf16_round(rng.standard_normal((2, 5, 64)))  # [..., E]
    logits = unembed(jnp.asarray(x, dtype), jnp.asarray(table, dtype))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 5, 300)
    ref = np.einsum("bte,ve->btv", x, table)
    np.testing.assert_allclose(np.asarray(logits, np.float64), ref, rtol=1e-5, atol=1e-4)


def test_unembed_rejects_mismatched_table():
    with pytest.raises(ValueError, match="unembed"):
        unembed(jnp.ones((3, 64)), jnp.ones((300, 32)))


@pytest.mark.parametrize("vocab", [1024, 1000])  # a multiple of 128 lanes, and a ragged last strip
def test_lane_strip_lookup_equals_row_indexing(vocab):
    # the TPU form of the tied-embedding lookup (128-column strips of table.T) reads the same rows
    rng = np.random.default_rng(2)
    table = rng.standard_normal((vocab, 48)).astype(np.float32)
    tokens = np.array([0, 5, 127, 128, 511, vocab - 129, vocab - 1], np.int32)
    out = embed(jnp.asarray(table), jnp.asarray(tokens), jnp.float32, lane_strips=True)
    np.testing.assert_array_equal(np.asarray(out), table[tokens])
    np.testing.assert_array_equal(np.asarray(lane_strip_rows(jnp.asarray(table), jnp.asarray(tokens))), table[tokens])


def test_lane_strip_lookup_refuses_a_table_narrower_than_a_strip():
    with pytest.raises(ValueError, match="at least 128 rows"):
        lane_strip_rows(jnp.ones((100, 8)), jnp.zeros((1,), jnp.int32))


def test_tpu_vocab_minor_follows_the_tile_padding():
    assert tpu_vocab_minor((49152, 576))  # SmolLM2: 576 is 4.5 lanes tiles, the vocabulary pads nothing
    assert tpu_vocab_minor((49152, 960))
    assert not tpu_vocab_minor((49152, 512)) and not tpu_vocab_minor((128256, 4096))


@pytest.mark.parametrize("impl", ["xla", "cpu"])
def test_unembed_quantized_table_gives_unrounded_float32_logits(impl):
    # A quantized tied table with bf16 activations: the logits come out of the matmul's float32
    # accumulator, not rounded to bf16 first (a logit of ~10 rounded to bf16 moves by up to 1/32, enough to
    # reorder near-tied tokens).
    from jaxinfer.models.qembedding import QEmbedding

    rng = np.random.default_rng(3)
    table = QEmbedding.quantize(jnp.asarray(rng.standard_normal((512, 64)), jnp.float32), "int8-g32")
    x = _bf16_round(rng.standard_normal((4, 64)) * 2)
    logits = unembed(jnp.asarray(x, jnp.bfloat16), table, impl=impl)
    assert logits.dtype == jnp.float32 and logits.shape == (4, 512)
    w = np.asarray(table.dequantize(jnp.float32), np.float64).T
    # the XLA path rounds the dequantized weights to the activations' dtype; the C++ kernel's decode path
    # (M <= 8) multiplies them in float32
    ref = x @ (w if impl == "cpu" else _bf16_round(w))
    err = np.abs(np.asarray(logits, np.float64) - ref).max()
    assert err < 1e-4 * np.abs(ref).max()
    # the bound is tight enough to catch a bf16-rounded result
    assert np.abs(_bf16_round(ref) - ref).max() > 10 * 1e-4 * np.abs(ref).max()


def test_linear_out_dtype_keeps_float32_accumulation():
    rng = np.random.default_rng(4)
    x = _bf16_round(rng.standard_normal((8, 512)))
    w = _bf16_round(rng.standard_normal((512, 16)))
    y = linear(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), out_dtype=jnp.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float64), x @ w, rtol=0, atol=1e-5 * np.abs(x @ w).max())
