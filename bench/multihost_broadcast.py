"""What broadcasting process 0's engine operations costs per step (``jaxinfer serve --distributed``).

Two CPU processes join one JAX runtime; process 0 runs :class:`jaxinfer.engine_mirror.LeaderEngine` and
process 1 :func:`jaxinfer.engine_mirror.follow`, both over engines that only record when ``step`` is
called (no model: this isolates the transport). Process 0 "steps" every ``--interval-ms`` (a device
step's stand-in) so the follower is already waiting, as in a server under load. Reported per step:

* ``publish_ms``: what process 0 spends storing a message before its own step (on its critical path);
* ``delivery_ms``: from process 0 calling ``LeaderEngine.step`` to process 1 entering the same step (what
  the step's collectives wait for process 1 beyond a step without the broadcast; both clocks are this
  host's monotonic clock);

for a plain step message and for one that also carries a new request (a 512-token prompt).

    python bench/multihost_broadcast.py [--steps 400] [--interval-ms 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


class StubEngine:
    """The Engine calls the broadcast makes; ``step`` records when it was entered."""

    def __init__(self):
        self.step_times: list[float] = []

    def add_request(self, *args, **kwargs):
        pass

    def abort_request(self, request_id):
        return True

    def flush_prefix_cache(self):
        return 0

    def step(self, exclude=()):
        self.step_times.append(time.monotonic())
        return []


def _process(args) -> None:
    import jax

    from jaxinfer.distributed import initialize, kv_client
    from jaxinfer.engine_mirror import LeaderEngine, OpChannel, follow
    from jaxinfer.sampling_params import SamplingParams

    initialize()
    channel = OpChannel(kv_client(), jax.process_index(), jax.process_count(), namespace="bench/broadcast")
    engine = StubEngine()
    if channel.process_id:
        follow(engine, channel, poll_s=30)
        kv_client().key_value_set("bench/times/1", json.dumps(engine.step_times))
        return
    leader = LeaderEngine(engine, channel, seed=0)
    prompt = list(range(512))
    marks, called = {}, []
    for variant in ("step", "step+add"):
        start, publish0 = len(engine.step_times), leader.publish_s
        for i in range(args.steps):
            if variant == "step+add":
                leader.add_request(f"r{i}", prompt, SamplingParams(max_tokens=16))
            called.append(time.monotonic())
            leader.step()
            time.sleep(args.interval_ms / 1000)
        marks[variant] = (start, len(engine.step_times), (leader.publish_s - publish0) / args.steps)
    leader.close()
    follower_times = json.loads(kv_client().blocking_key_value_get("bench/times/1", 120_000))
    from machine import machine_info, result_path

    record = {
        "benchmark": "multihost_broadcast",
        "processes": 2,
        "steps": args.steps,
        "interval_ms": args.interval_ms,
        "machine": machine_info(),
        "note": "2 CPU processes on one shared machine (other jobs running); transport only, no model",
    }
    for variant, (a, b, publish_s) in marks.items():
        delivery = (np.array(follower_times[a:b]) - np.array(called[a:b])) * 1e3
        record[variant] = {
            "publish_ms_mean": publish_s * 1e3,
            "delivery_ms_p50": float(np.median(delivery)),
            "delivery_ms_p90": float(np.percentile(delivery, 90)),
            "delivery_ms_mean": float(delivery.mean()),
        }
    path = result_path("multihost_broadcast")
    path.write_text(json.dumps(record, indent=2))
    print(json.dumps({k: record[k] for k in ("step", "step+add")}, indent=2))
    print(f"wrote {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--interval-ms", type=float, default=10.0)
    args = p.parse_args()
    if "JAXINFER_PROCESS_ID" in os.environ:
        _process(args)
        return 0
    from jaxinfer.launch import free_port, process_env

    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen([sys.executable, __file__, *sys.argv[1:]], env=process_env(env, coordinator, 2, i, 1))
        for i in range(2)
    ]
    try:
        return max(p.wait(timeout=600) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
