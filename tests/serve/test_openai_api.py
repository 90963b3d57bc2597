"""The OpenAI API over a FakeEngine, driven by the official ``openai`` client and raw SSE."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.serve.fake_engine import FakeTokenizer, fake_completion

TOK = FakeTokenizer()


def ids(text: str) -> list[int]:
    return TOK(text)["input_ids"]


def chat_ids(messages, add_generation_prompt=True) -> list[int]:
    return ids(TOK.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))


@pytest.fixture(scope="module")
def client(fake_server):
    return openai.OpenAI(base_url=fake_server.http_url + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(fake_server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert client.models.retrieve("fake-model").id == "fake-model"
    r = httpx.get(fake_server.http_url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_completion_greedy(client):
    r = client.completions.create(model="fake-model", prompt="Hello there", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == "fake-model"
    assert r.choices[0].text == fake_completion(ids("Hello there"), 12)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 12, 23)


def test_completion_default_max_tokens_is_16(client):
    r = client.completions.create(model="fake-model", prompt="abc", temperature=0)
    assert r.usage.completion_tokens == 16


def test_completion_stream_equals_non_stream(client):
    full = client.completions.create(model="fake-model", prompt="stream me", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="fake-model", prompt="stream me", max_tokens=20, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_chat_greedy_and_stream(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="fake-model", messages=msgs, max_tokens=10, temperature=0)
    expected = fake_completion(chat_ids(msgs), 10)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(chat_ids(msgs))
    chunks = list(client.chat.completions.create(model="fake-model", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]


def test_chat_max_completion_tokens_and_content_parts(client):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    r = client.chat.completions.create(model="fake-model", messages=msgs, max_completion_tokens=5, max_tokens=50,
                                       temperature=0)
    assert r.choices[0].message.content == fake_completion(chat_ids([{"role": "user", "content": "ab"}]), 5)


def test_chat_default_max_tokens_fills_context(make_server):
    srv = make_server({"max_model_len": 64})
    c = openai.OpenAI(base_url=srv.http_url + "/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "x"}]
    r = c.chat.completions.create(model="fake-model", messages=msgs, temperature=0)
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 64
    assert r.choices[0].finish_reason == "length"


def test_n_and_seed(client):
    kw = dict(model="fake-model", prompt="sample", max_tokens=8, temperature=0.8, n=3, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same samples
    assert len({c.text for c in a.choices}) == 3
    assert a.usage.completion_tokens == 24
    chunks = list(client.completions.create(stream=True, **kw))
    texts = ["", "", ""]
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in a.choices]


def test_batched_prompts(client):
    r = client.completions.create(model="fake-model", prompt=["one", "two"], max_tokens=4, n=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == fake_completion(ids("one"), 4)
    assert r.choices[2].text == r.choices[3].text == fake_completion(ids("two"), 4)
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 16


def test_token_id_prompt_and_echo(client):
    p = ids("tokens!")
    r = client.completions.create(model="fake-model", prompt=p, max_tokens=6, temperature=0)
    assert r.choices[0].text == fake_completion(p, 6)
    r = client.completions.create(model="fake-model", prompt="echo:", max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text == "echo:" + fake_completion(ids("echo:"), 3)


def test_stop_strings_and_stop_token_ids(client):
    full = fake_completion(ids("stops"), 30)
    stop = full[7:9]
    r = client.completions.create(model="fake-model", prompt="stops", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == stop
    chunks = list(client.completions.create(model="fake-model", prompt="stops", max_tokens=30, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]
    r = client.completions.create(model="fake-model", prompt="stops", max_tokens=30, temperature=0,
                                  extra_body={"stop_token_ids": [32]})
    assert r.choices[0].text == full[:4] and r.choices[0].model_extra["stop_reason"] == 32


def test_eos_and_ignore_eos(client):
    r = client.completions.create(model="fake-model", prompt="[eos:3]", max_tokens=10, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 3
    r = client.completions.create(model="fake-model", prompt="[eos:3]", max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10


def test_completion_logprobs(client):
    r = client.completions.create(model="fake-model", prompt="lp", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs == [-0.25] * 5
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset == [0, 1, 2, 3, 4]
    chunks = list(client.completions.create(model="fake-model", prompt="lp", max_tokens=5, temperature=0,
                                            logprobs=0, stream=True))
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert offsets == [0, 1, 2, 3, 4]


def test_chat_logprobs(client):
    msgs = [{"role": "user", "content": "lp"}]
    r = client.chat.completions.create(model="fake-model", messages=msgs, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob for t in content)
    assert content[0].bytes == list(content[0].token.encode())
    r = client.chat.completions.create(model="fake-model", messages=msgs, max_tokens=4, temperature=0)
    assert r.choices[0].logprobs is None


def test_raw_sse_format(fake_server):
    body = {"model": "fake-model", "prompt": "raw", "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", fake_server.http_url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == fake_completion(ids("raw"), 3)


def test_model_may_be_omitted(fake_server):
    r = httpx.post(fake_server.http_url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "fake-model"
