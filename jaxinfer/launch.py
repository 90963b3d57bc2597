"""``jaxinfer launch``: start N local processes of one multi-process (multi-host style) jaxinfer run.

For trying multi-controller JAX on one machine (several CPU processes, or one process per local GPU)::

    jaxinfer launch --num-processes 2 --devices-per-process 2 -- \\
        generate --tensor-parallel-size 4 "What is the capital of France?"

Each process gets ``JAXINFER_COORDINATOR=127.0.0.1:<free port>``, ``JAXINFER_NUM_PROCESSES``,
``JAXINFER_PROCESS_ID`` and (``--devices-per-process``) ``XLA_FLAGS=--xla_force_host_platform_device_count=D``,
and runs ``python -m jaxinfer.cli <command> --distributed``. Their output lines are streamed with a
``[pI]`` prefix. When a process fails, the others get ``--grace`` seconds to fail on their own (they
normally do, with the runtime's error) and are then terminated; the launcher exits with the first failing
process's status (0 when all succeed). Real multi-host jobs start one process per host instead (see the
README's "Multiple devices and hosts").
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, coordinator: str, num_processes: int, process_id: int,
                devices_per_process: int | None) -> dict:
    """The environment of process ``process_id`` (``base`` plus the JAXINFER_* variables)."""
    env = dict(base)
    env.update(JAXINFER_COORDINATOR=coordinator, JAXINFER_NUM_PROCESSES=str(num_processes),
               JAXINFER_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
    if devices_per_process is not None:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
    return env


def _pump(stream, prefix: str, out, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        with lock:
            out.write(f"{prefix}{line}\n")
            out.flush()
    stream.close()


def _status(rc: int) -> int:
    return 128 - rc if rc < 0 else rc  # killed by signal N -> 128 + N, as a shell reports it


def run(num_processes: int, command: list[str], *, devices_per_process: int | None = None,
        port: int | None = None, grace_s: float = 30.0, stdout=None, stderr=None) -> int:
    """Run ``jaxinfer <command> --distributed`` in ``num_processes`` local processes; return the exit status."""
    if num_processes < 1:
        raise ValueError("--num-processes must be >= 1")
    if not command:
        raise ValueError("no jaxinfer command given (e.g. -- generate --tensor-parallel-size 4 \"Hello\")")
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if "--distributed" not in command:
        command = [*command, "--distributed"]
    coordinator = f"127.0.0.1:{port or free_port()}"
    lock = threading.Lock()
    procs, pumps = [], []
    try:
        for i in range(num_processes):
            env = process_env(os.environ, coordinator, num_processes, i, devices_per_process)
            p = subprocess.Popen([sys.executable, "-m", "jaxinfer.cli", *command], env=env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(p)
            for stream, out in ((p.stdout, stdout), (p.stderr, stderr)):
                t = threading.Thread(target=_pump, args=(stream, f"[p{i}] ", out, lock), daemon=True)
                t.start()
                pumps.append(t)
        first_failure, deadline = None, None
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                if first_failure is None and p.returncode not in (None, 0):
                    first_failure = _status(p.returncode)
                    deadline = time.monotonic() + grace_s
                    with lock:
                        stderr.write(f"[launch] process {i} exited with status {first_failure}; "
                                     f"stopping the others in {grace_s:g} s\n")
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in pumps:
            t.join(timeout=5)
    statuses = [_status(p.returncode) for p in procs]
    if first_failure is None and any(statuses):
        first_failure = next(s for s in statuses if s)
    return first_failure or 0


def register(sub) -> None:
    """Add the ``launch`` sub-command to the ``jaxinfer`` parser."""
    p = sub.add_parser("launch", help="start N local processes of one --distributed jaxinfer run",
                       description="Start N local processes of one multi-process jaxinfer run: each gets "
                       "JAXINFER_COORDINATOR, JAXINFER_NUM_PROCESSES, JAXINFER_PROCESS_ID and runs "
                       "'jaxinfer <command> --distributed'; output lines are prefixed [pI].")
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--devices-per-process", type=int, default=None,
                   help="virtual CPU devices per process (sets XLA_FLAGS=--xla_force_host_platform_device_count)")
    p.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds the others may take to exit after one process fails before they are stopped")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then a jaxinfer command, e.g. -- generate ...")

    def main(args) -> int:
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        # SIGTERM (e.g. from a job scheduler) unwinds run(), which then stops the processes it started
        signal.signal(signal.SIGTERM, lambda sig, _frame: sys.exit(128 + sig))
        return run(args.num_processes, command, devices_per_process=args.devices_per_process, port=args.port,
                   grace_s=args.grace)

    p.set_defaults(run=main)
