"""Run the HTTP and/or gRPC servers on one asyncio loop, with graceful shutdown.

Shutdown (``stop`` set: SIGINT / SIGTERM from ``jaxinfer serve``, or ``ServerThread.stop``): new
requests get 503 (gRPC UNAVAILABLE) while in-flight ones may finish for ``shutdown_grace_s``; the rest
are aborted (their streams end with ``finish_reason: "abort"``), then the listeners close and the
engine thread stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from serve.async_engine import AsyncEngine
from serve.grpc_server import build_grpc_server
from serve.http_server import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, build_app

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerOptions:
    """Where and how to listen. ``port`` / ``grpc_port``: ``None`` disables that server, 0 picks a free
    port.

    Security: ``api_key`` (``None``: no authentication) is required as ``Authorization: Bearer <key>``
    on every HTTP route but ``auth_open_paths`` and on every gRPC method but ``Health``;
    ``allowed_origins``: browser origins that get CORS headers (empty: no CORS headers at all).
    Connections: a client must send a request's headers within ``header_timeout_s`` (else the
    connection is closed) and its body within ``body_timeout_s`` (else 408); an idle keep-alive
    connection is closed after ``keep_alive_timeout_s``; beyond ``max_connections`` open HTTP
    connections new ones are closed at once; ``max_header_bytes`` bounds the request line + headers.
    """

    host: str = "127.0.0.1"
    port: int | None = 8000
    grpc_port: int | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_grace_s: float = 30.0
    api_key: str | None = None
    auth_open_paths: tuple[str, ...] = ("/health", "/metrics")
    allowed_origins: tuple[str, ...] = ()
    header_timeout_s: float = 10.0
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    keep_alive_timeout_s: float = 15.0
    max_connections: int = 1024
    max_header_bytes: int = 64 * 1024


@dataclass(frozen=True)
class ServerAddresses:
    """The bound addresses: ``http_url`` like ``http://127.0.0.1:8000``, ``grpc_target`` like
    ``127.0.0.1:50051``."""

    http_url: str | None
    grpc_target: str | None


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: ``run_server`` owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a header read timeout (slowloris: a connection that does not complete a
    request's headers in time is closed) and a cap on open connections (beyond it, closed at once)."""

    header_timeout_s = 10.0
    max_connections = 1024

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = None
        if len(self.connections) > self.max_connections:
            logger.warning("more than %d open HTTP connections: closing a new one", self.max_connections)
            transport.close()
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self._header_timer is None:  # a request has started arriving: its headers must complete
                self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def _protocol_class(opts: ServerOptions) -> type:
    return type("GuardedH11", (_GuardedH11,), {"header_timeout_s": opts.header_timeout_s,
                                               "max_connections": opts.max_connections})


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Its protocol is set to IPPROTO_TCP explicitly: asyncio only enables
    TCP_NODELAY on accepted sockets whose ``proto`` says TCP, and without it Nagle's algorithm plus the
    client's delayed ACK add ~40 ms to every keep-alive response and SSE chunk."""
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _fmt_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def run_server(engine: AsyncEngine, opts: ServerOptions, stop: asyncio.Event,
                     ready: Callable[[ServerAddresses], None] | None = None) -> None:
    """Serve until ``stop`` is set (or a server dies), then shut down gracefully."""
    if opts.port is None and opts.grpc_port is None:
        raise ValueError("nothing to serve: enable HTTP (port) and/or gRPC (grpc_port)")
    await engine.start()
    http = http_task = grpc_server = None
    http_url = grpc_target = None
    try:
        if opts.port is not None:
            sock = _listen(opts.host, opts.port)
            app = build_app(engine, opts.max_body_bytes, body_timeout_s=opts.body_timeout_s, api_key=opts.api_key,
                            auth_open_paths=opts.auth_open_paths, allowed_origins=opts.allowed_origins)
            config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                    timeout_graceful_shutdown=5, timeout_keep_alive=opts.keep_alive_timeout_s,
                                    http=_protocol_class(opts), h11_max_incomplete_event_size=opts.max_header_bytes)
            http = _Uvicorn(config)
            http_task = asyncio.ensure_future(http.serve(sockets=[sock]))
            while not http.started:
                if http_task.done():
                    http_task.result()
                    raise RuntimeError("the HTTP server stopped during start-up")
                await asyncio.sleep(0.01)
            http_url = f"http://{_fmt_host(opts.host)}:{sock.getsockname()[1]}"
            logger.info("OpenAI-compatible HTTP server on %s (model %s)", http_url, engine.model_name)
        if opts.grpc_port is not None:
            grpc_server, gport = build_grpc_server(engine, opts.host, opts.grpc_port, api_key=opts.api_key)
            await grpc_server.start()
            grpc_target = f"{_fmt_host(opts.host)}:{gport}"
            logger.info("gRPC server on %s", grpc_target)
        if ready is not None:
            ready(ServerAddresses(http_url, grpc_target))
        waits = [asyncio.ensure_future(stop.wait())] + ([http_task] if http_task else [])
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        waits[0].cancel()
    finally:
        logger.info("shutting down")
        await engine.shutdown(opts.shutdown_grace_s)
        if http is not None:
            http.should_exit = True
            with contextlib.suppress(Exception):
                await http_task
        if grpc_server is not None:
            await grpc_server.stop(grace=1.0)
        logger.info("stopped")


class ServerThread:
    """The servers in a background thread with their own event loop (tests, notebooks).

    ``with ServerThread(engine, ServerOptions(port=0, grpc_port=0)) as srv: srv.http_url ...``
    """

    def __init__(self, engine, opts: ServerOptions | None = None, **engine_kw):
        self.opts = opts or ServerOptions(port=0)
        self._engine = engine
        self._engine_kw = engine_kw
        self.async_engine: AsyncEngine | None = None
        self.addresses: ServerAddresses | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="jaxinfer-server", daemon=True)

    @property
    def http_url(self) -> str | None:
        return self.addresses.http_url if self.addresses else None

    @property
    def grpc_target(self) -> str | None:
        return self.addresses.grpc_target if self.addresses else None

    def _main(self) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.async_engine = AsyncEngine(self._engine, **self._engine_kw)

            def on_ready(addresses: ServerAddresses) -> None:
                self.addresses = addresses
                self._ready.set()

            await run_server(self.async_engine, self.opts, self._stop, on_ready)

        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced by start()
            self._error = e
            logger.exception("server thread failed")
        finally:
            self._ready.set()

    def start(self, timeout: float = 60.0) -> ServerThread:
        """Start and wait until the servers listen."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the server did not start in time")
        if self._error is not None or self.addresses is None:
            raise RuntimeError("the server failed to start") from self._error
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful shutdown (see the module docstring); waits for the thread."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
