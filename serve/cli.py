"""``jaxinfer serve``: the OpenAI-compatible HTTP server and/or the gRPC server for one model."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from jaxinfer.config_cli import add_engine_args, engine_config_from_args

logger = logging.getLogger(__name__)

DEFAULT_MAX_NUM_SEQS = 64
# jaxinfer serve's --max-step-tokens-per-request when not given (the engine's default is no limit): while
# another request has work, a request with several sequences puts at most this many tokens in a step
# (bench/serving_isolation.py; serve/README.md, "Limits"). 0 turns it off.
SERVE_STEP_TOKENS_PER_REQUEST = 1
_DESCRIPTION = ("Serve one model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                "/v1/models, /health, /metrics) and/or gRPC. SIGINT/SIGTERM shut down gracefully: new requests "
                "get 503, in-flight ones may finish for --shutdown-timeout seconds, then are aborted; a second "
                "signal exits at once.")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` sub-command to the ``jaxinfer`` parser; it runs ``run(args)``."""
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (and gRPC)",
                              description=_DESCRIPTION)
    p.add_argument("--model", default=None,
                   help="registered name, HF directory, GGUF file or hub id (default: smollm2-135m-instruct)")
    p.add_argument("--served-model-name", default=None, help="name clients pass as 'model' (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0 picks a free one; default 8000)")
    p.add_argument("--grpc-port", type=int, default=None, help="also serve gRPC on this port (0 picks a free one)")
    p.add_argument("--no-http", action="store_true", help="serve gRPC only (needs --grpc-port)")
    p.add_argument("--distributed", action="store_true",
                   help="one engine over every process of a multi-host JAX runtime (run on every process, e.g. "
                        "through 'jaxinfer launch'): process 0 serves HTTP / gRPC, the others follow its engine")
    e = p.add_argument_group("engine")
    add_engine_args(e)
    e.add_argument("--no-warmup", action="store_true", help="do not compile every step shape at start-up")
    e.add_argument("--max-waiting-requests", type=int, default=256,
                   help="requests admitted beyond --max-num-seqs before answering 429 (default 256)")
    e.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may finish after SIGINT/SIGTERM (default 30)")
    e.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body in MiB (default 16)")
    lim = p.add_argument_group("per-request limits")
    lim.add_argument("--max-n", type=int, default=128, help="largest n (samples per prompt) (default 128)")
    lim.add_argument("--max-prompts-per-request", type=int, default=256,
                     help="most prompts in one /v1/completions request (default 256)")
    lim.add_argument("--max-seqs-per-request", type=int, default=256,
                     help="most sequences (n x prompts) one request adds (default 256)")
    lim.add_argument("--max-stop-strings", type=int, default=64, help="most stop strings per request (default 64)")
    lim.add_argument("--max-stop-bytes", type=int, default=4096,
                     help="most UTF-8 bytes of a request's stop strings together (default 4096)")
    lim.add_argument("--grammar-timeout", type=float, default=10.0,
                     help="seconds a request's output constraint (JSON schema, grammar, tools) may take to "
                          "validate and compile, off the engine thread; 400 beyond (default 10)")
    sec = p.add_argument_group("security and connections")
    sec.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1/* and gRPC Generate (default: the "
                          "JAXINFER_API_KEY environment variable; unset: no authentication)")
    sec.add_argument("--auth-health-metrics", action="store_true",
                     help="also require the API key on /health and /metrics (open by default)")
    sec.add_argument("--allowed-origins", default="",
                     help="comma-separated browser origins allowed by CORS (default: none, no CORS headers)")
    sec.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds a client has to send a request's headers before the connection is closed "
                          "(default 10)")
    sec.add_argument("--body-timeout", type=float, default=30.0,
                     help="seconds a client has to send a request body (408 after) (default 30)")
    sec.add_argument("--keep-alive-timeout", type=float, default=15.0,
                     help="seconds an idle keep-alive connection stays open (default 15)")
    sec.add_argument("--max-connections", type=int, default=1024,
                     help="open HTTP connections beyond which new ones are closed at once (default 1024)")
    p.set_defaults(run=run)
    return p


def _positive(args, name: str) -> None:
    value = getattr(args, name)
    if value is not None and value < 1:
        raise SystemExit(f"jaxinfer serve: --{name.replace('_', '-')} must be >= 1, got {value}")


def build_engine(args):
    """Load ``--model`` into a ``jaxinfer.engine.Engine`` configured from the options; compile every step
    shape now unless ``--no-warmup`` (so no request waits for a compilation)."""
    import time

    from jaxinfer.engine_factory import create_engine

    step = getattr(args, "max_step_tokens_per_request", None)
    if step is None or step == 0:
        args.max_step_tokens_per_request = SERVE_STEP_TOKENS_PER_REQUEST if step is None else None
    engine = create_engine(args.model, engine_config_from_args(args))
    if not args.no_warmup:
        t = time.perf_counter()
        logger.info("compiling the engine's step shapes (--no-warmup skips this)")
        engine.warmup()
        logger.info("warm-up done in %.1f s", time.perf_counter() - t)
    return engine


def engine_max_num_seqs(engine, requested: int | None) -> int:
    """The engine's running-request limit (for admission), from the option or the engine's config."""
    replicas = max(1, getattr(getattr(engine, "config", None), "data_parallel_size", 1) or 1)
    if requested is not None:
        return requested * replicas
    for holder in (engine, getattr(engine, "config", None), getattr(engine, "engine_config", None)):
        value = getattr(holder, "max_num_seqs", None) if holder is not None else None
        if isinstance(value, int) and value > 0:
            return value * replicas
    return DEFAULT_MAX_NUM_SEQS


def run(args, engine=None, on_ready=None) -> int:
    """Run the servers until SIGINT / SIGTERM. ``engine``: use this one instead of loading ``--model``;
    ``on_ready(addresses)``: called once listening. With ``--distributed`` process 0 serves and the
    other processes follow its engine (:mod:`jaxinfer.engine_mirror`)."""
    from serve.async_engine import AsyncEngine

    group = None
    if getattr(args, "distributed", False):
        group = _join_group()  # first: nothing may start the XLA backend before it
    from serve.server import ServerOptions, run_server

    for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
        _positive(args, name)
    if args.no_http and args.grpc_port is None:
        raise SystemExit("jaxinfer serve: --no-http needs --grpc-port")
    if args.max_waiting_requests < 0:
        raise SystemExit("jaxinfer serve: --max-waiting-requests must be >= 0")
    from serve.limits import RequestLimits

    api_key = args.api_key if args.api_key is not None else os.environ.get("JAXINFER_API_KEY") or None
    opts = ServerOptions(host=args.host, port=None if args.no_http else args.port, grpc_port=args.grpc_port,
                         max_body_bytes=int(args.max_body_mb * 2**20), shutdown_grace_s=args.shutdown_timeout,
                         api_key=api_key, auth_open_paths=() if args.auth_health_metrics else ("/health", "/metrics"),
                         allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
                         header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                         keep_alive_timeout_s=args.keep_alive_timeout, max_connections=args.max_connections)
    try:
        limits = RequestLimits(max_n=args.max_n, max_prompts=args.max_prompts_per_request,
                               max_seqs_per_request=args.max_seqs_per_request, max_stop=args.max_stop_strings,
                               max_stop_bytes=args.max_stop_bytes, grammar_timeout_s=args.grammar_timeout)
    except ValueError as e:
        raise SystemExit(f"jaxinfer serve: {e}") from None
    if engine is None:
        logger.info("loading %s", args.model or "the default model")
        try:
            engine = build_engine(args)
        except ValueError as e:  # EngineConfig rejects the combination of options
            raise SystemExit(f"jaxinfer serve: {e}") from None
    if group is not None:
        engine = _mirror(engine, group)
        if engine is None:  # a follower: its engine ran process 0's steps until it stopped
            return 0
    async_engine = AsyncEngine(engine, max_num_seqs=engine_max_num_seqs(engine, args.max_num_seqs),
                               max_waiting_requests=args.max_waiting_requests,
                               served_model_name=args.served_model_name, limits=limits)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(sig: int) -> None:
            if stop.is_set():
                logger.warning("second %s: exiting now", signal.Signals(sig).name)
                os._exit(1)
            logger.info("%s: shutting down gracefully (again to force)", signal.Signals(sig).name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            await run_server(async_engine, opts, stop, on_ready or _announce)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    asyncio.run(main())
    if group is not None:
        engine.close()  # the followers stop and exit
    return 0


def _join_group():
    """``--distributed``: join the runtime; returns the channel of the serving group."""
    import jax

    from jaxinfer.distributed import initialize, kv_client
    from jaxinfer.engine_mirror import OpChannel

    initialize()
    return OpChannel(kv_client(), jax.process_index(), jax.process_count())


def _mirror(engine, channel):
    """Process 0: the engine that broadcasts its operations; other processes: follow, then None."""
    from jaxinfer.engine_mirror import LeaderEngine, follow

    if channel.process_id == 0:
        logger.info("process 0 of %d: serving; the others follow this engine", channel.num_processes)
        return LeaderEngine(engine, channel, seed=getattr(engine.config, "seed", 0))
    sys.stderr.write(f"[jaxinfer] process {channel.process_id} of {channel.num_processes}: following process "
                     "0's engine\n")
    sys.stderr.flush()
    steps = follow(engine, channel)
    st = engine.stats()
    sys.stderr.write(f"[jaxinfer] process {channel.process_id}: process 0 stopped the serving group after {steps} "
                     f"steps ({st.generation_tokens_total} tokens generated, {st.spec_draft_tokens} draft tokens "
                     f"proposed)\n")
    return None


def _announce(addresses) -> None:
    if addresses.http_url:
        sys.stderr.write(f"[jaxinfer] OpenAI-compatible API on {addresses.http_url}/v1\n")
    if addresses.grpc_target:
        sys.stderr.write(f"[jaxinfer] gRPC on {addresses.grpc_target}\n")
    sys.stderr.flush()
