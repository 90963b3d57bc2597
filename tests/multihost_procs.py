"""Helpers of the multi-process tests: spawn ``jaxinfer`` processes with their own environment and
logs, wait with timeouts, kill whatever is left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxinfer.launch import free_port, process_env

ROOT = Path(__file__).resolve().parents[1]


def base_env(devices: int) -> dict:
    """This environment without JAXINFER_* (the cache directory kept), ``devices`` CPU devices."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXINFER_") or k == "JAXINFER_CACHE_DIR"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"  # not conftest's 8 devices
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def spawn(args: list[str], env: dict, log_dir: Path, name: str) -> subprocess.Popen:
    """``python -m jaxinfer.cli *args`` with stdout / stderr in ``log_dir/name.out`` / ``.err``."""
    out = open(log_dir / f"{name}.out", "wb")  # files, not pipes: a full pipe cannot stall a process
    err = open(log_dir / f"{name}.err", "wb")
    p = subprocess.Popen(
        [sys.executable, "-m", "jaxinfer.cli", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
    )
    out.close()
    err.close()
    return p


def spawn_group(
    args: list[str], num_processes: int, devices: int, log_dir: Path, extra_env: dict | None = None
) -> list[subprocess.Popen]:
    """``num_processes`` processes of one ``--distributed`` run (logs ``p<i>.out`` / ``p<i>.err``)."""
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(num_processes):
        env = process_env(base_env(devices), coordinator, num_processes, i, devices)
        env.update(extra_env or {})
        procs.append(spawn(args, env, log_dir, f"p{i}"))
    return procs


def kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait(timeout=30)


def read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "replace") if path.exists() else ""


def wait(p: subprocess.Popen, timeout: float, what: str, log: Path) -> int:
    """``p``'s exit status; a test failure (with ``log``'s tail) when it runs longer than ``timeout``."""
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not exit within {timeout:.0f} s; stderr tail:\n{read(log)[-3000:]}")
