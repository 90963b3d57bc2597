"""Multi-process (multi-host style) generation on the CPU: several ``jaxinfer generate --distributed``
processes joined by ``jax.distributed`` (gloo collectives), tensor parallelism across processes.

Every process must print exactly what one process prints (greedy). A tiny random Llama (4 query heads,
2 KV heads: TP 4 repeats each KV head twice) keeps start-up and compilation short. Every wait has a
timeout and every spawned process is killed in ``finally``, so a mismatch or a hang is a failure.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from jaxinfer.launch import process_env
from jaxinfer.weight_sources import SafetensorsCheckpoint
from tests.multihost_procs import base_env as _base_env
from tests.multihost_procs import kill_all as _kill_all
from tests.multihost_procs import read as _read
from tests.multihost_procs import spawn as _spawn
from tests.multihost_procs import spawn_group
from tests.multihost_procs import wait as _wait

PROMPT = "The capital of France"
GEN_ARGS = ["--max-tokens", "24", "--max-model-len", "128"]
TIMEOUT_S = 240  # one run (start-up, load, compile, generate) of several processes on 2 shared cores

pytestmark = pytest.mark.slow


def _text(stdout: str) -> str:
    """A process's reply: its stdout without gloo's connection messages."""
    # gloo's native logging can reach stdout split from its "[Gloo] Rank" prefix on a loaded machine
    return "".join(line for line in stdout.splitlines(keepends=True)
                   if not line.startswith("[Gloo]") and "connected peer ranks" not in line)


def _distributed(model: Path, num_processes: int, devices: int, tmp_path: Path, *, gen_args=GEN_ARGS,
                 extra_env: dict | None = None, verbose: bool = False) -> list[subprocess.Popen]:
    """Start ``num_processes`` ``generate --distributed --tensor-parallel-size 4`` processes."""
    args = ["generate", "--distributed", "--tensor-parallel-size", "4", "--model", str(model), *gen_args, PROMPT]
    args = ["-v", *args] if verbose else args  # -v: the loader logs the checkpoint bytes each process read
    return spawn_group(args, num_processes, devices, tmp_path, extra_env)


@pytest.fixture(scope="module")
def model_and_reference(tiny_model_dir, tmp_path_factory):
    """The tiny model's directory and what one process with one device prints for it."""
    model, _ = tiny_model_dir("llama")
    logs = tmp_path_factory.mktemp("reference")
    p = _spawn(["generate", "--model", str(model), *GEN_ARGS, PROMPT], _base_env(1), logs, "ref")
    try:
        rc = _wait(p, TIMEOUT_S, "the single-process reference", logs / "ref.err")
    finally:
        _kill_all([p])
    assert rc == 0, _read(logs / "ref.err")[-3000:]
    ref = _read(logs / "ref.out")
    assert len(ref.strip()) > 0
    return model, ref


def test_two_processes_two_devices_each_equal_one_process(model_and_reference, tmp_path):
    model, ref = model_and_reference
    procs = _distributed(model, 2, 2, tmp_path, verbose=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        for i, p in enumerate(procs):
            rc = _wait(p, max(1.0, deadline - time.monotonic()), f"process {i}", tmp_path / f"p{i}.err")
            assert rc == 0, _read(tmp_path / f"p{i}.err")[-3000:]
    finally:
        _kill_all(procs)
    for i in range(2):
        assert _text(_read(tmp_path / f"p{i}.out")) == ref, f"process {i} differs from one process"
    # each process read its devices' half of every sharded tensor and the replicated ones (the norms) whole
    ckpt = SafetensorsCheckpoint(model)
    total = sum(ckpt.nbytes(k) for k in ckpt.keys())
    replicated = sum(ckpt.nbytes(k) for k in ckpt.keys() if k.endswith("norm.weight"))
    for i in range(2):
        m = re.search(r"process (\d) of 2 read (\d+) of (\d+) checkpoint bytes", _read(tmp_path / f"p{i}.err"))
        assert m and int(m[1]) == i, _read(tmp_path / f"p{i}.err")[-3000:]
        assert (int(m[2]), int(m[3])) == ((total - replicated) // 2 + replicated, total)


def test_quantized_checkpoint_two_processes_read_half(tiny_model_dir, tmp_path):
    """A quantized checkpoint (int4 g32 asymmetric) at TP 2 over 2 processes x 1 device: both print what one
    process prints, and each read from the memory-mapped files only its half of every split array (packed
    values, group scales and offsets, the float embedding and head) plus the replicated norms."""
    from jaxinfer.loader import load_model
    from jaxinfer.quantized_checkpoint import save_quantized
    from pallas_kernels.quantized_matmul.config import QuantConfig
    from quantize.model_quant import quantize_model

    model, _ = tiny_model_dir("llama")
    m = load_model(str(model))
    q = quantize_model(m.model, m.params, "rtn", QuantConfig("int4", group_size=32, symmetric=False), progress=False)
    ckpt_dir = save_quantized(tmp_path / "q", m.model, q.params, info=q.info, tokenizer=m.tokenizer)
    gen = ["--max-tokens", "8", "--max-model-len", "128"]
    procs = spawn_group(["-v", "generate", "--distributed", "--tensor-parallel-size", "2", "--model", str(ckpt_dir),
                         *gen, PROMPT], 2, 1, tmp_path)
    procs.append(_spawn(["generate", "--model", str(ckpt_dir), *gen, PROMPT], _base_env(1), tmp_path, "ref"))
    try:
        deadline = time.monotonic() + TIMEOUT_S
        for name, p in zip(["p0", "p1", "ref"], procs):
            rc = _wait(p, max(1.0, deadline - time.monotonic()), name, tmp_path / f"{name}.err")
            assert rc == 0, _read(tmp_path / f"{name}.err")[-3000:]
    finally:
        _kill_all(procs)
    ref = _read(tmp_path / "ref.out")
    assert ref.strip()
    stored = SafetensorsCheckpoint(ckpt_dir / "params")
    total = half = 0
    for k in stored.keys():
        n = stored.nbytes(k)
        assert n == int(np.prod(stored.shape(k))) * stored.dtype(k).itemsize
        total += n
        half += n if k.endswith("norm/scale") else n // 2  # every other array splits over TP 2
    for i in range(2):
        assert _text(_read(tmp_path / f"p{i}.out")) == ref, f"process {i} differs from one process"
        m = re.search(r"process (\d) of 2 read (\d+) of (\d+) checkpoint bytes", _read(tmp_path / f"p{i}.err"))
        assert m and int(m[1]) == i, _read(tmp_path / f"p{i}.err")[-3000:]
        assert (int(m[2]), int(m[3])) == (half, total)
    assert half < 0.52 * total


def test_launcher_four_processes_one_device_each_equal_one_process(model_and_reference, tmp_path):
    """``jaxinfer launch`` starts the 4 x 1 run; every process's prefixed lines equal one process's output."""
    model, ref = model_and_reference
    env = _base_env(1)
    args = ["launch", "--num-processes", "4", "--devices-per-process", "1", "--",
            "generate", "--tensor-parallel-size", "4", "--model", str(model), *GEN_ARGS, PROMPT]
    p = _spawn(args, env, tmp_path, "launch")
    try:
        rc = _wait(p, TIMEOUT_S + 60, "jaxinfer launch", tmp_path / "launch.err")
    finally:
        _kill_all([p])
    assert rc == 0, _read(tmp_path / "launch.err")[-3000:]
    lines = _read(tmp_path / "launch.out").splitlines(keepends=True)
    for i in range(4):
        mine = [line.removeprefix(f"[p{i}] ") for line in lines if line.startswith(f"[p{i}] ")]
        assert _text("".join(mine)) == ref, f"process {i} differs from one process"
    assert not [line for line in lines if not re.match(r"\[p[0-3]\] ", line)]


def _start_and_wait_for_tokens(model, tmp_path, extra_env=None):
    """Two processes generating a long reply; returns them once process 1 has printed generated text."""
    procs = _distributed(model, 2, 2, tmp_path, gen_args=["--max-tokens", "230", "--max-model-len", "256"],
                         extra_env=extra_env)
    deadline = time.monotonic() + TIMEOUT_S
    while not _text(_read(tmp_path / "p1.out")).strip():  # generation under way (warm-up done)
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            _kill_all(procs)
            pytest.fail(f"generation did not start; process 1 stderr:\n{_read(tmp_path / 'p1.err')[-3000:]}")
        time.sleep(0.2)
    return procs


def test_killed_process_makes_the_other_exit_with_a_clear_error(model_and_reference, tmp_path):
    """Process 1 killed mid-generation: process 0 exits with a clear error instead of hanging or waiting in
    the runtime's shutdown barrier. Normally its next collective fails at once and it names the likely cause;
    on a loaded machine (CI's other test worker) the runtime's heartbeat check (30 s here) may notice the dead
    process first, and its error, naming the process that stopped, is accepted as the clear error too."""
    model, _ = model_and_reference
    procs = _start_and_wait_for_tokens(model, tmp_path, {"JAXINFER_HEARTBEAT_TIMEOUT": "30"})
    try:
        procs[1].send_signal(signal.SIGKILL)
        start = time.monotonic()
        rc = _wait(procs[0], 120, "process 0 after process 1 was killed", tmp_path / "p0.err")
        took = time.monotonic() - start
    finally:
        _kill_all(procs)
    err = _read(tmp_path / "p0.err")
    assert rc != 0
    clear = ("another process probably died or stalled" in err or "stopped sending heartbeats" in err
             or "JAX distributed service detected fatal errors" in err and "unhealthy" in err)
    assert clear, err[-3000:]
    assert took < 100, f"process 0 took {took:.1f} s to exit"


def test_stalled_process_makes_the_other_exit_after_the_heartbeat_timeout(model_and_reference, tmp_path):
    """Process 1 stopped (SIGSTOP) mid-generation: its collectives stall rather than fail, so it is the
    coordination service's heartbeat timeout (``JAXINFER_HEARTBEAT_TIMEOUT``, 5 s here) that ends process 0."""
    model, _ = model_and_reference
    procs = _start_and_wait_for_tokens(model, tmp_path, {"JAXINFER_HEARTBEAT_TIMEOUT": "5"})
    try:
        procs[1].send_signal(signal.SIGSTOP)
        start = time.monotonic()
        rc = _wait(procs[0], 60, "process 0 after process 1 was stopped", tmp_path / "p0.err")
        took = time.monotonic() - start
    finally:
        procs[1].send_signal(signal.SIGCONT)
        _kill_all(procs)
    err = _read(tmp_path / "p0.err")
    assert rc != 0
    assert "stopped sending heartbeats" in err, err[-3000:]
    assert took < 40, f"process 0 took {took:.1f} s to exit"


def test_initialize_after_the_backend_started_is_an_error(monkeypatch):
    import jax

    from jaxinfer import distributed

    jax.devices()
    monkeypatch.setenv("JAXINFER_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("JAXINFER_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXINFER_PROCESS_ID", "0")
    with pytest.raises(RuntimeError, match="before anything starts the XLA backend"):
        distributed.initialize()


def test_incomplete_environment_is_an_error(monkeypatch):
    from jaxinfer import distributed

    monkeypatch.setenv("JAXINFER_COORDINATOR", "127.0.0.1:1")
    monkeypatch.delenv("JAXINFER_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAXINFER_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="JAXINFER_NUM_PROCESSES"):
        distributed.initialize()
    monkeypatch.setenv("JAXINFER_NUM_PROCESSES", "two")
    monkeypatch.setenv("JAXINFER_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="not an integer"):
        distributed.initialize()


def test_launcher_environment():
    env = process_env({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"}, "h:1", 4, 3, 2)
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"
    assert (env["JAXINFER_COORDINATOR"], env["JAXINFER_NUM_PROCESSES"], env["JAXINFER_PROCESS_ID"]) == ("h:1", "4", "3")
    assert process_env({}, "h:1", 1, 0, None).get("XLA_FLAGS") is None


def test_data_parallelism_across_processes_is_refused(monkeypatch):
    """Each replica would run on some processes only: refused before anything is loaded."""
    import jax

    from jaxinfer.config import EngineConfig
    from jaxinfer.engine_factory import create_engine

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="data_parallel_size > 1 is not supported across processes"):
        create_engine("no-such-model-is-loaded", EngineConfig(data_parallel_size=2))
