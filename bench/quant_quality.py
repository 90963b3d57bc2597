"""Quantization quality of the default model (SmolLM2-135M-Instruct) on WikiText-2 (test split).

For every format: perplexity, KL(p_float || p_q) per token, top-1 agreement with the float model, and the
model's bytes, all on identical token windows (protocol in ``quantize/evaluate.py``). The float
reference is the float32 dequantization of the model's GGUF file (Q4_1 linears, Q8_0 embedding): it is
the only released form of these weights available here, so every other format re-quantizes those values.

Cross-check of the protocol against llama.cpp (``llama-cpp-python``, same GGUF): llama.cpp's
``perplexity`` tool tokenizes the whole text, cuts it into ``n_ctx`` windows and scores only the second
half of each window. That computation is repeated here with llama.cpp's own forward (``logits_all``),
and our float / native-GGUF models are scored on exactly those tokens with the same second-half rule.

Usage::

    nice -n 10 python bench/quant_quality.py [--max-tokens N] [--seq-len 512] [--skip-llama-cpp]

The run is resumable (``bench/quality_work.py``): calibration tokens, quantized models and running sums
live in a work directory and are saved every minute, so an interrupted run started again with the same
arguments continues where it stopped (the full text takes several CPU-hours).

Calibration (GPTQ / AWQ / SmoothQuant), never overlapping the evaluated tokens: ``--calib-text FILE``
when given; else windows after the evaluated tokens when ``--max-tokens`` leaves enough text over; else
(the full text is evaluated) sequences sampled from the float model itself (temperature 1, each started
from the document-boundary token), so no evaluated token is seen by the calibration.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_info, result_path  # noqa: E402
from quality_work import WorkDir, sha256_text  # noqa: E402

_REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = [p / "shared" / "data" / "wikitext-2-raw-test.txt" for p in (_REPO.parent, _REPO.parent.parent)]
DEFAULT_TEXT = next((p for p in _CANDIDATES if p.is_file()), _CANDIDATES[0])

VARIANTS = [  # name, method, preset
    ("int8", "rtn", "int8"),
    ("fp8", "fp8", "fp8"),
    ("fp8-w8a8", "fp8", "fp8-w8a8"),
    ("int4-g128-rtn", "rtn", "int4"),
    ("int4-g128-gptq", "gptq", "int4"),
    ("int4-g128-awq", "awq", "int4"),
    ("int8-w8a8-smoothquant", "smoothquant", "int8-w8a8"),
]


def llama_cpp_tokens(gguf_path: Path, text: str) -> np.ndarray:
    """llama.cpp's tokenization of the whole text (no BOS: the GGUF sets add_bos_token=false)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=64, vocab_only=True, verbose=False)
    return np.asarray(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False), np.int32)


def llama_cpp_perplexity(gguf_path: Path, windows: np.ndarray, threads: int, work: WorkDir) -> dict:
    """llama.cpp's perplexity protocol through llama-cpp-python on ``windows`` (i32[W, n_ctx]): each window
    from an empty cache, the second half scored. Resumable: sums are saved in ``work`` every minute."""
    from llama_cpp import Llama

    n_chunks, n_ctx = windows.shape
    llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads,
                verbose=False)
    st = work.progress("llama-cpp") or dict(windows_done=0, nll=0.0, count=0, seconds=0.0)
    first = n_ctx // 2
    last_save = time.monotonic()
    for c in range(st["windows_done"], n_chunks):
        t0 = time.perf_counter()
        toks = windows[c].tolist()
        llm.reset()
        llm.eval(toks)
        logits = np.asarray(llm.scores[first:n_ctx - 1], np.float64)
        m = logits.max(axis=1)
        lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
        st["nll"] += float((lse - logits[np.arange(len(logits)), windows[c, first + 1:]]).sum())
        st["count"] += len(logits)
        st["windows_done"] = c + 1
        st["seconds"] += time.perf_counter() - t0
        if c + 1 == n_chunks or time.monotonic() - last_save >= 60:
            work.save_progress("llama-cpp", st)
            last_save = time.monotonic()
    return dict(perplexity=math.exp(st["nll"] / st["count"]), num_tokens=st["count"], chunks=n_chunks,
                seconds=round(st["seconds"], 1))


def sampled_calibration(n_samples: int, seq_len: int) -> np.ndarray:
    """``i32[n_samples, seq_len]`` sampled from the float default model (temperature 1, seed i), each
    started from the document-boundary token (the first sampled token is the window's first token)."""
    from jaxinfer import LLM, SamplingParams

    llm = LLM(max_num_seqs=min(n_samples, 32))
    tok = llm.tokenizer
    start = tok.convert_tokens_to_ids("<|endoftext|>")
    if start is None or start == tok.unk_token_id:
        start = tok.bos_token_id
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=seq_len, ignore_eos=True) for i in range(n_samples)]
    outs = llm.generate([[start]] * n_samples, params)
    return np.asarray([o.outputs[0].token_ids[:seq_len] for o in outs], np.int32)


def resumable_evaluate(work: WorkDir, part: str, model, ref_params, variants, windows, **kw):
    """``quantize.evaluate.evaluate`` continuing from, and saving to, ``work``'s progress of ``part``."""
    from quantize.evaluate import EvalProgress, evaluate

    saved = work.progress(part)
    return evaluate(model, ref_params, variants, windows, resume=EvalProgress.from_dict(saved) if saved else None,
                    checkpoint=lambda p: work.save_progress(part, p.to_dict()), **kw)


def load_or_quantize(work: WorkDir, name: str, method: str, preset: str, ref, calib):
    """The variant saved in ``work``, or quantize it now and save it (jaxinfer.quantized_checkpoint)."""
    from jaxinfer.quantized_checkpoint import load_quantized, save_quantized
    from quantize.model_quant import quantize_model

    d = work.variant_dir(name)
    if (d / "params").exists():
        _, params, manifest = load_quantized(d)
        return params, manifest["quantization"]
    q = quantize_model(ref.model, ref.params, method, preset, calib_tokens=calib)
    save_quantized(d, ref.model, q.params, info=q.info, source_model=ref.source.name)
    sys.stderr.write(f"{name}: quantized in {q.info['seconds']} s\n")
    return q.params, q.info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", default=os.environ.get("JAXINFER_WIKITEXT", str(DEFAULT_TEXT)))
    ap.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calib-text", default=None, help="UTF-8 calibration text (default: see the docstring)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--only", action="append", default=None,
                    help="variant names to run (repeatable; also gguf-native, kv-int8, kv-fp8)")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--with-native", action="store_true",
                    help="also score the native GGUF weights in the main table (identical to float)")
    ap.add_argument("--cross-check-only", action="store_true", help="only the llama.cpp cross-check")
    ap.add_argument("--cross-check-windows", type=int, default=None, help="llama.cpp windows to score")
    ap.add_argument("--work-dir", default=None, help="resumable state (default: under the jaxinfer cache)")
    ap.add_argument("--restart", action="store_true", help="discard the work directory's saved state")
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from jaxinfer.compilation_cache import cache_root, enable_compilation_cache
    from jaxinfer.loader import load_model
    from quantize.evaluate import Variant, token_windows
    from quantize.model_formats import param_bytes
    from quantize.model_quant import CALIBRATED, calibration_tokens

    enable_compilation_cache()
    text = Path(args.text).read_text(encoding="utf-8")
    ref = load_model(None)
    ids = np.asarray(ref.tokenizer(text)["input_ids"], np.int32)
    windows = token_windows(ids, args.seq_len, args.max_tokens)
    used = windows.size
    rest = ids[used:]
    need = args.calib_samples * args.calib_seq_len
    calib_text = Path(args.calib_text).read_text(encoding="utf-8") if args.calib_text else None
    n_cal, l_cal = args.calib_samples, args.calib_seq_len
    if calib_text is not None:
        calib_source = f"--calib-text {Path(args.calib_text).resolve()} (sha256 {sha256_text(calib_text)[:16]})"
        calib_fn = lambda: calibration_tokens(ref.tokenizer(calib_text)["input_ids"], n_cal, l_cal)
    elif len(rest) >= need:
        calib_source = "tokens after the evaluated ones"
        calib_fn = lambda: calibration_tokens(rest, n_cal, l_cal)
    else:
        calib_source = "sampled from the float model (temperature 1, from the document-boundary token)"
        calib_fn = lambda: sampled_calibration(n_cal, l_cal)
    setup = dict(text_sha256=sha256_text(text), seq_len=args.seq_len, max_tokens=args.max_tokens,
                 windows=int(windows.shape[0]), calib_samples=args.calib_samples,
                 calib_seq_len=args.calib_seq_len, calib_source=calib_source)
    key = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:12]
    work = WorkDir(args.work_dir or cache_root() / "quant_quality" / key, setup, restart=args.restart)
    sys.stderr.write(f"work directory (resumable): {work.path}\n")

    def make_calib():  # called only when a calibrated method has no saved calibration yet
        return calib_fn(), dict(source=calib_source, samples=n_cal, seq_len=l_cal)

    variants, info = {}, {}
    info["float"] = dict(method="none", format="float32 (dequantized GGUF)", bytes=param_bytes(ref.params))
    want = lambda name: not args.cross_check_only and (not args.only or name in args.only)
    native = load_model(None, quantization="gguf", load_tokenizer_too=False).params
    info["gguf-native (Q4_1/Q8_0)"] = dict(bytes=param_bytes(native))
    if args.with_native and want("gguf-native"):
        variants["gguf-native (Q4_1/Q8_0)"] = native
        info["gguf-native (Q4_1/Q8_0)"] = dict(method="gguf import", format="Q4_1 linears, Q8_0 embedding",
                                               bytes=param_bytes(native))
    for kv in ("int8", "fp8"):
        if want(f"kv-{kv}"):  # float weights, paged KV cache quantized per token and head
            variants[f"kv-{kv}"] = Variant(ref.params, kv)
            info[f"kv-{kv}"] = dict(method="kv cache", format=f"{kv} KV pages (absmax per token x head)",
                                    bytes=param_bytes(ref.params))
    calib, calib_info = None, None
    for name, method, preset in VARIANTS:
        if not want(name):
            continue
        if method in CALIBRATED and calib is None:
            calib, calib_info = work.calibration(make_calib)
        params, qinfo = load_or_quantize(work, name, method, preset, ref, calib)
        variants[name] = params
        info[name] = dict(method=method, format=qinfo["format"], bytes=qinfo["bytes"],
                          group_size_fallbacks=sorted(set(qinfo["group_size_fallbacks"].values())),
                          seconds_to_quantize=qinfo["seconds"])
    table = {}
    if not args.cross_check_only:
        results = resumable_evaluate(work, "main", ref.model, ref.params, variants, windows, batch=args.batch)
        table = {n: {**r.to_dict(), **info[n]} for n, r in results.items()}
    sizes = {n: v["bytes"] for n, v in info.items()}

    cross = None
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        cross = dict(error=f"llama-cpp-python unavailable: {e}")
    if not args.skip_llama_cpp and cross is None:
        lc_ids = llama_cpp_tokens(ref.source.path, text)
        n_chunks = len(lc_ids) // args.seq_len
        if args.cross_check_windows is not None:
            n_chunks = min(n_chunks, args.cross_check_windows)
        elif args.max_tokens is not None:
            n_chunks = min(n_chunks, args.max_tokens // args.seq_len)
        lc_windows = lc_ids[: n_chunks * args.seq_len].reshape(n_chunks, args.seq_len)
        lc = llama_cpp_perplexity(ref.source.path, lc_windows, os.cpu_count() or 1, work)
        ours_variants = {"gguf-native": native} if args.with_native else {}
        ours = resumable_evaluate(work, "cross-check", ref.model, ref.params, ours_variants, lc_windows,
                                  score_start=args.seq_len // 2, batch=args.batch)
        cross = dict(llama_cpp=lc, jaxinfer_float=ours["float"].to_dict(),
                     protocol=f"llama.cpp tokenization (no BOS: the GGUF sets add_bos_token=false), "
                              f"{n_chunks} windows of {args.seq_len} ({n_chunks * args.seq_len} of "
                              f"{len(lc_ids)} tokens), positions [{args.seq_len // 2}, {args.seq_len - 1}) scored")
        if "gguf-native" in ours:
            cross["jaxinfer_gguf_native"] = ours["gguf-native"].to_dict()

    out = dict(
        benchmark="quant_quality", model="smollm2-135m-instruct (GGUF Q4_1)", machine=machine_info(),
        text=str(Path(args.text).resolve()), text_tokens=int(len(ids)), evaluated_tokens=int(used),
        full_text=bool(table) and (args.max_tokens is None or used >= len(ids) - args.seq_len),
        protocol=(f"jaxinfer tokenizer; {windows.shape[0]} non-overlapping windows of {args.seq_len} tokens "
                  f"from the start of the text; every position but the last scored "
                  f"({args.seq_len - 1} tokens per window)"),
        calibration=calib_info, work_dir=str(work.path),
        results=table, bytes=sizes, llama_cpp_cross_check=cross,
    )
    path = result_path("quant_quality" + (f"-{args.tag}" if args.tag else ""))
    path.write_text(json.dumps(out, indent=1))
    print(f"{'format':<26} {'ppl':>9} {'KL':>8} {'top-1':>7} {'MiB':>7} {'B/param':>8}")
    for n, r in table.items():
        b = r["bytes"]
        print(f"{n:<26} {r['perplexity']:>9.3f} {r['kl']:>8.4f} {r['top1']:>7.4f} "
              f"{b['total_bytes'] / 2**20:>7.1f} {b['bytes_per_param']:>8.3f}")
    if cross and "llama_cpp" in cross:
        print(f"llama.cpp ppl {cross['llama_cpp']['perplexity']:.4f}; jaxinfer float "
              f"{cross['jaxinfer_float']['perplexity']:.4f} ({cross['protocol']})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
