"""Quantization quality of the default model (SmolLM2-135M-Instruct) on a slice of WikiText-2.

Protocol: the first 2,048 tokens of the text in 8 non-overlapping windows of 256 (2,040 scored tokens,
see ``quantize.evaluate``); calibration on 16 x 128 tokens taken from token 10,000 on (disjoint from the
evaluated slice). Claims:

* int8 (RTN, per channel, every decoder linear): perplexity within 1% of the float model;
* int4 g128 on decoder layers 0-7 (the other layers kept float, to keep GPTQ's sequential pass inside the
  test budget): GPTQ and AWQ both reach a lower perplexity and a lower KL divergence than RTN. SmolLM2's
  K = 576 projections are not a multiple of 128, so they use g64 (recorded fallback); down_proj uses g128.

The text is WikiText-2's test split when found (``tests/quantize/text_data.py``), else a generated
English-like text; the assertions are the same either way.
"""

import numpy as np
import pytest

from quantize.evaluate import evaluate, token_windows
from quantize.model_quant import calibration_tokens, quantize_model
from tests.quantize.text_data import evaluation_text

SUBSET_KEEP = tuple(f"layers_{i}/*" for i in range(8, 30))


@pytest.fixture(scope="module")
def data(default_llm):
    text, _ = evaluation_text()
    ids = np.asarray(default_llm.tokenizer(text[:120_000])["input_ids"])
    return token_windows(ids, 256, 2048), calibration_tokens(ids[10_000:], 16, 128)


def test_int8_and_int4_methods_quality(default_llm, data):
    windows, calib = data
    m = default_llm.loaded
    variants = {"int8": quantize_model(m.model, m.params, "rtn", "int8", progress=False).params}
    info = {}
    for method in ("rtn", "gptq", "awq"):
        q = quantize_model(m.model, m.params, method, "int4", calib_tokens=calib, keep=SUBSET_KEEP, progress=False)
        variants[method], info[method] = q.params, q.info
    assert set(info["gptq"]["group_size_fallbacks"].values()) == {64}
    assert "layers_0/mlp/down_proj" not in info["gptq"]["group_size_fallbacks"]
    res = evaluate(m.model, m.params, variants, windows, batch=2, progress=False)
    base = res["float"].perplexity
    assert res["float"].num_tokens == 8 * 255
    assert abs(res["int8"].perplexity / base - 1.0) < 0.01, res
    assert res["int8"].top1 > 0.9
    for method in ("gptq", "awq"):
        assert res[method].perplexity < res["rtn"].perplexity, res
        assert res[method].kl < res["rtn"].kl, res
    assert res["rtn"].perplexity > base  # int4 costs something
