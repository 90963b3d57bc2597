"""The ``jaxinfer`` command: ``generate`` (one prompt) and ``chat`` (interactive, multi-turn)."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from jaxinfer.compile_cli import register as register_compile
from jaxinfer.config_cli import add_engine_args, engine_config_kwargs
from jaxinfer.errors import JaxinferError
from jaxinfer.launch import register as register_launch
from jaxinfer.train.train_draft import register as register_train_draft
from quantize.cli import register as register_quantize_commands
from serve.cli import register as register_serve


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="registered name, HF directory, GGUF file or hub id (default: smollm2-135m-instruct)")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-host JAX runtime first (jax.distributed.initialize)")
    add_engine_args(p.add_argument_group("engine"))


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed of the request (--engine-seed: the "
                   "engine's seed for requests without one)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description="LLM inference on JAX and Pallas")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a reply to one prompt and report tokens/s")
    g.add_argument("prompt")
    g.add_argument("--no-chat-template", action="store_true",
                   help="complete the raw prompt instead of wrapping it as a user chat message")
    _add_model_args(g)
    _add_sampling_args(g)
    c = sub.add_parser("chat", help="interactive multi-turn chat (/reset clears history, /exit quits)")
    c.add_argument("--system", default=None, help="system prompt")
    _add_model_args(c)
    _add_sampling_args(c)
    register_serve(sub)
    register_quantize_commands(sub)  # quantize, eval-ppl
    register_launch(sub)  # launch: N local processes of one --distributed run
    register_compile(sub)
    register_train_draft(sub)
    return parser


def _sampling(args):
    from jaxinfer.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop or ())


def _stream_reply(llm, sp, out, *, prompt=None, messages=None):
    """Stream one reply to ``out``; return (text, number of tokens, ttft, decode tok/s)."""
    start = time.perf_counter()
    text, n_tok, ttft, final = [], 0, None, None
    for delta in llm.stream(prompt, sp, messages=messages):
        c = delta.outputs[0]
        if c.token_ids and ttft is None:
            ttft = time.perf_counter() - start
        n_tok += len(c.token_ids)
        text.append(c.text)
        out.write(c.text)
        out.flush()
        final = delta
    out.write("\n")
    tps = final.metrics.decode_tokens_per_s if final else None
    return "".join(text), n_tok, ttft, tps


def _report(n_tok, ttft, tps):
    speed = f"{tps:.1f} tok/s decode" if tps else "n/a tok/s"
    first = f", first token {ttft:.2f} s" if ttft is not None else ""
    sys.stderr.write(f"[jaxinfer] {n_tok} tokens, {speed}{first}\n")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if hasattr(args, "run"):  # sub-commands that bring their own runner (serve)
            return args.run(args)
        if hasattr(args, "handler"):  # sub-commands with their own handler (quantize, eval-ppl, compile)
            return args.handler(args)
        if args.distributed:  # first: nothing may start the XLA backend before it
            from jaxinfer.distributed import initialize

            initialize()
        from jaxinfer.llm import LLM

        sp = _sampling(args)
        llm = LLM(args.model, **engine_config_kwargs(args))
        llm.engine.warmup(token_counts=[1])  # decode step compiled before timing (cached across runs)
        if args.command == "generate":
            use_chat = not args.no_chat_template and getattr(llm.tokenizer, "chat_template", None)
            if use_chat:
                res = _stream_reply(llm, sp, sys.stdout, messages=[{"role": "user", "content": args.prompt}])
            else:
                res = _stream_reply(llm, sp, sys.stdout, prompt=args.prompt)
            _report(*res[1:])
            return 0
        return _chat_loop(llm, sp, args.system)
    except (JaxinferError, ValueError) as e:
        sys.stderr.write(f"jaxinfer: error: {e}\n")
        return 2
    except Exception as e:
        if getattr(args, "distributed", False):
            from jaxinfer.distributed import abort_on_failure

            abort_on_failure(e)  # exits now: the others cannot finish without this process
        raise


def _chat_loop(llm, sp, system) -> int:
    history = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write("assistant> ")
        try:
            reply, *stats = _stream_reply(llm, sp, sys.stdout, messages=history)
        except JaxinferError as e:  # e.g. the conversation outgrew the context window
            sys.stderr.write(f"jaxinfer: error: {e}\n")
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
        _report(*stats)


if __name__ == "__main__":
    sys.exit(main())
