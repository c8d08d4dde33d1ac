"""Prometheus metrics, and the ASGI middleware that checks the API key and counts every request."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from blindnet.serve.batcher import BatchRecord
from blindnet.serve.errors import error_response

log = logging.getLogger("blindnet.serve")
# Endpoints a load balancer / orchestrator probes without credentials.
_UNAUTHENTICATED_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


class ServerMetrics:
    """Prometheus metrics in a registry of their own, so several apps can live in one process (tests)."""

    def __init__(self, batcher_getter, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "blindnet_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "blindnet_request_duration_seconds",
            "End-to-end request time by endpoint",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.queue_depth = Gauge("blindnet_queue_depth", "Images waiting in the batch queue", registry=r)
        self.queue_depth.set_function(lambda: float(batcher_getter().queue_depth))
        size_buckets = sorted({1, 2, 4, 8, 16, 32, 64, max_batch_size} & set(range(1, max_batch_size + 1)))
        self.batch_size = Histogram(
            "blindnet_batch_size", "Images per backend batch", buckets=[float(b) for b in size_buckets], registry=r
        )
        self.queue_wait = Histogram(
            "blindnet_queue_wait_seconds",
            "Time a request waited in the queue before its batch started",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.compute = Histogram(
            "blindnet_compute_seconds",
            "Wall time of one batch: pre-processing, backend, post-processing",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.batches = Counter("blindnet_batches", "Backend batches run, by outcome", ["outcome"], registry=r)
        self.images = Counter("blindnet_inference_images", "Images run through the backend", registry=r)
        #: Requests cut off by the drain timeout at shutdown (answered 503 when their answer had not started).
        self.cut = 0

    def observe_batch(self, rec: BatchRecord) -> None:
        self.batch_size.observe(rec.size)
        self.compute.observe(rec.compute_s)
        for w in rec.queue_waits_s:
            self.queue_wait.observe(w)
        self.batches.labels("ok" if rec.ok else "error").inc()
        self.images.inc(rec.size)


class MetricsAndAuthMiddleware:
    """Pure ASGI middleware: API-key check, then request counting by route template and status code.

    Pure ASGI (not ``BaseHTTPMiddleware``) because it sits on every request's path and must stay cheap.
    """

    def __init__(self, app, *, metrics: ServerMetrics, api_key: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self.api_key = api_key

    def _authorised(self, scope) -> bool:
        if self.api_key is None or scope["path"] in _UNAUTHENTICATED_PATHS:
            return True
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        # Constant-time comparison: the key must not leak through response timing.
        return given is not None and hmac.compare_digest(given.encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state = {"status": 500, "started": False}
        close = _ambiguous_framing(scope["headers"])

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                if close:  # RFC 9112 6.3: after a request framed two ways, close the connection
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            if not self._authorised(scope):
                response = error_response(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                    {"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when the drain time is over: answer it as the README promises
            # (JSON 503) instead of uvicorn's plain-text 500 and a traceback, and let the task end normally.
            self.metrics.cut += 1
            if not state["started"]:
                response = error_response(
                    503, "server shut down before this request finished; retry", {"Retry-After": "5"}
                )
                await response(scope, receive, send_wrapper)
            log.warning("%s %s cut off by the drain timeout at shutdown", scope["method"], scope["path"])
        finally:  # count crashes too (they leave status 500)
            # The route template (not the raw path) keeps label cardinality bounded.
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(state["status"])).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - t0)


def _ambiguous_framing(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request carries both Content-Length and Transfer-Encoding (its length is read two ways)."""
    names = {name.lower() for name, _ in headers}
    return b"content-length" in names and b"transfer-encoding" in names
