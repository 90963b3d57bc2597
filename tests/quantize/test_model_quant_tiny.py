"""quantize_model on tiny random HF models of every architecture.

Bounds (stated per assertion):

* exact dispatch: a model whose kernels are QArrays equals the same model run with the dequantized
  float kernels substituted, to 1e-5 of max |logit| (weight-only formats: ``linear`` on a QArray is
  ``x @ dequantize(w)``);
* format-derived closeness to the float model: with ``eps_w`` = the largest relative Frobenius error
  ``||dequant(Q) - W|| / ||W||`` of any quantized kernel, and ``eps_a`` the worst-case relative error of
  dynamic per-token activation quantization (int8: ``sqrt(K) / 254``, each element off by at most
  ``amax / 254``; fp8 e4m3: ``2**-4``, half an ulp of a 3-bit mantissa), the relative logit error of the
  quantized model is at most twice that of the float model whose kernels get independent Gaussian noise
  of relative Frobenius size ``eps_w + eps_a`` (quantization error acts like weight noise of that size);
* folding (AWQ / SmoothQuant): the float parameters with every scale folded in compute the float
  model's logits to 2e-5 of max |logit| (float32, highest matmul precision).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxinfer.loader import load_model
from jaxinfer.models.qembedding import QEmbedding
from pallas_kernels.quantized_matmul.config import as_config
from pallas_kernels.quantized_matmul.qarray import QArray
from quantize.model_quant import count_quantized, quantize_model
from tests.models.dense_steps import ragged_prefill

SEQS = [[1, 5, 9, 33, 150, 7, 2, 64, 64, 11, 40, 200], [1, 300, 12, 77]]
ARCHS = ["llama", "llama_mha_tied", "llama3_rope", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    cache = {}

    def get(arch):
        if arch not in cache:
            path, _ = tiny_model_dir(arch)
            cache[arch] = load_model(str(path), load_tokenizer_too=False)
        return cache[arch]

    return get


def _logits(m, params):
    out, _ = ragged_prefill(m.model, params, SEQS)
    return np.concatenate(out)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _calib(seed=0):
    return np.random.default_rng(seed).integers(3, 320, (4, 32)).astype(np.int32)


def _dequantized(params):
    return jax.tree.map(lambda x: x.dequantize(jnp.float32) if isinstance(x, QArray) else x, params,
                        is_leaf=lambda x: isinstance(x, QArray))


def _max_rel_weight_error(params, qparams):
    f, q = flatten_dict(params), flatten_dict(qparams)
    errs = [float(jnp.linalg.norm(q[p].dequantize(jnp.float32) - f[p]) / jnp.linalg.norm(f[p]))
            for p in q if isinstance(q[p], QArray)]
    return max(errs)


def _act_eps(cfg, k_max):
    if cfg.act == "int8":
        return math.sqrt(k_max) / 254
    if cfg.act == "fp8":
        return 2.0**-4
    return 0.0


def _noise_error(m, params, qparams, eps, ref, seeds=(0, 1)):
    """Relative logit error of the float model with Gaussian kernel noise of relative size ``eps``."""
    errs = []
    for s in seeds:
        key = jax.random.PRNGKey(s)
        f, q = flatten_dict(params), flatten_dict(qparams)
        noisy = {}
        for i, (p, w) in enumerate(f.items()):
            if isinstance(q[p], QArray):
                z = jax.random.normal(jax.random.fold_in(key, i), w.shape, w.dtype)
                w = w + z * (eps * jnp.linalg.norm(w) / jnp.linalg.norm(z))
            noisy[p] = w
        errs.append(_rel(_logits(m, unflatten_dict(noisy)), ref))
    return float(np.mean(errs))


CASES = [(a, "int4-g32") for a in ARCHS] + [("llama", "int8"), ("qwen3", "int8")] + [
    ("qwen3", f) for f in ("fp8", "fp8-w8a8", "int8-w8a8")]


@pytest.mark.parametrize("arch,fmt", CASES)
def test_rtn_formats_run_through_the_model(loaded, arch, fmt):
    m = loaded(arch)
    cfg = as_config(fmt)
    method = "fp8" if cfg.weight == "fp8" else "rtn"
    q = quantize_model(m.model, m.params, method, cfg, progress=False)
    c = m.config
    assert count_quantized(q.params) == 7 * c.num_layers  # every decoder linear is a QArray leaf
    assert isinstance(q.params["layers_0"]["mlp"]["down_proj"]["kernel"], QArray)
    assert not isinstance(q.params["embed_tokens"], QEmbedding)  # head / embedding float by default
    ref = _logits(m, m.params)
    got = _logits(m, q.params)
    if cfg.act is None:
        exact = _logits(m, _dequantized(q.params))
        np.testing.assert_allclose(got, exact, atol=1e-5 * np.abs(exact).max(), rtol=0)
    eps = _max_rel_weight_error(m.params, q.params) + _act_eps(cfg, max(c.hidden_size, c.intermediate_size))
    err, noise = _rel(got, ref), _noise_error(m, m.params, q.params, eps, ref)
    assert err <= 2.0 * noise, (err, noise, eps)
    assert q.info["bytes"]["quantized_bytes"] > 0 and q.info["format"] == cfg.name


def test_mixed_precision_keeps_chosen_leaves_float(loaded):
    m = loaded("llama")
    q = quantize_model(m.model, m.params, "rtn", "int4-g32", keep=("layers_1/mlp/*",), keep_first_last=False,
                       progress=False)
    lp0, lp1 = q.params["layers_0"], q.params["layers_1"]
    assert isinstance(lp0["mlp"]["down_proj"]["kernel"], QArray)
    for name in ("gate_proj", "up_proj", "down_proj"):
        np.testing.assert_array_equal(np.asarray(lp1["mlp"][name]["kernel"]),
                                      np.asarray(m.params["layers_1"]["mlp"][name]["kernel"]))
    assert isinstance(lp1["self_attn"]["q_proj"]["kernel"], QArray)
    assert not isinstance(q.params["lm_head"]["kernel"], QArray)
    assert "layers_1/mlp/down_proj" in q.info["kept_float"]
    q2 = quantize_model(m.model, m.params, "rtn", "int8", keep_first_last=True, quantize_head=True, progress=False)
    assert count_quantized(q2.params) == 1  # 2 layers both kept; only the LM head
    assert isinstance(q2.params["lm_head"]["kernel"], QArray)


def test_tied_head_quantized_as_qembedding(loaded):
    m = loaded("llama_mha_tied")
    q = quantize_model(m.model, m.params, "rtn", "int8", quantize_head=True, progress=False)
    emb = q.params["embed_tokens"]
    assert isinstance(emb, QEmbedding) and emb.shape == m.params["embed_tokens"].shape
    exact = jax.tree.map(lambda x: x.dequantize(jnp.float32) if isinstance(x, (QArray, QEmbedding)) else x,
                         q.params, is_leaf=lambda x: isinstance(x, (QArray, QEmbedding)))
    got, want = _logits(m, q.params), _logits(m, exact)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("arch,method", [("llama_mha_tied", "awq"), ("qwen2", "awq"), ("qwen3", "awq"),
                                         ("llama", "smoothquant"), ("qwen3", "smoothquant")])
def test_folding_preserves_the_float_function(loaded, arch, method):
    m = loaded(arch)
    cfg = "int4-g32" if method == "awq" else "int8-w8a8"
    q = quantize_model(m.model, m.params, method, cfg, calib_tokens=_calib(), progress=False, return_folded=True)
    ref, folded = _logits(m, m.params), _logits(m, q.folded)
    np.testing.assert_allclose(folded, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)
    # the folding did something: norms were rescaled (and, with MHA, v_proj columns for o_proj)
    n0 = np.asarray(q.params["layers_0"]["input_layernorm"]["scale"])
    assert not np.allclose(n0, np.asarray(m.params["layers_0"]["input_layernorm"]["scale"]))
    if arch == "llama_mha_tied":  # v -> o scales folded into v_proj's output columns
        v = np.asarray(q.folded["layers_0"]["self_attn"]["v_proj"]["kernel"])
        v0 = np.asarray(m.params["layers_0"]["self_attn"]["v_proj"]["kernel"])
        s_o = np.asarray(q.folded["layers_0"]["self_attn"]["o_proj"]["kernel"])[:, 0] / np.asarray(
            m.params["layers_0"]["self_attn"]["o_proj"]["kernel"])[:, 0]
        assert not np.allclose(s_o, 1.0)
        np.testing.assert_allclose(v * s_o[None, :], v0 * _qkv_scale(q, m)[:, None], rtol=1e-5, atol=1e-7)
    assert count_quantized(q.params) == 7 * m.config.num_layers


def _qkv_scale(q, m):
    """Per-input-channel AWQ scale of the q/k/v group of layer 0 (norm before / after folding)."""
    before = np.asarray(m.params["layers_0"]["input_layernorm"]["scale"])
    return before / np.asarray(q.folded["layers_0"]["input_layernorm"]["scale"])


def test_gptq_reduces_layer_output_error_vs_rtn(loaded):
    """GPTQ's objective on each layer's calibration inputs: lower output error than RTN on the same inputs."""
    from quantize.layer_runner import LayerRunner

    m = loaded("qwen2")
    calib = _calib(3)
    g = quantize_model(m.model, m.params, "gptq", "int4-g32", calib_tokens=calib, progress=False)
    r = quantize_model(m.model, m.params, "rtn", "int4-g32", progress=False)
    runner = LayerRunner(m.model, calib)
    x = runner.embed(m.params)
    y_ref, _ = runner.run(m.params["layers_0"], x, capture=False)
    y_g, _ = runner.run(g.params["layers_0"], x, capture=False)
    y_r, _ = runner.run(r.params["layers_0"], x, capture=False)
    assert _rel(np.asarray(y_g), np.asarray(y_ref)) < _rel(np.asarray(y_r), np.asarray(y_ref))
    assert g.info["calibration"] == dict(num_samples=4, seq_len=32, num_tokens=128)


def test_bad_requests_raise_typed_errors(loaded):
    from jaxinfer.errors import QuantizationError
    from quantize.model_formats import method_config
    from quantize.model_quant import calibration_tokens

    m = loaded("llama")
    with pytest.raises(QuantizationError, match="calibration"):
        quantize_model(m.model, m.params, "gptq", "int4", progress=False)
    with pytest.raises(QuantizationError, match="unknown quantization method"):
        quantize_model(m.model, m.params, "magic", "int8", progress=False)
    with pytest.raises(QuantizationError, match="W8A8"):
        quantize_model(m.model, m.params, "smoothquant", "int8", calib_tokens=_calib(), progress=False)
    with pytest.raises(QuantizationError):
        method_config("smoothquant", 4)
    with pytest.raises(QuantizationError, match="fewer than"):
        calibration_tokens(np.arange(100), 4, 32)
    assert method_config("awq").name == "int4-g128" and method_config("rtn", 8).name == "int8"
    assert method_config("fp8", act="fp8").name == "fp8-w8a8"
