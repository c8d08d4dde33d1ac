"""Attacks on the real server process (``python -m blindnet.serve`` on loopback, default limits): small requests that
used to freeze it or exhaust its memory, framing tricks, idle connections, shutdown.

Bounded: a fixed list of cases, each a handful of requests; the memory cases read the server's RSS from /proc.
Liveness is probed while the parse attacks run: every probe must answer in < 100 ms (the acceptance bound of these
limits; a frozen event loop took 16-34 s before them).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from blindnet.backends.torch_backend import TorchBackend
from blindnet.inference import Predictor
from blindnet.serve import client
from blindnet.serve.app import BackgroundServer, create_app
from blindnet.serve.config import ServeConfig
from tests.conftest import ServeProcess
from tests.test_serve_hardening import png_bomb

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")

INFER = client.infer_path()
#: The acceptance bound for a probe while a hostile parse runs.
PROBE_LIMIT_S = 0.1
#: The acceptance bound of memory growth per hostile request.
RSS_LIMIT_KIB = 300 * 1024


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory) -> ServeProcess:
    """The server at its default limits (torch backend, tiny model)."""
    proc = ServeProcess(tiny_checkpoint, log_dir=tmp_path_factory.mktemp("serve")).wait_ready()
    # Warm every path once (threads, parsers, the model) so that growth measured later is the attack's own.
    body, headers = client.encode_infer(np.zeros((1, 16, 16, 3), np.uint8))
    assert httpx.post(proc.url + INFER, content=body, headers=headers, timeout=60).status_code == 200
    yield proc
    proc.stop()


def _rss_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak(pid: int) -> None:
    with contextlib.suppress(OSError):  # Linux >= 4.0: restart VmHWM at the current RSS
        Path(f"/proc/{pid}/clear_refs").write_text("5")


#: Probes liveness, readiness and metrics until a stop file appears; prints the slowest answer in ms. A process of
#: its own, so that the attacking threads of this one do not delay it (they share this process's GIL).
_PROBE = """
import json, os, sys, time, httpx
url, stop = sys.argv[1], sys.argv[2]
slowest, count = 0.0, 0
with httpx.Client(base_url=url, timeout=30) as http:
    http.get("/v2/health/live")
    print("ready", flush=True)
    while not os.path.exists(stop):
        for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
            t0 = time.perf_counter()
            assert http.get(path).status_code == 200, path
            slowest, count = max(slowest, time.perf_counter() - t0), count + 1
        time.sleep(0.01)
print(json.dumps({"slowest": slowest, "count": count}), flush=True)
"""


def _probe_while(url: str, attack: Callable[[], list[httpx.Response]]) -> tuple[list[httpx.Response], float]:
    """Run ``attack`` while another process probes liveness, readiness and metrics; (its answers, slowest probe s).

    On this shared 2-core machine the scheduler alone can delay one probe past the bound, so an attack whose slowest
    probe misses it runs once more and the better of the two counts: a blocked event loop (which took seconds before
    these limits) misses it both times.
    """
    answers, slowest = _probe_once(url, attack)
    if slowest >= PROBE_LIMIT_S:
        answers, again = _probe_once(url, attack)
        slowest = min(slowest, again)
    return answers, slowest


def _probe_once(url: str, attack: Callable[[], list[httpx.Response]]) -> tuple[list[httpx.Response], float]:
    with tempfile.TemporaryDirectory() as tmp:
        stop = Path(tmp) / "stop"
        probe = subprocess.Popen([sys.executable, "-c", _PROBE, url, str(stop)], stdout=subprocess.PIPE, text=True)
        try:
            assert probe.stdout is not None and probe.stdout.readline().strip() == "ready"
            answers = attack()
            time.sleep(0.05)  # a last round of probes after the answers
            stop.touch()
            out, _ = probe.communicate(timeout=60)
        finally:
            if probe.poll() is None:
                probe.kill()
                probe.wait()
    assert probe.returncode == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["count"] >= 3
    return answers, result["slowest"]


#: One client for all attacks, made once: building an httpx client (its TLS context) costs tens of milliseconds of
#: CPU, which eight at once would take from the server and the probe on two cores, inside the measured window.
_HTTP = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=16, max_keepalive_connections=0))


def _post_all(url: str, bodies: list[tuple[str, bytes, dict[str, str]]]) -> list[httpx.Response]:
    def post(item: tuple[str, bytes, dict[str, str]]) -> httpx.Response:
        path, body, headers = item
        return _HTTP.post(url + path, content=body, headers=headers)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def _gzip(text: bytes) -> tuple[bytes, dict[str, str]]:
    return gzip.compress(text, 9), {"Content-Encoding": "gzip", "Content-Type": "application/json"}


# ----------------------------------------------------------------------------------------------------------------------
# Parse attacks: the event loop keeps answering, every attack gets its 4xx, memory stays bounded
# ----------------------------------------------------------------------------------------------------------------------


def _hostile_json_cases() -> list[tuple[str, str, bytes, dict[str, str], int]]:
    """``(name, path, body, headers, status)``: JSON built to cost the parser as much as the limits allow."""
    quotes = b'"' + b'\\"' * 32_000  # unterminated string of escaped quotes: ~100 bytes gzipped
    big_quotes = b'"' + b'\\"' * (4 * 1024 * 1024 - 1)  # the same, as long as the JSON size limit allows (8 MiB)
    big_escapes = b'"' + b"\\n" * (4 * 1024 * 1024 - 1)  # one unterminated 8 MiB string of escapes
    big_string = b'"' + b" " * (8 * 1024 * 1024 - 1)  # one unterminated 8 MiB string the parser must scan
    lists = b"[" + b"[]," * 1_000_000 + b"[]]"
    numbers = b'{"inputs":[{"name":"images","datatype":"UINT8","shape":[1,1,1,3],"data":[' + b"7," * 3_000_000
    numbers += b"7]}]}"  # 3 M numbers for a 3-value tensor: parsed, then refused
    floats = b"[" + b"0.5," * 2_000_000 + b"1]"
    over = b"[" + b"1," * 32_000_000 + b"1]"  # 62 KB gzipped, 63 MB of numbers
    logits = client.encode_infer(np.zeros((1, 768, 768, 3), np.uint8), outputs=["logits"], binary_outputs=False)
    cases = [
        ("escaped quotes, index", "/v2/repository/index", *_gzip(quotes), 400),
        ("escaped quotes, infer", INFER, *_gzip(quotes), 400),
        ("8 MiB of escaped quotes", INFER, *_gzip(big_quotes), 413),
        ("an 8 MiB string of escapes", INFER, *_gzip(big_escapes), 413),
        ("an 8 MiB string of spaces", INFER, *_gzip(big_string), 400),
        ("a million empty lists", INFER, *_gzip(lists), 413),
        ("3 M numbers", INFER, *_gzip(numbers), 400),
        ("2 M floats", INFER, *_gzip(floats), 400),
        ("63 MB of numbers", INFER, *_gzip(over), 413),
        ("JSON logits of 768x768 (1.2 GB before)", INFER, *logits, 413),
        ("a 4000x4000 PNG bomb", "/v1/segment", png_bomb(4000, 4000), {"Content-Type": "image/png"}, 413),
    ]
    return cases


def test_hostile_json_never_freezes_the_server_and_each_costs_under_300_mb(server: ServeProcess) -> None:
    for name, path, body, headers, status in _hostile_json_cases():
        _reset_peak(server.pid)
        before = _rss_kib(server.pid)
        attack = [(path, body, headers)]
        answers, slowest = _probe_while(server.url, lambda a=attack: _post_all(server.url, a))
        growth = _rss_kib(server.pid, "VmHWM") - before
        r = answers[0]
        print(f"{name}: {len(body)} B sent -> {r.status_code}, slowest probe {slowest * 1000:.0f} ms, +{growth} KiB")
        assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
        assert r.json()["error"], name
        assert slowest < PROBE_LIMIT_S, f"{name}: a probe took {slowest * 1000:.0f} ms"
        assert growth < RSS_LIMIT_KIB, f"{name}: +{growth} KiB"


def test_eight_json_bombs_at_once_stay_bounded(server: ServeProcess) -> None:
    body, headers = _gzip(b"[" + b"1," * 32_000_000 + b"1]")
    _reset_peak(server.pid)
    before = _rss_kib(server.pid)
    answers, slowest = _probe_while(server.url, lambda: _post_all(server.url, [(INFER, body, headers)] * 8))
    growth = _rss_kib(server.pid, "VmHWM") - before
    print(f"8 x 63 MB JSON bombs: slowest probe {slowest * 1000:.0f} ms, +{growth} KiB")
    assert [r.status_code for r in answers] == [413] * 8
    assert slowest < PROBE_LIMIT_S
    assert growth < RSS_LIMIT_KIB  # for all eight together


def test_large_json_outputs_are_refused_before_the_work_with_a_hint(server: ServeProcess) -> None:
    images = np.zeros((1, 768, 768, 3), np.uint8)
    stats = httpx.get(server.url + "/v1/stats").json()
    for output in ("logits", "labels"):
        body, headers = client.encode_infer(images, outputs=[output], binary_outputs=False)
        if output == "labels":  # 590 k labels fit as JSON; 4 such images do not
            body, headers = client.encode_infer(np.zeros((8, 768, 768, 3), np.uint8), binary_outputs=False)
        r = httpx.post(server.url + INFER, content=gzip.compress(body), headers=_gzip(b"")[1] | headers, timeout=60)
        assert r.status_code == 413, r.text[:300]
        assert "binary_data" in r.json()["error"]
    # Refused before queueing: the batcher saw no new request.
    assert httpx.get(server.url + "/v1/stats").json()["requests"] == stats["requests"]


def test_boolean_parameters_must_be_json_booleans(server: ServeProcess) -> None:
    body, _ = client.encode_infer(np.zeros((1, 4, 4, 3), np.uint8), binary=False)
    request = json.loads(body)
    for where in ("output", "request"):
        bad = json.loads(json.dumps(request))
        if where == "output":
            bad["outputs"][0]["parameters"]["binary_data"] = "false"
        else:
            bad["parameters"] = {"binary_data_output": 0}
        r = httpx.post(server.url + INFER, json=bad, timeout=60)
        assert r.status_code == 400, r.text
        assert "must be a JSON boolean" in r.json()["error"]
    r = httpx.post(server.url + INFER, content=body, timeout=60)
    assert r.status_code == 200 and client.decode_infer(r.content, r.headers)["labels"].shape == (1, 4, 4)


# ----------------------------------------------------------------------------------------------------------------------
# Framing and connections
# ----------------------------------------------------------------------------------------------------------------------


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or ``timeout`` passes (False)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data, False
    return data, True


def test_content_length_with_transfer_encoding_closes_after_the_answer(server: ServeProcess) -> None:
    smuggled = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    request = (
        b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n" + smuggled
    )
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(request)
        data, closed = _read_until_closed(s, 10)
    assert closed, data
    assert data.count(b"HTTP/1.1 ") == 1, data  # the bytes after the chunked body never ran as a request
    assert b"connection: close" in data.lower()


@pytest.fixture(scope="module")
def strict_server(tiny_checkpoint: Path, tmp_path_factory) -> ServeProcess:
    """A server with a 1 s header timeout and room for 6 connections (the defaults are 10 s and 64)."""
    flags = ("--header-timeout-s", "1", "--max-connections", "6")
    proc = ServeProcess(tiny_checkpoint, *flags, log_dir=tmp_path_factory.mktemp("strict")).wait_ready()
    yield proc
    proc.stop()


def test_idle_and_half_sent_connections_are_closed_and_extra_ones_refused(strict_server: ServeProcess) -> None:
    assert ServeConfig().header_timeout_s <= 10
    addr = ("127.0.0.1", strict_server.port)
    idle = [socket.create_connection(addr) for _ in range(4)]
    half = socket.create_connection(addr)
    half.sendall(b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    time.sleep(0.2)
    extra = [socket.create_connection(addr) for _ in range(4)]  # 6 + 4 open now: the last ones are refused
    try:
        refused = [_read_until_closed(s, 5) for s in extra[-3:]]
        for data, closed in refused:
            assert closed and data.startswith(b"HTTP/1.1 503"), data[:200]
        t0 = time.monotonic()
        for s in idle:
            data, closed = _read_until_closed(s, 5)
            assert closed and data == b""
        data, closed = _read_until_closed(half, 5)
        assert closed and data.startswith(b"HTTP/1.1 408"), data[:200]
        assert "did not arrive" in json.loads(data.partition(b"\r\n\r\n")[2])["error"]
        print(f"idle connections closed {time.monotonic() - t0:.2f} s after the check began (timeout 1 s)")
        assert httpx.get(strict_server.url + "/v2/health/ready", timeout=5).status_code == 200
    finally:
        for s in [*idle, half, *extra]:
            s.close()
    log = strict_server.log()
    assert "Traceback" not in log, log[-2000:]


# ----------------------------------------------------------------------------------------------------------------------
# Large images queue instead of being stacked
# ----------------------------------------------------------------------------------------------------------------------


def test_large_images_run_in_batches_within_the_pixel_budget(tiny_checkpoint: Path) -> None:
    backend = TorchBackend.from_checkpoint(tiny_checkpoint)
    reference = Predictor(backend, batch_size=8)
    config = ServeConfig(max_image_pixels=48 * 48, max_batch_pixels=2 * 48 * 48, max_queue_delay_ms=300)
    images = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    with BackgroundServer(create_app(backend, config)) as srv:
        body, headers = client.encode_infer(images)  # one request of 4: split into parts of 2
        answers = _post_all(srv.url, [(INFER, body, headers)] * 3)
        stats = httpx.get(srv.url + "/v1/stats").json()
    for r in answers:
        assert r.status_code == 200, r.text
        labels = client.decode_infer(r.content, r.headers)["labels"]
        np.testing.assert_array_equal(labels, np.stack([p.labels for p in reference.predict_arrays(list(images))]))
    assert stats["max_batch_seen"] == 2 and stats["images"] == 12


# ----------------------------------------------------------------------------------------------------------------------
# Start and stop
# ----------------------------------------------------------------------------------------------------------------------


def test_a_busy_port_is_reported_in_one_line_before_starting(tiny_checkpoint: Path, serve_process) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = serve_process(tiny_checkpoint, "--port", str(port), ready=False)
        assert proc.proc.wait(60) == 2
    lines = [line for line in proc.log().splitlines() if line.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], lines


def test_a_clean_sigterm_drain_exits_0(tiny_checkpoint: Path, serve_process) -> None:
    proc = serve_process(tiny_checkpoint)
    body, headers = client.encode_infer(np.zeros((1, 8, 8, 3), np.uint8))
    assert httpx.post(proc.url + INFER, content=body, headers=headers, timeout=60).status_code == 200
    assert proc.stop() == 0
    assert "Traceback" not in proc.log()


def test_accept_errors_at_the_file_limit_are_logged_once_without_tracebacks(tiny_checkpoint: Path, tmp_path) -> None:
    # 80 open files in all, room for 500 connections: accept() itself fails, as at a real descriptor limit.
    proc = ServeProcess(tiny_checkpoint, "--max-connections", "500", log_dir=tmp_path, max_open_files=80)
    proc.wait_ready()
    socks = []
    try:
        socks = [socket.create_connection(("127.0.0.1", proc.port), timeout=5) for _ in range(120)]
        time.sleep(3.5)  # asyncio retries accept() every second
    finally:
        for s in socks:
            s.close()
    time.sleep(1.0)
    assert httpx.get(proc.url + "/v2/health/live", timeout=10).status_code == 200  # serving again
    assert proc.stop() == 0
    log = proc.log()
    accept_lines = [line for line in log.splitlines() if "accept()" in line]
    assert 1 <= len(accept_lines) <= 2, log[-3000:]  # at most once per 10 s (two when the window turns over)
    assert "Traceback" not in log, log[-3000:]


def test_the_documented_memory_bound_is_the_one_the_settings_give() -> None:
    parts = ServeConfig().memory_bound(network_bytes_per_pixel=300, num_classes=19)
    readme = (Path(__file__).resolve().parents[1] / "serve" / "README.md").read_text()
    assert f"= {parts['total'] // 2**20} MiB ({parts['total'] / 2**30:.1f} GiB) at the defaults" in readme
    for name, mib in (("bodies and JSON", "bodies_and_json"), ("image decoding", "decoding"), ("queued", "queue")):
        assert f"{parts[mib] // 2**20} MiB" in readme, name
