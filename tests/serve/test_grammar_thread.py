"""A slow output constraint (a JSON schema that takes seconds to validate and compile) is prepared in the
server's grammar thread, not on the engine thread or the event loop: another client's tokens keep coming
while it compiles (issue 25), and a constraint over the time limit is a 400."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from jaxinfer.config import EngineConfig
from jaxinfer.engine import Engine
from jaxinfer.loader import load_model
from jaxinfer.structured_output import StructuredOutputsParams
from serve.limits import RequestLimits
from serve.server import ServerOptions, ServerThread
from tests.tiny_models import make_tiny_model


# thousands of required properties with patterns: seconds of llguidance work (validation + compilation)
def _schema(n: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{3,8}[0-9]{2}"}
                                             for i in range(n)}, "required": [f"p{i}" for i in range(n)]}


SLOW = _schema(5000)


def _slow_schema(engine) -> tuple[dict, float]:
    """A schema whose validation + compilation costs over 1 s on this machine now, and that cost: the size
    doubles from 5,000 properties until it does (a quiet machine compiles 5,000 in about 1 s)."""
    cost = 0.0
    for n in (5000, 10000, 20000, 40000):
        schema = _schema(n)
        t = time.perf_counter()
        engine.grammars.compile(StructuredOutputsParams(json=schema))
        cost = time.perf_counter() - t
        if cost > 1.0:
            return schema, cost
    pytest.fail(f"no schema up to 40,000 properties took over 1 s to compile (last: {cost:.2f} s)")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    path = tmp_path_factory.mktemp("grammar_model") / "qwen2"
    make_tiny_model("qwen2", path, max_position_embeddings=1024)
    engine = Engine(load_model(str(path)), EngineConfig(max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=128,
                                                        page_size=16))
    server = ServerThread(engine, ServerOptions(port=0), max_num_seqs=8, max_waiting_requests=64).start()
    server.engine = engine
    yield server
    server.stop()


def _stream_chunks(url: str, stop: threading.Event, gaps: list, window: list) -> None:
    """Streamed greedy completions one after another until ``stop``; the gaps between a stream's chunks that
    arrived while ``window`` (start, end) was open."""
    body = {"prompt": "The quick brown fox", "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120) as c:
        while not stop.is_set():
            last = None
            with c.stream("POST", url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    now = time.perf_counter()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    if last is not None and window and window[0] <= now and (len(window) == 1 or last <= window[1]):
                        gaps.append(now - last)
                    last = now
                    if stop.is_set():
                        break


def test_slow_schema_does_not_delay_another_clients_tokens(srv):
    # reference: what the constraint costs, measured directly (validation + llguidance compilation)
    slow, cost = _slow_schema(srv.engine)
    stop, gaps, window = threading.Event(), [], []
    victim = threading.Thread(target=_stream_chunks, args=(srv.http_url, stop, gaps, window))
    victim.start()
    try:
        time.sleep(1.0)  # the victim streams
        for _ in range(2):  # the step shapes of a constrained row beside the victim's are compiled (XLA) first
            w = httpx.post(srv.http_url + "/v1/completions", timeout=120, json={
                "prompt": "{", "max_tokens": 12, "temperature": 0, "guided_json": {"type": "object"}})
            assert w.status_code == 200, w.text
        window.append(time.perf_counter())
        r = httpx.post(srv.http_url + "/v1/completions", timeout=120, json={
            "prompt": "{", "max_tokens": 12, "temperature": 0, "response_format": {
                "type": "json_schema", "json_schema": {"name": "slow", "schema": slow}}})
        window.append(time.perf_counter())
    finally:
        stop.set()
        victim.join(120)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert text.startswith('{"p0":"') or '{"p0":"'.startswith(text), text  # the schema's compiled grammar ran
    assert window[1] - window[0] > 0.5 * cost  # the constrained request did wait for its compilation
    assert len(gaps) >= 10, "the other client got no tokens while the schema compiled"
    # before: the engine thread compiled it, and every stream stalled for the whole compilation
    assert max(gaps) < cost / 4, (max(gaps), cost)


def test_constraint_over_the_time_limit_is_a_400(srv):
    eng = srv.async_engine
    saved = eng.limits
    eng.limits = RequestLimits(grammar_timeout_s=0.2)
    try:
        r = httpx.post(srv.http_url + "/v1/completions", timeout=120, json={
            "prompt": "{", "max_tokens": 4, "guided_json": SLOW})
    finally:
        eng.limits = saved
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "guided_json" and err["code"] == "grammar_timeout" and "0.2 s" in err["message"]
    # the server goes on: a small constraint compiles (after the slow one finished in the background)
    r = httpx.post(srv.http_url + "/v1/completions", timeout=120, json={
        "prompt": "x", "max_tokens": 4, "guided_choice": ["yes", "no"]})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("yes", "no")
