"""llama.cpp as a batch-1 decode peer, run from its own environment (``bench/llamacpp/setup.sh``).

``llama-cpp-python`` builds llama.cpp from source on install (it did not finish within 25 minutes on the
2-core benchmark machine); ``llama-cpp-py-sync`` ships prebuilt llama.cpp shared libraries (a CPU backend
with AVX2 / AVX-512 kernels) with CFFI bindings, so it installs in seconds. This script uses only its
low-level calls (``llama_decode`` through ``Llama._eval_tokens`` and a greedy sampler), so the timing is
llama.cpp's own work.

Usage (by bench/decode.py, or by hand)::

    .venv-llamacpp/bin/python bench/llamacpp/peer.py MODEL.gguf --prompt-ids 1,2,3 --new-tokens 64

Prints one JSON object: decode tok/s (tokens after the first over the time after the first), end-to-end
tok/s, the llama.cpp commit and thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--prompt-ids", required=True, help="comma-separated prompt token ids")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    # Its OpenMP threads spin-wait by default; on a shared, oversubscribed machine that made 2 threads ~100x
    # slower than 1 (0.3 vs 6.5 tok/s measured here), so they wait passively unless the caller says otherwise.
    # Set before the libraries (and libgomp) load.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp_py_sync as lcp
    from llama_cpp_py_sync.llama import Llama

    ids = [int(t) for t in args.prompt_ids.split(",")]
    llm = Llama(model_path=args.model, n_ctx=len(ids) + args.new_tokens + 16, n_batch=512,
                n_threads=args.threads, verbose=False)
    lib = llm._lib
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())

    def run(n: int) -> tuple[float, float, list[int]]:
        llm._clear_context_state()
        t0 = time.perf_counter()
        n_past = llm._eval_tokens(ids, 0)
        out = [lib.llama_sampler_sample(chain, llm._ctx, -1)]
        t_first = time.perf_counter()
        while len(out) < n:
            n_past = llm._eval_tokens([out[-1]], n_past)
            out.append(lib.llama_sampler_sample(chain, llm._ctx, -1))
        return t_first - t0, time.perf_counter() - t0, out

    run(4)  # warm-up
    first, total, out = run(args.new_tokens)
    version = getattr(lcp, "__version__", None)
    print(json.dumps({"decode_tok_s": (args.new_tokens - 1) / (total - first), "e2e_tok_s": args.new_tokens / total,
                      "first_token_s": first, "n_threads": args.threads, "package": f"llama-cpp-py-sync {version}",
                      "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                      "tokens": out[:16]}))


if __name__ == "__main__":
    main()
