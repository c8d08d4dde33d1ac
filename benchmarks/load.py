"""Load generator for ``python -m blindnet.serve``: throughput and latency under concurrency, against the Predictor's own pace.

``python -m blindnet.benchmarks.load`` (or :func:`run_load_benchmark`) does, in one run:

1. **Baseline**: the :class:`~blindnet.inference.Predictor` with the same backend, device, precision and batch size
   as the server, fed full batches of distinct images in a loop, no HTTP: images/s of ``predict_arrays`` (the exact
   pre-process -> backend -> post-process path a server batch takes). Measured while no server runs.
2. **Server**: ``python -m blindnet.serve`` started as a subprocess on loopback (so client and server do not share a GIL), or
   an already running server given by ``url``. For each concurrency ``c``, ``c`` closed-loop clients send
   single-image requests (v2 binary tensors by default, or PNG uploads to ``/v1/segment``) until ``requests`` are
   done or ``max_seconds`` pass. We record throughput (images/s), p50/p90/p99 latency, errors, and the server's
   mean batch size (from ``/v1/stats``).
3. **Ratio**: server images/s / Predictor images/s per concurrency level, and the best level (target >= 0.85).
   Also **CPU efficiency**: the Predictor's CPU seconds per image / the server process's CPU seconds per image (read
   from ``/proc``), which is what the wall-clock ratio measures on a dedicated host, but stays meaningful when other
   jobs share the machine (wall-clock ratios there mostly measure the scheduler).

Caveats printed with the result: on a small CPU machine the load generator competes with the server for cores, so
the ratio understates what a GPU host (where the network runs on the device) achieves; requests carry raw tensors, so
image decoding is not measured unless ``protocol="segment"``.

Results go to ``benchmarks/results/load_<backend>_<device>_<H>x<W>.{json,csv}``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from blindnet.backends import BACKEND_NAMES
from blindnet.backends.select import make_backend
from blindnet.benchmarks.soak import png_bomb, run_soak, write_soak_report
from blindnet.checkpoint import save_model
from blindnet.inference import Predictor
from blindnet.models import build_model
from blindnet.resolve import DEFAULT_CHECKPOINT
from blindnet.serve import client
from blindnet.serve.client import free_port
from blindnet.zoo import checkpoint_path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CSV_FIELDS = (
    "concurrency",
    "requests",
    "errors",
    "seconds",
    "images_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_batch_size",
    "fraction_of_predictor",
    "server_cpu_ms_per_image",
    "cpu_efficiency",
    "mismatches",
)


@dataclass
class LevelResult:
    """One concurrency level: ``requests`` single-image requests by ``concurrency`` closed-loop clients."""

    concurrency: int
    requests: int
    errors: int
    seconds: float
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch_size: float | None
    fraction_of_predictor: float | None = None
    server_cpu_ms_per_image: float | None = None
    cpu_efficiency: float | None = None
    mismatches: int | None = None


@dataclass
class LoadReport:
    """Everything one run measured (written as JSON; the levels also as CSV)."""

    setup: dict[str, Any]
    predictor_images_per_s: float | None
    predictor_images_per_s_before_after: list[float] = field(default_factory=list)
    predictor_cpu_ms_per_image: float | None = None
    levels: list[LevelResult] = field(default_factory=list)
    best_fraction: float | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------------
# Predictor baseline
# ----------------------------------------------------------------------------------------------------------------------


def _throughput_here(predictor, images: Sequence[np.ndarray], min_seconds: float, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        predictor.predict_arrays(images)
    n = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    while True:
        predictor.predict_arrays(images)
        n += len(images)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds and n >= 3 * len(images):
            return n / elapsed, (time.process_time() - c0) / n


def predictor_throughput(
    predictor, images: Sequence[np.ndarray], *, min_seconds: float = 3.0, warmup: int = 2
) -> tuple[float, float]:
    """``(images/s, CPU seconds per image)`` of ``predictor.predict_arrays`` on full batches of ``images``.

    ``len(images)`` is the batch size. Measured twice, on the calling thread and on a fresh thread (where the server's
    batcher runs it), keeping the *better* figure of each: with a CPU backend on a busy host the OpenMP pool of the
    main thread and of a secondary thread can differ several-fold, and the baseline must be the best the Predictor
    does, or the server/Predictor ratio flatters the server. CPU time is the whole process's (all threads).
    """
    import threading

    results = [_throughput_here(predictor, images, min_seconds / 2, warmup)]
    thread = threading.Thread(
        target=lambda: results.append(_throughput_here(predictor, images, min_seconds / 2, warmup)), daemon=True
    )
    thread.start()
    thread.join()
    return max(r[0] for r in results), min(r[1] for r in results)


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all threads) from ``/proc``; None where unavailable."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------------------------------------------------
# Client side
# ----------------------------------------------------------------------------------------------------------------------


def _answer_labels(path: str, content: bytes, response_headers) -> np.ndarray:
    """The label map in a 200 answer: a v2 ``labels`` tensor, or a ``/v1/segment`` labels PNG."""
    if path.startswith("/v2/"):
        return client.decode_infer(content, response_headers)["labels"][0]
    return client.decode_png(content)


async def _run_level(
    url: str,
    bodies: list[tuple[str, bytes, dict[str, str]]],
    *,
    concurrency: int,
    requests: int,
    max_seconds: float,
    headers: dict[str, str],
    expected: list[np.ndarray] | None = None,
) -> tuple[list[float], int, float, int]:
    """Closed loop: ``concurrency`` workers send requests back to back.

    Returns ``(latencies_s, errors, wall_s, mismatches)``; with ``expected`` (the label map each body must get back,
    by index) every 200 answer is compared with it, after its latency is taken.
    """
    import httpx

    latencies: list[float] = []
    errors = 0
    counter = 0
    mismatches = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120, headers=headers) as client:
        t0 = time.perf_counter()
        deadline = t0 + max_seconds

        async def worker() -> None:
            nonlocal counter, errors, mismatches
            while counter < requests and time.perf_counter() < deadline:
                index = counter % len(bodies)
                path, body, hdrs = bodies[index]
                counter += 1
                s = time.perf_counter()
                try:
                    r = await client.post(path, content=body, headers=hdrs)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - s)
                    if expected is not None:
                        got = _answer_labels(path, r.content, r.headers)
                        mismatches += int(not np.array_equal(got, expected[index]))
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, errors, wall, mismatches


def _stats(url: str, headers: dict[str, str]) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{url}/v1/stats", headers=headers, timeout=10).json()


def _wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before becoming ready")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} not ready after {timeout:.0f} s")


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------------


def _resolve_checkpoint(checkpoint: str | Path | None, backbone: str, tmpdir: Path) -> tuple[Path, str]:
    """The checkpoint to load: given, the shipped default, or a random-init ``backbone`` (throughput only)."""
    if checkpoint is not None:
        return checkpoint_path(checkpoint), "given"  # a model name (blindnet-r50-gtav): its cached file

    if DEFAULT_CHECKPOINT.exists():
        return DEFAULT_CHECKPOINT, "shipped default"
    import torch

    torch.manual_seed(0)
    path = save_model(build_model({"backbone": backbone}), tmpdir / f"random_{backbone}.safetensors")
    return path, f"random-init {backbone} (weights do not change throughput)"


def run_load_benchmark(
    *,
    checkpoint: str | Path | None = None,
    backbone: str = "mobilenetv2",
    backend: str = "torch",
    device: str | None = None,
    precision: str | None = None,
    image_size: tuple[int, int] = (256, 512),
    max_batch_size: int = 8,
    max_queue_delay_ms: float = 5.0,
    concurrencies: Sequence[int] = (1, 8, 16, 32),
    requests: int = 160,
    max_seconds: float = 30.0,
    protocol: str = "v2",
    url: str | None = None,
    api_key: str | None = None,
    baseline_seconds: float = 5.0,
    out_dir: str | Path | None = RESULTS_DIR,
    verify: bool = False,
) -> LoadReport:
    """Measure Predictor throughput, then the server's at each concurrency (see the module docstring).

    Args:
        checkpoint: model to serve; None: the shipped default, else a random-init ``backbone``.
        image_size: ``(H, W)`` of every request image (one shape, so the server batches them together).
        concurrencies: closed-loop client counts to run, in order.
        requests: requests per level (bounded run time), also stopped by ``max_seconds``.
        protocol: ``v2`` (raw UINT8 tensors, binary extension) or ``segment`` (PNG upload, PNG label map back).
        url: an already running server to load instead of starting one (it must serve the same model/backend for the
            ratio to mean anything).
        out_dir: where JSON/CSV go; None writes nothing.
        verify: compare every answer with the in-process Predictor's label map (``mismatches`` per level).
    """
    if protocol not in ("v2", "segment"):
        raise ValueError(f"protocol must be 'v2' or 'segment', got {protocol!r}")

    h, w = image_size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(max(max_batch_size, 16))]
    backend_kwargs = {k: v for k, v in (("device", device), ("precision", precision)) if v is not None}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, ckpt_source = _resolve_checkpoint(checkpoint, backbone, Path(tmp))
        # 1. Predictor baseline, before any server exists so nothing competes with it. It is measured again after the
        # levels (server idle) and the higher figure is used: load from elsewhere on the host can only lower a
        # measurement, and the conservative ratio divides by the best the Predictor managed.
        predictor = Predictor(make_backend(backend, ckpt, **backend_kwargs), batch_size=max_batch_size)
        backend_desc = predictor.backend.describe()
        base_before, cpu_before = predictor_throughput(predictor, images[:max_batch_size], min_seconds=baseline_seconds)
        expected = [p.labels for p in predictor.predict(images)] if verify else None

        # 2. The server.
        proc = None
        headers = {"X-API-Key": api_key} if api_key else {}
        if url is None:
            url, proc = _start_server(
                ckpt, backend, max_batch_size, max_queue_delay_ms, concurrencies, device, precision, api_key
            )
        try:
            _wait_ready(url, proc)
            bodies = _request_bodies(images, protocol)
            # Warm-up: first-call costs (allocator, kernels) must not land in the first level.
            _warm_up(url, bodies, max_batch_size, headers)
            levels = [
                _measure_level(url, bodies, c, requests, max_seconds, headers, expected, proc) for c in concurrencies
            ]
            base_after, cpu_after = predictor_throughput(
                predictor, images[:max_batch_size], min_seconds=baseline_seconds
            )
        finally:
            _stop_server(proc)
    notes = _host_notes(backend_desc)
    setup = _setup_facts(
        ckpt_source, backend_desc, image_size, max_batch_size, max_queue_delay_ms, protocol, requests, max_seconds
    )
    report = _build_report(setup, (base_before, base_after), (cpu_before, cpu_after), levels, notes)
    if out_dir is not None:
        write_report(report, out_dir)
    return report


def _host_notes(backend_desc: dict[str, Any]) -> list[str]:
    """Caveats about this host that a reader of the numbers needs."""
    notes: list[str] = []
    if (os.cpu_count() or 1) <= 4 and backend_desc.get("device", "cpu") == "cpu":
        notes.append(
            f"{os.cpu_count()} CPU cores: the load generator and the server's HTTP handling compete with the CPU "
            "backend for the same cores, so the fraction understates a GPU host"
        )
    return notes


def _warm_up(url: str, bodies: list[tuple[Any, ...]], max_batch_size: int, headers: dict[str, str]) -> None:
    """A few full batches of requests, untimed."""
    asyncio.run(
        _run_level(
            url,
            bodies,
            concurrency=max_batch_size,
            requests=3 * max_batch_size,
            max_seconds=60,
            headers=headers,
        )
    )


def _setup_facts(
    ckpt_source: str,
    backend_desc: dict[str, Any],
    image_size: tuple[int, int],
    max_batch_size: int,
    max_queue_delay_ms: float,
    protocol: str,
    requests: int,
    max_seconds: float,
) -> dict[str, Any]:
    """What was measured where: the report's ``setup``."""
    h, w = image_size
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "checkpoint": ckpt_source,
        "backend": backend_desc,
        "image_size": [h, w],
        "max_batch_size": max_batch_size,
        "max_queue_delay_ms": max_queue_delay_ms,
        "protocol": protocol,
        "requests_per_level": requests,
        "max_seconds_per_level": max_seconds,
    }


def _build_report(
    setup: dict[str, Any],
    base_before_after: tuple[float, float],
    cpu_before_after: tuple[float, float],
    levels: list[LevelResult],
    notes: list[str],
) -> LoadReport:
    """The run's report from the Predictor's two baselines (the best of them counts) and every level."""
    base = max(base_before_after)
    cpu_ms = 1000 * min(cpu_before_after)
    _compare_with_predictor(levels, base, cpu_ms)
    return LoadReport(
        setup=setup,
        predictor_images_per_s=round(base, 2),
        predictor_images_per_s_before_after=[round(base_before_after[0], 2), round(base_before_after[1], 2)],
        predictor_cpu_ms_per_image=round(cpu_ms, 2),
        levels=levels,
        best_fraction=max((lv.fraction_of_predictor or 0.0) for lv in levels) if levels else None,
        notes=notes,
    )


def _start_server(
    ckpt: Path,
    backend: str,
    max_batch_size: int,
    max_queue_delay_ms: float,
    concurrencies: Sequence[int],
    device: str | None,
    precision: str | None,
    api_key: str | None,
) -> tuple[str, subprocess.Popen]:
    """Start ``python -m blindnet.serve`` on a free local port; returns its URL and process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = _server_command(
        ckpt, backend, port, max_batch_size, max_queue_delay_ms, concurrencies, device, precision, api_key
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(cmd, env=env)
    return url, proc


def _server_command(
    ckpt: Path,
    backend: str,
    port: int,
    max_batch_size: int,
    max_queue_delay_ms: float,
    concurrencies: Sequence[int],
    device: str | None,
    precision: str | None,
    api_key: str | None,
) -> list[str]:
    """The ``python -m blindnet.serve`` command line of the server under load."""
    cmd = [sys.executable, "-m", "blindnet.serve", "--checkpoint", str(ckpt), "--backend", backend, "--port", str(port)]
    cmd += ["--max-batch-size", str(max_batch_size), "--max-queue-delay-ms", str(max_queue_delay_ms)]
    cmd += ["--max-queue-size", str(max(64, 2 * max(concurrencies))), "--log-level", "warning"]
    for flag, value in (("--device", device), ("--precision", precision), ("--api-key", api_key)):
        if value is not None:
            cmd += [flag, value]
    return cmd


def _request_bodies(images: list[np.ndarray], protocol: str) -> list[tuple[Any, ...]]:
    """``(path, body, headers)`` of one request per image in the chosen protocol."""
    if protocol == "v2":
        return [(client.infer_path(), *client.encode_infer(img[None])) for img in images]
    return [("/v1/segment", client.encode_upload(img), {"Content-Type": "image/png"}) for img in images]


def _measure_level(
    url: str,
    bodies: list[tuple[Any, ...]],
    concurrency: int,
    requests: int,
    max_seconds: float,
    headers: dict[str, str],
    expected: list[np.ndarray] | None,
    proc: subprocess.Popen | None,
) -> LevelResult:
    """One closed-loop level: latencies, the server's batching (from /v1/stats) and, for our own server, its CPU."""
    verify = expected is not None
    before = _stats(url, headers)
    cpu0 = process_cpu_seconds(proc.pid) if proc is not None else None
    lat, errors, wall, mismatches = asyncio.run(
        _run_level(
            url,
            bodies,
            concurrency=concurrency,
            requests=requests,
            max_seconds=max_seconds,
            headers=headers,
            expected=expected,
        )
    )
    after = _stats(url, headers)
    cpu1 = process_cpu_seconds(proc.pid) if proc is not None else None
    batches = after["batches"] - before["batches"]
    imgs = after["images"] - before["images"]
    ms = np.asarray(lat) * 1000 if lat else np.asarray([np.nan])
    rate = len(lat) / wall if wall > 0 else 0.0
    level = LevelResult(
        concurrency=concurrency,
        requests=len(lat) + errors,
        errors=errors,
        seconds=round(wall, 3),
        images_per_s=round(rate, 2),
        p50_ms=round(float(np.percentile(ms, 50)), 2),
        p90_ms=round(float(np.percentile(ms, 90)), 2),
        p99_ms=round(float(np.percentile(ms, 99)), 2),
        # Behind a load balancer (Ray Serve) /v1/stats answers from one replica per call, so the
        # difference can mix replicas: only a positive count of both is reported.
        mean_batch_size=round(imgs / batches, 2) if batches > 0 and imgs > 0 else None,
        fraction_of_predictor=None,  # filled in once the baseline is final
        server_cpu_ms_per_image=(
            round((cpu1 - cpu0) * 1000 / imgs, 2) if cpu0 is not None and cpu1 is not None and imgs else None
        ),
        mismatches=mismatches if verify else None,
    )
    print(
        f"concurrency {concurrency:4d}: {rate:8.2f} img/s  p50 {level.p50_ms:8.1f} ms  "
        f"p99 {level.p99_ms:8.1f} ms  mean batch {level.mean_batch_size}  errors {errors}"
        + (f"  mismatches {mismatches}" if verify else ""),
        flush=True,
    )
    return level


def _stop_server(proc: subprocess.Popen | None) -> None:
    """Terminate the server we started (None: a server we did not start), killing it if it does not exit in a minute."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def _compare_with_predictor(levels: list[LevelResult], base: float, cpu_ms: float) -> None:
    """Fill each level's fraction of the Predictor's throughput and its CPU efficiency, and print them."""
    for lv in levels:
        lv.fraction_of_predictor = round(lv.images_per_s / base, 3)
        if lv.server_cpu_ms_per_image:
            lv.cpu_efficiency = round(cpu_ms / lv.server_cpu_ms_per_image, 3)
        print(
            f"concurrency {lv.concurrency:4d}: {lv.fraction_of_predictor} of the Predictor's {base:.2f} img/s; "
            f"CPU per image {lv.server_cpu_ms_per_image} ms vs the Predictor's {cpu_ms:.1f} ms "
            f"(efficiency {lv.cpu_efficiency})"
        )


def write_report(report: LoadReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``load_<backend>_<device>_<H>x<W>.json`` and ``.csv``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    b = report.setup["backend"]
    h, w = report.setup["image_size"]
    stem = f"load_{b.get('backend', 'backend')}_{b.get('device', 'na')}_{h}x{w}_{report.setup['protocol']}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(asdict(report), indent=2) + "\n")
    csv_path = out_dir / f"{stem}.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for lv in report.levels:
            writer.writerow({k: getattr(lv, k) for k in CSV_FIELDS})
    return json_path, csv_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blindnet.benchmarks.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="model to serve (default: shipped checkpoint, else random-init --backbone)")
    p.add_argument("--backbone", default="mobilenetv2", help="random-init backbone when no checkpoint exists")
    p.add_argument("--backend", default="torch", choices=BACKEND_NAMES)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default=None)
    p.add_argument("--size", type=int, nargs=2, default=[256, 512], metavar=("H", "W"))
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32])
    p.add_argument("--requests", type=int, default=160, help="requests per concurrency level")
    p.add_argument("--max-seconds", type=float, default=30.0, help="time cap per level")
    p.add_argument("--baseline-seconds", type=float, default=5.0)
    p.add_argument("--protocol", default="v2", choices=["v2", "segment"])
    p.add_argument("--url", help="load an already running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("BLINDNET_API_KEY"))
    p.add_argument("--out", default=str(RESULTS_DIR), help="results folder")
    p.add_argument("--verify", action="store_true", help="check every answer against the in-process Predictor")
    p.add_argument(
        "--soak",
        type=float,
        metavar="SECONDS",
        help="instead of the levels: SECONDS of valid and hostile requests mixed at the largest --concurrency, "
        "against the server at its default limits (writes soak_*.json)",
    )
    return p


def run_soak_benchmark(args: argparse.Namespace) -> int:
    """``--soak``: start the server at its default limits, mix valid and hostile traffic, print and write the result."""
    h, w = args.size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(4)]
    images += [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(2)]  # small: also sent as JSON
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, ckpt_source = _resolve_checkpoint(args.checkpoint, args.backbone, Path(tmp))
        predictor = Predictor(make_backend(args.backend, ckpt), batch_size=8)
        expected = [p.labels for p in predictor.predict(images)]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "blindnet.serve", "--checkpoint", str(ckpt), "--backend", args.backend]
        cmd += ["--port", str(port), "--log-level", "warning"]
        root = str(Path(__file__).resolve().parents[1])
        proc = subprocess.Popen(
            cmd, env={**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        )
        try:
            _wait_ready(url, proc)
            _warm_up(url, _request_bodies(images[:4], "v2"), 8, {})
            setup = {"checkpoint": ckpt_source, "backend": args.backend, "image_size": [h, w], "command": cmd[1:]}
            report = run_soak(
                url,
                proc.pid,
                images=images,
                expected=expected,
                png_bomb=png_bomb(4000, 4000),
                concurrency=max(args.concurrency),
                seconds=args.soak,
                setup=setup,
            )
        finally:
            _stop_server(proc)
    print(json.dumps({k: v for k, v in asdict(report).items() if k != "setup"}, indent=2))
    print(f"written: {write_soak_report(report, args.out)}")
    return 0 if not report.mismatches and not report.hostile_unexpected else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.soak:
        return run_soak_benchmark(args)
    report = run_load_benchmark(
        checkpoint=args.checkpoint,
        backbone=args.backbone,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        image_size=tuple(args.size),
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        concurrencies=args.concurrency,
        requests=args.requests,
        max_seconds=args.max_seconds,
        protocol=args.protocol,
        url=args.url,
        api_key=args.api_key,
        baseline_seconds=args.baseline_seconds,
        out_dir=args.out,
        verify=args.verify,
    )
    print(
        f"Predictor batched throughput: {report.predictor_images_per_s} img/s; best server fraction: "
        f"{report.best_fraction} (target >= 0.85)"
    )
    for note in report.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
