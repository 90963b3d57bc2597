"""Cost of one EAGLE draft step against one target decode step on the default model, per draft vocabulary size.

A draft step here is the head's dense reference (fc, one decoder layer, norm, LM head over ``Vd`` ids) for one
token attending to ``--context`` cached positions; a target step is the target's forward for one token over a
dense cache of the same context. Both jitted, in bfloat16 on the CPU, timed interleaved (median of
``--reps``). The engine's paged draft step adds its own overheads; this isolates how ``Vd`` scales the head.

    python bench/eagle_head_cost.py --out bench/results/eagle-head-cost-<date>-cpu2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _time(fn, reps):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--vocab", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 49152])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from jaxinfer.attention import AttentionMetadata, init_dense_cache
    from jaxinfer.loader import load_model
    from jaxinfer.speculative.eagle_head import (
        attend,
        draft_logits,
        fc_input,
        init_eagle_head,
        layer_finish,
        layer_qkv,
    )

    dt = jnp.bfloat16
    loaded = load_model(None, dtype=dt)
    lm, params, c = loaded.model, loaded.params, loaded.config
    n = args.context
    caches = init_dense_cache(c.num_layers, 1, n + 1, c.num_kv_heads, c.head_dim, dt)
    md = AttentionMetadata(cu_q_lens=jnp.array([0, 1], jnp.int32), kv_lens=jnp.array([n + 1], jnp.int32),
                           num_seqs=jnp.array([1], jnp.int32), slot_mapping=jnp.array([n], jnp.int32), max_q_len=1)
    target = jax.jit(lambda p, ca: lm.forward(p, jnp.array([5], jnp.int32), jnp.array([n], jnp.int32), ca, md)[0])
    table = params["embed_tokens"]
    rows = {}
    for vd in args.vocab:
        cfg, hp = init_eagle_head(jax.random.PRNGKey(0), c, np.arange(vd), dtype=dt)
        kv = jnp.zeros((1, n, c.num_kv_heads, c.head_dim), dt)

        def step(hp=hp, cfg=cfg, kv=kv):
            x = fc_input(hp, table, jnp.array([[5]], jnp.int32), jnp.zeros((1, 1, c.hidden_size), dt))
            q, k, v = layer_qkv(hp["layer"], cfg, x, jnp.array([[n]], jnp.int32))
            keys, values = jnp.concatenate([kv, k], 1), jnp.concatenate([kv, v], 1)
            o = attend(q, keys, values, jnp.ones((1, 1, n + 1), bool), cfg.layer_config().sm_scale)
            return draft_logits(hp, cfg, layer_finish(hp["layer"], cfg, x, o))

        head = jax.jit(step)
        t_head = _time(head, args.reps)
        t_target = _time(lambda: target(params, caches), args.reps)
        size = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(hp)) * 2 / 2**20
        rows[str(vd)] = {"head_step_ms": round(t_head * 1e3, 3), "target_step_ms": round(t_target * 1e3, 3),
                         "ratio": round(t_head / t_target, 4), "head_file_mib_16bit": round(size, 2)}
        print(vd, rows[str(vd)], flush=True)
    res = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "note": "shared 2-core CPU (other jobs running); head and target timed interleaved in one process",
           "context": n, "dtype": "bfloat16", "results": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
