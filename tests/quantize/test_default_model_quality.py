"""Quantization quality of the default model (SmolLM2-135M-Instruct) on a slice of WikiText-2.

Protocol: the first 1,536 tokens of the text in 6 non-overlapping windows of 256 (1,530 scored tokens,
see ``quantize.evaluate``); calibration on 16 x 128 tokens taken from token 10,000 on (disjoint from the
evaluated slice). Claims:

* int8 (RTN, per channel, every decoder linear): perplexity within 1% of the float model;
* int4 g128 on decoder layers 0-5 (the other layers kept float, to keep GPTQ's sequential pass inside the
  test budget): GPTQ and AWQ both reach a lower perplexity and a lower KL divergence than RTN. SmolLM2's
  K = 576 projections are not a multiple of 128, so they use g64 (recorded fallback); down_proj uses g128.

The text is WikiText-2's test split when found (``tests/quantize/text_data.py``). Without it, the tokens
are sampled from the float model itself (8 seeded continuations of 512 tokens at temperature 1; eval on
the first 3, calibration on the other 5). On such text the expected negative log-likelihood of a
quantized model is the float model's entropy plus KL(p_float || p_q), so the same perplexity claims
remain meaningful; the assertions are identical either way.
"""

import numpy as np
import pytest

from jaxinfer import SamplingParams
from quantize.evaluate import evaluate, token_windows
from quantize.model_quant import calibration_tokens, quantize_model
from tests.quantize.text_data import wikitext_path

SUBSET_KEEP = tuple(f"layers_{i}/*" for i in range(6, 30))


def _model_samples(llm):
    prompts = ["The history of", "In 1998, the city", "Scientists have found", "The album was",
               "During the war,", "The river flows", "She was born in", "The game was released"]
    outs = llm.generate(prompts, [SamplingParams(temperature=1.0, max_tokens=512, ignore_eos=True, seed=i)
                                  for i in range(len(prompts))])
    return np.stack([np.asarray(o.outputs[0].token_ids[:512]) for o in outs])


@pytest.fixture(scope="module")
def data(default_llm):
    path = wikitext_path()
    if path is not None:
        ids = np.asarray(default_llm.tokenizer(path.read_text(encoding="utf-8")[:120_000])["input_ids"])
        return token_windows(ids, 256, 1536), calibration_tokens(ids[10_000:], 16, 128)
    samples = _model_samples(default_llm)
    return token_windows(samples[:3].reshape(-1), 256), calibration_tokens(samples[3:].reshape(-1), 16, 128)


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
    res = evaluate(m.model, m.params, variants, windows, batch=3, progress=False)
    base = res["float"].perplexity
    assert res["float"].num_tokens == 6 * 255
    assert abs(res["int8"].perplexity / base - 1.0) < 0.01, res
    assert res["int8"].top1 > 0.9
    for method in ("gptq", "awq"):
        assert res[method].perplexity < res["rtn"].perplexity, res
        assert res[method].kl < res["rtn"].kl, res
    assert res["rtn"].perplexity > base  # int4 costs something
