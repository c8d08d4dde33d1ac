"""The HTTP front end: KServe v2 / Triton inference protocol, a plain image endpoint, metrics, limits and auth.

Endpoints (all errors are JSON ``{"error": "<message>"}``, the shape ``tritonclient`` reads):

==========================================  =====================================================================
``GET  /v2/health/live``                    200 while the process runs
``GET  /v2/health/ready``                   200 when the model can take requests, 503 while draining
``GET  /v2``                                server metadata (extensions: ``binary_tensor_data``)
``GET  /v2/models/{name}[/versions/1]``     model metadata; unknown name -> 404
``GET  /v2/models/{name}/config``           Triton-style config (max_batch_size, dynamic_batching)
``GET  /v2/models/{name}/ready``            200 / 503
``POST /v2/models/{name}/infer``            input ``images`` UINT8 ``[N,H,W,3]``; outputs ``labels`` UINT8
                                            ``[N,H,W]`` (default) and ``logits`` FP32 ``[N,C,H,W]`` (on request);
                                            JSON or binary tensor data (``Inference-Header-Content-Length``)
``POST /v1/segment?format=...``             image file (multipart or raw body) -> ``labels`` PNG (class ids),
                                            ``color`` PNG, ``overlay`` PNG, or ``json`` class shares
``POST /v2/repository/index``               Triton's repository index: ``[{name, version, state, reason}]``
``GET  /metrics``                           Prometheus text
``GET  /v1/stats``                          batcher counters as JSON (introspection for tests and benchmarks)
==========================================  =====================================================================

Status codes (one per class of error): 400 malformed input (not an image, truncated file, bad JSON or JSON nested too
deep, a v2 request of the wrong structure, a boolean parameter that is not a JSON boolean, wrong tensor
shape/dtype/size, bad HTTP framing), 401 missing/wrong API key, 404 unknown model or endpoint, 405 wrong method, 408
body (or a request's headers) not received in time, 413 over a size limit, decided before the work (body, JSON text,
JSON values, image pixels, outputs; a parse past its time budget), 415 image format or Content-Encoding not
accepted, 503 + ``Retry-After`` queue full, memory budget busy, too many connections, or shutting down (also for a
request the drain time cut off), 500 backend failure (only the requests of that batch). A client that leaves
mid-body is counted as 499. serve/README.md gives every limit and the server's worst-case memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import resource
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from uvicorn.protocols.http.h11_impl import H11Protocol

from blindnet.backends.base import Backend
from blindnet.inference import Predictor
from blindnet.serve.batcher import DynamicBatcher
from blindnet.serve.config import ServeConfig
from blindnet.serve.errors import install_error_handlers
from blindnet.serve.metrics import MetricsAndAuthMiddleware
from blindnet.serve.routes import (
    ServeContext,
    add_observability_routes,
    add_segment_routes,
    add_v2_health_routes,
    add_v2_inference_routes,
)

log = logging.getLogger("blindnet.serve")


# ----------------------------------------------------------------------------------------------------------------------
# App factory
# ----------------------------------------------------------------------------------------------------------------------


def make_predictor(predictor_or_backend: Predictor | Backend, config: ServeConfig) -> Predictor:
    """A Predictor for serving: same backend and input size, ``batch_size`` = ``max_batch_size`` (one call/batch)."""
    if isinstance(predictor_or_backend, Predictor):
        base = predictor_or_backend
        if config.input_size is not None and base.input_size not in (None, tuple(config.input_size)):
            raise ValueError(f"config.input_size {config.input_size} contradicts the predictor's {base.input_size}")
        input_size = (config.input_size[0], config.input_size[1]) if config.input_size is not None else base.input_size
        return Predictor(base.backend, input_size=input_size, batch_size=config.max_batch_size)
    if isinstance(predictor_or_backend, Backend):
        return Predictor(predictor_or_backend, input_size=config.input_size, batch_size=config.max_batch_size)
    raise TypeError(f"expected a Predictor or Backend, got {type(predictor_or_backend).__name__}")


def create_app(predictor_or_backend: Predictor | Backend, config: ServeConfig | None = None) -> FastAPI:
    """Build the FastAPI app. The batcher starts with the app's lifespan and drains on shutdown (SIGTERM).

    Args:
        predictor_or_backend: a :class:`Predictor` (its backend and input size are used) or a bare :class:`Backend`.
        config: server settings; defaults when None.
    """
    config = config or ServeConfig()
    predictor = make_predictor(predictor_or_backend, config)
    ctx = ServeContext(config, predictor)
    app = FastAPI(
        title="blindnet segmentation server",
        lifespan=functools.partial(_lifespan, ctx),
        docs_url=None,
        redoc_url=None,
    )
    app.state.config = config
    app.state.predictor = predictor
    app.state.metrics = ctx.metrics
    app.state.batcher = ctx.get_batcher
    app.state.shutdown_requested_at = None
    app.add_middleware(MetricsAndAuthMiddleware, metrics=ctx.metrics, api_key=config.api_key)
    install_error_handlers(app)
    # Routes match in the order they are added.
    for add_routes in (add_v2_health_routes, add_v2_inference_routes, add_segment_routes, add_observability_routes):
        add_routes(app, ctx)
    return app


@contextlib.asynccontextmanager
async def _lifespan(ctx: ServeContext, app: FastAPI) -> AsyncIterator[None]:
    """Run the batcher while the app serves; on shutdown, drain its queue within what is left of the drain time."""
    config, predictor = ctx.config, ctx.predictor
    ctx.batcher = DynamicBatcher(
        predictor,
        max_batch_size=config.max_batch_size,
        max_queue_delay_ms=config.max_queue_delay_ms,
        max_queue_size=config.max_queue_size,
        max_batch_pixels=config.batch_pixel_budget,
        max_queue_pixels=config.queue_pixel_budget,
        on_batch=ctx.metrics.observe_batch,
    )
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(RateLimitedLoopErrors(loop.get_exception_handler()))
    log.info("serving model %r on backend %s", config.model_name, predictor.backend.describe())
    try:
        yield
    finally:
        # uvicorn has stopped accepting connections and finished in-flight requests by now; whatever is still
        # queued (e.g. requests whose clients went away) is run, not dropped.
        b = ctx.batcher
        log.info("draining %d queued image(s) before exit", b.queue_depth)
        await run_in_threadpool(b.close, drain=True, timeout=_drain_left(app, config.drain_timeout_s))
        app.state.queue_drained = not b.alive


def _drain_left(app: FastAPI, drain_timeout_s: float) -> float:
    """Seconds left of the drain time, counted from when shutdown was requested (now, if nobody recorded it)."""
    started = app.state.shutdown_requested_at
    if started is None:
        return drain_timeout_s
    return max(0.0, drain_timeout_s - (time.monotonic() - started))


# ----------------------------------------------------------------------------------------------------------------------
# Running it
# ----------------------------------------------------------------------------------------------------------------------


class InsecureBindError(RuntimeError):
    """Refusal to expose the server beyond this machine without an API key."""


def is_loopback(host: str) -> bool:
    """True for hosts only this machine can reach (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: assume reachable from outside


def check_bind(host: str, api_key: str | None, *, allow_unauthenticated: bool = False) -> None:
    """Refuse a non-loopback bind without an API key, unless explicitly allowed (then warn loudly).

    Policy: *refuse*. Anyone who can reach the port could otherwise run the model (and fill the queue). The escape
    hatch ``allow_unauthenticated`` exists for deployments where a proxy in front does the authentication.
    """
    if is_loopback(host) or api_key:
        return
    if not allow_unauthenticated:
        raise InsecureBindError(
            f"refusing to bind {host!r} (reachable from other machines) without an API key: pass --api-key KEY "
            "(or set BLINDNET_API_KEY), or --allow-unauthenticated if a proxy in front authenticates requests"
        )
    log.warning("!!! serving on %s WITHOUT authentication: anyone who can reach this port can run the model !!!", host)


def _raw_json_response(status: int, reason: str, message: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 response with a JSON ``{"error": ...}`` body that closes the connection (for answers
    given below the app: framing errors, header timeouts, refused connections)."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n{extra}"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _framing_error_response(msg: str) -> bytes:
    """A complete HTTP/1.1 400 response with a JSON ``{"error": ...}`` body, for requests uvicorn cannot parse."""
    return _raw_json_response(400, "Bad Request", f"malformed HTTP request: {msg}")


class GuardedHTTPProtocol(H11Protocol):
    """uvicorn's h11 HTTP protocol with the connection hygiene the app cannot do itself (it only sees whole requests):

    * unparsable requests (bad framing, bad headers) are answered in the JSON error shape (uvicorn: plain text);
    * a connection that has not sent a complete request's headers within :attr:`header_timeout_s` of connecting, or
      of starting a new request, is closed (408 when it sent part of one), so idle sockets cannot pile up;
    * beyond :attr:`max_connections` open connections, a new one is answered 503 and closed at once.

    :func:`uvicorn_config` makes a subclass with the server's settings. Built on the h11 protocol whatever else is
    installed (uvicorn would pick httptools when present): one parser, so framing is handled the same everywhere.
    """

    header_timeout_s: float = 10.0
    max_connections: int = 64

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            transport.write(
                _raw_json_response(
                    503,
                    "Service Unavailable",
                    f"server at its limit of {self.max_connections} connections; retry shortly",
                    "retry-after: 1\r\n",
                )
            )
            transport.close()
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_timer is None and self._idle() and not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _idle(self) -> bool:
        """No request is being handled (none yet, or the last one answered)."""
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout, self.cycle)

    def _header_timeout(self, armed_cycle) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._idle():
            return
        if self.cycle is not armed_cycle:  # a request came and went since: time the next one from now
            self._arm_header_timer()
            return
        if self.conn.trailing_data[0]:  # part of a request arrived, not all its headers
            message = f"request headers did not arrive within {self.header_timeout_s:g} s"
            self.transport.write(_raw_json_response(408, "Request Timeout", message))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self.transport.write(_framing_error_response(msg))
        self.transport.close()


#: Kept for code that names the earlier class.
JsonErrorHTTPProtocol = GuardedHTTPProtocol


class RateLimitedLoopErrors:
    """An asyncio exception handler that logs each kind of event-loop error at most once per ``interval_s``, as one
    line without a traceback, counting what it left out.

    At the file-descriptor limit asyncio reports every failed ``accept()`` with a traceback; unthrottled that grew
    the log by megabytes per second.
    """

    def __init__(self, previous=None, interval_s: float = 10.0) -> None:
        self.previous = previous
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", "event loop error"))
        exc = context.get("exception")
        now = time.monotonic()
        if now - self._last.get(message, -math.inf) < self.interval_s:
            self._suppressed[message] = self._suppressed.get(message, 0) + 1
            return
        if isinstance(exc, ValueError) and "_start_serving" in message:
            # asyncio's retry of a failed accept() firing after shutdown closed the socket: nothing to report.
            log.debug("%s: %s", message, exc)
            return
        self._last[message] = now
        left_out = self._suppressed.pop(message, 0)
        more = f" ({left_out} more like it in the last {self.interval_s:g} s)" if left_out else ""
        detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        log.error("%s%s%s", message, detail, more)


def guarded_protocol(config: ServeConfig) -> type[GuardedHTTPProtocol]:
    """The HTTP protocol class with ``config``'s header timeout and connection limit."""
    return type(
        "GuardedHTTPProtocol",
        (GuardedHTTPProtocol,),
        {"header_timeout_s": config.header_timeout_s, "max_connections": config.max_connections},
    )


def uvicorn_config(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "warning",
    drain_timeout_s: float | None = None,
) -> uvicorn.Config:
    """The uvicorn settings this server runs under (graceful shutdown waits for in-flight requests).

    ``drain_timeout_s`` (default: the app's ``ServeConfig.drain_timeout_s``) caps how long shutdown waits for
    in-flight requests; whatever is left of it then goes to the queue (see :class:`DrainingServer`).
    """
    config: ServeConfig = app.state.config
    if drain_timeout_s is None:
        drain_timeout_s = config.drain_timeout_s
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # per-request log lines cost more than the metrics that already count requests
        timeout_graceful_shutdown=max(1, math.ceil(drain_timeout_s)),
        # An idle kept-alive connection is closed after this; one that starts a request gets header_timeout_s.
        timeout_keep_alive=max(1, min(5, math.ceil(config.header_timeout_s))),
        http=guarded_protocol(config),
    )


class PortInUseError(OSError):
    """The address the server should listen on is taken."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (as uvicorn would open it), or :class:`PortInUseError` naming the port.

    Binding before the app starts means a busy port is reported in one line before anything is loaded, not as a
    bind error after "Application startup complete".
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on sockets whose protocol says TCP; without it
    # every answer written in two parts waits out the peer's delayed ACK (40 ms per request on Linux).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUseError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another server running?)"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit (connections are files); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


class DrainingServer(uvicorn.Server):
    """A ``uvicorn.Server`` that records on the app when shutdown was requested (SIGTERM, Ctrl-C or
    :meth:`request_exit`), so that in-flight requests and the queue drain share one drain time.

    Unlike uvicorn, it does not re-raise the signal after a graceful shutdown: :attr:`clean` tells whether every
    request was answered and the queue drained, and ``blindnet serve`` exits 0 or 1 accordingly.
    """

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._stamp()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    def request_exit(self) -> None:
        """Shut down as on SIGTERM."""
        self._stamp()
        self.should_exit = True

    @property
    def clean(self) -> bool:
        """The server ran, and shut down with every request answered and the queue drained."""
        app: Any = self.config.app  # the FastAPI app this server was made for (uvicorn types it as any ASGI app)
        state = app.state
        return bool(self.started) and getattr(state, "queue_drained", False) and state.metrics.cut == 0

    def _stamp(self) -> None:
        state = getattr(self.config.app, "state", None)
        if state is not None and getattr(state, "shutdown_requested_at", None) is None:
            state.shutdown_requested_at = time.monotonic()


class BackgroundServer:
    """Run the app under uvicorn in a daemon thread (tests, benchmarks, notebooks). Use as a context manager.

    ``port=0`` picks a free port; :attr:`url` is set once the server listens. Leaving the context does what SIGTERM
    does in ``python -m blindnet.serve``: stop accepting, finish in-flight requests, drain the queue.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning") -> None:
        import socket

        self.app = app
        self.host = host
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.port = port
        self.url = f"http://{host}:{port}"
        self.server = DrainingServer(uvicorn_config(app, host, port, log_level=log_level))
        self._thread: Any = None

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        import threading

        self._thread = threading.Thread(target=self.server.run, name="blindnet-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.request_exit()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
