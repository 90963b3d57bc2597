"""``jaxinfer quantize`` and ``jaxinfer eval-ppl`` subcommands (registered by :func:`register`)."""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

from jaxinfer.errors import QuantizationError


def register(sub) -> None:
    """Add the ``quantize`` and ``eval-ppl`` subcommands to the ``jaxinfer`` subparsers."""
    q = sub.add_parser("quantize", help="quantize a model's weights and save a quantized checkpoint")
    q.add_argument("--model", default=None, help="model to quantize (default: smollm2-135m-instruct)")
    q.add_argument("--method", required=True, choices=["rtn", "gptq", "awq", "smoothquant", "fp8"])
    q.add_argument("--bits", type=int, choices=[4, 8], default=None,
                   help="weight bits (default: 4 for awq, 8 otherwise)")
    q.add_argument("--group-size", type=int, default=None,
                   help="rows per scale: 32, 64, 128, or 0 for per-channel (default: 128 for 4 bits, "
                        "per-channel for 8 bits)")
    q.add_argument("--asym", action="store_true", help="asymmetric int4 (scale + offset per group)")
    q.add_argument("--act", choices=["fp8"], default=None, help="with --method fp8: W8A8 fp8")
    q.add_argument("--calib-text", default=None, help="UTF-8 text file for calibration (gptq/awq/smoothquant)")
    q.add_argument("--calib-samples", type=int, default=64, help="calibration sequences (default 64)")
    q.add_argument("--calib-seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    q.add_argument("--keep", action="append", default=[],
                   help="linears kept float, fnmatch pattern such as 'layers_0/*' (repeatable)")
    q.add_argument("--keep-first-last", action="store_true", help="keep the first and last decoder layers float")
    q.add_argument("--quantize-head", action="store_true", help="also quantize the LM head / tied embedding")
    q.add_argument("--dtype", default="float32", help="float dtype of the result (default float32)")
    q.add_argument("--out", required=True, help="output directory")
    q.set_defaults(handler=run_quantize)

    e = sub.add_parser("eval-ppl", help="perplexity, KL divergence and top-1 agreement vs the float model")
    e.add_argument("--model", default=None, help="reference model (default: smollm2-135m-instruct)")
    e.add_argument("--quantized", action="append", default=[],
                   help="quantized checkpoint directory, or 'gguf' for the model's native GGUF weights "
                        "(repeatable)")
    e.add_argument("--kv-cache-dtype", action="append", default=[], choices=["auto", "int8", "fp8"],
                   help="also score the float weights over a paged KV cache of this dtype (repeatable)")
    e.add_argument("--compute-dtype", action="append", default=[], choices=["bfloat16", "float16"],
                   help="also score the model loaded and computed in this dtype, over the dense cache and over "
                        "each --kv-cache-dtype (repeatable; e.g. bfloat16 with int8 KV, the CPU default); with "
                        "--quantized gguf also the GGUF's quantized weights in this dtype")
    e.add_argument("--int8-activations", action="store_true",
                   help="with --quantized gguf and --compute-dtype: also score the GGUF's weights on the C++ CPU "
                        "matmul's int8 dot path (activations quantized per 32-block; needs AVX512-VNNI), "
                        "named '...+int8act'")
    e.add_argument("--only", nargs="+", default=None, metavar="PATTERN",
                   help="score only the variants whose names match one of these fnmatch patterns (the float "
                        "reference is always scored)")
    e.add_argument("--text", required=True, help="UTF-8 text file to score (e.g. WikiText-2 test)")
    e.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    e.add_argument("--seq-len", type=int, default=512, help="window length (default 512)")
    e.add_argument("--second-half", action="store_true",
                   help="score only the second half of each window (llama.cpp perplexity protocol)")
    e.add_argument("--batch", type=int, default=1, help="windows per forward call")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.set_defaults(handler=run_eval)


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QuantizationError(f"cannot read text file {path}: {e}") from e


def run_quantize(args: argparse.Namespace) -> int:
    """Load, calibrate, quantize and save; a summary goes to stderr."""
    from jaxinfer.config import resolve_dtype
    from jaxinfer.loader import load_model
    from jaxinfer.quantized_checkpoint import save_quantized
    from quantize.model_formats import method_config
    from quantize.model_quant import CALIBRATED, calibration_tokens, quantize_model

    gs = "default" if args.group_size is None else args.group_size
    cfg = method_config(args.method, args.bits, gs, symmetric=not args.asym, act=args.act)
    if args.method in CALIBRATED and not args.calib_text:
        raise QuantizationError(f"--method {args.method} needs --calib-text FILE")
    loaded = load_model(args.model, dtype=resolve_dtype(args.dtype))
    calib = None
    if args.method in CALIBRATED:
        ids = loaded.tokenizer(_read_text(args.calib_text))["input_ids"]
        calib = calibration_tokens(ids, args.calib_samples, args.calib_seq_len)
    res = quantize_model(loaded.model, loaded.params, args.method, cfg, calib_tokens=calib,
                         keep=tuple(args.keep), keep_first_last=args.keep_first_last,
                         quantize_head=args.quantize_head)
    if calib is not None:
        res.info["calibration"]["text"] = str(Path(args.calib_text).resolve())
    out = save_quantized(args.out, loaded.model, res.params, info=res.info,
                         source_model=args.model or loaded.source.name, tokenizer=loaded.tokenizer)
    b = res.info["bytes"]
    sys.stderr.write(f"[jaxinfer] {args.method} {cfg.name}: {b['total_bytes'] / 2**20:.1f} MiB "
                     f"({b['bytes_per_param']:.3f} bytes/param) in {res.info['seconds']:.1f} s -> {out}\n")
    return 0


def _int8_kernels(mesh):
    """The model's default kernels on ``mesh`` with the C++ CPU matmul's int8 dot path on.

    Raises:
      QuantizationError: the matmul there is not the C++ CPU kernel, or the CPU has no AVX512-VNNI.
    """
    import dataclasses

    from jaxinfer.target import Kernels
    from pallas_kernels.quantized_matmul import cpu as qmm_cpu

    kernels = Kernels.for_mesh(mesh)
    if kernels.matmul != "cpu" or not qmm_cpu.has_vnni():
        raise QuantizationError("--int8-activations needs the C++ CPU quantized matmul on a CPU with AVX512-VNNI")
    return dataclasses.replace(kernels, matmul_int8_activations=True)


def run_eval(args: argparse.Namespace) -> int:
    """Score the reference and every ``--quantized`` variant on the same windows; table on stdout."""
    from jaxinfer.config import resolve_dtype
    from jaxinfer.loader import load_model
    from jaxinfer.quantized_checkpoint import load_quantized
    from quantize.evaluate import Variant, evaluate, token_windows
    from quantize.model_formats import param_bytes

    ref = load_model(args.model)
    variants, sizes = {}, {"float": param_bytes(ref.params)["total_bytes"]}
    for q in args.quantized:
        if q == "gguf":
            params = load_model(args.model, quantization="gguf", load_tokenizer_too=False).params
        else:
            model, params, _ = load_quantized(q, mesh=ref.mesh)
            if model.config != ref.config:
                raise QuantizationError(f"{q} was quantized from a different model than {ref.source.name}")
        variants[q] = params
        sizes[q] = param_bytes(params)["total_bytes"]
    for kv in args.kv_cache_dtype:
        variants[f"kv-{kv}"] = Variant(ref.params, kv)
        sizes[f"kv-{kv}"] = sizes["float"]
    for dt in args.compute_dtype:
        low = load_model(args.model, dtype=resolve_dtype(dt), load_tokenizer_too=False)
        for kv in [None, *args.kv_cache_dtype]:
            name = dt if kv is None else f"{dt}+kv-{kv}"
            variants[name] = Variant(low.params, kv, model=low.model)
            sizes[name] = param_bytes(low.params)["total_bytes"]
        if "gguf" in args.quantized:  # the GGUF's own quantized weights, computed in this dtype
            native = load_model(args.model, dtype=resolve_dtype(dt), quantization="gguf", load_tokenizer_too=False)
            for kv in [None, *args.kv_cache_dtype]:
                name = f"gguf+{dt}" if kv is None else f"gguf+{dt}+kv-{kv}"
                variants[name] = Variant(native.params, kv, model=native.model)
                sizes[name] = param_bytes(native.params)["total_bytes"]
                if args.int8_activations:
                    variants[f"{name}+int8act"] = Variant(native.params, kv, model=native.model,
                                                          kernels=_int8_kernels(ref.mesh))
                    sizes[f"{name}+int8act"] = sizes[name]
    if args.int8_activations and not any(n.endswith("+int8act") for n in variants):
        raise QuantizationError("--int8-activations needs --quantized gguf and a --compute-dtype")
    if args.only:
        variants = {n: v for n, v in variants.items() if any(fnmatch.fnmatchcase(n, p) for p in args.only)}
        if not variants:
            raise QuantizationError(f"--only {' '.join(args.only)} matches no variant")
    ids = ref.tokenizer(_read_text(args.text))["input_ids"]
    windows = token_windows(ids, args.seq_len, args.max_tokens)
    start = args.seq_len // 2 if args.second_half else 0
    results = evaluate(ref.model, ref.params, variants, windows, score_start=start, batch=args.batch)
    protocol = (f"{windows.shape[0]} non-overlapping windows of {args.seq_len} tokens; scored positions "
                f"[{start}, {args.seq_len - 1}) of each window")
    out = sys.stdout
    out.write(f"# {protocol}\n")
    out.write(f"{'model':<40} {'ppl':>10} {'KL':>9} {'top-1':>7} {'tokens':>8} {'MiB':>8}\n")
    for name, r in results.items():
        out.write(f"{name[-40:]:<40} {r.perplexity:>10.4f} {r.kl:>9.5f} {r.top1:>7.4f} {r.num_tokens:>8d} "
                  f"{sizes[name] / 2**20:>8.1f}\n")
    if args.json:
        data = dict(protocol=protocol, model=args.model, text=str(Path(args.text).resolve()),
                    results={n: {**r.to_dict(), "bytes": sizes[n]} for n, r in results.items()})
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 0
