"""lm-evaluation-harness (``local-completions``) against a real ``jaxinfer serve`` on a tiny random model,
and the echo / prompt-logprobs API it relies on.

The server runs as its own process (``python -m jaxinfer.cli serve``). lm-eval tokenizes with the model's
own tokenizer directory (no hub) and sends token ids: loglikelihood requests as ``echo: true,
logprobs: 1, max_tokens: 1``, generation requests with ``stop``. The scores are checked against an
offline computation: loglikelihoods and greediness from HF transformers' float64 ``log_softmax`` on the
same model (tolerance 1e-4 per token, 1e-3 per summed continuation), generations from ``LLM.generate``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import grpc
import httpx
import numpy as np
import openai
import pytest
import torch

from jaxinfer.sampling_params import SamplingParams
from serve.protos import jaxinfer_pb2 as pb
from serve.protos import jaxinfer_pb2_grpc as pb_grpc

ENGINE_ARGS = [
    "--max-model-len",
    "256",
    "--max-num-seqs",
    "4",
    "--max-num-batched-tokens",
    "64",
    "--min-token-bucket",
    "16",
    "--dtype",
    "float32",
]
TOL = 1e-4


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """``jaxinfer serve`` on the tiny llama model: ``(http base url, grpc target, model dir, hf model)``."""
    path, hf = tiny_model_dir("llama")
    cmd = [
        sys.executable,
        "-m",
        "jaxinfer.cli",
        "serve",
        "--model",
        str(path),
        "--served-model-name",
        "tiny",
        "--port",
        "0",
        "--grpc-port",
        "0",
        *ENGINE_ARGS,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    lines, found = [], {}

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "OpenAI-compatible API on " in line:
                found["http"] = line.split(" on ", 1)[1].strip().removesuffix("/v1")
            if "gRPC on " in line:
                found["grpc"] = line.split(" on ", 1)[1].strip()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for _ in range(6000):
            if len(found) == 2 or proc.poll() is not None:
                break
            threading.Event().wait(0.1)
        assert len(found) == 2, "server did not start:\n" + "".join(lines[-30:])
        yield found["http"], found["grpc"], path, hf
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _log_softmax(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ---- the API lm-eval relies on -------------------------------------------------------------------------
def test_echo_logprobs_cover_prompt_and_completion(served):
    url, _, path, hf = served
    tok = _tokenizer(path)
    ids = tok("Paris is the capital of France; Berlin is", add_special_tokens=False).input_ids
    ref = _log_softmax(hf, ids)
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    only = c.completions.create(model="tiny", prompt=ids, echo=True, logprobs=3, max_tokens=0, temperature=0)
    one = c.completions.create(model="tiny", prompt=ids, echo=True, logprobs=3, max_tokens=1, temperature=0)
    ch = only.choices[0]
    assert ch.text == tok.decode(ids) and ch.finish_reason == "length" and only.usage.completion_tokens == 0
    lp = ch.logprobs
    assert lp.tokens == [tok.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    np.testing.assert_allclose(lp.token_logprobs[1:], [ref[j - 1, ids[j]] for j in range(1, len(ids))], atol=TOL)
    for j in range(1, len(ids)):
        best = np.argsort(-ref[j - 1])[:3]
        want = {}  # text -> best logprob (tokens of one text share a key)
        for t in best:
            want.setdefault(tok.decode([int(t)]), ref[j - 1, t])
        assert lp.top_logprobs[j].keys() == want.keys()
        assert list(lp.top_logprobs[j].values()) == pytest.approx(list(want.values()), abs=TOL)
    assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
    # max_tokens 1: the same prompt part, then the greedy token scored at the last prompt position
    lp1 = one.choices[0].logprobs
    nxt = int(np.argmax(ref[-1]))
    assert lp1.token_logprobs[: len(ids)] == lp.token_logprobs and lp1.tokens[-1] == tok.decode([nxt])
    assert lp1.token_logprobs[-1] == pytest.approx(ref[-1, nxt], abs=TOL)
    assert one.choices[0].text == tok.decode(ids) + tok.decode([nxt]) and one.usage.completion_tokens == 1
    # streamed: the same text and logprobs
    chunks = list(
        c.completions.create(model="tiny", prompt=ids, echo=True, logprobs=3, max_tokens=1, temperature=0, stream=True)
    )
    assert "".join(k.choices[0].text for k in chunks) == one.choices[0].text
    streamed = [v for k in chunks if k.choices[0].logprobs for v in k.choices[0].logprobs.token_logprobs]
    assert streamed == lp1.token_logprobs


def test_vllm_prompt_logprobs_field_and_grpc(served):
    url, target, path, hf = served
    ids = _tokenizer(path)("The quick brown fox jumps", add_special_tokens=False).input_ids
    ref = _log_softmax(hf, ids)
    r = httpx.post(
        url + "/v1/completions",
        json={"prompt": ids, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2},
        timeout=300,
    ).json()
    pl = r["choices"][0]["prompt_logprobs"]
    assert pl[0] is None and len(pl) == len(ids) and r["choices"][0]["logprobs"] is None
    for j in range(1, len(ids)):
        e = pl[j]
        assert next(iter(e)) == str(ids[j]) and len(e) in (2, 3)
        for t, v in e.items():
            assert v["logprob"] == pytest.approx(ref[j - 1, int(t)], abs=TOL)
        # vLLM's rank: 1 + the tokens more likely than this one (HF float64; near-ties within TOL either way)
        lp = ref[j - 1, ids[j]]
        assert 1 + np.sum(ref[j - 1] > lp + TOL) <= e[str(ids[j])]["rank"] <= 1 + np.sum(ref[j - 1] > lp - TOL)
        alts = sorted((t for t in e if t != str(ids[j]) or len(e) == 2), key=lambda t: -e[t]["logprob"])
        assert [e[t]["rank"] for t in alts] == list(range(1, len(alts) + 1))
    bad = httpx.post(url + "/v1/completions", json={"prompt": ids, "prompt_logprobs": 21}, timeout=300)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt_logprobs"
    zero = httpx.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": 0}, timeout=300)
    assert zero.status_code == 400 and zero.json()["error"]["param"] == "max_tokens"
    with grpc.insecure_channel(target) as ch:
        req = pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParameters(max_tokens=2, prompt_logprobs=1)
        )
        msgs = list(pb_grpc.InferenceStub(ch).Generate(req, timeout=300))
    scored = [m.prompt_logprobs for m in msgs if m.prompt_logprobs]
    assert len(scored) == 1 and [p.token_id for p in scored[0]] == ids[1:]
    np.testing.assert_allclose(
        [p.logprob for p in scored[0]], [ref[j - 1, ids[j]] for j in range(1, len(ids))], atol=TOL
    )
    assert all(len(p.top) == 1 and p.top[0].token_id == int(np.argmax(ref[j])) for j, p in enumerate(scored[0]))


def test_chat_prompt_logprobs(served):
    """vLLM's ``prompt_logprobs`` on /v1/chat/completions: one top-level list over the templated prompt
    (tokens from HF's ``apply_chat_template``, logprobs from HF transformers)."""
    url, _, path, hf = served
    messages = [{"role": "user", "content": "The quick brown fox"}]
    ids = _tokenizer(path).apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    ref = _log_softmax(hf, ids)
    r = httpx.post(url + "/v1/chat/completions", timeout=300,
                   json={"messages": messages, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 1}).json()
    pl = r["prompt_logprobs"]
    assert "prompt_logprobs" not in r["choices"][0] and r["usage"]["prompt_tokens"] == len(ids)
    assert pl[0] is None and [int(next(iter(e))) for e in pl[1:]] == ids[1:]
    for j in range(1, len(ids)):
        for t, v in pl[j].items():
            assert v["logprob"] == pytest.approx(ref[j - 1, int(t)], abs=TOL)
        assert str(int(np.argmax(ref[j - 1]))) in pl[j]  # the best alternative
    bad = httpx.post(url + "/v1/chat/completions", timeout=300,
                     json={"messages": messages, "prompt_logprobs": 1, "stream": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt_logprobs"


# ---- lm-eval against the server ------------------------------------------------------------------------
MC_ROWS = [
    {
        "question": "The quick brown fox jumps over the",
        "choices": [" lazy dog.", " capital of France.", " 1, 2"],
        "answer": 0,
    },
    {"question": "Paris is the capital of", "choices": [" Germany", " France", " TPUs and GPUs"], "answer": 1},
    {
        "question": "JAX and Pallas compile programs for",
        "choices": [" the dog", " a time", " TPUs and GPUs."],
        "answer": 2,
    },
    {"question": "Once upon a time there was a small", "choices": [" language model", " fox", " Berlin"], "answer": 0},
    {"question": "Berlin is the capital of", "choices": [" Germany.", " France.", " JAX."], "answer": 0},
]
GEN_PROMPTS = ["The quick brown fox", "Paris is the capital", "JAX and Pallas", "Once upon a time there", "Berlin is"]
MAX_GEN = 8


def _write_tasks(root, gen_targets):
    mc, gen = root / "mc.json", root / "gen.json"
    mc.write_text("\n".join(json.dumps(r) for r in MC_ROWS))
    gen.write_text("\n".join(json.dumps({"prompt": p, "target": t}) for p, t in zip(GEN_PROMPTS, gen_targets)))
    (root / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (root / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {MAX_GEN}
  do_sample: false
metric_list:
  - metric: exact_match
""")


def _reference_loglikelihood(hf, tok, context, continuation):
    """lm-eval's split of ``context + continuation`` into tokens, scored by HF: ``(sum logprob, is_greedy)``."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = len(tok(context, add_special_tokens=False).input_ids)
    lp = _log_softmax(hf, whole)
    cont = whole[ctx:]
    rows = lp[ctx - 1 : len(whole) - 1]
    return float(sum(rows[j, t] for j, t in enumerate(cont))), all(
        int(np.argmax(rows[j])) == t for j, t in enumerate(cont)
    )


def test_lm_eval_local_completions(served, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from jaxinfer import LLM

    url, _, path, hf = served
    tok = _tokenizer(path)
    # offline greedy generations; half of the targets are set to them so exact_match is 0.6, not 0 or 1
    llm = LLM(str(path), max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, min_token_bucket=16)
    gen_ids = [tok(p, add_special_tokens=False).input_ids for p in GEN_PROMPTS]
    greedy = SamplingParams(max_tokens=MAX_GEN, temperature=0, stop=["\n"])
    offline = [o.outputs[0].text for o in llm.generate(gen_ids, greedy)]
    targets = [t if i % 2 == 0 else "no such answer" for i, t in enumerate(offline)]
    _write_tasks(tmp_path, targets)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_args = (
        f"model=tiny,base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={path},"
        "tokenized_requests=True,max_length=256,num_concurrent=1,max_retries=1"
    )
    res = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=["tiny_mc", "tiny_gen"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
        batch_size=1,
    )
    # multiple choice: every (context, choice) loglikelihood and the accuracy from them
    correct = []
    for s in res["samples"]["tiny_mc"]:
        lls = []
        for args, resp in zip(s["arguments"], s["resps"]):
            ctx, cont = _arg_pair(args)
            ll, greedy_ref = _reference_loglikelihood(hf, tok, ctx, cont)
            got_ll, got_greedy = resp[0]
            assert got_ll == pytest.approx(ll, abs=1e-3) and bool(got_greedy) == greedy_ref, (ctx, cont)
            lls.append(ll)
        correct.append(int(np.argmax(lls)) == s["doc"]["answer"])
    assert len(correct) == len(MC_ROWS)
    assert res["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))
    # generate_until: the server's greedy text equals LLM.generate's
    by_prompt = {s["doc"]["prompt"]: s["resps"][0][0] for s in res["samples"]["tiny_gen"]}
    assert [by_prompt[p] for p in GEN_PROMPTS] == offline
    assert res["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(0.6)


def _arg_pair(args):
    """A logged ``(context, continuation)`` (a tuple or lm-eval's ``{"gen_args_0": {"arg_0", "arg_1"}}``)."""
    if isinstance(args, dict):
        return args["arg_0"], args["arg_1"]
    return args[0], args[1]
