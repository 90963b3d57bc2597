"""quantize.evaluate against a float64 numpy computation of the same metrics from the models' logits."""

import numpy as np
import pytest

from jaxinfer.loader import load_model
from quantize.evaluate import evaluate, token_windows
from quantize.model_quant import quantize_model
from tests.models.dense_steps import ragged_prefill


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("score_start", [0, 16])
def test_metrics_match_float64_reference(tiny_model_dir, score_start):
    path, _ = tiny_model_dir("llama")
    m = load_model(str(path), load_tokenizer_too=False)
    q = quantize_model(m.model, m.params, "rtn", "int4-g32", progress=False).params
    ids = np.random.default_rng(0).integers(3, 320, 5 * 32 + 7)
    windows = token_windows(ids, 32)
    assert windows.shape == (5, 32)  # the partial tail is dropped
    res = evaluate(m.model, m.params, {"int4": q}, windows, score_start=score_start, batch=2, progress=False)
    nll_r, nll_q, kl, top = [], [], [], []
    for w in windows:
        lr = _log_softmax64(ragged_prefill(m.model, m.params, [list(w)])[0][0])
        lq = _log_softmax64(ragged_prefill(m.model, q, [list(w)])[0][0])
        for j in range(score_start, 31):
            nll_r.append(-lr[j, w[j + 1]])
            nll_q.append(-lq[j, w[j + 1]])
            kl.append(np.sum(np.exp(lr[j]) * (lr[j] - lq[j])))
            top.append(lr[j].argmax() == lq[j].argmax())
    n = len(nll_r)
    assert res["float"].num_tokens == res["int4"].num_tokens == n == 5 * (31 - score_start)
    # float32 log-softmax on device vs float64 here: 1e-5 relative on perplexity, 1e-4 absolute on KL
    assert res["float"].perplexity == pytest.approx(np.exp(np.mean(nll_r)), rel=1e-5)
    assert res["int4"].perplexity == pytest.approx(np.exp(np.mean(nll_q)), rel=1e-5)
    assert res["int4"].kl == pytest.approx(np.mean(kl), abs=1e-4, rel=1e-3)
    assert res["int4"].top1 == pytest.approx(np.mean(top), abs=1.5 / n)  # at most one near-tie flips
    assert res["float"].kl == 0.0 and res["float"].top1 == 1.0 and res["int4"].kl > 0


def test_kv_cache_variants_over_paged_cache(tiny_model_dir):
    """Float weights over paged KV pages: float pages equal the dense path (KL <= 1e-6, same argmax);
    int8 / fp8 pages perturb the distribution (KL > 0) but stay close (KL < 0.1 nats)."""
    from quantize.evaluate import Variant

    path, _ = tiny_model_dir("qwen3")
    m = load_model(str(path), load_tokenizer_too=False)
    windows = token_windows(np.random.default_rng(1).integers(3, 320, 3 * 40), 40)
    res = evaluate(m.model, m.params, {kv: Variant(m.params, kv) for kv in ("auto", "int8", "fp8")}, windows,
                   batch=3, progress=False)
    assert abs(res["auto"].kl) <= 1e-6 and res["auto"].top1 == 1.0
    assert res["auto"].perplexity == pytest.approx(res["float"].perplexity, rel=1e-5)
    for kv in ("int8", "fp8"):
        assert 0.0 < res[kv].kl < 0.1


def test_interrupted_evaluation_resumes_to_the_same_result(tiny_model_dir):
    """An evaluation stopped after a checkpoint and resumed from the saved progress (through JSON) gives
    the uninterrupted result: the same float64 sums in the same order, hence equal metrics (rel 1e-12)."""
    import json

    from jaxinfer.errors import QuantizationError
    from quantize.evaluate import EvalProgress

    path, _ = tiny_model_dir("llama")
    m = load_model(str(path), load_tokenizer_too=False)
    q = quantize_model(m.model, m.params, "rtn", "int8", progress=False).params
    windows = token_windows(np.random.default_rng(2).integers(3, 320, 7 * 24), 24)
    whole = evaluate(m.model, m.params, {"int8": q}, windows, batch=2, progress=False)

    saved = []

    class Stop(Exception):
        pass

    def save_then_stop(p):
        saved.append(json.dumps(p.to_dict()))
        if p.windows_done >= 4:
            raise Stop

    with pytest.raises(Stop):
        evaluate(m.model, m.params, {"int8": q}, windows, batch=2, progress=False, checkpoint=save_then_stop,
                 checkpoint_every_s=0.0)
    state = EvalProgress.from_dict(json.loads(saved[-1]))
    assert state.windows_done == 4 and state.count == 4 * 23
    final = []
    res = evaluate(m.model, m.params, {"int8": q}, windows, batch=2, progress=False, resume=state,
                   checkpoint=final.append)
    assert final[-1].windows_done == 7 and final[-1].count == 7 * 23
    for name in ("float", "int8"):
        assert res[name].num_tokens == whole[name].num_tokens == 7 * 23
        for k in ("perplexity", "kl", "top1"):
            assert getattr(res[name], k) == pytest.approx(getattr(whole[name], k), rel=1e-12, abs=1e-15)
    with pytest.raises(QuantizationError, match="cannot resume"):
        evaluate(m.model, m.params, {"other": q}, windows, progress=False, resume=state)


def test_variant_computed_in_bfloat16(tiny_model_dir):
    """A variant through another model (the same weights loaded and computed in bfloat16, over int8 pages):
    its perplexity matches a float64 computation from the bfloat16 model's own logits, KL > 0 against the
    float32 reference; a model of another configuration is refused."""
    import dataclasses

    import jax.numpy as jnp

    from jaxinfer.errors import QuantizationError
    from jaxinfer.models.causal_lm import CausalLM
    from quantize.evaluate import Variant

    path, _ = tiny_model_dir("llama")
    m = load_model(str(path), load_tokenizer_too=False)
    low = load_model(str(path), dtype=jnp.bfloat16, load_tokenizer_too=False)
    windows = token_windows(np.random.default_rng(2).integers(3, 320, 3 * 32), 32)
    res = evaluate(m.model, m.params, {"bf16": Variant(low.params, None, model=low.model),
                                       "bf16+int8": Variant(low.params, "int8", model=low.model)},
                   windows, batch=3, progress=False)
    nll = []
    for w in windows:
        lq = _log_softmax64(np.asarray(ragged_prefill(low.model, low.params, [list(w)])[0][0], np.float32))
        nll.extend(-lq[j, w[j + 1]] for j in range(31))
    # bf16 matmuls round differently over 3 windows at once than over one: 2e-3 relative (seen: 2.6e-4)
    assert res["bf16"].perplexity == pytest.approx(np.exp(np.mean(nll)), rel=2e-3)
    assert res["bf16"].kl > 0 and res["bf16+int8"].kl > 0
    other = CausalLM(dataclasses.replace(m.config, num_layers=m.config.num_layers + 1), jnp.float32)
    with pytest.raises(QuantizationError, match="configuration"):
        evaluate(m.model, m.params, {"x": Variant(m.params, None, model=other)}, windows, progress=False)


def test_variant_with_int8_activation_kernels(tiny_model_dir):
    """A variant with explicit kernels (the C++ CPU matmul's int8 activations) is scored with them: its
    perplexity differs from the same weights on the default kernels (the activation rounding shows) and
    stays within 5% of it. Without AVX512-VNNI (no int8 path compiled) the two are the same computation."""
    import dataclasses

    from jaxinfer.target import Kernels
    from pallas_kernels.quantized_matmul import cpu
    from quantize.evaluate import Variant

    path, _ = tiny_model_dir("llama")
    m = load_model(str(path), load_tokenizer_too=False)
    q = quantize_model(m.model, m.params, "rtn", "int8-g32", progress=False).params
    if Kernels.for_mesh(m.mesh).matmul != "cpu":  # no C++ compiler here: int8 activations are refused
        with pytest.raises(ValueError, match="matmul='cpu'"):
            dataclasses.replace(Kernels.for_mesh(m.mesh), matmul_int8_activations=True)
        return
    kernels = dataclasses.replace(Kernels.for_mesh(m.mesh), matmul_int8_activations=True)
    windows = token_windows(np.random.default_rng(3).integers(3, 320, 2 * 32), 32)
    res = evaluate(m.model, m.params, {"int8": Variant(q, None, kernels=Kernels.for_mesh(m.mesh)),
                                       "int8act": Variant(q, None, kernels=kernels)}, windows, progress=False)
    if not cpu.has_vnni():
        assert res["int8act"].perplexity == res["int8"].perplexity
        return
    assert res["int8act"].perplexity != res["int8"].perplexity and res["int8act"].kl != res["int8"].kl
    assert res["int8act"].perplexity == pytest.approx(res["int8"].perplexity, rel=0.05)


def test_eval_ppl_only_and_int8_activations_flags(tiny_model_dir, tmp_path, capsys):
    """``eval-ppl --only`` scores the matching variants (and the reference) alone; ``--int8-activations``
    without GGUF weights in a compute dtype, or an ``--only`` that matches nothing, is refused."""
    import json

    from jaxinfer.cli import main
    from tests.quantize.text_data import generated_text

    path, _ = tiny_model_dir("llama")
    text = tmp_path / "t.txt"
    text.write_text(generated_text(200))
    out = tmp_path / "r.json"
    base = ["eval-ppl", "--model", str(path), "--kv-cache-dtype", "int8", "--kv-cache-dtype", "fp8", "--text",
            str(text), "--seq-len", "32", "--max-tokens", "64"]
    assert main([*base, "--only", "kv-i*", "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["results"]) == {"float", "kv-int8"}
    capsys.readouterr()
    assert main([*base, "--int8-activations"]) == 2
    assert "--int8-activations needs" in capsys.readouterr().err
    assert main([*base, "--only", "nothing*"]) == 2
    assert "matches no variant" in capsys.readouterr().err
