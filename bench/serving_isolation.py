"""Does one client hurt another? A well-behaved client's latency alone, then while another client sends
the worst request of each kind the server allows (issue 25). Bounded: a fixed number of victim requests
per scenario, the attacker stops when the victim is done (and after ``--max-seconds`` at the latest).

    python bench/serving_isolation.py                       # FakeEngine server in a subprocess
    python bench/serving_isolation.py --real-model          # jaxinfer serve on the default model; JSON result
    python bench/serving_isolation.py --url http://127.0.0.1:8000 --grpc 127.0.0.1:50051   # a running server
    python bench/serving_isolation.py --real-model --rounds 3 --only n128_64_stops_grpc --server-args "..."

Victim: sequential non-streamed completions (``max_tokens`` 32, greedy); reported: median / p90 latency.
Attacks (defaults of ``jaxinfer serve``'s limits): n=128 x 2 prompts with 64 stop strings totalling
4096 bytes (HTTP and gRPC), 256 distinct 200-token prompts in one request, requests whose step fails
(FakeEngine ``[fail]``), int32-overflowing fields, 300 slowloris sockets, non-JSON posts; beside them, as the
yardstick, one ordinary request from another client (one 200-token prompt, 200 tokens out). The big requests
are streamed and dropped as soon as the victim is done (the server aborts them); the next scenario starts
once the server is idle. ``--rounds``: baseline and attacks repeated in turn, so the baseline's spread
across rounds (``round_medians_s``) shows what the shared machine's load moves.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOPS = [f"{chr(0x400 + i)}q" for i in range(63)]  # 63 strings of 3 UTF-8 bytes ...
STOPS = ["z" * (4095 - 3 * len(STOPS)) + "!", *STOPS]  # ... and one long one: 64 strings, 4096 UTF-8 bytes
_SERVER = """
import sys, time
from serve.server import ServerOptions, ServerThread
from tests.serve.fake_engine import FakeEngine
srv = ServerThread(FakeEngine(max_model_len=1024, max_num_seqs=32, step_delay=0.005),
                   ServerOptions(port=0, grpc_port=0), max_num_seqs=32, max_waiting_requests=512).start()
print(srv.http_url, srv.grpc_target, flush=True)
sys.stdin.read()
srv.stop()
"""


def victim(url: str, count: int) -> list[float]:
    lat = []
    with httpx.Client(timeout=120) as c:
        for i in range(count):
            t = time.perf_counter()
            r = c.post(url + "/v1/completions", json={"prompt": f"victim {i}", "max_tokens": 32, "temperature": 0})
            r.raise_for_status()
            lat.append(time.perf_counter() - t)
    return lat


def _stream_until(url, body, stop):
    """Post ``body`` streamed, again and again; disconnect (the server aborts it) as soon as ``stop`` is set."""
    with httpx.Client(timeout=120) as c:
        while not stop.is_set():
            with c.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        break


def _big_http(url, stop):
    _stream_until(url, {"prompt": ["attack a", "attack b"], "n": 128, "max_tokens": 200, "temperature": 1,
                        "stop": STOPS}, stop)


def _many_prompts_http(url, stop):
    # the most prompts a request may carry, each a distinct 200-token prompt (prefill work, no cache hits)
    prompts = [[(p * 7919 + i * 104729) % 40000 + 100 for i in range(200)] for p in range(256)]
    _stream_until(url, {"prompt": prompts, "max_tokens": 200, "temperature": 1, "stop": STOPS}, stop)


def _one_ordinary_http(url, stop):
    # not an attack: one ordinary request (one 200-token prompt, 200 tokens out) from another client, the
    # yardstick for what any concurrent client costs the victim on a compute-bound device
    prompt = [(i * 104729) % 40000 + 100 for i in range(200)]
    _stream_until(url, {"prompt": prompt, "max_tokens": 200, "temperature": 1}, stop)


def _big_grpc(target, stop):
    import grpc

    from serve.protos import jaxinfer_pb2 as pb
    from serve.protos import jaxinfer_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        while not stop.is_set():
            sp = pb.SamplingParameters(max_tokens=200, n=128, temperature=1.0, stop=STOPS)
            for _ in stub.Generate(pb.GenerateRequest(text="attack", sampling=sp), timeout=120):
                if stop.is_set():
                    break


def _failing(url, stop):
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            c.post(url + "/v1/completions", json={"prompt": "[fail] attack", "max_tokens": 50})


def _overflow(url, stop):
    bodies = [{"prompt": "x", "top_k": 2**31}, {"prompt": "x", "stop_token_ids": [2**31], "min_tokens": 1},
              {"prompt": "x", "logit_bias": {"1": 1e9}}]
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            for b in bodies:
                c.post(url + "/v1/completions", json=b)


def _junk(url, stop):
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            c.post(url + "/v1/completions", content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"})


def _slowloris(url, stop, count=300):
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(count):
        try:
            s = socket.create_connection((host, int(port)), timeout=5)
            s.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        except OSError:
            break
    while not stop.wait(1.0):
        for s in list(socks):
            try:
                s.send(b"X-Slow: 1\r\n")
            except OSError:
                socks.remove(s)
                s.close()
    for s in socks:
        s.close()


ATTACKS = {"one_ordinary_request_http": _one_ordinary_http,
           "n128x2_prompts_64_stops_http": _big_http, "n128_64_stops_grpc": _big_grpc,
           "256_prompts_of_200_tokens_http": _many_prompts_http,
           "failing_step": _failing, "int32_overflow_fields": _overflow, "non_json_posts": _junk,
           "slowloris_300_sockets": _slowloris}


def _wait_idle(url: str, timeout: float = 120.0) -> None:
    """Wait until the server has no request running or waiting (an aborted attack's pages are freed)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = httpx.get(url + "/metrics", timeout=10).text
        busy = [line for line in text.splitlines() if line.startswith(("jaxinfer:num_requests_running",
                                                                      "jaxinfer:num_requests_waiting"))]
        if busy and all(float(line.split()[-1]) == 0 for line in busy):
            return
        time.sleep(0.5)
    raise RuntimeError("the server did not become idle after an attack")


def run(url: str, grpc_target: str | None, count: int, max_seconds: float, skip=(), rounds: int = 1) -> dict:
    """``rounds`` x (baseline, then each attack): baselines interleaved with the attacks, so the machine's
    changing load shows in the baselines' spread. Returns ``{scenario: [per-round latency lists]}``."""
    results: dict[str, list[list[float]]] = {}
    victim(url, 3)  # warm-up
    for _ in range(rounds):
        results.setdefault("baseline", []).append(victim(url, count))
        for name, fn in ATTACKS.items():
            if (name.endswith("grpc") and not grpc_target) or name in skip:
                continue
            stop = threading.Event()
            t = threading.Thread(target=fn, args=(grpc_target if name.endswith("grpc") else url, stop),
                                 daemon=True)
            t.start()
            time.sleep(1.0)  # let the attack get going
            timer = threading.Timer(max_seconds, stop.set)
            timer.start()
            try:
                results.setdefault(name, []).append(victim(url, count))
            finally:
                stop.set()
                timer.cancel()
                t.join(30)
            assert httpx.get(url + "/health", timeout=10).status_code == 200, name
            _wait_idle(url)
    return results


def summarize(res: dict) -> dict:
    """Pooled median / p90 per scenario, each round's median, and (baseline) the spread of the rounds'
    medians: the noise an attack's median is compared with."""
    def p90(v):
        return sorted(v)[int(0.9 * (len(v) - 1))]

    out = {}
    for k, rounds in res.items():
        pooled = [x for r in rounds for x in r]
        out[k] = {"median_s": round(statistics.median(pooled), 4), "p90_s": round(p90(pooled), 4),
                  "round_medians_s": [round(statistics.median(r), 4) for r in rounds]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server (default: start a FakeEngine server)")
    ap.add_argument("--grpc", default=None, help="its gRPC target")
    ap.add_argument("--count", type=int, default=20, help="victim requests per scenario")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="longest attack per scenario")
    ap.add_argument("--rounds", type=int, default=1, help="baseline + attacks, repeated (interleaved)")
    ap.add_argument("--only", default=None, help="comma-separated attacks to run (default: all)")
    ap.add_argument("--tag", default="", help="added to the result file's name")
    ap.add_argument("--server-args", default=None,
                    help="extra jaxinfer serve flags for --real-model (e.g. '--max-step-tokens-per-request 0')")
    ap.add_argument("--real-model", action="store_true",
                    help="serve the default model with jaxinfer serve (the FakeEngine-only failing-step attack is "
                         "skipped) and write bench/results/serving_isolation-<date>-<machine>.json")
    args = ap.parse_args()
    proc = None
    url, target = args.url, args.grpc
    extra = args.server_args.split() if args.server_args else []
    if args.real_model:
        proc, url, target = _real_server(extra)
    elif url is None:
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        url, target = proc.stdout.readline().split()
    try:
        skip = {"failing_step"} if args.real_model else set()
        if args.only:
            skip |= set(ATTACKS) - set(args.only.split(","))
        res = run(url, target, args.count, args.max_seconds, skip, args.rounds)
    finally:
        if proc is not None and args.real_model:
            proc.terminate()
            proc.wait(120)
        elif proc is not None:
            proc.stdin.close()
            proc.wait(60)
    out = summarize(res)
    print(json.dumps(out, indent=1))
    if args.real_model:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from machine import machine_info, result_path

        path = result_path("serving_isolation" + (f"-{args.tag}" if args.tag else ""))
        info = {"machine": machine_info(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                "model": "default (smollm2-135m-instruct)", "server": REAL_SERVER_ARGS + extra,
                "victim_requests_per_scenario_and_round": args.count, "rounds": args.rounds,
                "max_attack_seconds": args.max_seconds, "latency": out}
        with open(path, "w") as f:
            f.write(json.dumps(info, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)


REAL_SERVER_ARGS = ["--max-model-len", "1024", "--max-num-seqs", "32", "--max-num-batched-tokens", "256"]


def _real_server(extra=()):
    """``jaxinfer serve`` on the default model on free ports; returns (process, http url, grpc target)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "jaxinfer.cli", "serve", "--port", "0", "--grpc-port", "0", *REAL_SERVER_ARGS,
           *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    url = target = None
    for line in proc.stderr:
        if "OpenAI-compatible API on " in line:
            url = line.split(" on ", 1)[1].strip().removesuffix("/v1")
        elif "gRPC on " in line:
            target = line.split(" on ", 1)[1].strip()
        if url and target:
            break
    if not (url and target):
        raise RuntimeError(f"jaxinfer serve exited with {proc.wait()}")
    def drain():  # keep reading the server's log so its pipe never fills
        for _ in proc.stderr:
            pass

    threading.Thread(target=drain, daemon=True).start()
    return proc, url, target


if __name__ == "__main__":
    main()
