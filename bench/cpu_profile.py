"""Where the CPU's time goes in bench/throughput.py's workload, by machine-code symbol (Linux ``perf``).

A child process builds ``LLM()`` with the default settings and the throughput benchmark's limits, compiles
every step shape (``engine.warmup()``), then runs the workload (``--num-prompts`` prompts of 64-512 random
tokens, ``--output-len`` outputs, greedy, EOS ignored; the prompts of ``bench/throughput.py``'s
``make_prompts``, seed 1 so that none is in the prefix cache from the warm-up). ``perf record`` samples
the child's threads for the whole run (``cpu-clock`` at ``--freq`` Hz: it needs no hardware counters, which
virtual machines often lack). The samples are then summed per symbol and per part:

* ``quantized matmul``: the C++ matmul kernel (AMX / vdpbf16ps products, panel build, decode GEMV);
* ``attention``: the C++ attention kernel (decode rows, blocked prefill);
* ``sampler kernel``: the C++ row argmax / log-sum-exp;
* ``XLA runtime`` (thread pool, thunks) and ``XLA generated code`` (fused elementwise ops);
* ``Python`` (host loop, scheduler), ``Linux kernel`` (page faults, scheduling), ``other``.

Percentages are of all samples of the process; the samples of the two busiest threads against the run's
wall time give how busy the cores were. Prints a table and writes JSON to ``bench/results/``.

Usage: ``python bench/cpu_profile.py [--num-prompts 64] [--output-len 128] [--tag xeon]``
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_info, result_path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, os, sys, time
sys.path.insert(0, {bench!r})
from throughput import make_prompts
from jaxinfer import LLM, SamplingParams
n, lo, hi, out_len, ready = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
llm = LLM(max_num_seqs=64, max_num_batched_tokens=512, max_model_len=hi + out_len + 16)
llm.engine.warmup()
prompts = make_prompts(n, lo, hi, vocab=llm.engine.model_config.vocab_size, seed=1)
sp = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
open(ready, "w").close()
time.sleep(2.0)  # perf attaches
t = time.perf_counter()
outs = llm.generate(prompts, sp)
dt = time.perf_counter() - t
print(json.dumps({{"elapsed_s": dt, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}}))
"""

PARTS = [  # (part, predicate on (dso, symbol))
    ("quantized matmul", lambda dso, sym: dso.startswith("qmm_cpu")),
    ("attention", lambda dso, sym: dso.startswith("rpa_cpu")),
    ("sampler kernel", lambda dso, sym: dso.startswith("logits_rows")),
    ("XLA generated code", lambda dso, sym: dso.startswith("[JIT]") or dso.startswith("[unknown]")),
    ("XLA runtime", lambda dso, sym: dso.startswith(("libjax_common", "xla_extension", "libjax"))),
    ("Python", lambda dso, sym: dso.startswith("libpython") or dso == "python" or dso.startswith("python")),
    ("Linux kernel", lambda dso, sym: dso.startswith("[kernel")),
]

_LINE = re.compile(r"^\s*([0-9.]+)%\s+(.+?)\s+\[[.k]\]\s+(.*)$")


def part_of(dso: str, sym: str) -> str:
    for name, pred in PARTS:
        if pred(dso, sym):
            return name
    return "other"


def short_symbol(sym: str) -> str:
    """A symbol without argument lists and template arguments' namespaces (for the table)."""
    sym = sym.replace("(anonymous namespace)::", "")
    sym = re.sub(r"\(\([^()]*\)(\d+)\)", r"\1", sym)  # (WKind)2 -> 2
    return sym[:110]


def parse_report(text: str) -> list[tuple[float, str, str]]:
    rows = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3).strip()))
    return rows


def thread_samples(perf: str, data: Path) -> list[int]:
    out = subprocess.run([perf, "script", "-i", str(data), "-F", "tid"], capture_output=True, text=True, check=True)
    counts = collections.Counter(line.strip() for line in out.stdout.splitlines() if line.strip())
    return sorted(counts.values(), reverse=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--min-input", type=int, default=64)
    p.add_argument("--max-input", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--freq", type=int, default=999, help="perf samples per second and thread")
    p.add_argument("--top", type=int, default=25, help="symbols listed")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    perf = shutil.which("perf")
    if perf is None:
        sys.exit("bench/cpu_profile.py needs Linux perf (e.g. apt-get install linux-perf)")
    with tempfile.TemporaryDirectory() as tmp:
        ready, data = Path(tmp) / "ready", Path(tmp) / "perf.data"
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        child = subprocess.Popen([sys.executable, "-c", _CHILD.format(bench=str(Path(__file__).parent)),
                                  str(args.num_prompts), str(args.min_input), str(args.max_input),
                                  str(args.output_len), str(ready)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 text=True)
        while not ready.exists():
            if child.poll() is not None:
                sys.exit(f"the workload process exited early (code {child.returncode})")
            time.sleep(0.2)
        rec = subprocess.Popen([perf, "record", "-F", str(args.freq), "-p", str(child.pid), "-o", str(data)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        out, _ = child.communicate()
        rec.wait(timeout=120)
        if child.returncode != 0 or not data.exists():
            sys.exit(f"workload exit code {child.returncode}; perf: {rec.stderr.read() if rec.stderr else ''}")
        run = json.loads(out.strip().splitlines()[-1])
        report = subprocess.run([perf, "report", "-i", str(data), "--no-children", "-g", "none", "--sort",
                                 "dso,sym", "--stdio"], capture_output=True, text=True, check=True).stdout
        per_thread = thread_samples(perf, data)
    rows = parse_report(report)
    parts: dict[str, float] = collections.defaultdict(float)
    for pct, dso, sym in rows:
        parts[part_of(dso, sym)] += pct
    total = sum(per_thread)
    busiest = per_thread[:2]
    busy = [n / args.freq / run["elapsed_s"] for n in busiest]
    tok_s = run["output_tokens"] / run["elapsed_s"]
    print(f"{tok_s:.1f} output tok/s, {total} samples; two busiest threads busy {busy[0]:.0%} / "
          f"{busy[1] if len(busy) > 1 else 0:.0%} of the run")
    for name, pct in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {pct:6.2f}%  {name}")
    top = [{"percent": pct, "part": part_of(dso, sym), "dso": dso, "symbol": short_symbol(sym)}
           for pct, dso, sym in rows[: args.top]]
    for r in top:
        print(f"  {r['percent']:6.2f}%  {r['part']:<18} {r['symbol']}")
    path = result_path("cpu_profile" + (f"-{args.tag}" if args.tag else ""))
    path.write_text(json.dumps({
        "benchmark": "cpu_profile", "machine": machine_info(), "args": vars(args),
        "output_tok_s": tok_s, "elapsed_s": run["elapsed_s"], "samples": total,
        "busiest_threads_busy_fraction": busy, "parts_percent": dict(parts), "top_symbols": top}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
