"""``linear`` / ``unembed`` on plain float weights (16-bit inputs, tied LM head contracted over the stored
table), checked against float64 numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.models.ops import linear, unembed


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
