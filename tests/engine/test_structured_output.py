"""Structured output through the engine on a tiny random model sampled at temperature 1 (where
unconstrained output is garbage): every output parses and validates against its JSON schema (jsonschema),
matches its regex / choice / grammar; unconstrained requests in the same batch are unchanged; preemption
and speculative decoding of the other rows change nothing; bad constraints are refused before queueing."""

import json
import re

import jsonschema
import pytest

from jaxinfer.errors import InvalidRequestError
from jaxinfer.sampling_params import SamplingParams
from tests.engine.test_engine import _engine, _run

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["a", "b"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                               "maxItems": 2}},
     "required": ["ok", "kind", "tags"], "additionalProperties": False},
    {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5}, {"type": "null"}]},
]
REGEX = r"[a-z]{3,6}-[0-9]{2}"
CHOICES = ["positive", "negative", "neutral"]
LARK = 'start: "(" num ("," num)* ")"\nnum: /[0-9]{1,3}/'
GBNF = 'root ::= "<" [xy]+ ">"'
PROMPT = [1, 17, 42, 99, 7]
N = 3


def _constrained(seed_base=0, max_tokens=120):
    reqs = []
    for i, schema in enumerate(SCHEMAS):
        reqs.append((f"json{i}", PROMPT, SamplingParams(n=N, temperature=1.0, seed=seed_base + i, max_tokens=max_tokens,
                                                        structured_outputs={"json": schema})))
    for name, so in [("regex", {"regex": REGEX}), ("choice", {"choice": CHOICES}), ("lark", {"grammar": LARK}),
                     ("gbnf", {"grammar": GBNF})]:
        reqs.append((name, PROMPT, SamplingParams(n=N, temperature=1.0, seed=seed_base + 10, max_tokens=max_tokens,
                                                  structured_outputs=so)))
    return reqs


def _check(out):
    for i, schema in enumerate(SCHEMAS):
        for j in range(N):
            tokens, reason, text = out[f"json{i}"][j]
            assert reason == "stop", (i, j, text)
            jsonschema.validate(json.loads(text), schema)
    for j in range(N):
        assert re.fullmatch(REGEX, out["regex"][j][2])
        assert out["choice"][j][2] in CHOICES
        assert re.fullmatch(r"\((\d{1,3})(,\d{1,3})*\)", out["lark"][j][2])
        assert re.fullmatch(r"<[xy]+>", out["gbnf"][j][2])
        assert all(out[k][j][1] == "stop" for k in ("regex", "choice", "lark", "gbnf"))


@pytest.fixture(scope="module")
def solo(tiny_model_dir):
    """Constrained requests alone, and unconstrained ones alone (references)."""
    eng = _engine(tiny_model_dir, max_model_len=256)
    constrained = _run(eng, _constrained())
    free = _run(eng, [(f"free{i}", [1, 5 + i, 9], SamplingParams(temperature=1.0, seed=50 + i, max_tokens=24))
                      for i in range(4)])
    return constrained, free


def test_outputs_parse_and_validate(solo):
    _check(solo[0])


def test_unconstrained_output_is_garbage(tiny_model_dir):
    """The same requests without the constraint: the model does not produce JSON by itself."""
    eng = _engine(tiny_model_dir, max_model_len=256)
    reqs = [(r, p, SamplingParams(n=N, temperature=1.0, seed=sp.seed, max_tokens=40))
            for r, p, sp in _constrained() if r.startswith("json")]
    out = _run(eng, reqs)
    for r, _, _ in reqs:
        for j in range(N):
            with pytest.raises(ValueError):
                json.loads(out[r][j][2])


def test_mixed_batch_changes_nobody(tiny_model_dir, solo):
    """Constrained and unconstrained requests interleaved in one batch: each output equals its solo run."""
    constrained, free = solo
    eng = _engine(tiny_model_dir, max_model_len=256)
    reqs = _constrained()
    frees = [(f"free{i}", [1, 5 + i, 9], SamplingParams(temperature=1.0, seed=50 + i, max_tokens=24)) for i in range(4)]
    mixed = reqs[:3] + frees[:2] + reqs[3:] + frees[2:]
    out = _run(eng, mixed, arrivals=[0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 6, 7][: len(mixed)])
    assert {k: out[k] for k in free} == free
    assert {k: out[k] for k in constrained} == constrained
    assert len(eng.grammars) == 0 and eng.stats().num_pages_used == 0  # matchers and pages released


def test_preemption_keeps_the_matcher_in_step(tiny_model_dir, solo):
    """Under a page budget that forces preemption (outputs recomputed as prompt), the constrained outputs
    are those of the roomy run and still valid."""
    tight = _engine(tiny_model_dir, max_model_len=256, kv_cache_memory=18 * 8 * 512)  # 18 pages of 8 tokens
    out = _run(tight, _constrained())
    assert tight.stats().num_preemptions > 0
    assert out == solo[0]


def test_speculative_engine_does_not_speculate_constrained_rows(tiny_model_dir, solo):
    """With n-gram speculation on, constrained rows get no drafts (their output equals the plain engine's)
    while an unconstrained repetitive request in the same batch speculates."""
    eng = _engine(tiny_model_dir, max_model_len=256, speculative_method="ngram", num_speculative_tokens=3)
    reqs = _constrained()[:2] + [("rep", [1, 9, 8, 7, 9, 8, 7, 9, 8, 7, 9, 8, 7], SamplingParams(temperature=0,
                                                                                                max_tokens=30))]
    out = _run(eng, reqs)
    assert eng.stats().spec_draft_tokens > 0
    assert out["json0"] == solo[0]["json0"] and out["json1"] == solo[0]["json1"]
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request("x", PROMPT, SamplingParams(structured_outputs={"regex": "a+"}), num_speculative_tokens=2)
    assert e.value.param == "num_speculative_tokens"


@pytest.mark.parametrize("so", [
    {"json": {"type": "frobnicate"}}, {"json": "{not json"}, {"json": [1, 2]}, {"regex": "[a-"},
    {"grammar": "start: undefined_rule"}, {"choice": []}, {"choice": ["a", 3]}, {"regex": "a", "choice": ["a"]},
    {}, {"json_schema": {}}, {"json": {"type": "string", "format": "no-such-format"}},
])
def test_bad_constraints_are_refused(tiny_model_dir, so):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(structured_outputs=so)
    assert e.value.param == "structured_outputs"


def test_grammar_end_stops_even_with_ignore_eos(tiny_model_dir):
    """A complete grammar ends the sequence ("stop") without waiting for EOS, even with ignore_eos."""
    eng = _engine(tiny_model_dir, max_model_len=256)
    out = _run(eng, [("c", PROMPT, SamplingParams(temperature=1.0, seed=1, max_tokens=50, ignore_eos=True,
                                                  structured_outputs={"choice": CHOICES}))])
    tokens, reason, text = out["c"][0]
    assert reason == "stop" and text in CHOICES and len(tokens) < 50


def test_json_object(tiny_model_dir):
    """Any JSON object. Its keys and strings are unbounded, where a random model at temperature 1 rarely
    closes a string, so the quote and closing-brace tokens get a logit_bias (which comes before the mask)."""
    eng = _engine(tiny_model_dir, max_model_len=256)
    vocab = eng.tokenizer.get_vocab()
    bias = {vocab['"']: 6, vocab["}"]: 6}
    out = _run(eng, [("o", PROMPT, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=120, logit_bias=bias,
                                                  structured_outputs={"json_object": True}))])
    for j in range(4):
        tokens, reason, text = out["o"][j]
        assert reason == "stop" and isinstance(json.loads(text), dict), text
