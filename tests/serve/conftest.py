"""Fixtures: servers on 127.0.0.1 (free ports) in background threads, over a FakeEngine."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve.server import ServerOptions, ServerThread
from tests.serve.fake_engine import FakeEngine


@pytest.fixture
def make_server():
    """``make_server(engine_kw={...}, max_num_seqs=..., ...)`` -> started ``ServerThread``; stopped after."""
    started = []

    def make(engine_kw: dict | None = None, *, grpc: bool = False, max_body_bytes: int = 1 << 20,
             shutdown_grace_s: float = 10.0, options: dict | None = None, engine=None, **server_kw) -> ServerThread:
        engine = engine or FakeEngine(**(engine_kw or {}))
        server_kw.setdefault("max_num_seqs", engine.max_num_seqs)
        opts = ServerOptions(port=0, grpc_port=0 if grpc else None, max_body_bytes=max_body_bytes,
                             shutdown_grace_s=shutdown_grace_s, **(options or {}))
        srv = ServerThread(engine, opts, **server_kw).start()
        srv.fake = engine
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def fake_server():
    """One shared server (HTTP + gRPC) over a fast FakeEngine for protocol tests."""
    engine = FakeEngine(max_model_len=512, max_num_seqs=16, step_delay=0.001)
    srv = ServerThread(engine, ServerOptions(port=0, grpc_port=0, max_body_bytes=1 << 20),
                       max_num_seqs=16, max_waiting_requests=256).start()
    srv.fake = engine
    yield srv
    srv.stop()


def scrape(url: str) -> dict[str, float]:
    """``/metrics`` as ``{"name{label=value,...}": value}`` via prometheus_client's parser."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll ``predicate`` until truthy (returns its value) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
