"""RTN quantization of mixture-of-experts models: each expert quantized as its own linear, stacked.

The quantized model must compute exactly the float model's function on the dequantized weights (logits
within 1e-5 relative: the XLA path dequantizes, then multiplies), each expert's QArray must equal that
expert quantized alone as a 2-D linear, int8 logits must stay within 2% of the float model's, and the
checkpoint written by ``jaxinfer quantize`` must load and generate. Calibrated methods refuse MoE models.
"""

import jax
import numpy as np
import pytest

from jaxinfer.errors import QuantizationError
from jaxinfer.loader import load_model
from jaxinfer.quantized_checkpoint import MANIFEST
from pallas_kernels.quantized_matmul.qarray import QArray
from quantize.model_quant import quantize_model
from tests.models.dense_steps import ragged_prefill

SEQS = [[1, 17, 42, 99, 7, 250, 3, 8, 64, 120], [1, 5, 9, 22, 33]]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    path, _ = tiny_model_dir("qwen2_moe")
    return path, load_model(str(path))


def _dequantized(tree):
    return jax.tree.map(
        lambda x: x.dequantize() if isinstance(x, QArray) else x, tree, is_leaf=lambda x: isinstance(x, QArray)
    )


@pytest.mark.parametrize("fmt", ["int8", "int4-g32"])
def test_rtn_experts_each_quantized_alone(loaded, fmt):
    _, m = loaded
    q = quantize_model(m.model, m.params, "rtn", fmt, progress=False).params
    moe = q["layers_1"]["mlp"]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        w, ref = moe["experts"][proj], m.params["layers_1"]["mlp"]["experts"][proj]
        assert isinstance(w, QArray) and w.shape == ref.shape
        for e in (0, ref.shape[0] - 1):
            alone = QArray.quantize(ref[e], fmt)
            np.testing.assert_array_equal(np.asarray(w.value[e]), np.asarray(alone.value))
            np.testing.assert_array_equal(np.asarray(w.scale[e]), np.asarray(alone.scale))
    assert isinstance(moe["shared_expert"]["down_proj"]["kernel"], QArray)
    assert not isinstance(moe["gate"]["kernel"], QArray)  # the router stays float
    assert not isinstance(moe["shared_expert_gate"]["kernel"], QArray)
    assert isinstance(q["layers_0"]["mlp"]["down_proj"]["kernel"], QArray)  # the dense layer too
    ours, _ = ragged_prefill(m.model, q, SEQS)
    exact, _ = ragged_prefill(m.model, _dequantized(q), SEQS)
    for a, b in zip(ours, exact):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)


def test_int8_closer_to_float_than_int4(loaded):
    """Quality ordering on the float model's logits (a routing flip can move single logits a lot, so the
    mean error and top-1 agreement are compared, not a per-logit bound)."""
    _, m = loaded
    flt = np.concatenate(ragged_prefill(m.model, m.params, SEQS)[0])
    err, top1 = {}, {}
    for fmt in ("int8", "int4-g32"):
        q = quantize_model(m.model, m.params, "rtn", fmt, progress=False).params
        got = np.concatenate(ragged_prefill(m.model, q, SEQS)[0])
        err[fmt] = np.abs(got - flt).mean() / np.abs(flt).mean()
        top1[fmt] = (got.argmax(-1) == flt.argmax(-1)).mean()
    assert err["int8"] < err["int4-g32"] and err["int8"] < 0.05, err
    assert top1["int8"] >= top1["int4-g32"], top1


def test_cli_quantize_loads_and_generates(loaded, tmp_path):
    from jaxinfer import LLM
    from jaxinfer.cli import main
    from jaxinfer.sampling_params import SamplingParams

    path, m = loaded
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(path), "--method", "rtn", "--bits", "8", "--out", str(out)]) == 0
    assert (out / MANIFEST).is_file()
    reloaded = load_model(str(out))
    assert isinstance(reloaded.params["layers_1"]["mlp"]["experts"]["up_proj"], QArray)
    ours, _ = ragged_prefill(reloaded.model, reloaded.params, SEQS)
    exact, _ = ragged_prefill(m.model, _dequantized(reloaded.params), SEQS)
    for a, b in zip(ours, exact):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)
    res = LLM(str(out)).generate([SEQS[0]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(res[0].outputs[0].token_ids) == 8


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
def test_calibrated_methods_refuse_moe(loaded, method):
    _, m = loaded
    with pytest.raises(QuantizationError, match="mixture-of-experts"):
        quantize_model(m.model, m.params, method, calib_tokens=np.ones((2, 8), np.int32), progress=False)
