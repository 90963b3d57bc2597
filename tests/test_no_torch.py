"""The user-facing commands run with torch unimportable (the runtime must never need it).

Each command runs in a subprocess whose import system cannot find ``torch`` (as in an environment where it
was never installed: ``importlib.util.find_spec("torch")`` is ``None``, ``import torch`` fails), and the
subprocess checks at exit that no torch module was loaded.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_BOOTSTRAP = """
import importlib.machinery, sys
class _NoTorch(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
sys.meta_path = [_NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
import atexit
atexit.register(lambda: [m for m in sys.modules if m.split(".")[0] == "torch"] and sys.stderr.write("TORCH LOADED\\n"))
from jaxinfer.cli import main
sys.exit(main(sys.argv[1:]))
"""

QUESTION = "What is the capital of France?"


def _jaxinfer(*args: str) -> list[str]:
    return [sys.executable, "-c", _BOOTSTRAP, *args]


def _run(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(_jaxinfer(*args), input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert "TORCH LOADED" not in proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bootstrap_really_hides_torch():
    code = _BOOTSTRAP.split("import atexit")[0] + (
        "import importlib.util\nassert importlib.util.find_spec('torch') is None\n"
        "try:\n    import torch\nexcept ImportError:\n    print('blocked')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "blocked", out.stderr


def test_generate_and_chat_without_torch():
    gen = _run("generate", QUESTION, "--max-tokens", "32")
    assert "Paris" in gen.stdout
    assert "tok/s decode" in gen.stderr
    chat = _run("chat", "--max-tokens", "32", stdin=f"{QUESTION}\n/exit\n")
    assert "Paris" in chat.stdout


def test_quantize_eval_and_quantized_generate_without_torch(tmp_path):
    out = tmp_path / "int8"
    _run("quantize", "--method", "rtn", "--bits", "8", "--out", str(out))
    gen = _run("generate", QUESTION, "--max-tokens", "32", "--model", str(out))
    assert "Paris" in gen.stdout
    text = tmp_path / "text.txt"
    text.write_text("The tower is 324 metres tall, about the same height as an 81-storey building. " * 20)
    result = tmp_path / "ppl.json"
    _run("eval-ppl", "--quantized", str(out), "--text", str(text), "--max-tokens", "256", "--seq-len", "128",
         "--json", str(result))
    results = json.loads(result.read_text())["results"]
    assert set(results) == {"float", str(out)}
    # int8 RTN stays close to float on this repetitive text (its perplexity is ~2.5)
    assert results["float"]["num_tokens"] == results[str(out)]["num_tokens"] > 200
    assert abs(results[str(out)]["perplexity"] / results["float"]["perplexity"] - 1) < 0.05
    assert 0 <= results[str(out)]["kl"] < 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_without_torch():
    port = _free_port()
    proc = subprocess.Popen(_jaxinfer("serve", "--port", str(port), "--no-warmup"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not become healthy in 240 s")
            time.sleep(0.5)
        body = json.dumps({"model": "smollm2-135m-instruct", "max_tokens": 32, "temperature": 0,
                           "messages": [{"role": "user", "content": QUESTION}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
        assert "Paris" in reply["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "TORCH LOADED" not in err
    assert proc.returncode in (0, -signal.SIGTERM), err[-3000:]


@pytest.mark.parametrize("package", ["jaxinfer", "pallas_kernels", "quantize", "serve"])
def test_runtime_packages_import_no_torch(package):
    """Every module of the runtime packages imports with torch hidden, and none pulls torch in."""
    code = _BOOTSTRAP.split("import atexit")[0] + (
        "import importlib, pkgutil\n"
        f"pkg = importlib.import_module({package!r})\n"
        "for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'torch']\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.strip().endswith("ok"), out.stderr[-3000:]
