"""Request parsing: bodies under limits, uploaded images, KServe v2 infer and repository-index requests.

Every function here refuses malformed input with :class:`~blindnet.serve.errors.HTTPError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import BaseModel, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.requests import ClientDisconnect

from blindnet.io import ImageError, ImageTooLargeError, check_pixel_limit, decode_image
from blindnet.serve.errors import CLIENT_CLOSED_REQUEST, HTTPError

log = logging.getLogger("blindnet.serve")

INPUT_NAME = "images"
OUTPUT_LABELS = "labels"
OUTPUT_LOGITS = "logits"
SEGMENT_FORMATS = ("labels", "color", "overlay", "json")
#: Pillow formats ``/v1/segment`` decodes. Each declares its pixel size in a header that is checked before decoding;
#: containers whose header need not match what they decode to (ICO, ICNS, ...) and animations (GIF) are refused.
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
#: A valid v2 request nests at most 7 deep ({"inputs": [{"data": [[[[...]]]]}]}); deeper JSON is refused unparsed.
MAX_JSON_DEPTH = 32


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


def requested_outputs(req: dict[str, Any]) -> list[tuple[str, bool]]:
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
