"""The endpoints, one builder per group, all reading one shared :class:`ServeContext`.

Groups: KServe v2 health and metadata, KServe v2 inference (and Triton's repository index), the plain image endpoint
``/v1/segment``, and observability (``/metrics``, ``/v1/stats``). They are added in this order, which is the order the
routes are matched and listed in the OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from blindnet import __version__
from blindnet.inference import Prediction, Predictor
from blindnet.serve.batcher import BatchFailedError, DynamicBatcher, QueueFullError, ShuttingDownError
from blindnet.serve.config import ServeConfig
from blindnet.serve.errors import HTTPError
from blindnet.serve.jsontext import ParseDeadline
from blindnet.serve.metrics import ServerMetrics
from blindnet.serve.parsing import (
    INPUT_NAME,
    OUTPUT_LABELS,
    OUTPUT_LOGITS,
    SEGMENT_FORMATS,
    Budget,
    JsonLimits,
    body_reservation,
    check_outputs,
    decode_body,
    decode_upload,
    parse_infer_request,
    parse_repository_index,
    probe_upload,
    read_body,
    requested_outputs,
    upload_bytes,
)
from blindnet.serve.responses import build_infer_response, segment_response

#: Bodies larger than this (or compressed) are decompressed and parsed in one of HEAVY_PARSE_SLOTS slots.
HEAVY_PARSE_BYTES = 1024 * 1024
HEAVY_PARSE_SLOTS = 2
#: Largest body of a repository index request (a tiny JSON object at most).
REPOSITORY_INDEX_MAX_BYTES = 64 * 1024


class _EmptyQueue:
    """What the queue-depth gauge reads before the batcher starts."""

    queue_depth = 0


@dataclass
class ServeContext:
    """Everything the endpoints share: settings, the predictor, metrics, the decode and memory budgets and (once
    the app's lifespan has started it) the batcher."""

    config: ServeConfig
    predictor: Predictor
    decode_budget: Budget = field(init=False)
    memory_budget: Budget = field(init=False)
    batcher: DynamicBatcher | None = None
    metrics: ServerMetrics = field(init=False)

    _heavy_parses: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._heavy_parses = asyncio.Semaphore(HEAVY_PARSE_SLOTS)
        self.metrics = ServerMetrics(self.queue_source, self.config.max_batch_size)
        self.decode_budget = Budget(self.config.decode_pixel_budget, "pixels")
        self.memory_budget = Budget(self.config.memory_budget_bytes, "bytes")

    @contextlib.asynccontextmanager
    async def heavy_parse(self, request: Request, body: bytes) -> AsyncIterator[None]:
        """A slot for decompressing or parsing a large body: at most :data:`HEAVY_PARSE_SLOTS` at once.

        Parsing is CPU work under the GIL: more threads at it than cores only make the event loop wait longer for
        the GIL (health probes included) without finishing any sooner. Small bodies skip the queue.
        """
        encoded = request.headers.get("content-encoding", "").lower() not in ("", "identity")
        if not encoded and len(body) <= HEAVY_PARSE_BYTES:
            yield
            return
        async with self._heavy_parses:
            yield

    def json_limits(self, max_bytes: int | None = None) -> JsonLimits:
        """What one JSON text of a request may cost under these settings."""
        c = self.config
        return JsonLimits(max_bytes or c.max_json_bytes, c.max_json_values, c.parse_timeout_s)

    def queue_source(self) -> DynamicBatcher | type[_EmptyQueue]:
        """What the queue-depth gauge reads: the batcher, or an empty queue before it starts."""
        return self.batcher if self.batcher is not None else _EmptyQueue

    def get_batcher(self) -> DynamicBatcher:
        """The running batcher."""
        if self.batcher is None:
            # Before the lifespan starts there is none: a KeyError, answered as any other internal error.
            raise KeyError("batcher")
        return self.batcher

    def ready(self) -> bool:
        """Whether the model takes requests (the batcher runs and is not draining)."""
        return self.batcher is not None and self.batcher.accepting

    def check_model(self, name: str, version: str | None = None) -> None:
        """404 unless ``name`` (and ``version``, when given) is the model this server serves."""
        config = self.config
        if name != config.model_name:
            raise HTTPError(404, f"unknown model {name!r}; this server serves {config.model_name!r}")
        if version is not None and version != config.model_version:
            raise HTTPError(
                404, f"unknown version {version!r} of model {name!r}; available: [{config.model_version!r}]"
            )


async def run_batch(ctx: ServeContext, images: np.ndarray, want_logits: bool) -> list[Prediction]:
    """Queue ``images`` and wait for their predictions, mapping batcher errors to HTTP answers."""
    try:
        fut = ctx.get_batcher().submit(images, want_logits=want_logits)
    except QueueFullError as exc:
        raise HTTPError(503, str(exc), {"Retry-After": str(math.ceil(exc.retry_after_s))}) from None
    except ShuttingDownError as exc:
        raise HTTPError(503, str(exc), {"Retry-After": "5"}) from None
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None
    try:
        # wrap_future propagates cancellation, so a vanished client's request is skipped by the worker.
        return await asyncio.wrap_future(fut)
    except BatchFailedError as exc:
        raise HTTPError(500, str(exc)) from None
    except ShuttingDownError as exc:
        raise HTTPError(503, str(exc), {"Retry-After": "5"}) from None


# ----------------------------------------------------------------------------------------------------------------------
# KServe v2: health and metadata
# ----------------------------------------------------------------------------------------------------------------------


def model_metadata(ctx: ServeContext) -> dict[str, Any]:
    """The v2 model metadata of the served model."""
    predictor, config = ctx.predictor, ctx.config
    c = predictor.num_classes
    return {
        "name": config.model_name,
        "versions": [config.model_version],
        "platform": predictor.backend.name,
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
        "outputs": [
            {"name": OUTPUT_LABELS, "datatype": "UINT8" if c <= 256 else "INT32", "shape": [-1, -1, -1]},
            {"name": OUTPUT_LOGITS, "datatype": "FP32", "shape": [-1, c, -1, -1]},
        ],
        "parameters": {
            "class_names": predictor.class_names,
            "input_size": list(predictor.input_size) if predictor.input_size else None,
            "backend": predictor.backend.describe(),
        },
    }


def triton_model_config(ctx: ServeContext) -> dict[str, Any]:
    """The Triton-style model config (batch size and dynamic batching settings)."""
    config = ctx.config
    return {
        "name": config.model_name,
        "platform": model_metadata(ctx)["platform"],
        "max_batch_size": config.max_batch_size,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_UINT8", "dims": [-1, -1, 3]}],
        "output": [
            {"name": OUTPUT_LABELS, "data_type": "TYPE_UINT8", "dims": [-1, -1]},
            {"name": OUTPUT_LOGITS, "data_type": "TYPE_FP32", "dims": [ctx.predictor.num_classes, -1, -1]},
        ],
        "dynamic_batching": {
            "max_queue_delay_microseconds": int(config.max_queue_delay_ms * 1000),
            "default_queue_policy": {"max_queue_size": config.max_queue_size},
        },
    }


def _ready_response(ctx: ServeContext, body: dict[str, Any]) -> JSONResponse:
    """``body`` plus the ``ready`` flag, 200 when ready and 503 otherwise."""
    ok = ctx.ready()
    return JSONResponse({**body, "ready": ok}, status_code=200 if ok else 503)


def add_v2_health_routes(app: FastAPI, ctx: ServeContext) -> None:
    """Liveness, readiness, server and model metadata of the KServe v2 protocol."""

    @app.get("/v2/health/live")
    async def live() -> JSONResponse:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def server_ready() -> JSONResponse:
        return _ready_response(ctx, {})

    @app.get("/v2")
    async def server_metadata() -> JSONResponse:
        return JSONResponse({"name": "blindnet", "version": __version__, "extensions": ["binary_tensor_data"]})

    @app.get("/v2/models/{name}")
    async def model_meta(name: str) -> JSONResponse:
        ctx.check_model(name)
        return JSONResponse(model_metadata(ctx))

    @app.get("/v2/models/{name}/versions/{version}")
    async def model_meta_version(name: str, version: str) -> JSONResponse:
        ctx.check_model(name, version)
        return JSONResponse(model_metadata(ctx))

    @app.get("/v2/models/{name}/config")
    async def model_config(name: str) -> JSONResponse:
        ctx.check_model(name)
        return JSONResponse(triton_model_config(ctx))

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> JSONResponse:
        ctx.check_model(name)
        return _ready_response(ctx, {"name": name})

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_version_ready(name: str, version: str) -> JSONResponse:
        ctx.check_model(name, version)
        return _ready_response(ctx, {"name": name})


# ----------------------------------------------------------------------------------------------------------------------
# KServe v2: inference (and Triton's repository index)
# ----------------------------------------------------------------------------------------------------------------------


async def repository_index_response(ctx: ServeContext, request: Request) -> JSONResponse:
    """Triton's repository index: this server's one model, or nothing when only ready models are asked for."""
    config = ctx.config
    limit = REPOSITORY_INDEX_MAX_BYTES
    async with ctx.memory_budget.hold(body_reservation(request.headers, limit), config.body_timeout_s):
        body = await read_body(request, limit, config.body_timeout_s)
        ready_only = await run_in_threadpool(_parse_repository_index, ctx, request, body)
    ok = ctx.ready()
    if ready_only and not ok:
        return JSONResponse([])
    state_name = "READY" if ok else "UNAVAILABLE"
    entry = {"name": config.model_name, "version": config.model_version, "state": state_name, "reason": ""}
    return JSONResponse([entry])


def _parse_repository_index(ctx: ServeContext, request: Request, body: bytes) -> bool:
    limits = ctx.json_limits(REPOSITORY_INDEX_MAX_BYTES)
    deadline = ParseDeadline(limits.timeout_s)
    text = decode_body(body, request.headers.get("content-encoding", ""), REPOSITORY_INDEX_MAX_BYTES, deadline)
    return parse_repository_index(text, limits)


def _parse_infer(ctx: ServeContext, request: Request, body: bytes) -> tuple[dict[str, Any], np.ndarray]:
    """Decompress and parse a v2 infer body (on a worker thread), one time budget for both."""
    config = ctx.config
    limits = ctx.json_limits()
    deadline = ParseDeadline(limits.timeout_s)
    header_length = request.headers.get("inference-header-content-length")
    # An all-JSON body may decompress to no more than a JSON text may be: a bomb stops at 8 MiB, not at 64.
    limit = (
        config.max_request_bytes if header_length is not None else min(config.max_request_bytes, config.max_json_bytes)
    )
    body = decode_body(body, request.headers.get("content-encoding", ""), limit, deadline)
    return parse_infer_request(
        body,
        header_length,
        max_batch_size=config.max_batch_size,
        max_pixels=config.max_image_pixels,
        limits=limits,
        deadline=deadline,
    )


async def infer(ctx: ServeContext, request: Request, name: str, version: str | None) -> Response:
    """One v2 infer request: reserve its memory, parse, check its outputs fit, queue the images, encode the answer."""
    config = ctx.config
    ctx.check_model(name, version)
    # An all-JSON body may be no larger than a JSON text may be (binary tensor data is what the byte limit is for).
    json_only = request.headers.get("inference-header-content-length") is None
    limit = min(config.max_request_bytes, config.max_json_bytes) if json_only else config.max_request_bytes
    reserve = body_reservation(
        request.headers, limit, json_bytes=config.max_json_bytes, json_values=config.max_json_values
    )
    async with ctx.memory_budget.hold(reserve, config.body_timeout_s):
        body = await read_body(request, limit, config.body_timeout_s)
        async with ctx.heavy_parse(request, body):
            req, images = await run_in_threadpool(_parse_infer, ctx, request, body)
        del body
    outputs = requested_outputs(req)
    check_outputs(
        outputs,
        images.shape,
        ctx.predictor.num_classes,
        max_json_values=config.max_json_values,
        max_bytes=config.max_response_bytes,
    )
    want_logits = any(n == OUTPUT_LOGITS for n, _ in outputs)
    preds = await run_batch(ctx, images, want_logits)
    return await run_in_threadpool(
        build_infer_response, req, preds, outputs, model_name=config.model_name, version=config.model_version
    )


def add_v2_inference_routes(app: FastAPI, ctx: ServeContext) -> None:
    """The v2 infer endpoints (with and without a version) and Triton's repository index."""

    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> JSONResponse:
        return await repository_index_response(ctx, request)

    @app.post("/v2/models/{name}/infer")
    async def model_infer(name: str, request: Request) -> Response:
        return await infer(ctx, request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def model_version_infer(name: str, version: str, request: Request) -> Response:
        return await infer(ctx, request, name, version)


# ----------------------------------------------------------------------------------------------------------------------
# Plain image endpoint
# ----------------------------------------------------------------------------------------------------------------------


async def segment_upload(ctx: ServeContext, request: Request, fmt: str, alpha: float | None) -> Response:
    """``/v1/segment``: check the parameters, decode the uploaded image within the pixel budget, segment it."""
    config = ctx.config
    if fmt not in SEGMENT_FORMATS:
        raise HTTPError(400, f"unknown format {fmt!r}; choose one of {list(SEGMENT_FORMATS)}")
    a = config.overlay_alpha if alpha is None else alpha
    if not 0.0 <= a <= 1.0:
        raise HTTPError(400, f"alpha must lie in [0, 1], got {a}")
    limit = config.max_request_bytes
    async with ctx.memory_budget.hold(2 * body_reservation(request.headers, limit), config.body_timeout_s):
        body = await read_body(request, limit, config.body_timeout_s)
        async with ctx.heavy_parse(request, body):
            body = await run_in_threadpool(
                decode_body,
                body,
                request.headers.get("content-encoding", ""),
                limit,
                ParseDeadline(config.parse_timeout_s),
            )
        data, name = await upload_bytes(request.headers, body)
        del body
        w, h = await run_in_threadpool(probe_upload, data, name=name, max_pixels=config.max_image_pixels)
        async with ctx.decode_budget.hold(w * h):  # decoding memory grows with pixels: bound what decodes at once
            image = await run_in_threadpool(decode_upload, data, name=name, max_pixels=config.max_image_pixels)
        del data
    pred = (await run_batch(ctx, image[None], False))[0]
    return await run_in_threadpool(segment_response, pred, fmt, alpha=a, model_name=config.model_name)


def add_segment_routes(app: FastAPI, ctx: ServeContext) -> None:
    """``POST /v1/segment``: one image in, labels / colour / overlay PNG or class shares out."""

    # The query parameter is named ``format`` (the public API), shadowing the builtin only inside this endpoint.
    @app.post("/v1/segment")
    async def segment(request: Request, format: str = "labels", alpha: float | None = None) -> Response:
        return await segment_upload(ctx, request, format, alpha)


# ----------------------------------------------------------------------------------------------------------------------
# Observability
# ----------------------------------------------------------------------------------------------------------------------


def batcher_stats(batcher: DynamicBatcher) -> dict[str, Any]:
    """The batcher's counters as ``/v1/stats`` answers them."""
    s = batcher.stats
    return {
        "requests": s.requests,
        "images": s.images,
        "batches": s.batches,
        "failed_batches": s.failed_batches,
        "rejected": s.rejected,
        "cancelled": s.cancelled,
        "max_batch_seen": s.max_batch_seen,
        "batch_sizes": {str(k): v for k, v in sorted(s.batch_sizes.items())},
        "queue_depth": batcher.queue_depth,
    }


def add_observability_routes(app: FastAPI, ctx: ServeContext) -> None:
    """Prometheus metrics and the batcher counters."""

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/stats")
    async def stats() -> JSONResponse:
        return JSONResponse(batcher_stats(ctx.get_batcher()))
