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
deep, a v2 request of the wrong structure, wrong tensor shape/dtype/size, bad HTTP framing), 401 missing/wrong API
key, 404 unknown model or endpoint, 405 wrong method, 408 body not received in time, 413 request body or image pixels
over the limit (from the header, before decoding), 415 image format or Content-Encoding not accepted, 503 +
``Retry-After`` queue full or shutting down, 500 backend failure (only the requests of that batch). A client that
leaves mid-body is counted as 499.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import logging
import math
import re
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from blindnet import __version__
from blindnet.backends.base import Backend
from blindnet.inference import Prediction, Predictor
from blindnet.io import ImageError, ImageTooLargeError, decode_image
from blindnet.serve.batcher import BatchFailedError, BatchRecord, DynamicBatcher, QueueFullError, ShuttingDownError

log = logging.getLogger("blindnet.serve")

INPUT_NAME = "images"
OUTPUT_LABELS = "labels"
OUTPUT_LOGITS = "logits"
SEGMENT_FORMATS = ("labels", "color", "overlay", "json")
# Endpoints a load balancer / orchestrator probes without credentials.
_UNAUTHENTICATED_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
#: Pillow formats ``/v1/segment`` decodes. Each declares its pixel size in a header that is checked before decoding;
#: containers whose header need not match what they decode to (ICO, ICNS, ...) and animations (GIF) are refused.
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
#: A valid v2 request nests at most 7 deep ({"inputs": [{"data": [[[[...]]]]}]}); deeper JSON is refused unparsed.
MAX_JSON_DEPTH = 32
#: Most bytes one decoded pixel occupies while it is decoded and converted (Pillow's 4-byte pixels, a mode
#: conversion, the numpy copy, the RGB result): what the decode pixel budget is multiplied by in the memory bound.
DECODE_BYTES_PER_PIXEL = 16
#: Status of a request whose client went away before sending its whole body (nobody receives it; it is counted).
CLIENT_CLOSED_REQUEST = 499


@dataclass
class ServeConfig:
    """Server settings (the CLI flags of ``python -m blindnet.serve`` map 1:1 onto these).

    Attributes:
        model_name: the name under ``/v2/models/``.
        model_version: the only version served.
        max_batch_size: most images per backend call (and per v2 request).
        max_queue_delay_ms: longest the oldest request waits for a fuller batch.
        max_queue_size: most images waiting in the queue; beyond it requests get 503 + Retry-After.
        input_size: ``(H, W)`` serving resolution; every image is resized to it (labels come back at the
            image's own size) and all requests share batches. None: run each image at its own size and batch only
            images of identical size.
        api_key: when set, every endpoint except the two health probes needs ``Authorization: Bearer KEY`` or
            ``X-API-Key: KEY``.
        max_request_bytes: largest request body accepted (413 beyond).
        max_image_pixels: largest ``H*W`` of one image accepted (413 beyond).
        overlay_alpha: label opacity of ``/v1/segment?format=overlay`` when the request gives none.
        max_decode_pixels: most pixels all concurrent image decodes hold together (None: twice
            ``max_image_pixels``); decoding memory stays under ``max_decode_pixels * DECODE_BYTES_PER_PIXEL`` bytes.
        body_timeout_s: longest a request body may take to arrive (408 beyond).
        drain_timeout_s: longest SIGTERM shutdown takes: in-flight requests, then the queue, then exit.
    """

    model_name: str = "blindnet"
    model_version: str = "1"
    max_batch_size: int = 8
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 64
    input_size: tuple[int, int] | None = None
    api_key: str | None = None
    max_request_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    overlay_alpha: float = 0.5
    max_decode_pixels: int | None = None
    body_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0

    @property
    def decode_pixel_budget(self) -> int:
        """Pixels concurrent decodes may hold together (never below one image of the largest size)."""
        budget = self.max_decode_pixels if self.max_decode_pixels is not None else 2 * self.max_image_pixels
        return max(budget, self.max_image_pixels)


class HTTPError(Exception):
    """An error answer: status code, message, optional extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# ----------------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------------


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

    def observe_batch(self, rec: BatchRecord) -> None:
        self.batch_size.observe(rec.size)
        self.compute.observe(rec.compute_s)
        for w in rec.queue_waits_s:
            self.queue_wait.observe(w)
        self.batches.labels("ok" if rec.ok else "error").inc()
        self.images.inc(rec.size)


class _MetricsAndAuthMiddleware:
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
        status_holder = {"status": 500}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            if not self._authorised(scope):
                response = _error(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                    {"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:  # count crashes too (they leave status 500)
            # The route template (not the raw path) keeps label cardinality bounded.
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status_holder["status"])).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------------------
# Body, image and tensor helpers
# ----------------------------------------------------------------------------------------------------------------------


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before it is all in memory.

    A body that has not fully arrived after ``timeout_s`` seconds is refused (408), so a stalled client holds neither
    a worker nor shutdown; a client that disconnects mid-body is logged once and answered
    :data:`CLIENT_CLOSED_REQUEST` (which only the metrics see).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise HTTPError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
        except ValueError:
            raise HTTPError(400, f"invalid Content-Length header {declared!r}") from None
    try:
        async with asyncio.timeout(timeout_s):
            body = await _read_stream(request, limit)
    except TimeoutError:
        raise HTTPError(408, f"request body did not arrive within {timeout_s:g} s") from None
    except ClientDisconnect:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.info("%s disconnected before sending the whole body of %s %s", client, request.method, request.url.path)
        raise HTTPError(CLIENT_CLOSED_REQUEST, "client disconnected before sending the whole body") from None
    encoding = request.headers.get("content-encoding", "").lower()
    if encoding in ("gzip", "deflate"):  # tritonclient can compress requests
        body = _decompress(body, encoding, limit)
    elif encoding not in ("", "identity"):
        raise HTTPError(415, f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    return body


async def _read_stream(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    # Bounded decompression: a small compressed body must not expand past the byte limit.
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise HTTPError(400, f"request body is not valid {encoding} data ({exc})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise HTTPError(413, f"decompressed request body exceeds the limit of {limit} bytes")
    return out


def probe_upload(data: bytes, *, name: str, max_pixels: int) -> tuple[int, int]:
    """``(W, H)`` of an uploaded image from its header alone, without decoding a pixel.

    Raises :class:`HTTPError` 400 (empty, or not an image), 415 (an image format the server does not accept) or 413
    (more than ``max_pixels`` pixels, or a Pillow decompression bomb).
    """
    from PIL import Image

    if not data:
        raise HTTPError(400, f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS)) as img:
            w, h = img.size
    except Image.DecompressionBombError as exc:
        raise HTTPError(413, f"{name}: {exc}") from None
    except Exception as exc:  # UnidentifiedImageError, or whatever Pillow raises on a hostile header
        raise _unaccepted_image(data, name, exc) from None
    if w * h > max_pixels:
        raise HTTPError(413, f"{name}: image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    return w, h


def _unaccepted_image(data: bytes, name: str, exc: Exception) -> HTTPError:
    """415 when the bytes start like an image format the server does not accept, else 400."""
    from PIL import UnidentifiedImageError

    if not isinstance(exc, UnidentifiedImageError):
        return HTTPError(400, f"{name}: corrupt or truncated image ({type(exc).__name__}: {exc})")
    fmt = _sniff_format(data[:32])
    if fmt is None:
        return HTTPError(400, f"{name}: not a recognised image format; send {', '.join(ACCEPTED_FORMATS)}")
    return HTTPError(415, f"{name}: {fmt} images are not accepted; send {', '.join(ACCEPTED_FORMATS)}")


def _sniff_format(prefix: bytes) -> str | None:
    """The Pillow format whose magic bytes ``prefix`` starts with, or None.

    Only the plugins' prefix tests run: opening the file could decode it (Pillow's ICO plugin loads on open).
    """
    from PIL import Image

    Image.init()
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        with contextlib.suppress(Exception):
            verdict = accept(prefix) if accept is not None else False
            if verdict and not isinstance(verdict, str):  # a string is Pillow's "looks like it, but broken"
                return fmt
    return None


def decode_upload(data: bytes, *, name: str, max_pixels: int) -> np.ndarray:
    """Decode an uploaded image: 413 if it has too many pixels, 415 if its format is not accepted, 400 if it is not
    a (complete) image. Returns ``H x W x 3`` uint8 RGB."""
    probe_upload(data, name=name, max_pixels=max_pixels)
    try:
        return decode_image(data, name=name, max_pixels=max_pixels, formats=ACCEPTED_FORMATS)
    except ImageTooLargeError as exc:
        raise HTTPError(413, str(exc)) from None
    except ImageError as exc:
        raise HTTPError(400, str(exc)) from None


class PixelBudget:
    """An asyncio weighted semaphore over pixels: concurrent decodes together hold at most ``capacity`` of them.

    Decoding memory is proportional to pixels, not to upload bytes (a few hundred KB of PNG can declare 16 M
    pixels), so this is what bounds it.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"pixel budget must be >= 1, got {capacity}")
        self.capacity = capacity
        self.free = capacity
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """Wait until ``pixels`` (capped at the capacity) are free, hold them for the ``async with`` body."""
        pixels = min(max(pixels, 1), self.capacity)
        async with self._cond:
            await self._cond.wait_for(lambda: self.free >= pixels)
            self.free -= pixels
        try:
            yield
        finally:
            async with self._cond:
                self.free += pixels
                self._cond.notify_all()


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an ``H x W`` uint8 (grayscale) or ``H x W x 3`` uint8 (RGB) array."""
    import cv2

    if array.ndim == 3:
        array = array[:, :, ::-1]  # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def segment_response(pred: Prediction, fmt: str, *, alpha: float, model_name: str) -> Response:
    """Encode one prediction as ``/v1/segment`` answers it (shared with the Ray Serve deployment)."""
    if fmt == "labels":
        labels = pred.labels
        if labels.dtype != np.uint8:  # > 256 classes: 16-bit PNG keeps the ids
            labels = labels.astype(np.uint16)
        return Response(encode_png(labels), media_type="image/png")
    if fmt == "color":
        return Response(encode_png(pred.colorized()), media_type="image/png")
    if fmt == "overlay":
        return Response(encode_png(pred.overlay(alpha)), media_type="image/png")
    h, w = pred.labels.shape
    return JSONResponse(
        {
            "model_name": model_name,
            "height": h,
            "width": w,
            "num_classes": pred.num_classes,
            "class_shares": pred.class_shares(),
        }
    )


class _V2Tensor(BaseModel):
    """A requested output of a v2 request (JSON shape only; names are checked against the model after)."""

    name: StrictStr
    parameters: dict[str, Any] | None = None


class _V2Input(_V2Tensor):
    """An input tensor of a v2 request; optional fields so that a wrong value gets its own precise message."""

    datatype: StrictStr | None = None
    shape: list[StrictInt] | None = None
    data: list[Any] | None = None


class _V2InferRequest(BaseModel):
    """The JSON header of a KServe v2 infer request, as far as its structure goes."""

    id: Any = None
    inputs: list[_V2Input]
    outputs: list[_V2Tensor] | None = None
    parameters: dict[str, Any] | None = None


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def json_depth(text: bytes) -> int:
    """Deepest ``[``/``{`` nesting of JSON text, found without parsing it (linear time, no recursion).

    String contents are skipped; on text that is not JSON the number is only an estimate (the parser refuses it).
    """
    brackets = np.frombuffer(_JSON_STRING.sub(b'""', text).translate(None, _NOT_BRACKETS), np.uint8)
    if brackets.size == 0:
        return 0
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def parse_json(text: bytes, what: str) -> Any:
    """Parse JSON text whose nesting is first checked against :data:`MAX_JSON_DEPTH`; 400 on anything wrong."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise HTTPError(400, f"{what} is JSON nested {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted")
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise HTTPError(400, f"{what} is not valid JSON ({exc})") from None


def validation_message(exc: ValidationError, limit: int = 5) -> str:
    """The first ``limit`` problems of a pydantic error as ``location: message`` (a bounded string)."""
    problems = [f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:limit]]
    more = exc.error_count() - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


def _split_binary(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """``(JSON header, binary tensor data)`` of a v2 body (binary extension when ``header_length`` is given)."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        hlen = int(header_length)
    except ValueError:
        raise HTTPError(400, f"invalid Inference-Header-Content-Length {header_length!r}") from None
    if not 0 < hlen <= len(body):
        raise HTTPError(400, f"Inference-Header-Content-Length {hlen} does not fit a body of {len(body)} bytes")
    return body[:hlen], memoryview(body)[hlen:]


def parse_infer_request(body: bytes, header_length: str | None, *, max_batch_size: int, max_pixels: int):
    """Parse a v2 infer body (JSON, or JSON header + binary tensors) into ``(request_json, images)``.

    Returns the decoded JSON header (its structure validated) and the ``N x H x W x 3`` uint8 array of the ``images``
    input. Anything malformed raises :class:`HTTPError` (400, or 413 for too many pixels).
    """
    header, binary = _split_binary(body, header_length)
    req = parse_json(header, "request")
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise HTTPError(400, "request JSON must be an object with an 'inputs' list")
    names = [i.get("name") if isinstance(i, dict) else None for i in req["inputs"]]
    if names != [INPUT_NAME]:
        raise HTTPError(400, f"expected exactly one input named '{INPUT_NAME}', got {names}")
    try:
        _V2InferRequest.model_validate(req)
    except ValidationError as exc:
        raise HTTPError(400, f"malformed v2 request: {validation_message(exc)}") from None
    return req, _input_images(req["inputs"][0], binary, max_batch_size=max_batch_size, max_pixels=max_pixels)


def _input_images(spec: dict[str, Any], binary: memoryview, *, max_batch_size: int, max_pixels: int) -> np.ndarray:
    """The ``N x H x W x 3`` uint8 images of a validated ``images`` input (binary data or JSON ``data``)."""
    dtype = spec.get("datatype")
    if dtype != "UINT8":
        raise HTTPError(400, f"input '{INPUT_NAME}' must have datatype UINT8 (RGB pixels 0-255), got {dtype!r}")
    shape = spec.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4):
        raise HTTPError(400, f"input '{INPUT_NAME}' must have shape [N, H, W, 3], got {shape!r}")
    n, h, w, c = shape
    if c != 3 or min(n, h, w) < 1:
        raise HTTPError(400, f"input '{INPUT_NAME}' must have shape [N, H, W, 3] with N, H, W >= 1, got {shape}")
    if n > max_batch_size:
        raise HTTPError(400, f"input '{INPUT_NAME}' batch of {n} exceeds the model's max_batch_size {max_batch_size}")
    if h * w > max_pixels:
        raise HTTPError(
            413, f"input '{INPUT_NAME}' images of {w}x{h} = {h * w} pixels exceed the limit of {max_pixels}"
        )
    expected = n * h * w * 3
    params = spec.get("parameters") or {}
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if type(size) is not int or size != expected:
            raise HTTPError(
                400, f"input '{INPUT_NAME}' binary_data_size {size!r} != {expected} bytes for UINT8 shape {shape}"
            )
        if len(binary) != size:
            raise HTTPError(
                400,
                f"input '{INPUT_NAME}' declares {size} binary bytes but the body carries {len(binary)} after the header",
            )
        return np.frombuffer(binary, dtype=np.uint8).reshape(shape)
    if spec.get("data") is None:
        raise HTTPError(400, f"input '{INPUT_NAME}' has neither 'data' nor parameters.binary_data_size")
    try:
        arr = np.asarray(spec["data"])
    except (ValueError, TypeError, OverflowError) as exc:
        raise HTTPError(400, f"input '{INPUT_NAME}' data is ragged or malformed ({exc})") from None
    if arr.size != expected:
        raise HTTPError(400, f"input '{INPUT_NAME}' has {arr.size} values, shape {shape} needs {expected}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 255):
        raise HTTPError(400, f"input '{INPUT_NAME}' UINT8 data must be integers in 0..255")
    return arr.astype(np.uint8).reshape(shape)


def _requested_outputs(req: dict[str, Any]) -> list[tuple[str, bool]]:
    """``[(output name, binary?)]`` for a v2 request; default: ``labels`` only (logits are large; ask for them)."""
    default_binary = bool((req.get("parameters") or {}).get("binary_data_output", False))
    outputs = req.get("outputs")
    if outputs is None:
        return [(OUTPUT_LABELS, default_binary)]
    if not isinstance(outputs, list):
        raise HTTPError(400, "'outputs' must be a list")
    result = []
    for o in outputs:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in (OUTPUT_LABELS, OUTPUT_LOGITS):
            raise HTTPError(400, f"unknown output {name!r}; this model has '{OUTPUT_LABELS}' and '{OUTPUT_LOGITS}'")
        result.append((name, bool((o.get("parameters") or {}).get("binary_data", default_binary))))
    return result


def build_infer_response(
    req: dict[str, Any], preds: list[Prediction], outputs: list[tuple[str, bool]], *, model_name: str, version: str
) -> Response:
    """v2 response; binary outputs go after the JSON header (``Inference-Header-Content-Length``)."""
    out_json: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in outputs:
        if name == OUTPUT_LABELS:
            arr = np.stack([p.labels for p in preds])
            dtype = "UINT8" if arr.dtype == np.uint8 else "INT32"
        else:
            arr = np.stack([p.logits for p in preds]).astype(np.float32)  # type: ignore[misc]
            dtype = "FP32"
        entry: dict[str, Any] = {"name": name, "datatype": dtype, "shape": list(arr.shape)}
        if binary:
            raw = np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        out_json.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": out_json}
    if "id" in req:
        body["id"] = req["id"]
    header = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


# ----------------------------------------------------------------------------------------------------------------------
# App factory
# ----------------------------------------------------------------------------------------------------------------------


def make_predictor(predictor_or_backend: Predictor | Backend, config: ServeConfig) -> Predictor:
    """A Predictor for serving: same backend and input size, ``batch_size`` = ``max_batch_size`` (one call/batch)."""
    if isinstance(predictor_or_backend, Predictor):
        base = predictor_or_backend
        if config.input_size is not None and base.input_size not in (None, tuple(config.input_size)):
            raise ValueError(f"config.input_size {config.input_size} contradicts the predictor's {base.input_size}")
        input_size = tuple(config.input_size) if config.input_size is not None else base.input_size
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
    state: dict[str, DynamicBatcher] = {}

    def batcher() -> DynamicBatcher:
        return state["batcher"]

    metrics = ServerMetrics(lambda: state["batcher"] if "batcher" in state else _EmptyQueue, config.max_batch_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["batcher"] = DynamicBatcher(
            predictor,
            max_batch_size=config.max_batch_size,
            max_queue_delay_ms=config.max_queue_delay_ms,
            max_queue_size=config.max_queue_size,
            on_batch=metrics.observe_batch,
        )
        log.info("serving model %r on backend %s", config.model_name, predictor.backend.describe())
        try:
            yield
        finally:
            # uvicorn has stopped accepting connections and finished in-flight requests by now; whatever is still
            # queued (e.g. requests whose clients went away) is run, not dropped.
            b = state["batcher"]
            log.info("draining %d queued image(s) before exit", b.queue_depth)
            await run_in_threadpool(b.close, drain=True, timeout=_drain_left(app, config.drain_timeout_s))

    app = FastAPI(title="blindnet segmentation server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config = config
    app.state.predictor = predictor
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.shutdown_requested_at = None
    app.add_middleware(_MetricsAndAuthMiddleware, metrics=metrics, api_key=config.api_key)
    decode_budget = PixelBudget(config.decode_pixel_budget)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Same {"error": ...} shape as every other refusal (FastAPI's default is a 422 with "detail").
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _error(400, f"invalid request parameters: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _routing_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths (404) and wrong methods (405, with its Allow header) in the same shape as every other error.
        if exc.status_code == 404:
            message = f"no endpoint {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return _error(exc.status_code, message, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error(500, f"internal server error: {type(exc).__name__}: {exc}")

    def check_model(name: str, version: str | None = None) -> None:
        if name != config.model_name:
            raise HTTPError(404, f"unknown model {name!r}; this server serves {config.model_name!r}")
        if version is not None and version != config.model_version:
            raise HTTPError(
                404, f"unknown version {version!r} of model {name!r}; available: [{config.model_version!r}]"
            )

    def ready() -> bool:
        return "batcher" in state and state["batcher"].accepting

    async def run_batch(images: np.ndarray, want_logits: bool) -> list[Prediction]:
        """Queue ``images`` and wait for their predictions, mapping batcher errors to HTTP answers."""
        try:
            fut = batcher().submit(images, want_logits=want_logits)
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

    # ---- KServe v2 -------------------------------------------------------------------------------------------------

    @app.get("/v2/health/live")
    async def live() -> JSONResponse:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def server_ready() -> JSONResponse:
        ok = ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2")
    async def server_metadata() -> JSONResponse:

        return JSONResponse({"name": "blindnet", "version": __version__, "extensions": ["binary_tensor_data"]})

    def model_metadata() -> dict[str, Any]:
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

    @app.get("/v2/models/{name}")
    async def model_meta(name: str) -> JSONResponse:
        check_model(name)
        return JSONResponse(model_metadata())

    @app.get("/v2/models/{name}/versions/{version}")
    async def model_meta_version(name: str, version: str) -> JSONResponse:
        check_model(name, version)
        return JSONResponse(model_metadata())

    @app.get("/v2/models/{name}/config")
    async def model_config(name: str) -> JSONResponse:
        check_model(name)
        meta = model_metadata()
        return JSONResponse(
            {
                "name": config.model_name,
                "platform": meta["platform"],
                "max_batch_size": config.max_batch_size,
                "input": [{"name": INPUT_NAME, "data_type": "TYPE_UINT8", "dims": [-1, -1, 3]}],
                "output": [
                    {"name": OUTPUT_LABELS, "data_type": "TYPE_UINT8", "dims": [-1, -1]},
                    {"name": OUTPUT_LOGITS, "data_type": "TYPE_FP32", "dims": [predictor.num_classes, -1, -1]},
                ],
                "dynamic_batching": {
                    "max_queue_delay_microseconds": int(config.max_queue_delay_ms * 1000),
                    "default_queue_policy": {"max_queue_size": config.max_queue_size},
                },
            }
        )

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> JSONResponse:
        check_model(name)
        ok = ready()
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_version_ready(name: str, version: str) -> JSONResponse:
        check_model(name, version)
        ok = ready()
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> JSONResponse:
        body = await read_body(request, 64 * 1024, config.body_timeout_s)
        ready_only = parse_repository_index(body)
        ok = ready()
        if ready_only and not ok:
            return JSONResponse([])
        state_name = "READY" if ok else "UNAVAILABLE"
        entry = {"name": config.model_name, "version": config.model_version, "state": state_name, "reason": ""}
        return JSONResponse([entry])

    async def infer(request: Request, name: str, version: str | None) -> Response:
        check_model(name, version)
        body = await read_body(request, config.max_request_bytes, config.body_timeout_s)
        req, images = await run_in_threadpool(
            parse_infer_request,
            body,
            request.headers.get("inference-header-content-length"),
            max_batch_size=config.max_batch_size,
            max_pixels=config.max_image_pixels,
        )
        outputs = _requested_outputs(req)
        want_logits = any(n == OUTPUT_LOGITS for n, _ in outputs)
        preds = await run_batch(images, want_logits)
        return await run_in_threadpool(
            build_infer_response, req, preds, outputs, model_name=config.model_name, version=config.model_version
        )

    @app.post("/v2/models/{name}/infer")
    async def model_infer(name: str, request: Request) -> Response:
        return await infer(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def model_version_infer(name: str, version: str, request: Request) -> Response:
        return await infer(request, name, version)

    # ---- plain image endpoint ---------------------------------------------------------------------------------------

    @app.post("/v1/segment")
    async def segment(request: Request, format: str = "labels", alpha: float | None = None) -> Response:
        if format not in SEGMENT_FORMATS:
            raise HTTPError(400, f"unknown format {format!r}; choose one of {list(SEGMENT_FORMATS)}")
        a = config.overlay_alpha if alpha is None else alpha
        if not 0.0 <= a <= 1.0:
            raise HTTPError(400, f"alpha must lie in [0, 1], got {a}")
        body = await read_body(request, config.max_request_bytes, config.body_timeout_s)
        data, name = await upload_bytes(request.headers, body)
        w, h = await run_in_threadpool(probe_upload, data, name=name, max_pixels=config.max_image_pixels)
        async with decode_budget.hold(w * h):  # decoding memory grows with pixels: bound what decodes at once
            image = await run_in_threadpool(decode_upload, data, name=name, max_pixels=config.max_image_pixels)
        pred = (await run_batch(image[None], False))[0]
        return await run_in_threadpool(segment_response, pred, format, alpha=a, model_name=config.model_name)

    # ---- observability ---------------------------------------------------------------------------------------------

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/stats")
    async def stats() -> JSONResponse:
        b = batcher()
        s = b.stats
        return JSONResponse(
            {
                "requests": s.requests,
                "images": s.images,
                "batches": s.batches,
                "failed_batches": s.failed_batches,
                "rejected": s.rejected,
                "cancelled": s.cancelled,
                "max_batch_seen": s.max_batch_seen,
                "batch_sizes": {str(k): v for k, v in sorted(s.batch_sizes.items())},
                "queue_depth": b.queue_depth,
            }
        )

    return app


class _EmptyQueue:
    queue_depth = 0


class _RepositoryIndexRequest(BaseModel):
    """Body of ``POST /v2/repository/index`` (Triton's model repository extension); all fields optional."""

    ready: StrictBool = False


def parse_repository_index(body: bytes) -> bool:
    """The ``ready`` flag of a repository index request (an empty body means all models); 400 when malformed."""
    if not body.strip():
        return False
    try:
        return _RepositoryIndexRequest.model_validate(parse_json(body, "repository index request")).ready
    except ValidationError as exc:
        raise HTTPError(400, f"malformed repository index request: {validation_message(exc)}") from None


async def upload_bytes(headers: Mapping[str, str], body: bytes) -> tuple[bytes, str]:
    """The image bytes of a ``/v1/segment`` upload and a name for messages: the first file of a multipart form, or
    the raw body. A malformed form raises :class:`HTTPError` 400."""
    ctype = headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        return body, "upload"
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def replay() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(Headers(headers=dict(headers)), replay(), max_files=4, max_fields=16).parse()
    except MultiPartException as exc:
        raise HTTPError(400, f"malformed multipart body ({exc.message})") from None
    except (KeyError, ValueError, UnicodeError) as exc:  # e.g. no boundary, or an undecodable one
        raise HTTPError(400, f"malformed multipart body ({type(exc).__name__}: {exc})") from None
    files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    try:
        if not files:
            raise HTTPError(400, "multipart body has no file part; send the image as a file field (e.g. 'file')")
        return await files[0].read(), files[0].filename or "upload"
    finally:
        await form.close()


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


def _framing_error_response(msg: str) -> bytes:
    """A complete HTTP/1.1 400 response with a JSON ``{"error": ...}`` body, for requests uvicorn cannot parse."""
    body = json.dumps({"error": f"malformed HTTP request: {msg}"}).encode()
    head = (
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class JsonErrorHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol, answering unparsable requests (bad framing, bad headers) in the JSON error shape.

    Those never reach the app, so uvicorn answers them itself, by default in plain text.
    """

    def send_400_response(self, msg: str) -> None:
        self.transport.write(_framing_error_response(msg))
        self.transport.close()


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
    if drain_timeout_s is None:
        drain_timeout_s = app.state.config.drain_timeout_s
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # per-request log lines cost more than the metrics that already count requests
        timeout_graceful_shutdown=max(1, math.ceil(drain_timeout_s)),
        timeout_keep_alive=30,
        http=JsonErrorHTTPProtocol,
    )


class DrainingServer(uvicorn.Server):
    """A ``uvicorn.Server`` that records on the app when shutdown was requested (SIGTERM, Ctrl-C or
    :meth:`request_exit`), so that in-flight requests and the queue drain share one drain time."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._stamp()
        super().handle_exit(sig, frame)

    def request_exit(self) -> None:
        """Shut down as on SIGTERM."""
        self._stamp()
        self.should_exit = True

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
