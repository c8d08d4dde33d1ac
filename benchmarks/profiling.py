"""Where one call's time goes: torch.profiler (or ONNX Runtime's own profiler) grouped by layer type."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blindnet.backends.onnxruntime_backend import ort_session
from blindnet.benchmarks.timing import Runner
from blindnet.io import quiet_native_stderr

#: Op/kernel name patterns -> layer type, checked in order (first match wins).
OP_TYPES: tuple[tuple[str, str], ...] = (
    ("convolution", r"conv|cudnn|implicit_gemm|fprop|winograd|mkldnn_conv|dgrad|xmma_fprop|sm\d+_xmma.*conv"),
    ("matmul", r"gemm|matmul|\bmm\b|addmm|bmm|cutlass|xmma"),
    ("normalization", r"norm|welford|var_mean|native_batch|instance"),
    ("interpolation", r"upsample|interp|resize|bilinear|grid_sample"),
    ("activation", r"^relu$|^clip$|^sigmoid$|hardswish"),
    ("pooling/reduction", r"pool|reduce|argmax|\bmax\b|\bmean\b|\bsum\b"),
    (
        "copy/layout/cast",
        r"copy|cast|\bto\b|contiguous|\bcat\b|concat|nchw|nhwc|transpose|permute|memcpy|memset|reorder",
    ),
    ("allocation", r"empty|fill|expand|clone|zero"),
    ("fused (triton)", r"triton"),
    ("elementwise", r"relu|add|mul|div|sub|clamp|hardtanh|sigmoid|elementwise|vectorized|unrolled|where"),
)


def op_type(name: str) -> str:
    """Layer type of an op or kernel name (see :data:`OP_TYPES`), ``other`` when nothing matches."""
    low = name.lower()
    for kind, pattern in OP_TYPES:
        if re.search(pattern, low):
            return kind
    return "other"


def profile_runner(runner: Runner, device: str, iterations: int = 5) -> dict[str, Any]:
    """Where one call's time goes: self time per op (CPU) or per kernel (CUDA), grouped by layer type.

    Returns ``{"unit": "ms per call", "by_type": [{type, ms, share}], "top_ops": [{name, type, calls, ms}]}``.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    n = len(runner.inputs)
    # The profiler's native start/stop lines (and a CUDA probe error on CPU-only machines) are noise to the reader.
    with quiet_native_stderr(), profile(activities=activities) as prof:
        for i in range(iterations):
            runner.fn(runner.inputs[i % n])
        if device == "cuda":
            torch.cuda.synchronize()
    per_name: dict[str, dict[str, float]] = {}
    for evt in prof.key_averages():
        if device == "cuda":
            # Kernels carry device time; CPU-side ops have none of their own (their kernels are counted).
            t_us = float(getattr(evt, "self_device_time_total", 0.0) or getattr(evt, "self_cuda_time_total", 0.0))
        else:
            t_us = float(evt.self_cpu_time_total)
        if t_us <= 0:
            continue
        entry = per_name.setdefault(evt.key, {"us": 0.0, "calls": 0})
        entry["us"] += t_us
        entry["calls"] += int(evt.count)
    return summarise_profile(per_name, iterations, "GPU kernel time" if device == "cuda" else "CPU self time")


def summarise_profile(per_name: dict[str, dict[str, float]], iterations: int, clock: str) -> dict[str, Any]:
    """``{name: {us, calls}}`` summed over ``iterations`` calls -> per-call table by layer type and top ops."""
    total_us = sum(e["us"] for e in per_name.values()) or 1.0
    by_type: dict[str, float] = {}
    for name, e in per_name.items():
        by_type[op_type(name)] = by_type.get(op_type(name), 0.0) + e["us"]
    top = sorted(per_name.items(), key=lambda kv: kv[1]["us"], reverse=True)[:15]
    return {
        "unit": "ms per call",
        "clock": clock,
        "iterations": iterations,
        "total_ms": total_us / 1e3 / iterations,
        "by_type": [
            {"type": k, "ms": v / 1e3 / iterations, "share": v / total_us}
            for k, v in sorted(by_type.items(), key=lambda kv: kv[1], reverse=True)
        ],
        "top_ops": [
            {
                "name": name[:120],
                "type": op_type(name),
                "calls": int(e["calls"]) // iterations,
                "ms": e["us"] / 1e3 / iterations,
                "share": e["us"] / total_us,
            }
            for name, e in top
        ],
    }


def ort_profile(
    path: Path, threads: int, providers: list[Any], input_name: str, inputs: list[np.ndarray], iterations: int, tmp: str
) -> dict[str, Any]:
    """ONNX Runtime's own node profiler (torch.profiler cannot see inside ORT), grouped like :func:`profile_runner`."""
    session = ort_session(
        path, providers=providers, threads=threads, inter_op_threads=1, profile_prefix=str(Path(tmp) / "ort-profile")
    )
    session.run(None, {input_name: inputs[0]})  # warm-up call, excluded below by counting only the last runs
    for i in range(iterations):
        session.run(None, {input_name: inputs[i % len(inputs)]})
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink(missing_ok=True)
    per_name: dict[str, dict[str, float]] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        op = str(e.get("args", {}).get("op_name", "?"))
        entry = per_name.setdefault(op, {"us": 0.0, "calls": 0})
        entry["us"] += float(e.get("dur", 0))
        entry["calls"] += 1
    # Every op ran iterations + 1 times (one warm-up); scale to one call.
    for entry in per_name.values():
        entry["us"] *= iterations / (iterations + 1)
        entry["calls"] = int(round(entry["calls"] * iterations / (iterations + 1)))
    return summarise_profile(per_name, iterations, "ONNX Runtime node time (op types)")
