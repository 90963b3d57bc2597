"""Quantized matmul under shard_map on 8 virtual CPU devices (Pallas TPU kernel, interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.quantized_matmul.api import quantized_matmul
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.sharded import quantized_matmul_sharded, weight_specs

M, K, N = 8, 1024, 512


def _mesh():
    devices = jax.devices("cpu")
    assert len(devices) >= 8, "conftest provides 8 virtual CPU devices"
    return Mesh(np.array(devices[:8]), ("model",))


def _inputs(fmt, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    w = QArray.quantize(jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), jnp.float32), fmt)
    return x, w


@pytest.mark.parametrize("split,fmt", [("n", "int8"), ("n", "int4-asym"), ("n", "int8-w8a8"), ("k", "int8"),
                                       ("k", "int4-g64"), ("k", "int8-g32")])
def test_sharded_equals_unsharded(split, fmt):
    mesh = _mesh()
    x, w = _inputs(fmt)
    want = quantized_matmul(x, w, impl="pallas_tpu", interpret=True)
    specs = weight_specs(w, split, "model")
    w_sh = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), w, specs)
    x_sh = jax.device_put(x, NamedSharding(mesh, P(None, "model") if split == "k" else P()))
    fn = jax.jit(lambda a, b: quantized_matmul_sharded(a, b, mesh, split=split, impl="pallas_tpu", interpret=True))
    got = fn(x_sh, w_sh)
    assert got.shape == (M, N)
    want_spec = P() if split == "k" else P(None, "model")
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, want_spec), 2)
    if split == "n":  # the same kernel on the same columns: identical
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    else:  # partial sums over 8 shards: f32 rounding differs
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_sharded_rejects_what_it_cannot_split():
    mesh = _mesh()
    x, w = _inputs("int4")
    with pytest.raises(ValueError, match="split"):
        quantized_matmul_sharded(x, w, mesh, split="diagonal")
