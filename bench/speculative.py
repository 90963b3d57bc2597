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

Usage: ``python bench/speculative.py [--batches 1 4 16] [--new-tokens 64] [--k 3] [--ngram-min 1 2]
[--draft-layers 12] [--draft-self] [--reps 3]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

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


def run_once(engine, prompts, new_tokens: int) -> dict:
    """All ``prompts`` at once; raw counts (tokens, decode tokens and time, speculation totals)."""
    from jaxinfer.sampling_params import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    engine.flush_prefix_cache()
    s0 = engine.stats()
    for i, p in enumerate(prompts):
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


def run_batch(engine, groups, new_tokens: int) -> dict:
    """Each group of prompts as one batch, one group after another; totals over the groups."""
    runs = [run_once(engine, g, new_tokens) for g in groups]
    total = {k: sum(r[k] for r in runs) for k in ("elapsed", "decode_tokens", "decode_time", "drafts", "accepted",
                                                  "verified")}
    n = sum(len(t) for r in runs for t in r["tokens"])
    return {"decode_tok_s": total["decode_tokens"] / total["decode_time"], "e2e_tok_s": n / total["elapsed"],
            "acceptance_length": 1 + total["accepted"] / total["verified"] if total["verified"] else None,
            "draft_acceptance_rate": total["accepted"] / total["drafts"] if total["drafts"] else None,
            "tokens": [t for r in runs for t in r["tokens"]]}


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
    args = ap.parse_args()

    from jaxinfer.config import EngineConfig
    from jaxinfer.engine import Engine
    from jaxinfer.loader import load_model
    from jaxinfer.tokenizer import encode_prompt

    target = load_model(None)
    prompts_all = [encode_prompt(target.tokenizer, p) for p in PROMPTS]
    max_b = max(args.batches)
    base = dict(max_model_len=256, max_num_seqs=max_b, max_num_batched_tokens=max(128, 8 * max_b), page_size=16)
    configs = {"off": (None, None, None), **{f"ngram_min{n}": ("ngram", None, n) for n in args.ngram_min},
               f"draft_{args.draft_layers}_layers": ("draft", early_exit_draft(target, args.draft_layers), None)}
    if args.draft_self:
        configs["draft_self"] = ("draft", target, None)
    engines, results = {}, {}
    for name, (method, draft, ngram_min) in configs.items():
        cfg = EngineConfig(**base, speculative_method=method, num_speculative_tokens=args.k,
                           **({"ngram_min": ngram_min} if ngram_min else {}))
        engines[name] = Engine(target, cfg, draft=draft)
        t = time.perf_counter()
        engines[name].warmup()
        results[name] = {"warmup_s": time.perf_counter() - t, "batches": {}}
    for b in args.batches:
        # batch 1: four prompts one after another (one prompt alone is too particular); else one batch
        groups = [[p] for p in prompts_all[:4]] if b == 1 else [
            [prompts_all[i % len(prompts_all)] for i in range(b)]]
        for engine in engines.values():
            run_batch(engine, groups[:1], args.new_tokens)  # untimed: first touch of this batch's buckets
        # reps interleaved across configurations, so a drift in machine speed hits all of them alike
        runs = {name: [] for name in engines}
        for _ in range(args.reps):
            for name, engine in engines.items():
                runs[name].append(run_batch(engine, groups, args.new_tokens))
        for name in engines:
            rs = runs[name]
            r = {k: statistics.median(x[k] for x in rs) if rs[0][k] is not None else None
                 for k in ("decode_tok_s", "e2e_tok_s", "acceptance_length", "draft_acceptance_rate")}
            r["same_as_off"] = all(x["tokens"] == runs["off"][0]["tokens"] for x in rs)
            r["decode_speedup"] = r["decode_tok_s"] / statistics.median(x["decode_tok_s"] for x in runs["off"])
            results[name]["batches"][b] = r
            acc = "-" if r["acceptance_length"] is None else f"{r['acceptance_length']:.2f}"
            print(f"{name:16s} batch {b:3d}: decode {r['decode_tok_s']:7.1f} tok/s  e2e {r['e2e_tok_s']:7.1f} tok/s"
                  f"  speed-up {r['decode_speedup']:.2f}x  acceptance length {acc}  same as off: {r['same_as_off']}",
                  flush=True)
    record = {"benchmark": "speculative", "model": "smollm2-135m-instruct", "machine": machine_info(),
              "workload": {"prompts": PROMPTS, "new_tokens": args.new_tokens, "greedy": True, "ignore_eos": True,
                           "num_speculative_tokens": args.k, "ngram_min": args.ngram_min,
                           "reps": args.reps, "reps_interleaved": True, "engine": base},
              "results": results}
    path = result_path("speculative")
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
