"""Soak: ``python -m blindnet.benchmarks.load --soak 60``: valid and hostile traffic mixed, against one server.

For ``seconds`` seconds, ``concurrency`` closed-loop clients each send, in turn, valid requests (v2 binary, v2 JSON,
``/v1/segment`` PNG uploads, every answer compared with the in-process Predictor's labels) and hostile ones (the
parse, memory and framing attacks of ``tests/test_serve_attacks.py``: escaped-quote and number bombs, a million
empty lists, oversized JSON outputs, string booleans, PNG bombs, truncated images). Meanwhile a probe (a process of its
own) asks ``/v2/health/live`` every 100 ms and the server's peak RSS is read from /proc.

Reported: valid-request p50/p99 latency and errors, mismatched answers, hostile answers by status (each must be
the 4xx the README documents, never a 5xx), the slowest liveness probe and the server's peak RSS above its idle RSS.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from blindnet.serve import client

INFER = client.infer_path()


@dataclass
class Request:
    """One request of the mix: ``expected`` labels for a valid one, ``statuses`` it may get for a hostile one."""

    name: str
    path: str
    body: bytes
    headers: dict[str, str]
    expected: np.ndarray | None = None
    statuses: tuple[int, ...] = (200,)


@dataclass
class SoakReport:
    """What one soak run measured (written as JSON)."""

    setup: dict[str, Any]
    seconds: float
    valid_requests: int = 0
    valid_errors: int = 0
    valid_p50_ms: float | None = None
    valid_p99_ms: float | None = None
    mismatches: int = 0
    hostile_requests: int = 0
    hostile_unexpected: dict[str, int] = field(default_factory=dict)
    hostile_statuses: dict[str, int] = field(default_factory=dict)
    slowest_probe_ms: float | None = None
    idle_rss_mib: float | None = None
    peak_rss_mib: float | None = None


def png_bomb(w: int, h: int) -> bytes:
    """A valid RGB PNG of ``w x h`` black pixels: a few hundred KB whose header declares ``w*h`` pixels."""
    z = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * w)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _gz(text: bytes) -> tuple[bytes, dict[str, str]]:
    return gzip.compress(text, 6), {"Content-Encoding": "gzip", "Content-Type": "application/json"}


def hostile_requests(png_bomb: bytes) -> list[Request]:
    """The hostile half of the mix (``png_bomb``: a PNG whose header declares more pixels than the limit)."""
    quotes = b'"' + b'\\"' * 32_000
    small_png = client.encode_upload(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    numbers = b'{"inputs":[{"name":"images","datatype":"UINT8","shape":[1,1,1,3],"data":[' + b"7," * 2_000_000
    bad_bool, _ = client.encode_infer(np.zeros((1, 4, 4, 3), np.uint8), binary=False)
    bad = json.loads(bad_bool)
    bad["outputs"][0]["parameters"]["binary_data"] = "false"
    logits, logits_headers = client.encode_infer(
        np.zeros((1, 768, 768, 3), np.uint8), outputs=["logits"], binary_outputs=False
    )
    return [
        Request("escaped quotes (100 B gzip)", INFER, *_gz(quotes), statuses=(400,)),
        Request("escaped quotes, index", "/v2/repository/index", *_gz(quotes), statuses=(400,)),
        Request("63 MB of numbers (62 KB gzip)", INFER, *_gz(b"[" + b"1," * 32_000_000 + b"1]"), statuses=(413,)),
        Request("a million empty lists", INFER, *_gz(b"[" + b"[]," * 1_000_000 + b"[]]"), statuses=(413,)),
        Request("2 M numbers, wrong count", INFER, *_gz(numbers + b"7]}]}"), statuses=(400,)),
        Request("JSON logits of 768x768", INFER, logits, logits_headers, statuses=(413,)),
        Request("binary_data as a string", INFER, json.dumps(bad).encode(), {}, statuses=(400,)),
        Request("PNG bomb", "/v1/segment", png_bomb, {"Content-Type": "image/png"}, statuses=(413,)),
        Request(
            "truncated PNG",
            "/v1/segment",
            small_png[: len(small_png) // 2],
            {"Content-Type": "image/png"},
            statuses=(400,),
        ),
        Request("deep JSON", INFER, b"[" * 20_000 + b"]" * 20_000, {}, statuses=(400,)),
        Request("unknown encoding", INFER, b"{}", {"Content-Encoding": "br"}, statuses=(415,)),
    ]


def valid_requests(images: list[np.ndarray], expected: list[np.ndarray]) -> list[Request]:
    """The valid half: each image as a v2 binary request, a v2 JSON request and a PNG upload."""
    out = []
    for image, labels in zip(images, expected):
        body, headers = client.encode_infer(image[None])
        out.append(Request("v2 binary", INFER, body, headers, expected=labels))
        if image.size <= 64 * 64 * 3:  # JSON for small images only, as clients use it
            body, headers = client.encode_infer(image[None], binary=False, binary_outputs=False)
            out.append(Request("v2 JSON", INFER, body, headers, expected=labels))
        png = client.encode_upload(image)
        out.append(Request("upload", "/v1/segment", png, {"Content-Type": "image/png"}, expected=labels))
    return out


def _labels(r: httpx.Response, req: Request) -> np.ndarray:
    if req.path == "/v1/segment":
        return client.decode_png(r.content)
    return client.decode_infer(r.content, r.headers)["labels"][0]


def _rss_mib(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


#: Asks ``/v2/health/live`` every 100 ms for the given seconds; prints the slowest answer's time.
_PROBE = """
import json, sys, time, httpx
url, seconds = sys.argv[1], float(sys.argv[2])
slowest, end = 0.0, time.perf_counter() + seconds
with httpx.Client(base_url=url, timeout=30) as http:
    http.get("/v2/health/live")
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        http.get("/v2/health/live")
        slowest = max(slowest, time.perf_counter() - t0)
        time.sleep(0.1)
print(json.dumps({"slowest_ms": round(slowest * 1000, 1)}))
"""


async def _soak(url: str, mix: list[Request], concurrency: int, seconds: float, report: SoakReport) -> None:
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        deadline = time.perf_counter() + seconds
        counter = 0

        async def worker() -> None:
            nonlocal counter
            while time.perf_counter() < deadline:
                req = mix[counter % len(mix)]
                counter += 1
                t0 = time.perf_counter()
                r: httpx.Response | None = None
                status: int | str  # the HTTP status, or the name of the transport error
                try:
                    r = await http.post(req.path, content=req.body, headers=req.headers)
                    status = r.status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                if req.expected is None:
                    report.hostile_requests += 1
                    statuses[f"{req.name}: {status}"] += 1
                    if status not in req.statuses:
                        unexpected[f"{req.name}: {status}"] += 1
                    continue
                report.valid_requests += 1
                if status != 200 or r is None:  # a 200 status comes with a response
                    report.valid_errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                report.mismatches += int(not np.array_equal(_labels(r, req), req.expected))

        # The probe runs in a process of its own: in this one, 32 clients decoding answers would delay it too.
        probe = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PROBE, url, str(seconds), stdout=asyncio.subprocess.PIPE
        )
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        out, _ = await probe.communicate()
        report.slowest_probe_ms = json.loads(out)["slowest_ms"]
    ms = np.asarray(latencies) * 1000
    if ms.size:
        report.valid_p50_ms = round(float(np.percentile(ms, 50)), 1)
        report.valid_p99_ms = round(float(np.percentile(ms, 99)), 1)
    report.hostile_statuses = dict(sorted(statuses.items()))
    report.hostile_unexpected = dict(sorted(unexpected.items()))


def run_soak(
    url: str,
    pid: int | None,
    *,
    images: list[np.ndarray],
    expected: list[np.ndarray],
    png_bomb: bytes,
    concurrency: int = 32,
    seconds: float = 60.0,
    setup: dict[str, Any] | None = None,
) -> SoakReport:
    """Drive the server at ``url`` (process ``pid``, for RSS) with the mix for ``seconds``; see the module docstring.

    Three valid requests to each hostile one: every client works through the same interleaved list.
    """
    valid, hostile = valid_requests(images, expected), hostile_requests(png_bomb)
    mix: list[Request] = []
    for i in range(max(len(valid), 3 * len(hostile))):
        mix.append(valid[i % len(valid)])
        if i % 3 == 2:
            mix.append(hostile[(i // 3) % len(hostile)])
    report = SoakReport(setup=dict(setup or {}, concurrency=concurrency, mix=len(mix)), seconds=seconds)
    if pid is not None:
        report.idle_rss_mib = _rss_mib(pid, "VmRSS")
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS counted from now
        except OSError:
            pass
    asyncio.run(_soak(url, mix, concurrency, seconds, report))
    if pid is not None:
        report.peak_rss_mib = _rss_mib(pid, "VmHWM")
    return report


def write_soak_report(report: SoakReport, out_dir: str | Path) -> Path:
    """``soak_<backend>_<H>x<W>.json`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    h, w = report.setup.get("image_size", (0, 0))
    path = out_dir / f"soak_{report.setup.get('backend', 'backend')}_{h}x{w}.json"
    path.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    return path
