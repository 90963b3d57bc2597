"""QArray formats: packing, quantize/dequantize error bounds, pytree behaviour, axes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer.models.ops import linear
from pallas_kernels.quantized_matmul.config import QuantConfig, as_config
from pallas_kernels.quantized_matmul.packing import pack_int4, unpack_int4
from pallas_kernels.quantized_matmul.qarray import QArray, abstract_qarray, concat_columns, dequantize, logical_axes
from pallas_kernels.quantized_matmul.quantizer import quantize_activations

INT_FORMATS = [
    "int8",
    "int8-g32",
    "int4-g32",
    "int4-g64",
    "int4",
    "int4-asym",
    QuantConfig("int4", group_size=32, symmetric=False),
]
ALL_FORMATS = INT_FORMATS + ["fp8", "fp8-w8a8", "int8-w8a8"]


def _weight(k=256, n=48, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    w[rng.integers(0, k, 10), rng.integers(0, n, 10)] *= 20.0  # outliers
    return w


def _layout_reference(q, g):
    """Split-half-per-group packing written out element by element (independent of pack_int4)."""
    k, n = q.shape
    out = np.zeros((k // 2, n), np.uint8)
    h = g // 2
    for j in range(k // g):
        for r in range(h):
            lo = q[j * g + r] & 0xF
            hi = q[j * g + h + r] & 0xF
            out[j * h + r] = lo | (hi << 4)
    return out.view(np.int8)


@pytest.mark.parametrize("g", [32, 64])
@pytest.mark.parametrize("signed", [True, False])
def test_int4_pack_layout_and_round_trip(g, signed):
    rng = np.random.default_rng(1)
    lo, hi = (-8, 8) if signed else (0, 16)
    q = rng.integers(lo, hi, size=(128, 10)).astype(np.int32)
    packed = np.asarray(pack_int4(jnp.asarray(q), g))
    np.testing.assert_array_equal(packed, _layout_reference(q, g))
    np.testing.assert_array_equal(np.asarray(unpack_int4(jnp.asarray(packed), g, signed)), q)
    stacked = np.stack([q, q[::-1]])  # leading dims are carried through
    back = unpack_int4(pack_int4(jnp.asarray(stacked), g), g, signed)
    np.testing.assert_array_equal(np.asarray(back), stacked)


@pytest.mark.parametrize("fmt", INT_FORMATS, ids=str)
def test_integer_round_trip_error_at_most_half_step(fmt):
    cfg = as_config(fmt)
    w = _weight()
    qa = QArray.quantize(jnp.asarray(w), cfg)
    deq = np.asarray(qa.dequantize(jnp.float32), np.float64)
    g = qa.group_size
    step = np.repeat(np.asarray(qa.scale, np.float64), g, axis=0)  # [K, N]
    err = np.abs(deq - w)
    assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-7), float((err / step).max())
    levels = np.asarray(qa.levels())
    if cfg.symmetric:
        assert levels.min() >= -cfg.qmax - 1 and levels.max() <= cfg.qmax
    else:
        assert levels.min() >= 0 and levels.max() <= 2**cfg.bits - 1
    # min/max grid: the extreme levels are used
    if cfg.symmetric:
        assert levels.min() == -cfg.qmax - 1 and levels.max() == cfg.qmax
    else:
        assert levels.min() == 0 and levels.max() == 2**cfg.bits - 1


@pytest.mark.parametrize("fmt", ["fp8", "fp8-w8a8"])
def test_fp8_round_trip_error_within_half_ulp(fmt):
    w = _weight(k=64, n=16)
    qa = QArray.quantize(jnp.asarray(w), fmt)
    assert qa.value.dtype == jnp.float8_e4m3fn
    s = np.asarray(qa.scale, np.float64)  # [1, N]
    deq = np.asarray(qa.dequantize(jnp.float32), np.float64)
    # e4m3: 3 mantissa bits -> relative half-ulp 2**-4 for normals; subnormal spacing 2**-9 (x scale)
    bound = np.maximum(2.0**-4 * np.abs(w), 2.0**-10 * s) * (1 + 1e-6)
    assert np.all(np.abs(deq - w) <= bound)
    np.testing.assert_allclose(np.abs(w).max(0), np.abs(deq).max(0), rtol=2**-4)


def test_activation_quantization_per_token_error():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 96)).astype(np.float32) * np.array([1e-3, 1, 10, 100, 1, 1])[:, None]
    x[4] = 0.0  # an all-zero token
    xq, xs = quantize_activations(jnp.asarray(x), "int8")
    xs = np.asarray(xs, np.float64)
    amax = np.abs(x).max(1)
    np.testing.assert_allclose(xs[:, 0], np.where(amax > 0, amax / 127, 1.0), rtol=1e-6)
    err = np.abs(np.asarray(xq, np.float64) * xs - x)
    assert np.all(err <= xs / 2 * (1 + 1e-5))
    fq, fs = quantize_activations(jnp.asarray(x), "fp8")
    ferr = np.abs(np.asarray(fq.astype(jnp.float32), np.float64) * np.asarray(fs) - x)
    assert np.all(ferr <= np.maximum(2.0**-4 * np.abs(x), 2.0**-10 * np.asarray(fs)) * (1 + 1e-6))
    with pytest.raises(ValueError, match="activation"):
        quantize_activations(jnp.asarray(x), "int4")


@pytest.mark.parametrize(
    "fmt, expected",
    [
        ("int8", 1 + 4 / 4096),
        ("int8-g32", 1 + 4 / 32),
        ("int4", 0.5 + 4 / 128),
        ("int4-g32", 0.5 + 4 / 32),
        ("int4-asym", 0.5 + 8 / 128),
        ("fp8", 1 + 4 / 4096),
        ("int8-w8a8", 1 + 4 / 4096),
    ],
)
def test_bytes_per_param(fmt, expected):
    abstract = abstract_qarray(4096, 4096, fmt)
    assert abstract.shape == (4096, 4096)
    assert abstract.bytes_per_param == pytest.approx(expected)
    real = QArray.quantize(jnp.zeros((256, 128), jnp.float32), fmt)
    assert real.nbytes == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(real))


def test_pytree_jit_and_key_paths():
    qa = QArray.quantize(jnp.asarray(_weight()), "int4-asym")
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(qa)[0]]
    assert paths == [".value", ".scale", ".offset"]
    jitted = np.asarray(jax.jit(lambda w: w.dequantize(jnp.float32))(qa), np.float64)
    # float64 from the leaves; float32 scale * q + offset may or may not fuse into one FMA
    q, s, m = (np.asarray(a, np.float64) for a in (qa.levels(), qa.scale, qa.offset))
    exact = np.repeat(s, 128, 0) * q + np.repeat(m, 128, 0)
    bound = 2.0**-23 * (np.abs(np.repeat(s, 128, 0) * q) + np.abs(np.repeat(m, 128, 0)))
    assert np.all(np.abs(jitted - exact) <= bound)
    assert len(jax.tree.leaves(QArray.quantize(jnp.ones((64, 8)), "int8"))) == 2  # no offset leaf


def test_stacked_layers_scan_and_mixed_precision():
    rng = np.random.default_rng(3)
    ws = [rng.standard_normal((64, 64)).astype(np.float32) * 0.1 for _ in range(3)]
    layers = [QArray.quantize(jnp.asarray(w), "int4-g32") for w in ws]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    assert stacked.shape == (3, 64, 64)
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.float32)

    def body(h, w):
        return linear(h, w, impl="xla"), None

    out, _ = jax.lax.scan(body, x, stacked)
    expect = x
    for q in layers:
        expect = expect @ q.dequantize(jnp.float32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expect), rtol=1e-5, atol=1e-5)
    # mixed precision: plain leaves and QArrays side by side in one params tree
    params = {"q": layers[0], "plain": jnp.asarray(ws[1]), "bias": jnp.ones((64,))}
    f = jax.jit(lambda p, h: linear(linear(h, p["q"]), p["plain"], p["bias"]))
    got = f(params, x)
    want = (x @ layers[0].dequantize(jnp.float32)) @ ws[1] + 1.0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert dequantize(params["plain"]) is params["plain"]


def test_logical_axes_shard_every_leaf():
    per_channel = QArray.quantize(jnp.ones((64, 32)), "int8")
    grouped = QArray.quantize(jnp.ones((64, 32)), QuantConfig("int4", 32, False))
    ax = per_channel.logical_axes(("embed", "mlp"))
    assert (ax.value, ax.scale, ax.offset) == (("embed", "mlp"), (None, "mlp"), None)
    ax = grouped.logical_axes(("mlp", "embed"))
    assert (ax.value, ax.scale, ax.offset) == (("mlp", "embed"),) * 3
    assert grouped.logical_axes(("mlp", "embed"), group_axis=None).scale == (None, "embed")
    assert logical_axes(jnp.ones((4, 4)), ("embed", "vocab")) == ("embed", "vocab")
    stacked = jax.tree.map(lambda *a: jnp.stack(a), grouped, grouped)
    assert stacked.logical_axes(("layers", "mlp", "embed")).scale == ("layers", "mlp", "embed")
    with pytest.raises(ValueError, match="axis names"):
        grouped.logical_axes(("embed",))
    # the axes tree maps onto shardings leaf by leaf and device_put accepts it
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    table = {"embed": None, "mlp": "model"}
    to_sharding = lambda axes: NamedSharding(mesh, PartitionSpec(*(table.get(a) for a in axes)))
    shardings = jax.tree.map(to_sharding, ax, is_leaf=lambda x: isinstance(x, tuple))
    placed = jax.device_put(grouped, shardings)
    np.testing.assert_array_equal(np.asarray(placed.dequantize()), np.asarray(grouped.dequantize()))


@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "int4-asym", "fp8"])
def test_take_and_concat_columns(fmt):
    w = jnp.asarray(_weight(k=128, n=24))
    qa = QArray.quantize(w, fmt)
    perm = np.random.default_rng(4).permutation(24)
    full = np.asarray(qa.dequantize(jnp.float32))
    np.testing.assert_array_equal(np.asarray(qa.take_columns(perm).dequantize(jnp.float32)), full[:, perm])
    parts = [qa.take_columns(slice(0, 10)), qa.take_columns(slice(10, 24))]
    np.testing.assert_array_equal(np.asarray(concat_columns(parts).dequantize(jnp.float32)), full)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="group size"):
        QuantConfig("int4")
    with pytest.raises(ValueError, match="unsupported group size"):
        QuantConfig("int4", group_size=48)
    with pytest.raises(ValueError, match="unsupported weight type"):
        QuantConfig("int3")
    with pytest.raises(ValueError, match="asymmetric"):
        QuantConfig("int8", symmetric=False)
    with pytest.raises(ValueError, match="W8A8"):
        QuantConfig("int4", group_size=32, act="int8")
    with pytest.raises(ValueError, match="fp8"):
        QuantConfig("fp8", group_size=32)
    with pytest.raises(ValueError, match="unknown quantization preset"):
        as_config("int5")
    with pytest.raises(TypeError):
        as_config(8)
    with pytest.raises(ValueError, match="not divisible by group_size"):
        QArray.quantize(jnp.ones((100, 8)), "int4-g32")
    with pytest.raises(TypeError, match="float"):
        QArray.quantize(jnp.ones((64, 8), jnp.int32), "int8")
    with pytest.raises(ValueError, match="scale shape"):
        QArray.from_quantized(jnp.zeros((64, 8), jnp.int32), jnp.ones((1, 8)), None, "int4-g32")
    with pytest.raises(ValueError, match="offset"):
        QArray(jnp.zeros((32, 8), jnp.int8), jnp.ones((1, 8)), None, "int4-asym")
    with pytest.raises(ValueError, match="do not match"):
        linear(jnp.ones((2, 5)), jnp.ones((4, 3)))


def test_package_exports_resolve():
    import quantize

    for name in quantize.__all__:
        assert getattr(quantize, name) is not None
    assert quantize.linear is linear and quantize.QArray is QArray
