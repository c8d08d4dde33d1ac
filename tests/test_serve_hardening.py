"""Hostile and careless clients: fuzzed parsers, a corpus of malformed requests against the real server on loopback,
tiny images, bounded decode memory, stalled and vanished uploads.

The parsers are fuzzed directly (Hypothesis, deterministic); everything else talks HTTP to uvicorn running the app
with a tiny real model, in a thread or as ``python -m blindnet.serve`` in a subprocess (for SIGTERM and RSS).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import logging
import signal
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from blindnet.backends.torch_backend import TorchBackend
from blindnet.inference import Predictor
from blindnet.serve import client
from blindnet.serve.app import BackgroundServer, create_app
from blindnet.serve.config import DECODE_BYTES_PER_PIXEL, ServeConfig
from blindnet.serve.errors import HTTPError
from blindnet.serve.parsing import PixelBudget, decode_upload, parse_infer_request, upload_bytes

MAX_PIXELS = 200 * 200
MAX_BYTES = 1024 * 1024
FUZZ = settings(
    max_examples=60, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def server(backend: TorchBackend):
    config = ServeConfig(
        max_batch_size=8,
        max_queue_delay_ms=20,
        max_request_bytes=MAX_BYTES,
        max_image_pixels=MAX_PIXELS,
        body_timeout_s=1.0,
    )
    with BackgroundServer(create_app(backend, config)) as srv:
        yield srv


def _image(seed: int, h: int = 24, w: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(image: np.ndarray | Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(w: int, h: int) -> bytes:
    """A real, valid RGB PNG of ``w x h`` black pixels: a few hundred KB that decode to ``3*w*h`` bytes."""
    z = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * w)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def ico_wrapping(png: bytes) -> bytes:
    """An ICO file with one entry holding ``png`` (its directory claims 256 x 256, whatever the PNG holds)."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def _tiff_small_first_frame() -> bytes:
    """A two-page TIFF: a 4 x 4 first page and a 3000 x 3000 second one (only the first is ever decoded)."""
    first = Image.fromarray(_image(3, 4, 4))
    return _encode(first, "TIFF", save_all=True, append_images=[Image.new("RGB", (3000, 3000))], compression="packbits")


def _v2_body(images: np.ndarray) -> tuple[bytes, dict[str, str]]:
    return client.encode_infer(images)


def _v2_labels(r: httpx.Response) -> np.ndarray:
    return client.decode_infer(r.content, r.headers)["labels"]


def _raw_http(url: str, payload: bytes, *, read: bool = True, timeout: float = 30.0) -> bytes:
    """Send raw bytes on a fresh connection and return everything the server answers until it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(payload)
        if not read:
            return b""
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if _response_complete(data):  # the server may keep the connection open after answering
                break
    return data


def _response_complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole HTTP response (headers and a Content-Length body)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


# ----------------------------------------------------------------------------------------------------------------------
# Property-based fuzzing of the parsers: a valid parse, or our own client error, never anything else
# ----------------------------------------------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=6)
_json = st.recursive(
    _scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12
)
_params = st.dictionaries(st.sampled_from(["binary_data_size", "binary_data", "binary_data_output"]), _json) | _json
_input = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["images", "x"]) | _json,
        "datatype": st.sampled_from(["UINT8", "FP32"]) | _json,
        "shape": st.lists(st.integers(-1, 4) | st.booleans(), max_size=5) | _json,
        "parameters": _params,
        "data": st.lists(st.integers(-2, 300) | _json, max_size=14) | _json,
    },
)
_request = st.fixed_dictionaries(
    {"inputs": st.lists(_input, min_size=1, max_size=2) | _json},
    optional={
        "outputs": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["labels", "logits"]) | _json}, optional={"parameters": _params}
            ),
            max_size=2,
        )
        | _json,
        "parameters": _params,
        "id": _json,
    },
)


def _client_error_or_ok(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except HTTPError as exc:
        assert 400 <= exc.status < 500, (exc.status, exc.message)
        assert exc.message
        return None


@FUZZ
@given(req=_request, binary=st.binary(max_size=64), mode=st.sampled_from(["json", "binary", "bad-length"]))
def test_fuzz_v2_parser(req: dict, binary: bytes, mode: str) -> None:
    header = json.dumps(req).encode()
    length = {"json": None, "binary": str(len(header)), "bad-length": str(len(header) + len(binary) + 1)}[mode]
    body = header if mode == "json" else header + binary
    parsed = _client_error_or_ok(parse_infer_request, body, length, max_batch_size=4, max_pixels=64)
    if parsed is not None:
        _, images = parsed
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3


@FUZZ
@given(body=st.binary(max_size=200), length=st.none() | st.text(max_size=4) | st.integers(-5, 250).map(str))
def test_fuzz_v2_parser_raw_bytes(body: bytes, length: str | None) -> None:
    _client_error_or_ok(parse_infer_request, body, length, max_batch_size=4, max_pixels=64)


_SEEDS = {
    fmt: _encode(_image(1, 6, 5), fmt) for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "ICO", "TGA", "PPM")
}


@FUZZ
@given(
    fmt=st.sampled_from(sorted(_SEEDS)),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 10_000),
)
def test_fuzz_raw_image_decoding(fmt: str, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_SEEDS[fmt])
    for pos, value in flips:
        data[pos % len(data)] = value
    image = _client_error_or_ok(decode_upload, bytes(data[: max(cut, 1)]), name="upload", max_pixels=64)
    if image is not None:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@FUZZ
@given(
    boundary=st.sampled_from(["b0undary", "", "x" * 80]) | st.text(max_size=8),
    ctype=st.sampled_from(["multipart/form-data; boundary={b}", "multipart/form-data", "multipart/form-data; {b}"]),
    parts=st.lists(st.tuples(st.text(max_size=6), st.none() | st.text(max_size=6), st.binary(max_size=40)), max_size=3),
    garbage=st.binary(max_size=40),
)
def test_fuzz_multipart_uploads(boundary: str, ctype: str, parts: list, garbage: bytes) -> None:
    pieces = []
    for field, filename, content in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
        pieces.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode(errors="replace") + content)
    body = b"\r\n".join(pieces) + f"\r\n--{boundary}--\r\n".encode(errors="replace") + garbage
    headers = {"content-type": ctype.format(b=boundary)}
    got = asyncio.run(_async_client_error_or_ok(upload_bytes(headers, body)))
    if got is not None:
        _client_error_or_ok(decode_upload, got[0], name=got[1], max_pixels=64)


async def _async_client_error_or_ok(coro):
    try:
        return await coro
    except HTTPError as exc:
        assert 400 <= exc.status < 500, (exc.status, exc.message)
        return None


# ----------------------------------------------------------------------------------------------------------------------
# A corpus of malformed requests against the real server
# ----------------------------------------------------------------------------------------------------------------------

_INFER = "/v2/models/blindnet/infer"
_GOOD_INPUT = {"name": "images", "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [1, 2, 3]}


def _json_case(payload: object) -> dict:
    return {"method": "POST", "url": _INFER, "content": json.dumps(payload).encode()}


def malformed_corpus() -> list[tuple[str, dict, int]]:
    """``(name, httpx request kwargs, expected status)`` for every class of bad input the server must refuse."""
    deep = b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    cases = [
        ("deep json", {"method": "POST", "url": _INFER, "content": deep}, 400),
        (
            "deep json in a string is fine but bad shape",
            _json_case({"id": "[" * 5000, "inputs": [{**_GOOD_INPUT, "shape": [1, 1, 1, True]}]}),
            400,
        ),
        ("boolean shape", _json_case({"inputs": [{**_GOOD_INPUT, "shape": [True, 1, 1, 3]}]}), 400),
        ("string shape", _json_case({"inputs": [{**_GOOD_INPUT, "shape": "1,1,1,3"}]}), 400),
        ("request parameters a list", _json_case({"inputs": [_GOOD_INPUT], "parameters": [1]}), 400),
        ("input parameters a string", _json_case({"inputs": [{**_GOOD_INPUT, "parameters": "x"}]}), 400),
        (
            "output parameters a number",
            _json_case({"inputs": [_GOOD_INPUT], "outputs": [{"name": "labels", "parameters": 3}]}),
            400,
        ),
        ("outputs not objects", _json_case({"inputs": [_GOOD_INPUT], "outputs": ["labels"]}), 400),
        (
            "binary_data_size a string",
            _json_case({"inputs": [{**_GOOD_INPUT, "parameters": {"binary_data_size": "3"}}]}),
            400,
        ),
        ("data holds objects", _json_case({"inputs": [{**_GOOD_INPUT, "data": [{"a": 1}, 2, 3]}]}), 400),
        ("data holds booleans", _json_case({"inputs": [{**_GOOD_INPUT, "data": [True, False, True]}]}), 400),
        ("data a number", _json_case({"inputs": [{**_GOOD_INPUT, "data": 7}]}), 400),
        ("data huge ints", _json_case({"inputs": [{**_GOOD_INPUT, "data": [10**30, 1, 2]}]}), 400),
        ("inputs an object", _json_case({"inputs": {"name": "images"}}), 400),
        ("top level a list", _json_case([1, 2]), 400),
        ("not utf-8", {"method": "POST", "url": _INFER, "content": b"\xff\xfe{"}, 400),
        (
            "bad header length",
            {"method": "POST", "url": _INFER, "content": b"{}", "headers": {"Inference-Header-Content-Length": "x"}},
            400,
        ),
        ("unknown path", {"method": "GET", "url": "/v2/nope"}, 404),
        ("wrong method", {"method": "GET", "url": _INFER}, 405),
        ("unknown model", _json_case({"inputs": [_GOOD_INPUT]}) | {"url": "/v2/models/nope/infer"}, 404),
        (
            "unsupported encoding",
            {"method": "POST", "url": _INFER, "content": b"{}", "headers": {"Content-Encoding": "br"}},
            415,
        ),
        (
            "gzip bomb",
            {
                "method": "POST",
                "url": _INFER,
                "content": gzip.compress(b" " * (4 * MAX_BYTES)),
                "headers": {"Content-Encoding": "gzip"},
            },
            413,
        ),
        ("body too large", {"method": "POST", "url": "/v1/segment", "content": b"\0" * (MAX_BYTES + 1)}, 413),
        ("png bomb", {"method": "POST", "url": "/v1/segment", "content": png_bomb(3000, 3000)}, 413),
        (
            "ico container bomb",
            {"method": "POST", "url": "/v1/segment", "content": ico_wrapping(png_bomb(3000, 3000))},
            415,
        ),
        ("gif", {"method": "POST", "url": "/v1/segment", "content": _SEEDS["GIF"]}, 415),
        ("not an image", {"method": "POST", "url": "/v1/segment", "content": b"definitely not an image"}, 400),
        ("truncated png", {"method": "POST", "url": "/v1/segment", "content": _encode(_image(0), "PNG")[:200]}, 400),
        (
            "multipart without boundary",
            {
                "method": "POST",
                "url": "/v1/segment",
                "content": b"--x\r\n",
                "headers": {"Content-Type": "multipart/form-data"},
            },
            400,
        ),
        (
            "repository index bad body",
            {"method": "POST", "url": "/v2/repository/index", "content": b'{"ready": "yes"}'},
            400,
        ),
        (
            "repository index deep body",
            {"method": "POST", "url": "/v2/repository/index", "content": b"[" * 50_000},
            400,
        ),
    ]
    return cases


def test_malformed_corpus_gets_documented_4xx_and_server_stays_healthy(server, reference) -> None:
    corpus = malformed_corpus()

    def send(case) -> tuple[str, int, httpx.Response]:
        name, kwargs, status = case
        with httpx.Client(base_url=server.url, timeout=60) as http:
            return name, status, http.request(**kwargs)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, corpus))
    for name, status, r in answers:
        assert r.status_code == status, f"{name}: {r.status_code} {r.text[:200]}"
        assert r.headers["content-type"].startswith("application/json"), name
        assert isinstance(r.json()["error"], str) and r.json()["error"], name
    allow = dict((n, r) for n, _, r in answers)["wrong method"].headers.get("allow", "")
    assert "POST" in allow

    # Requests uvicorn cannot even parse get the same JSON shape.
    for raw in (b"NOT HTTP AT ALL\r\n\r\n", b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"):
        answer = _raw_http(server.url, raw)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head.lower(), answer[:200]
        assert "malformed HTTP request" in json.loads(body)["error"]

    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    image = _image(42)
    body, headers = _v2_body(image[None])
    r = httpx.post(f"{server.url}{_INFER}", content=body, headers=headers, timeout=60)
    assert r.status_code == 200
    np.testing.assert_array_equal(_v2_labels(r)[0], reference.predict_one(image).labels)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'status="500"' not in metrics


def test_repository_index_lists_the_model(server) -> None:
    for body in (b"", b"{}", b'{"ready": true}'):
        r = httpx.post(f"{server.url}/v2/repository/index", content=body)
        assert r.status_code == 200
        assert r.json() == [{"name": "blindnet", "version": "1", "state": "READY", "reason": ""}]


def test_accepted_containers_decode_only_their_checked_first_frame(server, reference) -> None:
    r = httpx.post(f"{server.url}/v1/segment", content=_tiff_small_first_frame(), timeout=60)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(r.content))), reference.predict_one(_image(3, 4, 4)).labels
    )


# ----------------------------------------------------------------------------------------------------------------------
# Tiny images through the server
# ----------------------------------------------------------------------------------------------------------------------


def test_tiny_images_are_served_and_never_fail_their_batch(server, reference) -> None:
    tiny = [_image(s, h, w) for s, (h, w) in enumerate([(1, 1), (16, 16), (2, 9), (1, 1)])]
    normal = [_image(100 + s) for s in range(6)]

    def segment(image: np.ndarray) -> np.ndarray | None:
        r = httpx.post(f"{server.url}/v1/segment", content=_encode(image, "PNG"), timeout=60)
        return np.asarray(Image.open(io.BytesIO(r.content))) if r.status_code == 200 else None

    def v2(image: np.ndarray) -> np.ndarray | None:
        body, headers = _v2_body(image[None])
        r = httpx.post(f"{server.url}{_INFER}", content=body, headers=headers, timeout=60)
        return _v2_labels(r)[0] if r.status_code == 200 else None

    jobs = [(f, im) for im in tiny + normal for f in (segment, v2)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: job[0](job[1]), jobs))
    for (_, image), labels in zip(jobs, got):
        assert labels is not None
        np.testing.assert_array_equal(labels, reference.predict_one(image).labels)
    # The KServe JSON form of a single pixel, too.
    r = httpx.post(f"{server.url}{_INFER}", json={"inputs": [_GOOD_INPUT]}, timeout=60)
    assert r.status_code == 200
    assert r.json()["outputs"][0]["shape"] == [1, 1, 1]


def test_tiny_images_share_a_batch_at_a_small_serving_size(backend, reference) -> None:
    config = ServeConfig(input_size=(8, 8), max_queue_delay_ms=200)
    images = [_image(s, h, w) for s, (h, w) in enumerate([(1, 1), (24, 40), (5, 3), (30, 30)])]
    small = Predictor(backend, input_size=(8, 8))
    with BackgroundServer(create_app(backend, config)) as srv, ThreadPoolExecutor(4) as pool:
        posts = [
            pool.submit(httpx.post, f"{srv.url}/v1/segment", content=_encode(im, "PNG"), timeout=60) for im in images
        ]
        for image, post in zip(images, posts):
            r = post.result()
            assert r.status_code == 200, r.text
            np.testing.assert_array_equal(
                np.asarray(Image.open(io.BytesIO(r.content))), small.predict_one(image).labels
            )
        assert httpx.get(f"{srv.url}/v1/stats").json()["failed_batches"] == 0


# ----------------------------------------------------------------------------------------------------------------------
# Stalled and vanished uploads
# ----------------------------------------------------------------------------------------------------------------------


def test_stalled_body_gets_408(server) -> None:
    head = b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"\x89PNG"
    answer = _raw_http(server.url, head)  # then silence: the server must answer after its 1 s body timeout
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), answer[:200]
    assert "did not arrive" in json.loads(rest.partition(b"\r\n\r\n")[2])["error"]


def test_client_vanishing_mid_body_is_logged_once_and_not_a_500(backend, caplog) -> None:
    caplog.set_level(logging.INFO, logger="blindnet.serve")
    with BackgroundServer(create_app(backend, ServeConfig())) as srv:
        head = b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"\x89PNG" * 100
        _raw_http(srv.url, head, read=False)  # and close the connection
        deadline = time.monotonic() + 30
        while 'status="499"' not in (metrics := httpx.get(f"{srv.url}/metrics").text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.05)
        assert 'status="500"' not in metrics
    records = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None
    assert not [r for r in caplog.records if r.exc_info]


def test_sigterm_exits_within_the_drain_time_despite_a_stalled_upload(checkpoint: Path, serve_process) -> None:
    drain_s = 2.0
    server = serve_process(checkpoint, "--drain-timeout-s", str(drain_s), "--body-timeout-s", "600")
    proc = server.proc
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as stalled:
            stalled.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n\x89PNG")
            time.sleep(0.5)  # the request is in flight, its body never completes
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # Bound of the documented drain time plus process teardown (interpreter exit), never the body timeout.
            proc.wait(drain_s + 20)
            elapsed = time.monotonic() - t0
            answer = stalled.recv(65536)
        # The cut request is answered in the JSON shape (503), and the exit status says a request was cut.
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert "shut down" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert proc.returncode == 1
        log = server.log()
        assert "Traceback" not in log and "CancelledError" not in log, log
        print(f"SIGTERM to exit with a stalled upload: {elapsed:.2f} s (drain time {drain_s} s)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------------------------------------------------
# Bounded decoding memory
# ----------------------------------------------------------------------------------------------------------------------


def _rss_kib(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in status.splitlines()) if k in ("VmRSS", "VmHWM")
    }


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read RSS")
def test_concurrent_oversized_containers_stay_under_the_decode_memory_bound(checkpoint: Path, serve_process) -> None:
    max_pixels = 2000 * 2000
    budget = 2 * max_pixels
    bound_kib = budget * DECODE_BYTES_PER_PIXEL // 1024
    server = serve_process(checkpoint, "--max-image-pixels", str(max_pixels), "--max-decode-pixels", str(budget))
    proc, url = server.proc, server.url
    try:
        # Warm up every code path once (threads, Pillow plugins, the model) before the baseline.
        httpx.post(f"{url}/v1/segment", content=_encode(_image(0), "PNG"), timeout=60)
        truncated = png_bomb(2000, 2000)[:-2000]  # all pixels allocated, then "truncated"
        bombs = [ico_wrapping(png_bomb(6000, 6000)), png_bomb(6000, 6000), truncated, _tiff_small_first_frame()]

        def burst() -> list[int]:
            with ThreadPoolExecutor(16) as pool:
                post = lambda b: httpx.post(f"{url}/v1/segment", content=b, timeout=120).status_code  # noqa: E731
                return list(pool.map(post, bombs * 8))

        burst()  # first burst: the server's thread pool and allocator arenas grow to their working size
        with contextlib.suppress(OSError):  # restart the peak-RSS counter at the baseline (Linux >= 4.0)
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        before = _rss_kib(proc.pid)["VmRSS"]
        statuses = burst()
        assert sorted(set(statuses)) == [200, 400, 413, 415]
        peak = _rss_kib(proc.pid)["VmHWM"]
        print(
            f"decode bound {bound_kib / 1024:.0f} MiB; RSS {before / 1024:.0f} MiB -> peak {peak / 1024:.0f} MiB "
            f"(+{(peak - before) / 1024:.0f} MiB) under 32 concurrent oversized uploads"
        )
        assert peak - before <= bound_kib
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    finally:
        server.stop()


def test_pixel_budget_never_lets_concurrent_holders_exceed_it() -> None:
    async def scenario() -> int:
        budget = PixelBudget(10)
        held = peak = 0

        async def decode(pixels: int) -> None:
            nonlocal held, peak
            async with budget.hold(pixels):
                held += min(pixels, 10)
                peak = max(peak, held)
                await asyncio.sleep(0.001)
                held -= min(pixels, 10)

        await asyncio.gather(*(decode(p) for p in [4, 7, 3, 10, 25, 1, 6, 9, 2, 5] * 3))
        assert budget.free == 10
        return peak

    assert 1 <= asyncio.run(scenario()) <= 10
