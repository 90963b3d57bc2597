"""Runs one vLLM (CPU build) measurement in the vLLM environment; called by bench/throughput.py and
bench/decode.py as a subprocess: ``.venv-vllm/bin/python bench/vllm_cpu/run_vllm.py SPEC_JSON OUT_JSON``.

SPEC_JSON: ``{"model_dir", "dtype", "prompts": [[token ids], ...], "output_len", "max_num_seqs",
"max_num_batched_tokens", "max_model_len", "mode": "throughput" | "decode", "batches": [1, 32]}``. Throughput
(default): all prompts submitted at once to ``LLM.generate`` (greedy, EOS ignored) after a warm-up generate;
writes ``{"elapsed_s", "output_tokens", "warmup_s", "vllm_version", "torch_version", "config"}``.
Decode: for each batch size ``B`` in ``batches``, ``B`` copies of ``prompts[0]`` as one batch, timed after a
warm-up once with 1 output token and once with ``output_len``; the decode rate is
``B * (output_len - 1) / (t_output_len - t_1)`` (prefill excluded, as bench/decode.py does for HF); writes
``{"decode": [{"batch", "decode_tok_s", "e2e_tok_s"}, ...], "total_s", "vllm_version", "torch_version", "config"}``.
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
    cfg = {k: spec[k] for k in ("dtype", "max_num_seqs", "max_num_batched_tokens", "max_model_len")}
    versions = {"vllm_version": vllm.__version__, "torch_version": torch.__version__, "config": cfg}
    if spec.get("mode", "throughput") == "decode":
        json.dump({"decode": decode_rows(llm, prompts[0], spec), "total_s": time.perf_counter() - t, **versions},
                  open(sys.argv[2], "w"))
        return
    llm.generate(prompts[: min(len(prompts), spec["max_num_seqs"])], sp, use_tqdm=False)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    elapsed = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    json.dump({"elapsed_s": elapsed, "output_tokens": n, "warmup_s": warm, **versions}, open(sys.argv[2], "w"))


def decode_rows(llm, prompt, spec) -> list[dict]:
    """Decode tokens/s of ``B`` copies of ``prompt`` per batch size ``B`` (prefill time subtracted)."""
    from vllm import SamplingParams

    n = spec["output_len"]

    def run(batch: int, tokens: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True)
        t = time.perf_counter()
        llm.generate([prompt] * batch, sp, use_tqdm=False)
        return time.perf_counter() - t

    rows = []
    for b in spec["batches"]:
        run(b, 2)  # warm-up of this batch's shapes
        prefill = run(b, 1)
        total = run(b, n)
        rows.append({"batch": b, "decode_tok_s": b * (n - 1) / (total - prefill), "e2e_tok_s": b * n / total})
    return rows


if __name__ == "__main__":
    main()
