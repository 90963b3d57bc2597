"""Serving across processes: ``jaxinfer serve --distributed`` on 2 CPU processes x 2 devices (TP 4), one
front end (HTTP + gRPC) in process 0, the engine's operations broadcast to process 1; n-gram speculative
decoding on (in both servers), so its draft and verify steps run in lock-step too.

Concurrent requests (greedy and seeded sampling, streaming and not, ``n = 2``, gRPC, one stream dropped
by its client) must give exactly what a one-process server gives for the same requests; a process
killed mid-request must make the front end exit non-zero. A tiny random Llama keeps start-up short;
every wait has a timeout and every process is killed in ``finally``.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time

import grpc
import httpx
import pytest

from serve.protos import jaxinfer_pb2 as pb
from serve.protos import jaxinfer_pb2_grpc as pb_grpc
from tests.multihost_procs import base_env, kill_all, read, spawn, spawn_group, wait
from tests.serve.sse_client import stream_request

START_TIMEOUT_S = 300  # load + warm-up of every step shape, several processes on 2 shared cores
REQUEST_TIMEOUT_S = 120
SERVE_ARGS = [
    "--max-model-len",
    "256",
    "--max-num-seqs",
    "4",
    "--no-warmup",
    "--port",
    "0",
    "--grpc-port",
    "0",
    "--speculative-method",
    "ngram",
]

pytestmark = pytest.mark.slow


def _wait_log(procs, err_log, *patterns, timeout=START_TIMEOUT_S) -> list[re.Match]:
    """The first match of each regex in ``err_log`` once all have appeared (the processes log as they go)."""
    deadline = time.monotonic() + timeout
    while True:
        text = read(err_log)
        found = [re.search(pat, text) for pat in patterns]
        if all(found):
            return found
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            kill_all(procs)
            pytest.fail(f"{err_log.name} never showed {patterns}; stderr tail:\n{text[-3000:]}")
        time.sleep(0.2)


def _wait_ready(procs, err_log, timeout=START_TIMEOUT_S) -> tuple[str, str]:
    """The HTTP URL and gRPC target process 0 announces once it listens."""
    http, grpc_target = _wait_log(procs, err_log, r"OpenAI-compatible API on (\S+)/v1", r"gRPC on (\S+)",
                                  timeout=timeout)
    return http.group(1), grpc_target.group(1)


def _grpc_text(target: str, text: str, max_tokens: int) -> str:
    with grpc.insecure_channel(target) as ch:
        req = pb.GenerateRequest(text=text, sampling=pb.SamplingParameters(max_tokens=max_tokens))
        return "".join(r.text for r in pb_grpc.InferenceStub(ch).Generate(req, timeout=REQUEST_TIMEOUT_S))


async def _dropped_stream(client: httpx.AsyncClient) -> int:
    """A long streaming request whose client disconnects after two chunks; returns the chunks seen."""
    body = {"prompt": "The quick brown fox", "max_tokens": 200, "temperature": 0, "stream": True}
    chunks = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                chunks += 1
                if chunks == 2:
                    break  # leaving the block closes the connection: the server aborts the request
    return chunks


async def _workload(url: str, target: str) -> dict:
    """Concurrent requests; what each answered (the dropped stream's text is not compared)."""
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:

        async def completion(**body):
            r = await client.post("/v1/completions", json={"max_tokens": 12, **body})
            assert r.status_code == 200, r.text
            return [c["text"] for c in r.json()["choices"]]

        chat = stream_request(
            client,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Tell me about JAX"}], "max_tokens": 12, "temperature": 0},
        )
        results = await asyncio.gather(
            completion(prompt="The capital of France", temperature=0),
            completion(prompt="1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3", temperature=0),  # n-gram drafts
            completion(prompt="Once upon a time", temperature=0.9, seed=11),
            completion(prompt="JAX and Pallas", temperature=1.0, seed=5, n=2),
            chat,
            _dropped_stream(client),
            asyncio.to_thread(_grpc_text, target, "Paris is the capital", 10),
        )
        # after the abort the processes must still be in lock-step
        after = await completion(prompt="Berlin is the capital of", temperature=0)
        deadline = time.monotonic() + 30
        while True:
            health = await client.get("/health")
            if health.json().get("requests_in_flight") == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    greedy, lookup, sampled, n2, streamed, dropped, over_grpc = results
    assert streamed["status"] == 200 and streamed["done"], streamed
    assert dropped == 2
    assert health.status_code == 200 and health.json() == {"status": "ok", "requests_in_flight": 0}, health.text
    return {
        "greedy": greedy,
        "lookup": lookup,
        "sampled": sampled,
        "n2": n2,
        "chat_stream": streamed["text"],
        "grpc": over_grpc,
        "after_abort": after,
    }


@pytest.fixture(scope="module")
def model_and_reference(tiny_model_dir, tmp_path_factory):
    """The tiny model's directory and what a one-process, one-device server answers."""
    model, _ = tiny_model_dir("llama")
    logs = tmp_path_factory.mktemp("serve-reference")
    p = spawn(["serve", "--model", str(model), *SERVE_ARGS], base_env(1), logs, "ref")
    try:
        url, target = _wait_ready([p], logs / "ref.err")
        answers = asyncio.run(_workload(url, target))
        p.send_signal(signal.SIGINT)
        assert wait(p, 60, "the reference server", logs / "ref.err") == 0
    finally:
        kill_all([p])
    return model, answers


def test_two_processes_serve_like_one(model_and_reference, tmp_path):
    model, ref = model_and_reference
    assert all(ref.values()), ref
    procs = spawn_group(
        ["serve", "--distributed", "--tensor-parallel-size", "4", "--model", str(model), *SERVE_ARGS], 2, 2, tmp_path
    )
    try:
        url, target = _wait_ready(procs, tmp_path / "p0.err")
        # process 0 may listen before process 1 has logged that it follows: wait for the line, do not race it
        _wait_log(procs, tmp_path / "p1.err", re.escape("following process 0's engine"))
        answers = asyncio.run(_workload(url, target))
        procs[0].send_signal(signal.SIGINT)  # graceful stop: process 0 tells process 1 to stop
        for i, p in enumerate(procs):
            assert wait(p, 60, f"process {i}", tmp_path / f"p{i}.err") == 0, read(tmp_path / f"p{i}.err")[-3000:]
    finally:
        kill_all(procs)
    assert answers == ref
    followed = re.search(
        r"stopped the serving group after (\d+) steps \((\d+) tokens generated, (\d+) draft", read(tmp_path / "p1.err")
    )
    assert followed and int(followed[1]) > 0 and int(followed[3]) > 0, read(tmp_path / "p1.err")[-3000:]


def test_killed_process_ends_the_front_end(model_and_reference, tmp_path):
    """Process 1 killed while a request streams: process 0's step fails, it tells the client nothing more
    and exits non-zero at once, naming the likely cause, instead of hanging."""
    model, _ = model_and_reference
    procs = spawn_group(
        ["serve", "--distributed", "--tensor-parallel-size", "4", "--model", str(model), *SERVE_ARGS],
        2,
        2,
        tmp_path,
        {"JAXINFER_HEARTBEAT_TIMEOUT": "30"},
    )
    try:
        url, _ = _wait_ready(procs, tmp_path / "p0.err")
        body = {"prompt": "Once upon a time", "max_tokens": 230, "temperature": 0, "stream": True, "ignore_eos": True}
        chunks, start, rc = 0, None, None
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
            try:
                with client.stream("POST", "/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and start is None:
                            chunks += 1
                            procs[1].send_signal(signal.SIGKILL)
                            start = time.monotonic()
            except httpx.HTTPError:
                pass  # the connection dies with process 0
        assert start is not None, "no token arrived before the kill"
        rc = wait(procs[0], 120, "process 0 after process 1 was killed", tmp_path / "p0.err")
        took = time.monotonic() - start
    finally:
        kill_all(procs)
    err = read(tmp_path / "p0.err")
    assert rc != 0
    # either jaxinfer's own message (the failed collective) or, when the runtime's heartbeat check notices the
    # dead task first (a loaded machine), the distributed runtime's fatal error naming the unhealthy task
    clear = ("another process probably died or stalled" in err or "stopped sending heartbeats" in err
             or "JAX distributed service detected fatal errors" in err and "unhealthy" in err)
    assert clear, err[-3000:]
    assert took < 100, f"process 0 took {took:.1f} s to exit"


def test_killed_process_of_an_idle_group_ends_the_front_end(model_and_reference, tmp_path):
    """Process 1 killed while nothing runs: no collective notices, the runtime's heartbeats do
    (``JAXINFER_HEARTBEAT_TIMEOUT``, 5 s here) and process 0 is ended instead of serving a broken group."""
    model, _ = model_and_reference
    procs = spawn_group(
        ["serve", "--distributed", "--tensor-parallel-size", "4", "--model", str(model), *SERVE_ARGS],
        2,
        2,
        tmp_path,
        {"JAXINFER_HEARTBEAT_TIMEOUT": "5"},
    )
    try:
        url, _ = _wait_ready(procs, tmp_path / "p0.err")
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        procs[1].send_signal(signal.SIGKILL)
        start = time.monotonic()
        rc = wait(procs[0], 60, "process 0 after process 1 was killed", tmp_path / "p0.err")
        took = time.monotonic() - start
    finally:
        kill_all(procs)
    assert rc != 0
    assert "stopped sending heartbeats" in read(tmp_path / "p0.err"), read(tmp_path / "p0.err")[-3000:]
    assert took < 40, f"process 0 took {took:.1f} s to exit"
