"""How a time is taken: random input pools, warm-up then isolated timed calls, and the float32/TF32 precision flags.

A :class:`Runner` is what the timer consumes (``fn(x)`` plus its input pool); :mod:`blindnet.benchmarks.runners`
builds one per variant.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Runner:
    """A prepared variant: ``fn(x)`` runs one batch; ``inputs`` is its random input pool."""

    fn: Callable[[Any], Any]
    inputs: list[Any]
    sync: Callable[[], None] | None = None
    note: str = ""
    check: Callable[[], None] | None = None
    #: a backend's own profiler (ONNX Runtime), used instead of torch.profiler: ``profile(iterations) -> dict``
    profile: Callable[[int], dict[str, Any]] | None = None


@dataclass
class Timing:
    """Per-trial times in milliseconds, plus what was actually run."""

    ms: np.ndarray
    warmup: int
    trials: int

    def stats(self) -> dict[str, float]:
        ms = self.ms
        return {
            "mean_ms": float(ms.mean()),
            "median_ms": float(np.median(ms)),
            "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)),
            "min_ms": float(ms.min()),
            "std_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        }


def time_calls(
    fn: Callable[[Any], Any],
    inputs: Sequence[Any],
    *,
    device: str,
    warmup: int,
    trials: int,
    max_seconds: float | None = None,
    sync: Callable[[], None] | None = None,
) -> Timing:
    """Time ``fn(inputs[i % len(inputs)])`` after warm-up.

    CUDA: synchronize, record an event, call, record an event, wait for it: each trial is one isolated latency.
    CPU (or a backend that synchronises itself, e.g. ONNX Runtime): ``time.perf_counter`` around the call, after
    ``sync`` if given. ``max_seconds`` caps the total: the number of trials is cut (and returned) when one is slow.
    """
    n = len(inputs)
    if n == 0:
        raise ValueError("time_calls needs at least one input")
    use_events = device == "cuda" and sync is None
    budget = math.inf if max_seconds is None else max_seconds
    t_start = time.perf_counter()
    done_warmup = 0
    for i in range(warmup):
        fn(inputs[i % n])
        done_warmup += 1
        if device == "cuda":
            torch.cuda.synchronize()
        # Slow cases (CPU at full size): keep a few warm-up calls but do not spend the budget on them.
        if done_warmup >= 2 and time.perf_counter() - t_start > budget / 4:
            break
    if device == "cuda":
        torch.cuda.synchronize()
    times: list[float] = []
    t_timed = time.perf_counter()
    if use_events:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for i in range(trials):
            x = inputs[(done_warmup + i) % n]
            torch.cuda.synchronize()
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            if i >= 2 and time.perf_counter() - t_timed > budget:
                break
    else:
        for i in range(trials):
            x = inputs[(done_warmup + i) % n]
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            fn(x)
            if sync is not None:
                sync()
            times.append((time.perf_counter() - t0) * 1e3)
            if i >= 2 and time.perf_counter() - t_timed > budget:
                break
    return Timing(np.asarray(times, dtype=np.float64), done_warmup, len(times))


def input_pool(
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    channels_last: bool,
    pool_bytes: int,
    seed: int,
) -> list[torch.Tensor]:
    """2 to 8 random normal tensors (ImageNet-normalised images are roughly N(0, 1)) on ``device``."""
    per = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    count = int(max(2, min(8, pool_bytes // max(per, 1))))
    g = torch.Generator(device="cpu").manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [
        torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        for _ in range(count)
    ]


def uint8_pool(batch: int, size: tuple[int, int], seed: int, count: int = 4) -> list[np.ndarray]:
    """Random ``batch x H x W x 3`` uint8 image batches for the end-to-end path."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(batch, *size, 3), dtype=np.uint8) for _ in range(count)]


def _precision_flag_holders() -> list:
    """The per-backend ``fp32_precision`` flag holders of PyTorch's new precision API (cuDNN conv, CUDA matmul and
    cuDNN RNN, in that order); empty on a PyTorch without that API."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        return []
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    return [h for h in (conv, torch.backends.cuda.matmul, rnn) if h is not None]


@contextlib.contextmanager
def _fp32_precision(values: Sequence[str]) -> Iterator[None]:
    """Set the new API's flags (one value per holder of :func:`_precision_flag_holders`), restoring them afterwards."""
    holders = _precision_flag_holders()
    saved = [h.fp32_precision for h in holders]
    for h, v in zip(holders, values):
        h.fp32_precision = v
    try:
        yield
    finally:
        for h, v in zip(holders, saved):
            h.fp32_precision = v


@contextlib.contextmanager
def float32_matmul_mode(tf32: bool) -> Iterator[None]:
    """Run float32 convolutions/matmuls in true float32 (``tf32=False``) or TF32 (``True``), restoring afterwards.

    PyTorch lets cuDNN convolutions use TF32 by default, so an honest "float32" row must switch it off.
    """
    holders = _precision_flag_holders()
    if holders:
        # cuDNN RNN must follow conv: torch.export reads the legacy cudnn flag and refuses mixed conv/RNN settings.
        with _fp32_precision(["tf32" if tf32 else "ieee"] * len(holders)):
            yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# The flags as PyTorch set them at start-up (this module is imported before any variant changes them).
_IMPORT_TIME_PRECISION = [h.fp32_precision for h in _precision_flag_holders()]


@contextlib.contextmanager
def exportable() -> Iterator[None]:
    """Leave inference mode and put the precision flags back to their start-up values for an ONNX export.

    Runners are built under inference_mode, which torch.export (the dynamo exporter) cannot trace through (without
    this only TorchScript is tried, which cannot export ShuffleNetV2); and torch.export reads the legacy
    ``cudnn.allow_tf32`` flag, which raises once the new precision API has set anything, as the timing variants do.
    """
    with torch.inference_mode(False), _fp32_precision(_IMPORT_TIME_PRECISION):
        yield
