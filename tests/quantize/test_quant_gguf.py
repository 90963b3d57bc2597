"""GGUF Q8_0 / Q4_0 / Q4_1 import: dequantization equals gguf-py's, transposed, exactly."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from jaxinfer.gguf_qarray import gguf_tensor_to_weight, qarray_from_gguf
from pallas_kernels.quantized_matmul.api import quantized_matmul

TYPES = [T.Q8_0, T.Q4_0, T.Q4_1]


def _rows(n=12, k=96, seed=0):
    """A GGUF-layout weight [N, K] (rows = output features) with a zero block and an outlier."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[0, :32] = 0.0
    w[3, 40] = 25.0
    return w


@pytest.mark.parametrize("ttype", TYPES, ids=lambda t: t.name)
def test_import_matches_gguf_dequantize_exactly(ttype):
    w_nk = _rows()
    data = gguf_quantize(w_nk, ttype)
    expected = gguf_dequantize(data, ttype).T  # [K, N]
    qa = qarray_from_gguf(data, ttype, (96, 12))
    assert qa.shape == (96, 12)
    assert qa.bytes_per_param == pytest.approx(gguf.GGML_QUANT_SIZES[ttype][1] / 32)
    got = np.asarray(qa.dequantize(jnp.float32))
    np.testing.assert_array_equal(got, expected)  # eager float32: same operations as gguf-py
    # the matmul on the imported weight equals float64 x @ dequant
    x = np.random.default_rng(1).standard_normal((3, 96)).astype(np.float32)
    y = quantized_matmul(jnp.asarray(x), qa, impl="xla")
    ref = x.astype(np.float64) @ expected.astype(np.float64)
    assert np.abs(np.asarray(y) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_reader_round_trip_and_float_passthrough(tmp_path):
    path = tmp_path / "t.gguf"
    w_nk = _rows(n=8, k=64, seed=2)
    writer = gguf.GGUFWriter(str(path), "llama")
    for ttype in TYPES:
        q = gguf_quantize(w_nk, ttype)
        writer.add_tensor(f"w.{ttype.name}", q, raw_shape=q.shape, raw_dtype=ttype)
    writer.add_tensor("w.F16", w_nk.astype(np.float16))
    writer.add_tensor("w.Q5_0", gguf_quantize(w_nk, T.Q5_0), raw_dtype=T.Q5_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for ttype in TYPES:
        t = tensors[f"w.{ttype.name}"]
        qa = gguf_tensor_to_weight(t)
        np.testing.assert_array_equal(
            np.asarray(qa.dequantize(jnp.float32)), gguf_dequantize(t.data, ttype).T
        )
    dense = gguf_tensor_to_weight(tensors["w.F16"], dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(dense), w_nk.astype(np.float16).astype(np.float32).T)
    with pytest.raises(ValueError, match="Q5_0"):
        gguf_tensor_to_weight(tensors["w.Q5_0"])
    fallback = gguf_tensor_to_weight(tensors["w.Q5_0"], dtype=jnp.float32, dequantize_other=True)
    np.testing.assert_array_equal(np.asarray(fallback), gguf_dequantize(tensors["w.Q5_0"].data, T.Q5_0).T)


def test_output_row_permutation_on_imported_weight():
    """The loader undoes llama.cpp's q/k row permutation by selecting output columns of the QArray."""
    w_nk = _rows(n=16, k=64, seed=3)
    qa = qarray_from_gguf(gguf_quantize(w_nk, T.Q4_0), T.Q4_0, (64, 16))
    perm = np.arange(16).reshape(2, 2, 4).swapaxes(1, 2).reshape(16)  # a head-wise interleave
    np.testing.assert_array_equal(
        np.asarray(qa.take_columns(perm).dequantize(jnp.float32)),
        np.asarray(qa.dequantize(jnp.float32))[:, perm],
    )


def test_bad_gguf_inputs():
    data = gguf_quantize(_rows(), T.Q8_0)
    with pytest.raises(ValueError, match="bytes"):
        qarray_from_gguf(data, T.Q8_0, (96, 13))
    with pytest.raises(ValueError, match="lossless"):
        qarray_from_gguf(data, T.Q6_K, (96, 12))
    with pytest.raises(ValueError, match="2-D"):
        qarray_from_gguf(data, T.Q8_0, (96, 12, 1))


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("ttype", TYPES, ids=lambda t: t.name)
def test_kernels_on_imported_float16_scales(ttype, impl):
    w_nk = _rows(n=64, k=512, seed=4)
    qa = qarray_from_gguf(gguf_quantize(w_nk, ttype), ttype, (512, 64))
    assert qa.scale.dtype == jnp.float16
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 512)), jnp.float32)
    y = np.asarray(quantized_matmul(x, qa, impl=impl, interpret=True))
    ref = np.asarray(quantized_matmul(x, qa, impl="xla"))
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
