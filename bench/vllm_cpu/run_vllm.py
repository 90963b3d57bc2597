"""Runs one vLLM (CPU build) measurement in the vLLM environment; called by bench/throughput.py and
bench/decode.py as a subprocess: ``.venv-vllm/bin/python bench/vllm_cpu/run_vllm.py SPEC_JSON OUT_JSON``.

SPEC_JSON: ``{"model_dir", "dtype", "prompts": [[token ids], ...], "output_len", "max_num_seqs",
"max_num_batched_tokens", "max_model_len", "mode": "throughput" | "decode"}``. Throughput: all prompts submitted
at once to ``LLM.generate`` (greedy, EOS ignored) after a warm-up generate; decode: ``len(prompts)`` requests
as one batch, timed after warm-up, giving output tokens per second of the batch.
Writes ``{"elapsed_s", "output_tokens", "warmup_s", "vllm_version", "torch_version", "config"}``.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t = time.perf_counter()
    llm = LLM(model=spec["model_dir"], dtype=spec["dtype"], max_num_seqs=spec["max_num_seqs"],
              max_num_batched_tokens=spec["max_num_batched_tokens"], max_model_len=spec["max_model_len"],
              enable_prefix_caching=False, seed=0)
    sp = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    llm.generate(prompts[: min(len(prompts), spec["max_num_seqs"])], sp, use_tqdm=False)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    elapsed = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    cfg = {k: spec[k] for k in ("dtype", "max_num_seqs", "max_num_batched_tokens", "max_model_len")}
    json.dump({"elapsed_s": elapsed, "output_tokens": n, "warmup_s": warm, "vllm_version": vllm.__version__,
               "torch_version": torch.__version__, "config": cfg}, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
