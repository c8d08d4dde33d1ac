"""Request parsing: bodies under limits, uploaded images, KServe v2 infer and repository-index requests.

Every function here refuses malformed input with :class:`~blindnet.serve.errors.HTTPError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import sys
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import BaseModel, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.requests import ClientDisconnect

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # Python 3.10: the same context manager from the package asyncio's was taken from (the serve extra has it)
    from async_timeout import timeout

from blindnet.io import ImageError, ImageTooLargeError, check_pixel_limit, decode_image
from blindnet.serve.config import JSON_BYTES_PER_VALUE
from blindnet.serve.errors import CLIENT_CLOSED_REQUEST, HTTPError
from blindnet.serve.jsontext import ParseDeadline, int_list_to_array, parse_json

log = logging.getLogger("blindnet.serve")

INPUT_NAME = "images"
OUTPUT_LABELS = "labels"
OUTPUT_LOGITS = "logits"
SEGMENT_FORMATS = ("labels", "color", "overlay", "json")
#: Pillow formats ``/v1/segment`` decodes. Each declares its pixel size in a header that is checked before decoding;
#: containers whose header need not match what they decode to (ICO, ICNS, ...) and animations (GIF) are refused.
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
#: Bytes decompressed per step (the deadline is checked between steps).
_INFLATE_STEP = 1024 * 1024


def body_reservation(
    headers: Mapping[str, str], limit: int, *, json_bytes: int | None = None, json_values: int | None = None
) -> int:
    """Bytes a request may need while its body is read, decompressed and parsed, decided from its headers alone.

    The raw body (its Content-Length, or ``limit`` when chunked), the decompressed copy (at most ``limit``, or
    ``json_bytes`` for an all-JSON body), and, when ``json_values`` is given, the JSON parse: at most one value per
    two bytes of JSON text, at most ``json_values``, each :data:`~blindnet.serve.config.JSON_BYTES_PER_VALUE`.
    """
    declared = headers.get("content-length")
    raw = min(int(declared) if declared is not None and declared.isdigit() else limit, limit)
    header_length = headers.get("inference-header-content-length")
    all_json = json_bytes is not None and header_length is None
    encoded = headers.get("content-encoding", "").lower() not in ("", "identity")
    plain = min(limit, json_bytes) if all_json and json_bytes is not None else limit
    total = raw + (plain if encoded else 0)
    if json_values is not None:
        text = int(header_length) if header_length is not None and header_length.isdigit() else plain
        total += min(json_values, min(text, plain, raw if not encoded else plain) // 2 + 1) * JSON_BYTES_PER_VALUE
    return max(total, 1)


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request body as sent (still compressed, if it is), refusing (413) anything over ``limit`` bytes before it
    is all in memory.

    A body that has not fully arrived after ``timeout_s`` seconds is refused (408), so a stalled client holds neither
    a worker nor shutdown; a client that disconnects mid-body is logged once and answered
    :data:`CLIENT_CLOSED_REQUEST` (which only the metrics see). Decompress it with :func:`decode_body` (on a worker
    thread: zlib releases the GIL).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise HTTPError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
        except ValueError:
            raise HTTPError(400, f"invalid Content-Length header {declared!r}") from None
    encoding = request.headers.get("content-encoding", "").lower()
    if encoding not in ("", "identity", "gzip", "deflate"):  # tritonclient can compress requests
        raise HTTPError(415, f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    try:
        async with timeout(timeout_s):
            return await _read_stream(request, limit)
    except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on; another class on 3.10
        raise HTTPError(408, f"request body did not arrive within {timeout_s:g} s") from None
    except ClientDisconnect:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.info("%s disconnected before sending the whole body of %s %s", client, request.method, request.url.path)
        raise HTTPError(CLIENT_CLOSED_REQUEST, "client disconnected before sending the whole body") from None


async def _read_stream(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_body(body: bytes, encoding: str, limit: int, deadline: ParseDeadline | None = None) -> bytes:
    """``body`` decompressed per its Content-Encoding (gzip, deflate or none), at most ``limit`` bytes (413 beyond).

    Decompresses 1 MiB at a time, checking the deadline between steps; run it on a worker thread.
    """
    encoding = encoding.lower()
    if encoding in ("", "identity"):
        return body
    deadline = deadline or ParseDeadline(None)
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    d = zlib.decompressobj(wbits)
    out: list[bytes] = []
    size = 0
    data = body
    try:
        while True:
            piece = d.decompress(data, _INFLATE_STEP)
            size += len(piece)
            if size > limit:
                raise HTTPError(413, f"decompressed request body exceeds the limit of {limit} bytes")
            out.append(piece)
            data = d.unconsumed_tail
            if not data and (d.eof or not piece):
                break
            deadline.check("the request body")
    except zlib.error as exc:
        raise HTTPError(400, f"request body is not valid {encoding} data ({exc})") from None
    return b"".join(out)


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
    try:
        check_pixel_limit(w, h, max_pixels, name=name)
    except ImageTooLargeError as exc:
        raise HTTPError(413, str(exc)) from None
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


class Budget:
    """An asyncio weighted semaphore: concurrent holders together hold at most ``capacity`` units (pixels, bytes).

    Decoding memory is proportional to pixels, not to upload bytes (a few hundred KB of PNG can declare 16 M
    pixels), and a request's parse memory to what its headers declare, so these are what bound them.
    """

    def __init__(self, capacity: int, unit: str = "pixels") -> None:
        if capacity < 1:
            raise ValueError(f"budget must be >= 1 {unit}, got {capacity}")
        self.capacity = capacity
        self.unit = unit
        self.free = capacity
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, amount: int, timeout_s: float | None = None) -> AsyncIterator[None]:
        """Wait until ``amount`` (capped at the capacity) is free, hold it for the ``async with`` body.

        Waiting longer than ``timeout_s`` is answered 503 + Retry-After (the server is busy, not the request bad).
        """
        amount = min(max(amount, 1), self.capacity)
        try:
            async with timeout(timeout_s), self._cond:
                await self._cond.wait_for(lambda: self.free >= amount)
                self.free -= amount
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on; another class on 3.10
            raise HTTPError(
                503,
                f"server busy: {amount} {self.unit} of its {self.capacity} budget not free within {timeout_s:g} s",
                {"Retry-After": "1"},
            ) from None
        try:
            yield
        finally:
            async with self._cond:
                self.free += amount
                self._cond.notify_all()


PixelBudget = Budget


class _V2Tensor(BaseModel):
    """A requested output of a v2 request (JSON shape only; names are checked against the model after)."""

    name: StrictStr
    parameters: dict[str, Any] | None = None


class _V2Input(_V2Tensor):
    """An input tensor of a v2 request; optional fields so that a wrong value gets its own precise message."""

    datatype: StrictStr | None = None
    shape: list[StrictInt] | None = None
    data: Any = None  # a list, checked while it is converted (validating it here would copy millions of items)


class _V2InferRequest(BaseModel):
    """The JSON header of a KServe v2 infer request, as far as its structure goes."""

    id: Any = None
    inputs: list[_V2Input]
    outputs: list[_V2Tensor] | None = None
    parameters: dict[str, Any] | None = None


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


@dataclass
class JsonLimits:
    """What one JSON text may cost: bytes, values (numbers, strings, containers) and seconds (see jsontext)."""

    max_bytes: int | None = None
    max_values: int | None = None
    timeout_s: float | None = None


def parse_infer_request(
    body: bytes,
    header_length: str | None,
    *,
    max_batch_size: int,
    max_pixels: int,
    limits: JsonLimits | None = None,
    deadline: ParseDeadline | None = None,
):
    """Parse a v2 infer body (JSON, or JSON header + binary tensors) into ``(request_json, images)``.

    Returns the decoded JSON header (its structure validated) and the ``N x H x W x 3`` uint8 array of the ``images``
    input. Anything malformed raises :class:`HTTPError` (400, or 413 for too many pixels, JSON values or bytes, or a
    parse past ``limits.timeout_s``). Runs on a worker thread: the JSON parse yields the GIL as it goes.
    """
    limits = limits or JsonLimits()
    deadline = deadline or ParseDeadline(limits.timeout_s)
    header, binary = _split_binary(body, header_length)
    req = parse_json(header, "request", max_bytes=limits.max_bytes, max_values=limits.max_values, deadline=deadline)
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise HTTPError(400, "request JSON must be an object with an 'inputs' list")
    names = [i.get("name") if isinstance(i, dict) else None for i in req["inputs"]]
    if names != [INPUT_NAME]:
        raise HTTPError(400, f"expected exactly one input named '{INPUT_NAME}', got {names}")
    try:
        _V2InferRequest.model_validate(req)
    except ValidationError as exc:
        raise HTTPError(400, f"malformed v2 request: {validation_message(exc)}") from None
    images = _input_images(
        req["inputs"][0], binary, max_batch_size=max_batch_size, max_pixels=max_pixels, deadline=deadline
    )
    req["inputs"][0].pop("data", None)  # millions of Python ints: free them now, not when the answer is sent
    return req, images


def _input_shape(spec: dict[str, Any], *, max_batch_size: int, max_pixels: int) -> tuple[int, int, int, int]:
    """``(N, H, W, 3)`` of the ``images`` input, checked against the limits before any pixel is read."""
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
    return n, h, w, c


def _input_images(
    spec: dict[str, Any], binary: memoryview, *, max_batch_size: int, max_pixels: int, deadline: ParseDeadline
) -> np.ndarray:
    """The ``N x H x W x 3`` uint8 images of a validated ``images`` input (binary data or JSON ``data``)."""
    shape = _input_shape(spec, max_batch_size=max_batch_size, max_pixels=max_pixels)
    expected = int(np.prod(shape))
    params = spec.get("parameters") or {}
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if type(size) is not int or size != expected:
            raise HTTPError(
                400, f"input '{INPUT_NAME}' binary_data_size {size!r} != {expected} bytes for UINT8 shape {list(shape)}"
            )
        if len(binary) != size:
            raise HTTPError(
                400,
                f"input '{INPUT_NAME}' declares {size} binary bytes but the body carries {len(binary)} after the header",
            )
        return np.frombuffer(binary, dtype=np.uint8).reshape(shape)
    data = spec.get("data")
    if data is None:
        raise HTTPError(400, f"input '{INPUT_NAME}' has neither 'data' nor parameters.binary_data_size")
    if not isinstance(data, list):
        raise HTTPError(400, f"input '{INPUT_NAME}' data must be a list of integers, got {type(data).__name__}")
    flat = int_list_to_array(data, f"input '{INPUT_NAME}'", deadline)
    if flat.size != expected:
        raise HTTPError(400, f"input '{INPUT_NAME}' has {flat.size} values, shape {list(shape)} needs {expected}")
    if flat.size and (flat.min() < 0 or flat.max() > 255):
        raise HTTPError(400, f"input '{INPUT_NAME}' UINT8 data must be integers in 0..255")
    return flat.astype(np.uint8).reshape(shape)


def _flag(params: Any, key: str, default: bool, where: str) -> bool:
    """A boolean parameter: a JSON boolean or absent (400 for anything else: ``"false"`` is not false)."""
    value = (params or {}).get(key, default) if isinstance(params, dict) else default
    if type(value) is not bool:
        raise HTTPError(400, f"{where}parameters.{key} must be a JSON boolean (true or false), got {value!r}")
    return value


def requested_outputs(req: dict[str, Any]) -> list[tuple[str, bool]]:
    """``[(output name, binary?)]`` for a v2 request; default: ``labels`` only (logits are large; ask for them)."""
    default_binary = _flag(req.get("parameters"), "binary_data_output", False, "")
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
        result.append((name, _flag(o.get("parameters"), "binary_data", default_binary, f"output '{name}' ")))
    return result


def check_outputs(
    outputs: list[tuple[str, bool]], shape: tuple[int, ...], num_classes: int, *, max_json_values: int, max_bytes: int
) -> None:
    """Refuse (413), before any work, an answer whose outputs would be too large: JSON outputs over
    ``max_json_values`` values (binary data has no such limit), or output data over ``max_bytes`` in all."""
    n, h, w = shape[:3]
    total = 0
    for name, binary in outputs:
        values = n * h * w * (num_classes if name == OUTPUT_LOGITS else 1)
        item = 4 if (name == OUTPUT_LOGITS or num_classes > 256) else 1
        total += values * item
        if not binary and values > max_json_values:
            raise HTTPError(
                413,
                f"output '{name}' as JSON would hold {values} values; at most {max_json_values} are sent as JSON: "
                f'ask for binary data (outputs: [{{"name": "{name}", "parameters": {{"binary_data": true}}}}])',
            )
    if total > max_bytes:
        raise HTTPError(
            413,
            f"the requested outputs hold {total} bytes; at most {max_bytes} per answer (send fewer or smaller images)",
        )


class _RepositoryIndexRequest(BaseModel):
    """Body of ``POST /v2/repository/index`` (Triton's model repository extension); all fields optional."""

    ready: StrictBool = False


def parse_repository_index(body: bytes, limits: JsonLimits | None = None) -> bool:
    """The ``ready`` flag of a repository index request (an empty body means all models); 400 when malformed."""
    if not body.strip():
        return False
    limits = limits or JsonLimits()
    value = parse_json(
        body,
        "repository index request",
        max_bytes=limits.max_bytes,
        max_values=limits.max_values,
        deadline=ParseDeadline(limits.timeout_s),
    )
    try:
        return _RepositoryIndexRequest.model_validate(value).ready
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

    async def replay() -> AsyncGenerator[bytes, None]:
        # A step at a time, handing the event loop back in between: the parser is pure Python and runs on the loop.
        view = memoryview(body)
        for start in range(0, len(body), _INFLATE_STEP):
            yield bytes(view[start : start + _INFLATE_STEP])
            await asyncio.sleep(0)

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
