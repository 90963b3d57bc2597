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

Calibration (GPTQ / AWQ / SmoothQuant) uses windows taken after the evaluated tokens when
``--max-tokens`` leaves text over, otherwise the start of the text (then stated in the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_info, result_path  # noqa: E402

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


def llama_cpp_perplexity(gguf_path: Path, text: str, n_ctx: int, max_chunks: int | None, threads: int):
    """llama.cpp's perplexity protocol through llama-cpp-python: returns (ppl, tokens, chunk ids)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads,
                verbose=False)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    n_chunks = len(ids) // n_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    first = n_ctx // 2
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for c in range(n_chunks):
        toks = ids[c * n_ctx:(c + 1) * n_ctx]
        llm.reset()
        llm.eval(toks)
        logits = np.asarray(llm.scores[:n_ctx], np.float64)
        for j in range(first, n_ctx - 1):
            row = logits[j]
            m = row.max()
            lse = m + math.log(np.exp(row - m).sum())
            nll += lse - row[toks[j + 1]]
            count += 1
    return dict(perplexity=math.exp(nll / count), num_tokens=count, chunks=n_chunks,
                seconds=round(time.perf_counter() - t0, 1)), np.asarray(ids[: n_chunks * n_ctx], np.int32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", default=os.environ.get("JAXINFER_WIKITEXT", str(DEFAULT_TEXT)))
    ap.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
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
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from jaxinfer.compilation_cache import enable_compilation_cache
    from jaxinfer.loader import load_model
    from quantize.evaluate import Variant, evaluate, token_windows
    from quantize.model_formats import param_bytes
    from quantize.model_quant import calibration_tokens, quantize_model

    enable_compilation_cache()
    text = Path(args.text).read_text(encoding="utf-8")
    ref = load_model(None)
    ids = np.asarray(ref.tokenizer(text)["input_ids"], np.int32)
    windows = token_windows(ids, args.seq_len, args.max_tokens)
    used = windows.size
    rest = ids[used:]
    need = args.calib_samples * args.calib_seq_len
    calib_source = "tokens after the evaluated ones" if len(rest) >= need else "start of the text (overlaps)"
    calib = calibration_tokens(rest if len(rest) >= need else ids, args.calib_samples, args.calib_seq_len)

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
    for name, method, preset in VARIANTS:
        if not want(name):
            continue
        q = quantize_model(ref.model, ref.params, method, preset, calib_tokens=calib)
        variants[name] = q.params
        info[name] = dict(method=method, format=q.info["format"], bytes=q.info["bytes"],
                          group_size_fallbacks=sorted(set(q.info["group_size_fallbacks"].values())),
                          seconds_to_quantize=q.info["seconds"])
        sys.stderr.write(f"{name}: quantized in {q.info['seconds']} s\n")
    table = {}
    if not args.cross_check_only:
        results = evaluate(ref.model, ref.params, variants, windows, batch=args.batch)
        table = {n: {**r.to_dict(), **info[n]} for n, r in results.items()}
    sizes = {n: v["bytes"] for n, v in info.items()}

    cross = None
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        cross = dict(error=f"llama-cpp-python unavailable: {e}")
    if not args.skip_llama_cpp and cross is None:
        n_chunks = args.cross_check_windows
        if n_chunks is None and args.max_tokens is not None:
            n_chunks = args.max_tokens // args.seq_len
        lc, lc_ids = llama_cpp_perplexity(ref.source.path, text, args.seq_len, n_chunks, os.cpu_count() or 1)
        lc_windows = lc_ids.reshape(-1, args.seq_len)
        ours = evaluate(ref.model, ref.params, {"gguf-native": native}, lc_windows, score_start=args.seq_len // 2,
                        batch=args.batch)
        cross = dict(llama_cpp=lc, jaxinfer_float=ours["float"].to_dict(),
                     jaxinfer_gguf_native=ours["gguf-native"].to_dict(),
                     protocol=f"llama.cpp tokenization (no BOS: the GGUF sets add_bos_token=false), "
                              f"{lc_windows.shape[0]} windows of {args.seq_len}, positions "
                              f"[{args.seq_len // 2}, {args.seq_len - 1}) scored")

    out = dict(
        benchmark="quant_quality", model="smollm2-135m-instruct (GGUF Q4_1)", machine=machine_info(),
        text=str(Path(args.text).resolve()), text_tokens=int(len(ids)), evaluated_tokens=int(used),
        full_text=args.max_tokens is None or used >= len(ids) - args.seq_len,
        protocol=(f"jaxinfer tokenizer; {windows.shape[0]} non-overlapping windows of {args.seq_len} tokens "
                  f"from the start of the text; every position but the last scored "
                  f"({args.seq_len - 1} tokens per window)"),
        calibration=dict(samples=args.calib_samples, seq_len=args.calib_seq_len, source=calib_source),
        results=table, bytes=sizes, llama_cpp_cross_check=cross,
    )
    path = result_path("quant_quality" + (f"-{args.tag}" if args.tag else ""))
    path.write_text(json.dumps(out, indent=1))
    print(f"{'format':<26} {'ppl':>9} {'KL':>8} {'top-1':>7} {'MiB':>7} {'B/param':>8}")
    for n, r in table.items():
        b = r["bytes"]
        print(f"{n:<26} {r['perplexity']:>9.3f} {r['kl']:>8.4f} {r['top1']:>7.4f} "
              f"{b['total_bytes'] / 2**20:>7.1f} {b['bytes_per_param']:>8.3f}")
    if cross:
        print(f"llama.cpp ppl {cross['llama_cpp']['perplexity']:.4f}; jaxinfer float "
              f"{cross['jaxinfer_float']['perplexity']:.4f}, native {cross['jaxinfer_gguf_native']['perplexity']:.4f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
