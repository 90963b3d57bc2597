"""Client disconnects abort requests (pages freed); engine failures fail requests with 500 and the
server keeps serving; graceful shutdown finishes or aborts in-flight requests and answers 503."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import openai
import pytest

from tests.serve.conftest import scrape, wait_for
from tests.serve.fake_engine import FakeTokenizer, fake_completion

LONG = {"prompt": "a long one", "max_tokens": 400, "temperature": 0}


def _engine_idle(srv) -> bool:
    m = scrape(srv.http_url)
    return (m["jaxinfer:kv_cache_pages_used"] == 0 and m["jaxinfer:num_requests_running"] == 0
            and m["jaxinfer:num_requests_waiting"] == 0 and srv.async_engine.in_flight == 0)


def _aborted(srv) -> float:
    return scrape(srv.http_url).get("jaxinfer:request_success_total{finished_reason=abort}", 0)


def test_stream_disconnect_aborts_and_frees_pages(make_server):
    srv = make_server({"step_delay": 0.01})
    with httpx.stream("POST", srv.http_url + "/v1/completions", json={**LONG, "stream": True}) as r:
        lines = r.iter_lines()  # keep a reference: closing the iterator closes the connection
        got = 0
        while got < 3:
            got += next(lines).startswith("data: ")
        assert scrape(srv.http_url)["jaxinfer:kv_cache_pages_used"] > 0
    wait_for(lambda: _engine_idle(srv), timeout=3)
    assert _aborted(srv) == 1
    assert srv.fake.step_calls < 300  # it did not run to max_tokens


def _raw_post(url: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


def test_non_stream_disconnect_aborts(make_server):
    srv = make_server({"step_delay": 0.01})
    s = _raw_post(srv.http_url, LONG)
    wait_for(lambda: scrape(srv.http_url)["jaxinfer:num_requests_running"] == 1)
    s.close()
    wait_for(lambda: _engine_idle(srv), timeout=3)
    assert _aborted(srv) == 1


def test_disconnect_while_waiting_leaves_the_queue(make_server):
    srv = make_server({"step_delay": 0.01, "max_num_seqs": 1}, max_waiting_requests=4)
    running = _raw_post(srv.http_url, LONG)
    wait_for(lambda: scrape(srv.http_url)["jaxinfer:num_requests_running"] == 1)
    waiting = _raw_post(srv.http_url, LONG)
    wait_for(lambda: scrape(srv.http_url)["jaxinfer:num_requests_waiting"] == 1)
    waiting.close()
    wait_for(lambda: scrape(srv.http_url)["jaxinfer:num_requests_waiting"] == 0 and srv.async_engine.in_flight == 1)
    running.close()
    wait_for(lambda: _engine_idle(srv), timeout=3)


def test_engine_step_failure_fails_requests_and_keeps_serving(make_server):
    srv = make_server({"step_delay": 0.005})
    client = openai.OpenAI(base_url=srv.http_url + "/v1", api_key="x", max_retries=0)
    # A request whose step fails alone is failed alone (400 request_failed, see test_isolation.py).
    r = httpx.post(srv.http_url + "/v1/completions", json={"prompt": "[fail]", "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_failed"
    # A failure no request explains, that persists: every request in flight gets engine_error, then [DONE].
    other: dict = {}
    t = threading.Thread(target=_collect_stream, args=(srv.http_url, LONG, other))
    t.start()
    wait_for(lambda: srv.async_engine.in_flight == 1)
    with httpx.stream("POST", srv.http_url + "/v1/completions", json={**LONG, "stream": True}) as resp:
        events = []
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2:
                    srv.fake.fail_next_steps = 50
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_error"
    assert json.loads(events[-2])["error"]["type"] == "internal_error"
    t.join(30)
    assert json.loads(other["events"][-2])["error"]["code"] == "engine_error"
    srv.fake.fail_next_steps = 0
    # One failed step that a retry does not repeat (transient): nobody fails.
    with httpx.stream("POST", srv.http_url + "/v1/completions", json={**LONG, "max_tokens": 40,
                                                                      "stream": True}) as resp:
        events = []
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2:
                    srv.fake.fail_next_steps = 1
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    with pytest.raises(openai.APIError):
        list(client.completions.create(model="fake-model", prompt="[fail]", max_tokens=4, stream=True))
    # Still serving, still healthy, nothing left behind.
    p = "fine again"
    out = client.completions.create(model="fake-model", prompt=p, max_tokens=6, temperature=0)
    assert out.choices[0].text == fake_completion(FakeTokenizer()(p)["input_ids"], 6)
    wait_for(lambda: httpx.get(srv.http_url + "/health").status_code == 200)
    wait_for(lambda: _engine_idle(srv))
    m = scrape(srv.http_url)
    assert m["jaxinfer:request_errors_total{status=500}"] == 2
    assert m["jaxinfer:request_errors_total{status=400}"] == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected crash
def test_engine_thread_death_fails_fast(make_server):
    srv = make_server({"step_delay": 0.01})
    result: dict = {}
    t = threading.Thread(target=_collect_stream, args=(srv.http_url, LONG, result))
    t.start()
    wait_for(lambda: srv.async_engine.in_flight == 1)
    srv.fake.crash = True
    t.join(30)
    assert json.loads(result["events"][-2])["choices"][0]["finish_reason"] == "abort"
    r = httpx.post(srv.http_url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
    assert r.status_code == 503
    assert httpx.get(srv.http_url + "/health").json()["status"] == "unhealthy"


def _collect_stream(url: str, body: dict, out: dict) -> None:
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        out["status"] = r.status_code
        out["events"] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def test_graceful_shutdown_finishes_in_flight_and_refuses_new(make_server):
    srv = make_server({"step_delay": 0.01}, shutdown_grace_s=20)
    result: dict = {}
    t = threading.Thread(target=_collect_stream, args=(srv.http_url, {"prompt": "p", "max_tokens": 60,
                                                                      "temperature": 0}, result))
    t.start()
    wait_for(lambda: srv.async_engine.in_flight == 1)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    wait_for(lambda: srv.async_engine.draining)
    r = httpx.post(srv.http_url + "/v1/completions", json={"prompt": "late", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert httpx.get(srv.http_url + "/health").status_code == 503
    t.join(30)
    stopper.join(30)
    assert result["status"] == 200 and result["events"][-1] == "[DONE]"
    chunks = [json.loads(e) for e in result["events"][:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == fake_completion(FakeTokenizer()("p")["input_ids"], 60)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_shutdown_aborts_after_grace(make_server):
    srv = make_server({"step_delay": 0.01}, shutdown_grace_s=0.3)
    result: dict = {}
    t = threading.Thread(target=_collect_stream, args=(srv.http_url, LONG, result))
    t.start()
    wait_for(lambda: srv.async_engine.in_flight == 1)
    srv.stop()
    t.join(30)
    assert result["events"][-1] == "[DONE]"
    assert json.loads(result["events"][-2])["choices"][0]["finish_reason"] == "abort"
    assert not srv.fake.has_unfinished_requests() or srv.fake.stats().num_running == 0
