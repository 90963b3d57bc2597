"""Quantized linears under tensor parallelism run the Pallas kernel once per shard (shard_map) and equal
the unsharded result: column-parallel (N split) and row-parallel (K split, partial sums added), for
per-channel and group-wise formats (W8A8 row-parallel: per-shard activation scales, checked against the
sum of per-shard products). Runs the TPU kernel in interpret mode on 4 virtual CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.models.ops import sharded_quantized_matmul
from jaxinfer.sharding import ShardingPlan, make_mesh, place_param
from pallas_kernels.quantized_matmul.api import quantized_matmul
from pallas_kernels.quantized_matmul.qarray import QArray

K, N = 512, 256


def _rows(w: QArray, start: int, n: int) -> QArray:
    """Rows ``start : start + n`` of a per-channel QArray (its scales cover all rows)."""
    return QArray(w.value[start:start + n], w.scale, w.offset, w.config, w.dtype)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-asym", "int8-w8a8"])
@pytest.mark.parametrize("axes", [("embed", "mlp"), ("mlp", "embed")], ids=["column", "row"])
def test_sharded_quantized_matmul_equals_unsharded(fmt, axes):
    rng = np.random.default_rng(0)
    w = QArray.quantize(jnp.asarray(rng.standard_normal((K, N)), jnp.float32) * 0.05, fmt)
    x = jnp.asarray(rng.standard_normal((8, K)), jnp.float32)
    want = np.asarray(quantized_matmul(x, w, impl="xla"))
    if w.config.act is not None and axes[0] == "mlp":
        # W8A8 row-parallel: each shard quantizes its slice of the activations with its own per-token
        # scales (as TP ranks do in vLLM), so the reference is the sum of the per-shard products
        rows = K // 4
        want = sum(np.asarray(quantized_matmul(x[:, i * rows:(i + 1) * rows], _rows(w, i * rows, rows), impl="xla"))
                   for i in range(4))
    plan = ShardingPlan(make_mesh(4))
    placed = place_param(w, axes, plan)
    # the weight really is split: each device holds a quarter of the values
    assert placed.value.addressable_shards[0].data.size * 4 == placed.value.size
    got = jax.jit(lambda a, b: sharded_quantized_matmul(a, b, plan, axes, impl="pallas_tpu", interpret=True))(
        x, placed)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-4)
