"""Where a jaxinfer engine step's time goes on this machine: timed jitted pieces of real engine steps.

For each ``--dtype`` / ``--kv-cache-dtype`` setting it builds ``LLM`` with the throughput benchmark's limits
(``--max-num-seqs``, ``--max-num-batched-tokens``) and runs two workloads:

* **batch 1**: one request (``--prompt-len`` random tokens) decoding; one of its decode steps is captured.
* **throughput**: ``--num-prompts`` prompts of bench/throughput.py's workload (64-512 random tokens,
  ``--output-len`` outputs, greedy, EOS ignored). Every step is timed on the host (wall) and on the device
  (the step's dispatch to its result, blocked on), and its real token count is compared with the bucket it
  was padded to; a decode step with every sequence running and a full mixed (prefill + decode) step are
  captured.

Each captured step is then re-run alone (``--iters`` interleaved rounds, best of each) as: the whole jitted
step; the model forward
without the sampler; the forward with the attention kernel replaced by the identity; the forward without the
attention kernel and without the KV-cache write. Differences give the sampler, attention kernel and cache
write. Beside them, at the same padded token count: a jitted chain of every weight matmul of the model with
the same weights (the matmul ceiling), the same chain with q/k/v and gate/up fused into one matmul each, and
the LM head. Prints a table and writes JSON to ``bench/results/``.

Usage: ``python bench/step_profile.py [--settings auto/auto bfloat16/int8] [--num-prompts 64]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np
from machine import machine_info, result_path
from throughput import make_prompts


@contextlib.contextmanager
def patched_attention(*, kernel: bool, write: bool):
    """Trace the model with the attention kernel (``kernel=False``: identity on q) and / or the KV write
    (``write=False``: the cache unchanged) removed."""
    import jaxinfer.attention as att

    saved = att.ragged_paged_attention, att.write_kv
    if not kernel:
        att.ragged_paged_attention = lambda q, cache, *a, **k: q
    if not write:
        att.write_kv = lambda cache, k, v, slots: cache
    try:
        yield
    finally:
        att.ragged_paged_attention, att.write_kv = saved


def layer_weights(params) -> list[dict]:
    """Per layer, the projection kernels ``[K, N]`` by name (q/k/v/o, gate/up/down)."""
    out = []
    i = 0
    while f"layers_{i}" in params:
        lay = params[f"layers_{i}"]
        w = {n: lay["self_attn"][f"{n}_proj"]["kernel"] for n in "qkvo"}
        w.update({n: lay["mlp"][f"{n}_proj"]["kernel"] for n in ("gate", "up", "down")})
        out.append(w)
        i += 1
    return out


def matmul_chain(layers, fused: bool):
    """A jitted ``x[T, E] -> ...`` running every projection of the model once, in model order."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.models.ops import linear

    if fused:
        layers = [{"qkv": jnp.concatenate([w["q"], w["k"], w["v"]], axis=1), "o": w["o"],
                   "gu": jnp.concatenate([w["gate"], w["up"]], axis=1), "down": w["down"]} for w in layers]

    def chain(ws, x):
        kv = []
        for w in ws:
            if fused:
                qkv = linear(x, w["qkv"])
                q, rest = qkv[:, : w["o"].shape[0]], qkv[:, w["o"].shape[0]:]
                kv.append(rest)
                gu = linear(x + linear(q, w["o"]), w["gu"])
                g, u = jnp.split(gu, 2, axis=1)
            else:
                q = linear(x, w["q"])
                kv.append(jnp.concatenate([linear(x, w["k"]), linear(x, w["v"])], axis=1))
                h = x + linear(q, w["o"])
                g, u = linear(h, w["gate"]), linear(h, w["up"])
            x = x + linear(jax.nn.silu(g) * u, w["down"])
        return x, kv

    fn = jax.jit(chain)
    return lambda x: jax.block_until_ready(fn(layers, x))


def profile_batch(llm, batch, iters: int) -> dict:
    """Time the pieces of one captured step ``batch`` (see the module docstring); the pieces run interleaved,
    ``iters`` rounds, best of each kept (the machine is shared: interleaving spreads its load over all)."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.sampling import sample

    runner = llm.engine.runner
    batch = runner.place_mask(batch)
    state = {"kv": runner.kv_cache, "ps": runner.penalty_state}

    def full():
        out, state["kv"], state["ps"] = runner._step(runner.params, state["kv"], state["ps"], batch)
        jax.block_until_ready(out)

    def forward_fn(kernel=True, write=True):
        with patched_attention(kernel=kernel, write=write):
            f = jax.jit(runner._forward, donate_argnums=(1,))
            f.lower(runner.params, state["kv"], batch)  # trace under the patch

            def run():
                logits, state["kv"], _, _ = f(runner.params, state["kv"], batch)
                return jax.block_until_ready(logits)
            run()
        return run

    params = runner.params
    t, s = int(batch.tokens.shape[0]), int(batch.sampling.temperature.shape[0])
    fwd = forward_fn()
    logits = fwd()
    samp = jax.jit(sample)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((t, llm.config.hidden_size)) * 0.1,
                    params["norm"]["scale"].dtype)
    weights = layer_weights(params)
    quantized = any(not isinstance(w, jax.Array) for lay in weights for w in lay.values())
    chain = matmul_chain(weights, False)
    fused = None if quantized else matmul_chain(weights, True)  # quantized parts do not concatenate
    head = jax.jit(lambda p, h: runner.model.logits(p, h, runner.kernels))
    pieces = {
        "step": full, "forward": fwd,
        "forward_no_attention_kernel": forward_fn(kernel=False),
        "forward_no_attention": forward_fn(kernel=False, write=False),
        "sampler_alone": lambda: jax.block_until_ready(samp(logits, batch.sampling, state["ps"])),
        "matmul_chain": lambda: chain(x), "matmul_chain_fused": lambda: fused(x),
        "lm_head": lambda: jax.block_until_ready(head(params, x[:s])),
    }
    if fused is None:
        del pieces["matmul_chain_fused"]
    times = {k: [] for k in pieces}
    for _ in range(iters):
        for k, fn in pieces.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(1e3 * (time.perf_counter() - t0))
    runner.kv_cache, runner.penalty_state = state["kv"], state["ps"]
    res = {"tokens_padded": t, "rows_padded": s, **{f"{k}_ms": min(v) for k, v in times.items()},
           "median_ms": {k: float(np.median(v)) for k, v in times.items()}}
    res["attention_kernel_ms"] = res["forward_ms"] - res["forward_no_attention_kernel_ms"]
    res["kv_write_ms"] = res["forward_no_attention_kernel_ms"] - res["forward_no_attention_ms"]
    res["sampler_in_step_ms"] = res["step_ms"] - res["forward_ms"]
    res["rest_of_forward_ms"] = res["forward_no_attention_ms"] - res["matmul_chain_ms"] - res["lm_head_ms"]
    return res


class StepRecorder:
    """Wraps the engine's dispatch / packing: device time of each step (blocked on), bucket padding."""

    def __init__(self, llm):
        import jax

        import jaxinfer.engine as eng

        self.llm, self.steps, self.captured = llm, [], {}
        runner = llm.engine.runner
        self._dispatch, self._pack = runner.dispatch, eng.pack_step_inputs

        def dispatch(batch):
            t = time.perf_counter()
            out = jax.block_until_ready(self._dispatch(batch))
            self.steps[-1]["device_s"] = time.perf_counter() - t
            kind = "decode" if self.steps[-1]["tokens"] == self.steps[-1]["seqs"] else "mixed"
            self.captured.setdefault((kind, self.steps[-1]["bucket"]), batch)
            return out

        def pack(sched, buckets):
            x = self._pack(sched, buckets)
            n = sum(r.num_new_tokens for r in sched.scheduled)
            self.steps.append({"tokens": n, "seqs": len(sched.scheduled), "bucket": int(x.tokens.shape[0])})
            return x

        runner.dispatch, eng.pack_step_inputs = dispatch, pack

    def close(self):
        import jaxinfer.engine as eng

        self.llm.engine.runner.dispatch, eng.pack_step_inputs = self._dispatch, self._pack


def run_setting(dtype: str, kv: str, args) -> dict:
    from jaxinfer import LLM, SamplingParams

    llm = LLM(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=512 + args.output_len + 16, dtype=dtype, kv_cache_dtype=kv)
    t = time.perf_counter()
    llm.engine.warmup()
    out = {"dtype": dtype, "kv_cache_dtype": kv, "warmup_s": time.perf_counter() - t,
           "kv_dtype_resolved": str(llm.engine.kv_spec.dtype)}
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)

    rec = StepRecorder(llm)
    one = make_prompts(1, args.prompt_len, args.prompt_len, vocab=49152, seed=1)
    llm.generate(one, sp)
    b1 = rec.captured[("decode", rec.steps[-1]["bucket"])]
    rec.steps.clear()
    rec.captured.clear()

    prompts = make_prompts(args.num_prompts, 64, 512, vocab=49152)
    t = time.perf_counter()
    llm.generate(prompts, sp)
    wall = time.perf_counter() - t
    rec.close()
    steps = rec.steps
    dev = sum(s["device_s"] for s in steps)
    tok = sum(s["tokens"] for s in steps)
    pad = sum(s["bucket"] for s in steps)
    out["throughput_run"] = {
        "wall_s": wall, "steps": len(steps), "device_s": dev, "host_s": wall - dev,
        "host_fraction": (wall - dev) / wall, "output_tok_s": args.num_prompts * args.output_len / wall,
        "tokens": tok, "padded_tokens": pad, "padding_fraction": 1 - tok / pad,
        "decode_steps": sum(s["tokens"] == s["seqs"] for s in steps),
        "decode_device_s": sum(s["device_s"] for s in steps if s["tokens"] == s["seqs"]),
        "mixed_device_s": sum(s["device_s"] for s in steps if s["tokens"] != s["seqs"]),
        "buckets_used": sorted({s["bucket"] for s in steps}),
    }
    full_decode = max((k for k in rec.captured if k[0] == "decode"), key=lambda k: k[1])
    full_mixed = max((k for k in rec.captured if k[0] == "mixed"), key=lambda k: k[1])
    out["batch1_decode"] = profile_batch(llm, b1, args.iters)
    out[f"decode_{full_decode[1]}_rows"] = profile_batch(llm, rec.captured[full_decode], args.iters)
    out[f"mixed_{full_mixed[1]}_tokens"] = profile_batch(llm, rec.captured[full_mixed], args.iters)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--settings", nargs="+", default=["auto/auto", "bfloat16/int8"],
                    help="jaxinfer dtype/kv_cache_dtype pairs")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    record = {"benchmark": "step_profile", "model": "smollm2-135m-instruct", "machine": machine_info(),
              "args": vars(args), "results": []}
    path = result_path("step_profile" + (f"-{args.tag}" if args.tag else ""))
    for s in args.settings:
        dtype, kv = s.split("/")
        r = run_setting(dtype, kv, args)
        record["results"].append(r)
        path.write_text(json.dumps(record, indent=2))
        tr = r["throughput_run"]
        print(f"== {dtype}/{kv}: throughput run {tr['output_tok_s']:.1f} tok/s, host {100 * tr['host_fraction']:.1f}%, "
              f"padding {100 * tr['padding_fraction']:.1f}% of tokens, decode/mixed device s "
              f"{tr['decode_device_s']:.1f}/{tr['mixed_device_s']:.1f}")
        keys = ["step_ms", "forward_ms", "matmul_chain_ms", "matmul_chain_fused_ms", "lm_head_ms",
                "attention_kernel_ms", "kv_write_ms", "sampler_in_step_ms", "sampler_alone_ms",
                "rest_of_forward_ms"]
        for name, v in r.items():
            if isinstance(v, dict) and "step_ms" in v:
                print(f"  {name} (T={v['tokens_padded']}, S={v['rows_padded']}): "
                      + ", ".join(f"{k[:-3]} {v[k]:.2f}" for k in keys if k in v))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
