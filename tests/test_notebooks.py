"""The colab/ notebooks: executed top to bottom on the CPU with CI sizes (``JAXINFER_NOTEBOOK_SMALL=1``), failing
on any cell error, with each notebook's expected outputs asserted; and the committed notebooks checked for the
outputs of a real run, their badges, a shared install cell and small files."""

from __future__ import annotations

import base64
import math
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = ("quickstart", "quantize", "tpu_vm")
REPO_LINE = re.compile(r'^REPO = "https://github\.com/([\w.-]+/[\w.-]+)"', re.M)


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(COLAB / f"{name}.ipynb", as_version=4)


def _execute(name: str) -> nbformat.NotebookNode:
    """Run the notebook fresh, in order, in a new kernel (CellExecutionError on any failing cell)."""
    nb = _read(name)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no virtual devices from conftest.py
    env.update(
        JAXINFER_NOTEBOOK_SMALL="1",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
    )
    client = NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(COLAB)}})
    client.execute(env=env)
    return nb


def _text(cell) -> str:
    """Everything a code cell printed or displayed as text."""
    parts = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            parts.append(o.text)
        elif o.output_type in ("execute_result", "display_data"):
            parts.append(o.data.get("text/markdown") or o.data.get("text/plain", ""))
        elif o.output_type == "error":
            parts.append(f"{o.ename}: {o.evalue}")
    return "".join(parts)


def _output(nb, marker: str) -> str:
    """The text output of the one code cell whose source contains ``marker``."""
    cells = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    assert len(cells) == 1, f"{len(cells)} code cells contain {marker!r}"
    return _text(cells[0])


def _pngs(nb) -> list[bytes]:
    return [
        base64.b64decode(o.data["image/png"])
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "display_data" and "image/png" in o.data
    ]


def _table(markdown: str) -> dict[str, list[str]]:
    """Rows of a markdown table: first column -> the other cells."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows[1:]}


# ---- the expected outputs, on an executed notebook (CI sizes) or the committed run (full sizes) ----------------


def check_quickstart(nb) -> None:
    assert "Paris" in _output(nb, "answer = out.outputs"), "the greedy answer names Paris"
    assert _output(nb, "llm.stream(").strip(), "streamed text"
    assert "same seed, same samples: True" in _output(nb, "again = llm.chat")
    rows = re.findall(
        r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$",
        _output(nb, "for batch in tqdm(BATCH_SIZES"),
        re.M,
    )
    assert len(rows) >= 2, "a throughput row per batch size"
    for batch, tokens, steps, _, tok_s, _ in rows:
        assert int(tokens) % int(batch) == 0, "every request generated the same number of tokens (ignore_eos)"
        assert int(steps) >= int(tokens) // int(batch), "at most one token per request and step"
        assert float(tok_s) > 0
    assert len(_pngs(nb)) == 1, "the throughput plot"
    memory = _output(nb, "def bytes_per_device")
    capacity = int(re.search(r"KV cache: ([\d,]+) tokens", memory).group(1).replace(",", ""))
    weights_gib, kv_gib = (float(x) for x in re.search(r"cpu:0\s+([\d.]+)\s+([\d.]+)", memory).groups())
    per_token = int(re.search(r"([\d,]+) bytes per token", memory).group(1).replace(",", ""))
    assert capacity > 0 and math.isclose(kv_gib * 2**30, capacity * per_token, rel_tol=0.01)
    assert 0.2 < weights_gib < 1.0, "SmolLM2-135M in float32 is about 0.5 GiB"


def check_quantize(nb) -> None:
    table = _table(_output(nb, "results = evaluate("))
    assert "float" in table and "float, int8 KV cache" in table and "int8 RTN" in table and "int4 g128 AWQ" in table
    ppl, kl, top1, mib = (float(x) for x in table["float"])
    assert 5 < ppl < 200 and kl == 0 and top1 == 1
    for name, (p, k, t, m) in ((n, [float(x) for x in r]) for n, r in table.items()):
        assert math.isfinite(p) and k >= 0 and 0 <= t <= 1, name
        if name != "float":
            assert m <= mib, f"{name} is not larger than the float model"
    assert float(table["int8 RTN"][1]) < 0.05, "int8 per-channel weights stay close to float"
    assert float(table["int8 RTN"][3]) < 0.5 * mib
    assert len(_pngs(nb)) == 1, "the quality vs bytes chart"
    saved = _output(nb, 'print("reloaded model says:"')
    assert "method awq, format int4" in saved and "reloaded model says:" in saved
    assert re.search(r"reloaded model says: \S", saved), "the reloaded checkpoint generates text"


def check_tpu_vm(nb) -> None:
    assert "mesh axes ('data', 'model')" in _output(nb, "mesh = make_mesh(")
    tp = _output(nb, "tp_llm = LLM(")
    assert "What is the capital of France? -> The capital of France is Paris." in tp
    assert re.search(r"q_proj .* spec P\(None, 'model'\)", tp), "q_proj split over the model axis"
    assert "same answers as TP only: True" in _output(nb, "dp_llm = LLM(")
    compiled = _output(nb, "def attached_target")
    assert "compiles and fits" in compiled and "roofline decode batch 1" in compiled
    assert "server ready on port" in _output(nb, "server = subprocess.Popen")
    served = _output(nb, "client = OpenAI(")
    assert "Paris" in served.splitlines()[0] and re.search(r"streamed: \S", served)
    assert "server stopped, exit status 0" in _output(nb, "status = server.wait(")


CHECKS = {"quickstart": check_quickstart, "quantize": check_quantize, "tpu_vm": check_tpu_vm}


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name):
    """Fresh kernel, every cell in order, CI sizes: no cell errors and the expected outputs."""
    CHECKS[name](_execute(name))


# ---- the committed notebooks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_a_real_run(name):
    """Committed with the outputs of a full-size run (dated, machine named), small, no errors, no noisy metadata."""
    nb = _read(name)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    badge = f"https://colab.research.google.com/github/{_repo()}/blob/main/colab/{name}.ipynb"
    assert badge in first.source, "Open in Colab badge pointing at this notebook"
    assert re.search(r"outputs below are from a run on .*2-core AMD EPYC.*, \d{4}-\d{2}-\d{2}", first.source)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), "every code cell ran once, in order, in one kernel"
    assert all(o.output_type != "error" for c in code for o in c.outputs)
    assert all(not c.metadata for c in nb.cells), "no per-cell metadata (execution timestamps, ...)"
    assert set(nb.metadata) <= {"kernelspec", "language_info", "colab"}
    assert "JAXINFER_NOTEBOOK_SMALL" in code[0].source and "nothing installed" in _text(code[0])
    assert all(len(png) < 100_000 for png in _pngs(nb)), "small plots"
    assert (COLAB / f"{name}.ipynb").stat().st_size < 400_000
    CHECKS[name](nb)


def _repo() -> str:
    repos = {name: REPO_LINE.findall(_read(name).cells[1].source) for name in NOTEBOOKS}
    assert all(len(r) == 1 for r in repos.values()), repos
    (repo,) = {r[0] for r in repos.values()}
    return repo


def test_install_cell_is_shared_and_refuses_unusable_runtimes():
    """The install cell is the same in every notebook; its runtime checks pick the right jax extra or say why not."""
    sources = {_read(name).cells[1].source for name in NOTEBOOKS}
    assert len(sources) == 1, "the three install cells differ"
    (source,) = sources
    env = {"__name__": "install_cell"}
    os.environ["JAXINFER_NOTEBOOK_SMALL"], saved = "1", os.environ.get("JAXINFER_NOTEBOOK_SMALL")
    try:
        exec(compile(source, "install-cell", "exec"), env)  # installs nothing: jaxinfer is importable
    finally:
        if saved is None:
            del os.environ["JAXINFER_NOTEBOOK_SMALL"]
        else:
            os.environ["JAXINFER_NOTEBOOK_SMALL"] = saved
    req = env["jax_requirement"]
    assert req("tpu", None).startswith("jax[tpu]") and req("cpu", None).startswith("jax>=")
    assert req("gpu", [["Tesla T4", "550.54.15", "7.5"]]).startswith("jax[cuda12]")
    assert req("gpu", [["NVIDIA H100 80GB HBM3", "580.65.06", "9.0"]]).startswith("jax[cuda13]")
    assert req("gpu", [["Tesla P100", "580.65.06", "6.0"]]).startswith("jax[cuda12]")
    with pytest.raises(RuntimeError, match="driver 470.82.01"):
        req("gpu", [["Tesla T4", "470.82.01", "7.5"]])
    with pytest.raises(RuntimeError, match="compute capability 3.7"):
        req("gpu", [["Tesla K80", "535.104.05", "3.7"]])
    assert env["detect_runtime"]()[0] in ("cpu", "gpu", "tpu")
    assert sys.version_info >= (3, 11)


def test_readme_links_every_notebook():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    front = readme.split("\n## ", 1)[0]
    for name in NOTEBOOKS:
        assert f"https://colab.research.google.com/github/{_repo()}/blob/main/colab/{name}.ipynb" in front
        assert f"(colab/{name}.ipynb)" in front
