"""Serving benchmark: TTFT, TPOT, ITL and e2e latency (mean / p50 / p99) and request / token throughput of
``jaxinfer serve`` under load, over a matrix of request rates and concurrency limits.

Fixed seed and dataset: random-token prompts of 64-512 tokens, 128 output tokens (``ignore_eos``,
greedy). Each matrix cell gets its own prompts (different seed), so no cell hits the prefix cache with
another cell's prompts. The server is started here (``python -m jaxinfer.cli serve``, which compiles
every step shape before listening, so no compilation lands in a timed window) unless ``--url`` points
at a running one. A short warm-up precedes the timed runs.

Writes ``bench/results/serving-<date>-<machine>.json`` and a ``.png`` plot beside it, and prints a
markdown table. The peer, measured in the same run: the requests of the all-at-once cells listed in
``--peer-concurrency`` go through the engine in-process (no HTTP, same concurrency limit), and the
served / offline output-token throughput ratio is reported.

Usage::

    python bench/serving.py                                  # full matrix: rates 1 4 inf x concurrency 1 8 32
    python bench/serving.py --waves 1                        # half the prompts per cell (CPU-sized run)
    python bench/serving.py --rates inf --concurrency 1 8 --num-prompts 16
    python bench/serving.py --url http://127.0.0.1:8000      # a server already running
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from machine import machine_info, result_path
from serving_load import random_dataset, run_load, summarize

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    """``jaxinfer serve`` in a subprocess on a free loopback port; waits until /health answers 200."""
    port = _free_port()
    cmd = [sys.executable, "-m", "jaxinfer.cli", "-v", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--max-waiting-requests", "4096"]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = tempfile.NamedTemporaryFile("w", prefix="jaxinfer-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise TimeoutError("the server did not become healthy in time")


def _step_time(url: str) -> tuple[float, float]:
    """(sum of seconds, count) of the server's engine steps so far, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    total = count = 0.0
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "jaxinfer:engine_step_duration_seconds_sum":
                total = smp.value
            elif smp.name == "jaxinfer:engine_step_duration_seconds_count":
                count = smp.value
    return total, count


def _model_name(url: str) -> str:
    return httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]


def _vocab_range(url: str) -> tuple[int, int]:
    return (1000, 30000)  # inside every supported model's vocabulary, away from special tokens


def run_matrix(args, url: str) -> list[dict]:
    model = _model_name(url)
    vocab = _vocab_range(url)
    warm = random_dataset(args.warmup, args.seed + 999, (args.input_len[1], args.input_len[1]), 8, vocab)
    asyncio.run(run_load(url, model, warm, math.inf, max(args.concurrency), args.seed))
    rows = []
    cell = 0
    for rate in args.rates:
        for conc in args.concurrency:
            cell += 1
            n = args.num_prompts or max(4, args.waves * conc)
            reps = []
            step0 = _step_time(url)
            for rep in range(args.repeats):
                data = random_dataset(n, args.seed + 100 * cell + rep, tuple(args.input_len), args.output_len, vocab)
                results, duration = asyncio.run(run_load(url, model, data, rate, conc, args.seed + cell))
                reps.append((summarize(results, duration), args.seed + 100 * cell + rep))
            best, data_seed = sorted(reps, key=lambda s: s[0]["output_token_throughput"])[len(reps) // 2]  # median
            step1 = _step_time(url)
            steps = step1[1] - step0[1]
            row = {"rate": rate if math.isfinite(rate) else "inf", "concurrency": conc, "num_prompts": n,
                   "dataset_seed": data_seed, **best,
                   "server_engine_step_ms_mean": 1000 * (step1[0] - step0[0]) / steps if steps else None}
            rows.append(row)
            sys.stderr.write(_table_line(row) + "\n")
    return rows


def run_peer(args, rows: list[dict]) -> list[dict]:
    """The same requests as the all-at-once cells, through the engine in-process (see serving_offline)."""
    from serving_offline import run_offline

    peers = []
    for conc in args.peer_concurrency:
        row = next((r for r in rows if r["rate"] == "inf" and r["concurrency"] == conc), None)
        if row is None:
            continue
        data = random_dataset(row["num_prompts"], row["dataset_seed"], tuple(args.input_len), args.output_len,
                              (1000, 30000))
        opts = {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
                "max_num_batched_tokens": args.max_num_batched_tokens}
        results, duration = run_offline(data, conc, opts, args.model)
        peer = {"rate": "inf", "concurrency": conc, "num_prompts": row["num_prompts"], **summarize(results, duration)}
        peer["served_over_offline_output_tok_s"] = row["output_token_throughput"] / peer["output_token_throughput"]
        peers.append(peer)
        sys.stderr.write("offline " + _table_line(peer) + "\n")
    return peers


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}"


TABLE_HEAD = ("| rate (req/s) | conc | reqs | TTFT mean / p50 / p99 (ms) | TPOT mean / p50 / p99 (ms) | "
              "ITL mean / p50 / p99 (ms) | e2e mean / p50 / p99 (ms) | req/s | out tok/s | total tok/s |\n"
              "|---|---|---|---|---|---|---|---|---|---|")


def _table_line(r: dict) -> str:
    def trio(k):
        return " / ".join(_fmt(r[k][q]) for q in ("mean", "p50", "p99"))

    return (f"| {r['rate']} | {r['concurrency']} | {r['completed']}/{r['num_prompts']} | {trio('ttft_ms')} | "
            f"{trio('tpot_ms')} | {trio('itl_ms')} | {trio('e2e_ms')} | {r['request_throughput']:.2f} | "
            f"{r['output_token_throughput']:.1f} | {r['total_token_throughput']:.1f} |")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for rate in dict.fromkeys(r["rate"] for r in rows):
        sel = [r for r in rows if r["rate"] == rate]
        conc = [r["concurrency"] for r in sel]
        label = f"rate {rate} req/s"
        axes[0].plot(conc, [r["ttft_ms"]["p50"] or math.nan for r in sel], "o-", label=label)
        axes[1].plot(conc, [r["tpot_ms"]["p50"] or math.nan for r in sel], "o-", label=label)
        axes[2].plot(conc, [r["output_token_throughput"] for r in sel], "o-", label=label)
    for ax, name in zip(axes, ("TTFT p50 (ms)", "TPOT p50 (ms)", "output tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max concurrency")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--model", default=None, help="model for the started server (default: the default model)")
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 4.0, math.inf], help="req/s; inf = all at once")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--num-prompts", type=int, default=None, help="per cell (default: max(4, waves x concurrency))")
    p.add_argument("--waves", type=int, default=2, help="prompts per cell as a multiple of the concurrency")
    p.add_argument("--input-len", type=int, nargs=2, default=[64, 512], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="runs per cell; the median (by output tok/s) is kept")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests before the matrix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--startup-timeout", type=float, default=1800.0)
    p.add_argument("--peer-concurrency", type=int, nargs="*", default=[8],
                   help="all-at-once cells to repeat through the engine in-process (the peer; none: skip)")
    p.add_argument("--name", default="serving", help="result file prefix")
    args = p.parse_args(argv)

    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    load_before = os.getloadavg()
    try:
        t = time.perf_counter()
        rows = run_matrix(args, url)
        elapsed = time.perf_counter() - t
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    peers = run_peer(args, rows) if proc is not None else []
    info = machine_info()
    out = result_path(args.name)
    record = {"benchmark": "serving", "machine": info, "url": url if args.url else "started here",
              "config": {k: (v if not isinstance(v, float) or math.isfinite(v) else "inf")
                         for k, v in vars(args).items() if k != "rates"},
              "rates": [r if math.isfinite(r) else "inf" for r in args.rates], "wall_s": elapsed, "results": rows,
              "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
              "offline_peer": peers}
    out.write_text(json.dumps(record, indent=2))
    title = (f"jaxinfer serve, {info['device']} ({info['cpu']}, {info['cores']} cores), {info['date']}: "
             f"{args.input_len[0]}-{args.input_len[1]} in / {args.output_len} out")
    plot(rows, out.with_suffix(".png"), title)
    sys.stdout.write(TABLE_HEAD + "\n" + "\n".join(_table_line(r) for r in rows) + "\n")
    sys.stdout.write(f"load average before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
                     f"on {os.cpu_count()} cores (other work on the machine inflates latencies)\n")
    for peer in peers:
        sys.stdout.write(f"offline engine, same requests: {_table_line(peer)}  served / offline output tok/s = "
                         f"{peer['served_over_offline_output_tok_s']:.2f}\n")
    sys.stdout.write(f"wrote {out} and {out.with_suffix('.png').name} ({elapsed:.0f} s)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
