"""lm-evaluation-harness against ``jaxinfer serve``: scores, wall time and a consistency check.

Starts ``python -m jaxinfer.cli serve`` (the default model unless ``--model``), points lm-eval's
``local-completions`` model at it (token-id requests: loglikelihood tasks send ``echo: true, logprobs: 1,
max_tokens: 1``, generation tasks ``stop``) and runs ``--tasks``. Real lm-eval tasks (``--tasks
hellaswag arc_easy --limit 100``) download their data sets from the Hugging Face hub; where the hub cannot
be reached (as on the machine that produced the committed results), ``--tasks local`` runs two small
tasks written here: a 4-way multiple-choice task of short general-knowledge questions and a
``generate_until`` question-answering task (exact match, case and punctuation ignored).

The same requests are then recomputed offline with ``LLM`` in this process (the loglikelihood of each
logged continuation from ``prompt_logprobs``, each greedy generation from ``LLM.generate``), and the largest
loglikelihood difference and the number of differing generations go into the JSON
(``bench/results/lm_eval_server-<date>-<machine>.json``).

Usage::

    python bench/lm_eval_server.py                       # local tasks, default model
    python bench/lm_eval_server.py --tasks arc_easy --limit 50   # needs the Hugging Face hub
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_info, result_path
from serving import start_server

MC = [  # question, choices, answer index
    ("The capital of France is", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("The capital of Germany is", ["Vienna", "Berlin", "Warsaw", "Prague"], 1),
    ("The capital of Italy is", ["Milan", "Naples", "Rome", "Turin"], 2),
    ("The capital of Spain is", ["Lisbon", "Barcelona", "Seville", "Madrid"], 3),
    ("The capital of Japan is", ["Tokyo", "Osaka", "Kyoto", "Seoul"], 0),
    ("The largest planet in the solar system is", ["Mars", "Jupiter", "Venus", "Mercury"], 1),
    (
        "Water freezes at a temperature of",
        ["100 degrees Celsius", "50 degrees Celsius", "0 degrees Celsius", "10 degrees Celsius"],
        2,
    ),
    ("The color of a clear daytime sky is", ["green", "red", "yellow", "blue"], 3),
    ("A week has", ["seven days", "five days", "ten days", "three days"], 0),
    ("The opposite of hot is", ["warm", "cold", "big", "fast"], 1),
    ("Two plus two equals", ["five", "three", "four", "six"], 2),
    ("The animal that barks is the", ["cat", "cow", "fish", "dog"], 3),
    ("The sun rises in the", ["east", "west", "north", "south"], 0),
    ("Bees make", ["milk", "honey", "silk", "wool"], 1),
    ("The chemical symbol for water is", ["CO2", "O2", "H2O", "NaCl"], 2),
    ("The first month of the year is", ["March", "June", "December", "January"], 3),
    ("Ice is water in its", ["solid", "liquid", "gas", "plasma"], 0),
    ("A triangle has", ["four sides", "three sides", "five sides", "six sides"], 1),
    ("The fastest land animal is the", ["turtle", "elephant", "cheetah", "snail"], 2),
    ("Plants make food from sunlight by", ["digestion", "respiration", "fermentation", "photosynthesis"], 3),
]
GEN = [  # question, answer
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What color is grass?", "Green"),
    ("How many legs does a spider have?", "Eight"),
    ("What is the opposite of up?", "Down"),
    ("What do cows drink?", "Water"),
    ("What is two plus three?", "Five"),
]


def write_local_tasks(root: Path) -> list[str]:
    """The two local task YAMLs and their JSON-lines data under ``root``; returns the task names."""
    (root / "mc.jsonl").write_text(
        "\n".join(json.dumps({"question": q, "choices": [" " + c for c in cs], "answer": a}) for q, cs, a in MC)
    )
    (root / "qa.jsonl").write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in GEN))
    (root / "local_mc.yaml").write_text(f"""task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (root / "local_qa.yaml").write_text(f"""task: local_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "qa.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
    regexes_to_ignore: ["^\\\\s+"]
""")
    return ["local_mc", "local_qa"]


def _pair(args):
    return (args["arg_0"], args["arg_1"]) if isinstance(args, dict) else (args[0], args[1])


def offline_check(llm, tok, samples: dict) -> dict:
    """Recompute every logged request with ``LLM``: largest |loglikelihood difference| and differing texts."""
    from jaxinfer import SamplingParams

    max_diff, n_ll, gen_diff, n_gen = 0.0, 0, 0, 0
    for task_samples in samples.values():
        for s in task_samples:
            for args, resp in zip(s["arguments"], s["resps"]):
                if isinstance(resp[0], (list, tuple)):  # (loglikelihood, is_greedy)
                    ctx, cont = _pair(args)
                    n = len(ctx) - len(ctx.rstrip())
                    if n:
                        ctx, cont = ctx[:-n], ctx[-n:] + cont
                    whole = tok(ctx + cont, add_special_tokens=False).input_ids
                    k = len(tok(ctx, add_special_tokens=False).input_ids)
                    out = llm.generate(whole, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
                    ll = sum(out.prompt_logprobs[j][whole[j]] for j in range(k, len(whole)))
                    max_diff = max(max_diff, abs(ll - resp[0][0]))
                    n_ll += 1
                else:
                    ctx, gen_kwargs = _pair(args)
                    ids = tok(ctx, add_special_tokens=False).input_ids
                    until = [u for u in gen_kwargs.get("until", []) if u]
                    sp = SamplingParams(max_tokens=gen_kwargs.get("max_gen_toks", 16), temperature=0, stop=until)
                    gen_diff += llm.generate(ids, sp)[0].outputs[0].text != resp[0]
                    n_gen += 1
    return {
        "loglikelihood_requests": n_ll,
        "max_abs_loglikelihood_diff": max_diff,
        "generate_requests": n_gen,
        "differing_generations": gen_diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model to serve (default: the default model)")
    ap.add_argument("--tasks", nargs="+", default=["local"], help="lm-eval task names, or 'local'")
    ap.add_argument("--limit", type=int, default=None, help="documents per task")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256)
    ap.add_argument("--num-concurrent", type=int, default=4, help="lm-eval's concurrent requests")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--no-offline-check", action="store_true")
    args = ap.parse_args()

    import lm_eval
    from lm_eval.tasks import TaskManager

    from jaxinfer.model_registry import resolve_model
    from jaxinfer.tokenizer import load_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="jaxinfer-lm-eval-"))
    tok = load_tokenizer(resolve_model(args.model))
    tok.save_pretrained(str(tmp / "tokenizer"))
    tasks = write_local_tasks(tmp) if args.tasks == ["local"] else args.tasks
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1" if args.tasks == ["local"] else "0")
    proc, url = start_server(args)
    try:
        name = json.loads(_get(url + "/v1/models"))["data"][0]["id"]
        model_args = (
            f"model={name},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={tmp / 'tokenizer'},tokenized_requests=True,max_length={args.max_model_len},"
            f"num_concurrent={args.num_concurrent},max_retries=1"
        )
        start = time.perf_counter()
        res = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=model_args,
            tasks=tasks,
            task_manager=TaskManager(include_path=str(tmp)),
            log_samples=True,
            limit=args.limit,
            batch_size=1,
        )
        wall = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    out = {
        "machine": machine_info(),
        "note": "2-core machine shared with other jobs during the run",
        "model": args.model or "default (smollm2-135m-instruct)",
        "tasks": tasks,
        "limit": args.limit,
        "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "",
        "engine": {
            "max_model_len": args.max_model_len,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
        },
        "num_concurrent": args.num_concurrent,
        "wall_s": round(wall, 1),
        "results": {t: {k: v for k, v in r.items() if isinstance(v, (int, float))} for t, r in res["results"].items()},
    }
    if not args.no_offline_check:
        from jaxinfer import LLM

        llm = LLM(
            args.model,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
        )
        out["offline_check"] = offline_check(llm, tok, res["samples"])
    path = result_path("lm_eval_server")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["results"], indent=2))
    print(json.dumps(out.get("offline_check"), indent=2))
    print(f"wrote {path}", file=sys.stderr)


def _get(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=30).text


if __name__ == "__main__":
    main()
