"""Speculative decoding on the default model: speculation off vs n-gram (prompt lookup) vs a draft model,
at several batch sizes, in one run, greedy (outputs checked identical to speculation off); n-gram once
per ``--ngram-min`` value (single-token matches on or off). Batch 1 runs
four prompts one after another and reports their totals.

Workload: raw-text prompts that continue repetitive text (counting, lists, tables, code), a different
prompt per sequence, ``--new-tokens`` greedy tokens each (EOS ignored). Per configuration and batch size:
decode tokens/s (all tokens after each sequence's first, over the time after the first token), end-to-end
output tokens/s, mean acceptance length (tokens per speculating sequence-step), draft acceptance rate,
speed-up over speculation off, and whether the greedy outputs equal speculation off's. Median of
``--reps`` timed runs after a warm-up that compiles every bucket (no compilation in the timed window);
the reps of all configurations are interleaved (off, n-gram, draft, off, ...) so that a drift in
machine speed does not favour one of them.

Draft model: the default model is the smallest of its family here, so the draft is the target's first
``--draft-layers`` layers with its embedding, final norm and LM head (an early-exit draft of the same
model, no extra training); ``--draft-self`` also runs the whole target as its own draft (every draft
accepted: the acceptance ceiling, never faster).

EAGLE (``--methods ... eagle ngram+eagle``): the head shipped for the default model (or ``--eagle-head``),
once per ``--eagle-thresholds`` value (the early-stop threshold; named ``eagle@0.3`` etc. when not 0).
``--workload chat`` runs chat prompts instead (bench/chat_eval_prompts.json, written apart from the head's
training prompts, rendered with the chat template); ``--temperatures 0 0.7`` adds seeded sampled runs
(outputs then differ from speculation off by design: only speed and acceptance are compared).

Usage: ``python bench/speculative.py [--batches 1 4 16] [--new-tokens 64] [--k 3] [--ngram-min 1 2]
[--draft-layers 12] [--draft-self] [--reps 3] [--methods off ngram draft eagle ngram+eagle]
[--workload repetitive|chat] [--temperatures 0 0.7] [--eagle-head FILE] [--eagle-thresholds 0 0.3]
[--settings float32|default]`` (``default``: the target as `LLM()` runs it on this machine)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from machine import machine_info, result_path

PROMPTS = [  # raw completions of repetitive text (lists, tables, code): the prompt-lookup use case
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "apple, banana, cherry, date, apple, banana, cherry, date, apple, banana,",
    "<tr><td>1</td><td>one</td></tr>\n<tr><td>2</td><td>two</td></tr>\n<tr><td>3</td>",
    '[{"id": 1, "name": "item1"}, {"id": 2, "name": "item2"}, {"id": 3,',
    "x[0] = 0;\nx[1] = 1;\nx[2] = 2;\nx[3] =",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday, Monday, Tuesday,",
    "def get_a(self):\n    return self.a\n\ndef get_b(self):\n    return self.b\n\ndef get_c(self):",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick",
]


def early_exit_draft(loaded, num_layers: int):
    """The first ``num_layers`` layers of ``loaded`` with its embedding, final norm and head."""
    from jaxinfer.loader import LoadedModel
    from jaxinfer.models.causal_lm import CausalLM

    config = loaded.config.with_overrides(num_layers=num_layers)
    keep = {f"layers_{i}" for i in range(num_layers)}
    params = {k: v for k, v in loaded.params.items() if not k.startswith("layers_") or k in keep}
    return LoadedModel(loaded.source, CausalLM(config, loaded.model.dtype, loaded.plan), params, loaded.tokenizer,
                       loaded.mesh, loaded.plan)


CHAT_PROMPTS = Path(__file__).parent / "chat_eval_prompts.json"


def run_once(engine, prompts, new_tokens: int, temperature: float = 0.0) -> dict:
    """All ``prompts`` at once; raw counts (tokens, decode tokens and time, speculation totals)."""
    from jaxinfer.sampling_params import SamplingParams

    engine.flush_prefix_cache()
    s0 = engine.stats()
    for i, p in enumerate(prompts):
        sp = SamplingParams(temperature=temperature, max_tokens=new_tokens, ignore_eos=True, seed=i)
        engine.add_request(f"b{i}", p, sp)
    tokens, first, finish = {}, {}, {}
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
            if out.finished:
                first[out.request_id] = out.metrics.first_token_time
                finish[out.request_id] = out.metrics.finish_time
    s1 = engine.stats()
    return {"tokens": [tokens[f"b{i}"] for i in range(len(prompts))], "elapsed": time.perf_counter() - t0,
            "decode_tokens": sum(len(t) for t in tokens.values()) - len(prompts),
            "decode_time": max(finish.values()) - min(first.values()),
            "drafts": s1.spec_draft_tokens - s0.spec_draft_tokens,
            "accepted": s1.spec_accepted_tokens - s0.spec_accepted_tokens,
            "verified": s1.spec_verified - s0.spec_verified}


def run_batch(engine, groups, new_tokens: int, temperature: float = 0.0) -> dict:
    """Each group of prompts as one batch, one group after another; totals over the groups."""
    runs = [run_once(engine, g, new_tokens, temperature) for g in groups]
    total = {k: sum(r[k] for r in runs) for k in ("elapsed", "decode_tokens", "decode_time", "drafts", "accepted",
                                                  "verified")}
    n = sum(len(t) for r in runs for t in r["tokens"])
    return {"decode_tok_s": total["decode_tokens"] / total["decode_time"], "e2e_tok_s": n / total["elapsed"],
            "acceptance_length": 1 + total["accepted"] / total["verified"] if total["verified"] else None,
            "draft_acceptance_rate": total["accepted"] / total["drafts"] if total["drafts"] else None,
            "tokens": [t for r in runs for t in r["tokens"]]}


def engine_configs(args, target) -> dict:
    """Name -> ``(speculative_method, draft model, extra EngineConfig fields)`` for ``args.methods``."""
    out = {}
    for m in args.methods:
        if m == "off":
            out["off"] = (None, None, {})
        elif m == "ngram":
            out.update({f"ngram_min{n}": ("ngram", None, {"ngram_min": n}) for n in args.ngram_min})
        elif m == "draft":
            out[f"draft_{args.draft_layers}_layers"] = ("draft", early_exit_draft(target, args.draft_layers), {})
        elif m == "draft_self":
            out["draft_self"] = ("draft", target, {})
        elif m in ("eagle", "ngram+eagle"):
            out.update({m if th == 0 else f"{m}@{th:g}": (m, None, {"speculative_model": args.eagle_head,
                                                                   "eagle_draft_threshold": th})
                        for th in args.eagle_thresholds})
        else:
            raise SystemExit(f"unknown method {m!r}")
    return out


def load_prompts(workload: str, tokenizer) -> tuple[list[str], list[list[int]]]:
    from jaxinfer.tokenizer import encode_chat, encode_prompt

    if workload == "chat":
        texts = json.loads(CHAT_PROMPTS.read_text())["prompts"]
        return texts, [encode_chat(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    return PROMPTS, [encode_prompt(tokenizer, p) for p in PROMPTS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--draft-layers", type=int, default=12)
    ap.add_argument("--draft-self", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ngram-min", type=int, nargs="+", default=[1, 2],
                    help="one n-gram configuration per value of the proposer's ngram_min")
    ap.add_argument("--methods", nargs="+", default=["off", "ngram", "draft"],
                    help="off ngram draft draft_self eagle ngram+eagle")
    ap.add_argument("--workload", choices=["repetitive", "chat"], default="repetitive")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0])
    ap.add_argument("--eagle-head", default=None, help="EAGLE head file (default: the shipped head)")
    ap.add_argument("--eagle-thresholds", type=float, nargs="+", default=[0.0],
                    help="one EAGLE configuration per early-stop threshold (eagle_draft_threshold)")
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--tag", default="", help="suffix of the result file name (keeps runs apart)")
    ap.add_argument("--settings", choices=["float32", "default"], default="float32",
                    help="target model settings: float32 weights and cache, or LLM()'s defaults on this machine")
    args = ap.parse_args()
    if args.draft_self and "draft_self" not in args.methods:
        args.methods.append("draft_self")
    if "off" not in args.methods:  # the reference of every speed-up
        args.methods.insert(0, "off")

    from jaxinfer.compilation_cache import enable_compilation_cache
    from jaxinfer.config import EngineConfig
    from jaxinfer.engine import Engine
    from jaxinfer.loader import load_model

    enable_compilation_cache()
    max_b = max(args.batches)
    base = dict(max_model_len=args.max_model_len, max_num_seqs=max_b, max_num_batched_tokens=max(128, 8 * max_b),
                page_size=16)
    if args.settings == "default":  # what LLM() runs on this machine (dtype "auto": e.g. GGUF weights, bf16, int8 KV)
        from jaxinfer.config import resolve_auto_settings, resolve_dtype

        auto = resolve_auto_settings(EngineConfig(**base), gguf_model=True)
        base.update(dtype=auto.dtype, kv_cache_dtype=auto.kv_cache_dtype, quantization=auto.quantization)
        target = load_model(None, dtype=resolve_dtype(auto.dtype), quantization=auto.quantization)
    else:
        target = load_model(None)
    texts, prompts_all = load_prompts(args.workload, target.tokenizer)
    engines, results = {}, {}
    for name, (method, draft, extra) in engine_configs(args, target).items():
        cfg = EngineConfig(**base, speculative_method=method, num_speculative_tokens=args.k, **extra)
        engines[name] = Engine(target, cfg, draft=draft)
        t = time.perf_counter()
        engines[name].warmup()
        results[name] = {"warmup_s": time.perf_counter() - t}
    for temp in args.temperatures:
        key = "batches" if temp == 0 else f"batches_temperature_{temp:g}"
        for b in args.batches:
            # batch 1: four prompts one after another (one prompt alone is too particular); else one batch
            groups = [[p] for p in prompts_all[:4]] if b == 1 else [
                [prompts_all[i % len(prompts_all)] for i in range(b)]]
            for engine in engines.values():
                run_batch(engine, groups[:1], args.new_tokens, temp)  # untimed: first touch of this batch's buckets
            # reps interleaved across configurations, so a drift in machine speed hits all of them alike
            runs = {name: [] for name in engines}
            for _ in range(args.reps):
                for name, engine in engines.items():
                    runs[name].append(run_batch(engine, groups, args.new_tokens, temp))
            for name in engines:
                rs = runs[name]
                r = {k: statistics.median(x[k] for x in rs) if rs[0][k] is not None else None
                     for k in ("decode_tok_s", "e2e_tok_s", "acceptance_length", "draft_acceptance_rate")}
                r["same_as_off"] = all(x["tokens"] == runs["off"][0]["tokens"] for x in rs) if temp == 0 else None
                r["decode_speedup"] = r["decode_tok_s"] / statistics.median(x["decode_tok_s"] for x in runs["off"])
                results[name].setdefault(key, {})[b] = r
                acc = "-" if r["acceptance_length"] is None else f"{r['acceptance_length']:.2f}"
                print(f"{name:16s} T={temp:g} batch {b:3d}: decode {r['decode_tok_s']:7.1f} tok/s  "
                      f"e2e {r['e2e_tok_s']:7.1f} tok/s  speed-up {r['decode_speedup']:.2f}x  acceptance length "
                      f"{acc}  same as off: {r['same_as_off']}", flush=True)
    record = {"benchmark": "speculative", "model": "smollm2-135m-instruct", "machine": machine_info(),
              "workload": {"kind": args.workload, "prompts": texts, "new_tokens": args.new_tokens,
                           "temperatures": args.temperatures, "ignore_eos": True, "num_speculative_tokens": args.k,
                           "ngram_min": args.ngram_min, "methods": args.methods, "eagle_head": args.eagle_head,
                           "eagle_thresholds": args.eagle_thresholds,
                           "reps": args.reps, "reps_interleaved": True, "settings": args.settings,
                           "engine": base},
              "results": results}
    name = "speculative" if args.workload == "repetitive" else "speculative-chat"
    path = result_path(f"{name}-{args.tag}" if args.tag else name)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
