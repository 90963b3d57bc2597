"""EAGLE speculative decoding through the engine on tiny random models, at both extremes of head quality:

* a random head (``init_eagle_head``, reduced draft vocabulary): nearly every draft is rejected;
* an exact head: the target is a one-layer model whose attention output is zeroed (its next token depends
  on the current token only), and the head is that layer with ``fc`` passing the token embedding through
  and the target's norm and LM head, so its feature equals the target's hidden state and every draft is
  accepted.

Greedy output equals plain decoding under staggered arrivals, chunked prefill, prefix-cache hits and
preemption; the engine's drafts equal those of the dense reference head (``eagle_forward_dense``) fed
with HF transformers' hidden states; acceptance bookkeeping, per-request proposers, no compilation after
warm-up and the refusal of a head trained for another target. The sampled-distribution check is
tests/engine/test_speculative_distribution.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxinfer.config import EngineConfig
from jaxinfer.engine import Engine
from jaxinfer.errors import InvalidRequestError, UnsupportedModelError
from jaxinfer.loader import load_model
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.speculative.eagle_dense import eagle_forward_dense
from jaxinfer.speculative.eagle_head import EagleHeadConfig, init_eagle_head, save_eagle_head
from tests.engine.test_engine import GREEDY, _loaded, _run, count_compilations
from tests.engine.test_speculative_engine import CFG, PAGES, _run_k, _workload
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def eagle(tiny_model_dir, tmp_path_factory):
    """``{"path", "hf", "target", "head", "exact_target", "exact_head", "root"}``."""
    path, hf = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("eagle")
    target = _loaded(path)
    v = target.config.vocab_size
    draft_vocab = np.random.default_rng(0).permutation(v)[: v // 2]  # ids outside it have q = 0
    cfg, params = init_eagle_head(jax.random.key(0), target.config, draft_vocab, target_model=str(path))
    save_eagle_head(root / "random.safetensors", cfg, params, {"note": "random"}, dtype="float32")

    make_tiny_model("llama", root / "bigram", num_hidden_layers=1)
    exact = load_model(str(root / "bigram"))
    p = dict(exact.params)
    layer = jax.tree.map(lambda a: a, p["layers_0"])
    layer["self_attn"]["o_proj"]["kernel"] = jnp.zeros_like(layer["self_attn"]["o_proj"]["kernel"])
    p["layers_0"] = layer
    exact = dataclasses.replace(exact, params=p)
    d = exact.config.hidden_size
    hcfg = EagleHeadConfig.from_target(exact.config, None, str(root / "bigram"))
    head = {"fc": {"kernel": jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))]), "bias": jnp.zeros(d)},
            "layer": layer, "norm": p["norm"], "lm_head": p["lm_head"], "d2t": jnp.arange(v)}
    save_eagle_head(root / "exact.safetensors", hcfg, head, {"note": "exact"}, dtype="float32")
    return {"path": path, "hf": hf, "target": target, "head": str(root / "random.safetensors"),
            "exact_target": exact, "exact_head": str(root / "exact.safetensors"), "root": root}


def _engine(target, method=None, head=None, **kw):
    """``PAGES`` pages whatever the model (256 B per token and layer; the head has one layer)."""
    memory = PAGES * CFG["page_size"] * 256 * (target.config.num_layers + (1 if method else 0))
    kw.setdefault("eagle_draft_threshold", 0.0)  # full chains unless a test asks for the early stop
    cfg = EngineConfig(**{**CFG, "kv_cache_memory": memory, **kw}, speculative_method=method,
                       speculative_model=head)
    return Engine(target, cfg)


@pytest.mark.parametrize("which", ["random", "exact"])
def test_greedy_eagle_equals_plain(eagle, which):
    """Mixed continuous batching under page pressure: preemption, prefix-cache hits, chunked prefill."""
    target = eagle["target"] if which == "random" else eagle["exact_target"]
    head = eagle["head"] if which == "random" else eagle["exact_head"]
    reqs, ks, arrivals = _workload(16, seed=1)
    plain = _run(_engine(target), reqs, arrivals)
    for method in ["eagle", "ngram+eagle"] if which == "random" else ["eagle"]:
        eng = _engine(target, method, head)
        out = _run_k(eng, reqs, ks, arrivals)
        for rid, _, sp in reqs:
            assert out[rid][0][0] == plain[rid][0][0], (method, rid)
            assert len(out[rid][0][0]) == sp.max_tokens
        st = eng.stats()
        assert st.num_pages_used == 0 and st.num_preemptions > 0 and st.prefix_cache_hits > 0
        assert st.spec_verified > 0 and st.spec_draft_tokens >= st.spec_verified
        if which == "exact":
            assert st.spec_accepted_tokens == st.spec_draft_tokens
        else:
            assert st.spec_accepted_tokens < 0.2 * st.spec_draft_tokens
        assert st.spec_mean_acceptance_length == 1 + st.spec_accepted_tokens / st.spec_verified


def _hf_hidden(hf, tokens: list[int]) -> np.ndarray:
    """The last decoder layer's output before the final norm, ``[T, D]`` (float64 copy)."""
    got = {}
    hook = hf.model.layers[-1].register_forward_hook(lambda m, i, o: got.setdefault("h", o[0] if isinstance(
        o, tuple) else o))
    try:
        with torch.no_grad():
            hf(torch.tensor([tokens]))
    finally:
        hook.remove()
    return got["h"][0].double().numpy()


@pytest.mark.parametrize("threshold", [0.0, 0.002])  # the random head: ~0.05 / 0.002 / 1e-4 after 1 / 2 / 3
def test_engine_drafts_equal_dense_reference(eagle, threshold):
    """The paged head (catch-up over chunked prefill and verify steps, k-step drafting in one device call)
    proposes what the dense reference head proposes from HF's hidden states of the same history. With an
    early-stop threshold the proposal ends after the first draft at which the product of the reference's
    draft probabilities (softmax maximum, float64) falls under it; greedy output still equals plain decoding."""
    from jaxinfer.speculative.eagle_head import load_eagle_head

    eng = _engine(eagle["target"], "eagle", eagle["head"], enable_prefix_caching=False,
                  eagle_draft_threshold=threshold)
    hcfg, hp = load_eagle_head(eagle["head"])
    hp = jax.tree.map(jnp.asarray, hp)
    table = eagle["target"].params["embed_tokens"]
    records = []
    propose = eng.spec.propose

    def spy(rows, infos):
        ks = eng.spec._plan(rows)
        drafts = propose(rows, infos)
        records.extend((list(r.seq.all_token_ids), r.start, d, k) for r, d, k in zip(rows, drafts, ks) if d)
        return drafts

    eng.spec.propose = spy
    rng = np.random.default_rng(3)
    reqs = [(f"d{i}", [1] + rng.integers(3, 300, size=n).tolist(), SamplingParams(max_tokens=12, **GREEDY))
            for i, n in enumerate([45, 5, 20])]
    out = _run(eng, reqs, [0, 1, 3])
    assert out == _run(_engine(eagle["target"]), reqs, [0, 1, 3])
    assert len(records) >= 10
    d2t = np.asarray(hp["d2t"])
    width = 96  # right padding is harmless (causal): one compiled reference for every history
    dense = jax.jit(lambda t, h, p: eagle_forward_dense(hp, hcfg, table, t, h, p))
    lengths = []
    for toks, c, drafts, k in records:
        h = _hf_hidden(eagle["hf"], toks[:c])  # the target's h_0 .. h_{c-1}
        seq_t = np.zeros((1, width), np.int32)
        seq_h = np.zeros((1, width, h.shape[1]), np.float32)
        seq_t[0, :c] = toks[1 : c + 1]
        seq_h[0, :c] = h
        want, cum = [], 1.0
        for j in range(k):
            f, lg, _ = dense(seq_t, seq_h, np.arange(1, width + 1, dtype=np.int32)[None])
            row = np.asarray(lg[0, c + j - 1], np.float64)
            want.append(int(d2t[int(np.argmax(row))]))
            cum *= 1.0 / np.exp(row - row.max()).sum()
            if cum < threshold:
                assert abs(cum / threshold - 1) > 1e-3, "too close to the threshold to compare"
                break
            seq_t[0, c + j] = want[-1]
            seq_h[0, c + j] = np.asarray(f[0, c + j - 1])
        assert drafts == want, (c, drafts, want)
        lengths.append((len(drafts), k))
    if threshold == 0:
        assert all(n == k for n, k in lengths)
    else:  # some proposals stopped early, some went on past the first draft
        assert any(n < k for n, k in lengths) and any(n > 1 for n, _ in lengths), lengths


def test_acceptance_bookkeeping_and_per_request_proposer(eagle):
    eng = _engine(eagle["exact_target"], "ngram+eagle", eagle["exact_head"])
    prompt = [1, 5, 6, 7, 5, 6, 7, 5, 6]
    sp = SamplingParams(max_tokens=20, **GREEDY)
    eng.add_request("a", prompt, sp, num_speculative_tokens=3, speculative_method="eagle")
    eng.add_request("b", prompt, sp, num_speculative_tokens=0)
    eng.add_request("c", prompt, sp, speculative_method="ngram")
    with pytest.raises(InvalidRequestError, match="speculative_method"):
        eng.add_request("x", prompt, sp, speculative_method="draft")
    with pytest.raises(InvalidRequestError, match="speculative_method"):
        _engine(eagle["exact_target"]).add_request("y", prompt, sp, speculative_method="eagle")
    final, tokens = {}, {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
            if out.finished:
                final[out.request_id] = out.metrics
    a, b, c = final["a"], final["b"], final["c"]
    assert tokens["a"] == tokens["b"] == tokens["c"]
    assert b.num_spec_steps == b.num_draft_tokens == 0
    assert a.num_accepted_tokens == a.num_draft_tokens > 0 and a.num_draft_tokens <= 3 * a.num_spec_steps
    assert a.num_accepted_tokens + a.num_spec_steps == 19  # each verify step yields accepted + 1
    assert 0 < c.num_accepted_tokens <= c.num_draft_tokens  # n-gram lookup follows the prompt's cycle
    st = eng.stats()
    assert st.spec_draft_tokens == a.num_draft_tokens + c.num_draft_tokens
    assert st.spec_verified == a.num_spec_steps + c.num_spec_steps


def test_no_compilation_after_warmup_with_eagle(eagle):
    eng = _engine(eagle["target"], "ngram+eagle", eagle["head"])
    eng.warmup()
    rng = np.random.default_rng(7)
    reqs = []
    for i in range(10):
        sp = dict(max_tokens=int(rng.integers(1, 25)), seed=i)
        if i % 3 == 0:
            sp.update(temperature=0)
        elif i % 3 == 1:
            sp.update(temperature=0.8, top_k=5, top_p=0.9, logprobs=2)
        else:
            sp.update(temperature=0.7, n=2, min_tokens=3)
        block = rng.integers(3, 300, size=3).tolist()
        reqs.append((f"q{i}", [1] + block * int(rng.integers(1, 20)), SamplingParams(**sp)))
    arrivals = sorted(rng.integers(0, 10, size=len(reqs)).tolist())
    with count_compilations() as events:
        out = _run(eng, reqs, arrivals)
    assert len(out) == len(reqs) and events == []
    assert eng.stats().spec_verified > 0


def test_head_for_another_target_is_refused(eagle, tiny_model_dir):
    other, _ = tiny_model_dir("llama_mha_tied")  # other shapes (4 KV heads)
    with pytest.raises(UnsupportedModelError, match="num_kv_heads"):
        _engine(_loaded(other), "eagle", eagle["head"])
    with pytest.raises(UnsupportedModelError, match="bigram"):  # same shapes, another model's name
        _engine(eagle["target"], "eagle", eagle["exact_head"])
    with pytest.raises(ValueError, match="no EAGLE head is shipped"):
        _engine(eagle["target"], "eagle")
    with pytest.raises(FileNotFoundError):
        _engine(eagle["target"], "eagle", str(eagle["root"] / "missing.safetensors"))


def test_vllm_style_speculative_config():
    from jaxinfer.llm import _speculative_options

    assert _speculative_options({"method": "eagle", "model": "h.safetensors", "num_speculative_tokens": 4}, {}) == {
        "speculative_method": "eagle", "speculative_model": "h.safetensors", "num_speculative_tokens": 4}
    assert _speculative_options({"method": "ngram", "prompt_lookup_min": 2}, {}) == {
        "speculative_method": "ngram", "ngram_min": 2}
    with pytest.raises(ValueError, match="unknown key"):
        _speculative_options({"draft_tensor_parallel_size": 1}, {})
    with pytest.raises(ValueError, match="conflicts"):
        _speculative_options({"method": "eagle"}, {"speculative_method": "ngram"})
    assert EngineConfig(speculative_method="ngram+eagle", speculative_model="h.safetensors").speculative_model


def test_default_model_shipped_head_greedy_equals_plain(default_llm):
    """``speculative_method="eagle"`` without a head file uses the head shipped for the default model."""
    from jaxinfer.tokenizer import encode_chat

    ids = encode_chat(default_llm.tokenizer, [{"role": "user", "content": "Why do cats purr?"}])
    cfg = dict(max_model_len=128, max_num_seqs=2, max_num_batched_tokens=32, page_size=16, min_token_bucket=8)
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    reqs = [("a", ids, sp), ("b", ids[:-2], sp)]
    plain = _run(Engine(default_llm.loaded, EngineConfig(**cfg)), reqs)
    eng = Engine(default_llm.loaded, EngineConfig(**cfg, speculative_method="eagle", num_speculative_tokens=3))
    out = _run(eng, reqs)
    assert {r: v[0][0] for r, v in out.items()} == {r: v[0][0] for r, v in plain.items()}
    st = eng.stats()
    assert st.spec_verified > 0 and st.spec_accepted_tokens > 0  # the trained head gets some drafts right
