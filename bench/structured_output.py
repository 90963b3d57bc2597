"""Per-step host cost of structured output, and the device sampler's cost of applying the mask.

Host: the default model's tokenizer (49,152 tokens) in llguidance; ``B`` constrained sequences under a JSON
schema, each step computing every row's packed bitmask (``GrammarMatchers.masks``, llguidance's parallel
executor for several rows) and advancing each matcher by one allowed token (drawn at random from the mask,
so the walk explores the grammar like sampling does). Reports the one-off tokenizer build, the matcher
creation and the mean / p90 per-step mask and advance times.
Device: the jitted batched sampler on ``[B, V]`` logits at temperature 1 with top-p, with an all-ones mask
(no row constrained: the mask step is skipped) and with every row constrained, median of repeated calls.

Usage: ``python bench/structured_output.py [--batch 1 8 32 --steps 60]``; JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from machine import machine_info, result_path

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 6},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                     "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "tags", "address"]}


def host(tokenizer, vocab: int, eos, batch: int, steps: int, rng) -> dict:
    from jaxinfer.grammar_matcher import GrammarMatchers
    from jaxinfer.structured_output import StructuredOutputsParams

    gm = GrammarMatchers(tokenizer, vocab, eos)
    t0 = time.perf_counter()
    gm.ll_tokenizer()
    build = time.perf_counter() - t0
    params = StructuredOutputsParams(json=SCHEMA)
    t0 = time.perf_counter()
    for i, m in enumerate(gm.create(params, batch)):
        gm.add(f"s{i}", m)
    create = time.perf_counter() - t0
    ids = [f"s{i}" for i in range(batch)]
    mask_t, adv_t = [], []
    for _ in range(steps):
        live = [s for s in ids if s in gm]
        if not live:
            break
        t0 = time.perf_counter()
        masks = gm.masks(live)
        mask_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for s, m in zip(live, masks):
            bits = np.unpackbits(m.view(np.uint8), bitorder="little")[:vocab]
            allowed = np.flatnonzero(bits)
            if gm.advance(s, [int(rng.choice(allowed))]):
                gm.forget(s)
        adv_t.append(time.perf_counter() - t0)
    ms = lambda xs, q: 1e3 * float(np.percentile(xs, q))  # noqa: E731
    return {"batch": batch, "tokenizer_build_s": build, "create_matchers_ms": 1e3 * create, "steps": len(mask_t),
            "mask_ms_mean": 1e3 * float(np.mean(mask_t)), "mask_ms_p90": ms(mask_t, 90),
            "mask_ms_per_row_mean": 1e3 * float(np.mean(mask_t)) / batch,
            "advance_ms_mean": 1e3 * float(np.mean(adv_t)), "advance_ms_p90": ms(adv_t, 90)}


def device(vocab: int, batch: int, reps: int = 20) -> dict:
    import jax

    from jaxinfer.grammar_matcher import mask_words
    from jaxinfer.sampling import SamplingTensors, sample
    from jaxinfer.sampling_params import SamplingParams

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(batch, vocab)).astype(np.float32)
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * batch
    run = jax.jit(sample)
    masks = rng.integers(-(2**31), 2**31 - 1, size=(batch, mask_words(vocab)), dtype=np.int64).astype(np.int32)
    out = {}
    for name, rows in (("unconstrained", None), ("all_constrained", list(masks))):
        st = SamplingTensors.build(params, seeds=list(range(batch)), steps=[0] * batch, num_rows=batch, masks=rows)
        if st.token_mask is None:
            st = st.replace(token_mask=np.full(masks.shape, -1, np.int32))
        st = jax.device_put(st)
        x = jax.device_put(logits)
        run(x, st).tokens.block_until_ready()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run(x, st).tokens.block_until_ready()
            times.append(time.perf_counter() - t0)
        out[f"sampler_ms_{name}"] = 1e3 * float(np.median(times))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    from jaxinfer.model_registry import resolve_model
    from jaxinfer.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_model(None))
    vocab = 49152
    eos = [tok.eos_token_id]
    rng = np.random.default_rng(0)
    rows = [{**host(tok, vocab, eos, b, args.steps, rng), **device(vocab, b)} for b in args.batch]
    result = {"machine": machine_info(), "vocab": vocab, "schema": SCHEMA, "rows": rows,
              "note": "2-core CPU shared with other jobs while measured"}
    for r in rows:
        print(json.dumps(r))
    path = result_path("structured_output")
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
