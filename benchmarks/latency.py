"""Latency and throughput of the deployable network, measured the way careful GPU benchmarking asks.

One call, :func:`run_benchmarks`, measures every (model, variant, batch) combination a :class:`BenchConfig` names and
returns flat row dicts (schema: :data:`ROW_FIELDS`, documented in ``benchmarks/results/README.md``).

How a time is taken (and why):

* Inputs are a pool of pre-generated *random* tensors on the device (never zeros: zeros can run faster than real data
  and hide unwritten outputs); each trial takes the next tensor of the pool, so no trial re-reads the same buffer
  straight out of cache.
* Warm-up first (CUDA context, cuDNN algorithm search, ``torch.compile``, ONNX Runtime's per-shape conv search), then
  ``trials`` timed calls. On CUDA each trial is bracketed by CUDA events after a synchronize, so one trial is one
  isolated batch latency, launch gaps included; on CPU ``time.perf_counter`` around a synchronous call.
* We report mean, median, p90, p99, min and std; images/s and achieved TFLOP/s come from the median.
* "network" rows time the bare network (normalised float input -> logits) as the paper's table does; "end-to-end" rows
  time :class:`blindnet.inference.Predictor` (uint8 images in, label maps on the host out), which is what a caller of
  the package experiences.

Nothing here imports ``blindnet.task`` or ``blindnet.losses``: benchmarks measure the deployable network only.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import re
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from blindnet.backends.onnxruntime_backend import OnnxBackend, ort_providers, ort_session
from blindnet.backends.torch_backend import TorchBackend
from blindnet.benchmarks.config import (
    PAPER_NOTE,
    PAPER_ROW,
    PEER_MODEL,
    R50_FLOPS_2048,
    ROW_FIELDS,
    BenchConfig,
    Variant,
)
from blindnet.checkpoint import load_model
from blindnet.export.cost import cost_report
from blindnet.export.int8 import quantize_int8
from blindnet.export.onnx import export_onnx
from blindnet.inference import Predictor
from blindnet.models import ModelConfig, build_model, count_parameters


class Skip(Exception):
    """A variant cannot run here (library or hardware missing); the row says why instead of failing the run."""


# --------------------------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------------------------


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi(query: str) -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?"))
    except Exception:  # noqa: BLE001 - any import failure means "not installed" here
        return ""


def environment_info(device: str) -> dict[str, Any]:
    """Facts that make a number reproducible: device, driver, clocks, library versions, threads."""
    info: dict[str, Any] = {
        "device_type": device,
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "onnxruntime": _version("onnxruntime"),
        "tensorrt": _version("tensorrt"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model_name(),
        "threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "",
        "cuda": torch.version.cuda or "",
        "cudnn": "",
        "driver": "",
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            device_name=torch.cuda.get_device_name(0),
            cudnn=str(torch.backends.cudnn.version() or ""),
            driver=_nvidia_smi("driver_version"),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            # Clocks and power limit as found (we never change them); a throttled card explains odd numbers.
            clocks=_nvidia_smi("clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"),
        )
    else:
        info["device_name"] = info["cpu"]
    return info


def device_slug(info: dict[str, Any]) -> str:
    """File-name-safe device id: ``cpu-amd-epyc``, ``cuda-nvidia-h100-80gb-hbm3``."""
    name = re.sub(r"\(r\)|\(tm\)", "", str(info.get("device_name", "")).lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"{info['device_type']}-{name or 'unknown'}"


# --------------------------------------------------------------------------------------------------------------------
# Models and their cost
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """A network to time: our DeepLabV3+ (BlindNet or baseline) or the torchvision peer."""

    name: str
    network: str  # blindnet | baseline | peer
    backbone: str
    config: ModelConfig | None = None  # None for the peer

    def build(self, device: str = "cpu") -> nn.Module:
        """The module on ``device`` (``meta`` builds no storage: used for counting)."""
        with torch.device(device):
            if self.config is None:
                return _peer_model()
            return build_model(replace(self.config))


class _LogitsOnly(nn.Module):
    """torchvision segmentation models return ``{"out": ...}``; time the same ``x -> logits`` contract as ours."""

    def __init__(self, model: nn.Module, num_classes: int = 19) -> None:
        super().__init__()
        self.model = model
        self.config = ModelConfig(num_classes=num_classes)  # read by TorchBackend for num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _peer_model() -> nn.Module:
    from torchvision.models.segmentation import deeplabv3_resnet50

    # weights=None, weights_backbone=None: no downloads; same 19 classes as ours so the heads match.
    return _LogitsOnly(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=19, aux_loss=False))


def model_specs(cfg: BenchConfig) -> list[ModelSpec]:
    """Models in measuring order: the headline (first backbone, first network) first, the peer last."""
    specs = [
        ModelSpec(f"{net}-{bb}", net, bb, ModelConfig(backbone=bb, instance_norm=(net == "blindnet")))
        for bb in cfg.backbones
        for net in cfg.networks
    ]
    if cfg.peer:
        specs.append(ModelSpec(PEER_MODEL, "peer", "resnet50"))
    return specs


@dataclass
class Cost:
    """Parameters and arithmetic of one model at one resolution (batch 1)."""

    params_deployable: int
    params_paper: int | None
    macs_g: float
    flops_g: float
    flop_counter: str


def model_cost(spec: ModelSpec, size: tuple[int, int]) -> Cost:
    """Count parameters and operations for a ``1 x 3 x H x W`` input.

    Uses :func:`blindnet.export.cost.cost_report` (thop-style MACs, paper-comparable params with the aux
    head); otherwise ``FlopCounterMode`` on the meta device (FLOPs = 2 x conv/matmul MACs, no storage, no time).
    """
    h, w = size
    if spec.config is not None:
        return _cost_from_blindnet(spec.config, size)
    model = spec.build("meta").eval()
    flops = _meta_flops(model, (1, 3, h, w))
    return Cost(
        params_deployable=count_parameters(model),
        params_paper=None,
        macs_g=flops / 2e9,
        flops_g=flops / 1e9,
        flop_counter=f"torch FlopCounterMode {torch.__version__} (meta device; FLOPs = 2 x conv/matmul MACs)",
    )


def _meta_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty(shape))
    return int(counter.get_total_flops())


def _cost_from_blindnet(config: ModelConfig, size: tuple[int, int]) -> Cost:
    """Counts from :mod:`blindnet.export.cost` (thop-style MACs as the paper counts, paper-comparable params with the
    aux head)."""
    report = cost_report(replace(config), sizes=[size], baseline=False)
    params = report["parameters"]
    costs = report["costs"][0]
    return Cost(
        params_deployable=int(params["deployable"]),
        params_paper=int(params["paper_comparable"]),
        macs_g=costs["thop"]["macs"] / 1e9,
        flops_g=costs["flop_counter"]["flops"] / 1e9,
        flop_counter="MACs: thop convention (blindnet.export.cost); FLOPs: FlopCounterMode (2 x conv MACs)",
    )


def _maybe_int(x: Any) -> int | None:
    return None if x is None else int(x)


@torch.no_grad()
def settle_batchnorm(model: nn.Module, size: tuple[int, int], device: torch.device, seed: int = 0) -> None:
    """Give a randomly initialised model batch-norm statistics measured on random data.

    Default statistics (mean 0, var 1) let activations of deep random networks grow large; in float16 that can
    overflow to inf, which would make the finiteness check meaningless. Timing does not depend on these values.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    g = torch.Generator(device="cpu").manual_seed(seed)
    h, w = min(size[0], 256), min(size[1], 512)
    x = torch.randn(2, 3, h, w, generator=g).to(device)
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calls below
    model.train()
    for _ in range(2):
        model(x)
    model.eval()
    for m, mom in zip(bns, saved):
        m.momentum = mom


def load_models(spec: ModelSpec, cfg: BenchConfig, device: torch.device) -> tuple[nn.Module, str]:
    """The float32 eval-mode model on ``device`` and a word on its weights."""
    if spec.config is not None and cfg.checkpoint:

        loaded = load_model(cfg.checkpoint)
        # The checkpoint replaces the random network it matches (same backbone and variant); others stay random.
        if (loaded.config.backbone, loaded.config.instance_norm) == (spec.config.backbone, spec.config.instance_norm):
            return loaded.eval().to(device), f"checkpoint {Path(cfg.checkpoint).name}"
    torch.manual_seed(cfg.seed)
    model = spec.build("cpu").to(device)
    settle_batchnorm(model, cfg.size, device, cfg.seed)
    return model.eval(), "random init (BN settled on random data)"


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Runners: a variant turned into ``fn(x)`` plus its input pool
# --------------------------------------------------------------------------------------------------------------------

_TORCH_DTYPES = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def torch_runner(model: nn.Module, variant: Variant, shape: tuple[int, ...], cfg: BenchConfig) -> Runner:
    """Eager or compiled PyTorch. Low precision casts the weights (no autocast casts inside the timed region)."""
    device = torch.device(cfg.device)
    if variant.precision == "float16" and device.type == "cpu":
        raise Skip("float16 is not supported on CPU")
    if variant.precision == "tf32" and device.type != "cuda":
        raise Skip("TF32 exists on CUDA GPUs only")
    if variant.precision == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise Skip("this GPU has no bfloat16 support")
    dtype = _TORCH_DTYPES[variant.precision]
    net = model.to(dtype=dtype)
    if variant.channels_last:
        net = net.to(memory_format=torch.channels_last)
    run: Callable[[torch.Tensor], torch.Tensor] = net
    mark_step: Callable[[], None] | None = None
    if variant.compile:
        torch._dynamo.reset()
        # dynamic=False: every batch size gets its own static graph (what CUDA graphs and autotuning need), instead
        # of the shape-generic kernels dynamo would switch to after the first new shape.
        run = torch.compile(net, mode=None if variant.compile == "default" else variant.compile, dynamic=False)
        if variant.compile != "default":
            mark_step = torch.compiler.cudagraph_mark_step_begin
    inputs = input_pool(
        shape,
        dtype=dtype,
        device=device,
        channels_last=variant.channels_last,
        pool_bytes=cfg.pool_bytes,
        seed=cfg.seed + 1,
    )
    last: dict[str, torch.Tensor] = {}

    def fn(x: torch.Tensor) -> torch.Tensor:
        if mark_step is not None:
            mark_step()
        out = run(x)
        last["out"] = out
        return out

    def check() -> None:
        out = last.get("out")
        if out is None:
            return
        expect = (shape[0], 19, shape[2], shape[3])
        if tuple(out.shape) != expect:
            raise RuntimeError(f"network output has shape {tuple(out.shape)}, expected {expect}")
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError("network output contains NaN or Inf")

    note = "weights and activations in " + variant.precision if dtype != torch.float32 else ""
    return Runner(fn=fn, inputs=inputs, note=note, check=check)


# The flags as PyTorch set them at start-up (this module is imported before any variant changes them).
_IMPORT_TIME_PRECISION = [h.fp32_precision for h in _precision_flag_holders()]


@contextlib.contextmanager
def _exportable() -> Iterator[None]:
    """Leave inference mode and put the precision flags back to their start-up values for an ONNX export.

    Runners are built under inference_mode, which torch.export (the dynamo exporter) cannot trace through (without
    this only TorchScript is tried, which cannot export ShuffleNetV2); and torch.export reads the legacy
    ``cudnn.allow_tf32`` flag, which raises once the new precision API has set anything, as the timing variants do.
    """
    with torch.inference_mode(False), _fp32_precision(_IMPORT_TIME_PRECISION):
        yield


def _export_onnx(model: nn.Module, path: Path, *, fp16: bool, shape: tuple[int, ...], exporter: str = "auto") -> Path:
    """Export the raw network (normalised float input -> logits) through the project's exporter."""
    if not path.exists():
        cpu_model = model.float().to("cpu").to(memory_format=torch.contiguous_format).eval()
        with _exportable():
            export_onnx(cpu_model, path, normalize_input=False, argmax=False, fp16=fp16, exporter=exporter)
    return path


def ort_runner(model: nn.Module, variant: Variant, shape: tuple[int, ...], cfg: BenchConfig, workdir: Path) -> Runner:
    """ONNX Runtime on the CPU or CUDA execution provider. CUDA inputs/outputs stay on the GPU (IO binding)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise Skip(f"onnxruntime is not installed ({exc})") from exc
    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[variant.provider or "cpu"]
    if provider not in ort.get_available_providers():
        raise Skip(f"{provider} is not available in this onnxruntime build")
    if provider == "CUDAExecutionProvider" and cfg.device != "cuda":
        raise Skip("the CUDA execution provider needs --device cuda")
    fp16 = variant.precision == "float16"
    name = getattr(model, "_bench_name", "model")
    path = _export_onnx(
        model, workdir / f"{name}-{'fp16' if fp16 else 'fp32'}.onnx", fp16=fp16, shape=shape, exporter=cfg.onnx_exporter
    )
    if variant.precision == "int8":
        # The Q/DQ INT8 file the package serves (blindnet.export.int8), calibrated on a few generated scenes.
        path = quantize_int8(path, workdir / f"{name}-int8qdq.onnx", calibration=4, size=(256, 512))
    threads = cfg.threads or torch.get_num_threads()
    # EXHAUSTIVE: the benchmark times one fixed shape, so the best conv algorithms are worth searching for once.
    providers = ort_providers("cuda" if provider == "CUDAExecutionProvider" else "cpu", conv_algo_search="EXHAUSTIVE")
    session = ort_session(path, providers=providers, threads=threads, inter_op_threads=1)
    if session.get_providers()[0] != provider:
        # ORT silently falls back to the CPU when the CUDA provider's libraries do not load: never label that "cuda".
        raise Skip(f"{provider} did not load (session runs on {session.get_providers()}); check CUDA/cuDNN libraries")
    in_meta, out_meta = session.get_inputs()[0], session.get_outputs()[0]
    # The exporter keeps float32 at the graph boundary of float16 graphs; read what this file wants.
    in_np = np.float16 if "float16" in in_meta.type else np.float32
    out_np = np.float16 if "float16" in out_meta.type else np.float32
    note = f"{provider}, {threads} intra-op threads" if provider == "CPUExecutionProvider" else provider
    if provider == "CPUExecutionProvider":
        rng = np.random.default_rng(cfg.seed + 2)
        per = math.prod(shape) * np.dtype(in_np).itemsize
        count = int(max(2, min(8, cfg.pool_bytes // per)))
        inputs = [rng.standard_normal(shape, dtype=np.float32).astype(in_np) for _ in range(count)]
        last: dict[str, np.ndarray] = {}

        def fn(x: np.ndarray) -> Any:
            last["out"] = session.run([out_meta.name], {in_meta.name: x})[0]
            return last["out"]

        def check() -> None:
            out = last.get("out")
            if out is not None and not np.isfinite(out).all():
                raise RuntimeError("onnxruntime output contains NaN or Inf")

        def profile(iterations: int) -> dict[str, Any]:
            return _ort_profile(path, threads, providers, in_meta.name, inputs, iterations, str(workdir))

        return Runner(fn=fn, inputs=inputs, note=note, check=check, profile=profile)
    # CUDA EP: bind torch device buffers so the timed call is GPU compute, not PCIe copies.
    in_t = torch.float16 if in_np is np.float16 else torch.float32
    out_t = torch.float16 if out_np is np.float16 else torch.float32
    inputs = input_pool(
        shape, dtype=in_t, device=torch.device("cuda"), channels_last=False, pool_bytes=cfg.pool_bytes, seed=cfg.seed
    )
    out = torch.empty((shape[0], 19, shape[2], shape[3]), dtype=out_t, device="cuda")
    binding = session.io_binding()

    def fn_cuda(x: torch.Tensor) -> torch.Tensor:
        binding.bind_input(in_meta.name, "cuda", 0, in_np, tuple(x.shape), x.data_ptr())
        binding.bind_output(out_meta.name, "cuda", 0, out_np, tuple(out.shape), out.data_ptr())
        session.run_with_iobinding(binding)
        return out

    return Runner(fn=fn_cuda, inputs=inputs, sync=torch.cuda.synchronize, note=note + ", IO binding")


def _ort_profile(
    path: Path, threads: int, providers: list[Any], input_name: str, inputs: list[np.ndarray], iterations: int, tmp: str
) -> dict[str, Any]:
    """ONNX Runtime's own node profiler (torch.profiler cannot see inside ORT), grouped like :func:`profile_runner`."""
    import json

    session = ort_session(path, providers=providers, threads=threads, inter_op_threads=1,
                          profile_prefix=str(Path(tmp) / "ort-profile"))
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
    return _summarise_profile(per_name, iterations, "ONNX Runtime node time (op types)")


def trt_runner(model: nn.Module, variant: Variant, shape: tuple[int, ...], cfg: BenchConfig, workdir: Path) -> Runner:
    """A TensorRT engine built here from the ONNX export for exactly this shape (float16)."""
    if cfg.device != "cuda":
        raise Skip("TensorRT needs --device cuda")
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise Skip(f"tensorrt is not installed ({exc})") from exc
    if variant.precision == "int8":
        # Timing int8 with made-up dynamic ranges would publish a number for an engine nobody can deploy.
        raise Skip("int8 needs a calibration set (or a Q/DQ ONNX from ModelOpt); not timed with made-up ranges")
    strongly_typed = not hasattr(trt.BuilderFlag, "FP16")  # TensorRT 11 removed the weak-typing flags
    onnx_path = _export_onnx(
        model,
        workdir / f"{getattr(model, '_bench_name', 'model')}-{'fp16' if strongly_typed else 'fp32'}.onnx",
        fp16=strongly_typed,
        shape=shape,
        exporter=cfg.onnx_exporter,
    )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 8 << 30)
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    inp, outp = network.get_input(0), network.get_output(0)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    context.set_input_shape(inp.name, shape)
    in_dtype = torch.float16 if engine.get_tensor_dtype(inp.name) == trt.DataType.HALF else torch.float32
    inputs = input_pool(
        shape,
        dtype=in_dtype,
        device=torch.device("cuda"),
        channels_last=False,
        pool_bytes=cfg.pool_bytes,
        seed=cfg.seed,
    )
    out_dtype = torch.float16 if engine.get_tensor_dtype(outp.name) == trt.DataType.HALF else torch.float32
    out = torch.empty(tuple(context.get_tensor_shape(outp.name)), dtype=out_dtype, device="cuda")
    context.set_tensor_address(outp.name, out.data_ptr())

    def fn(x: torch.Tensor) -> torch.Tensor:
        context.set_tensor_address(inp.name, x.data_ptr())
        context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return out

    note = f"TensorRT {trt.__version__}, {'strongly typed fp16 ONNX' if strongly_typed else 'FP16 builder flag'}"
    return Runner(fn=fn, inputs=inputs, note=note)


def end_to_end_runner(model: nn.Module, variant: Variant, batch: int, cfg: BenchConfig) -> Runner:
    """The Predictor path: uint8 ``N x H x W x 3`` on the host in, label maps on the host out."""

    precision = "float32" if variant.precision == "tf32" else variant.precision
    backend = TorchBackend(
        model.float(),
        device=cfg.device,
        precision=precision,
        channels_last=variant.channels_last,
        compile=False if variant.compile is None else (variant.compile if variant.compile != "default" else True),
    )
    predictor = Predictor(backend, batch_size=batch)
    pool = uint8_pool(batch, cfg.size, cfg.seed + 3)

    def fn(images: np.ndarray) -> Any:
        return predictor.predict_arrays(list(images))

    sync = torch.cuda.synchronize if cfg.device == "cuda" else None
    note = "Predictor + TorchBackend (autocast), uint8 in, labels on host out"
    return Runner(fn=fn, inputs=pool, sync=sync, note=note)


def ort_end_to_end_runner(model: nn.Module, variant: Variant, batch: int, cfg: BenchConfig, workdir: Path) -> Runner:
    """The Predictor over :class:`OnnxBackend` on a deployment export (uint8 NHWC in, normalise + argmax in-graph)."""

    fp16 = variant.precision == "float16"
    path = workdir / f"{getattr(model, '_bench_name', 'model')}-deploy-{'fp16' if fp16 else 'fp32'}.onnx"
    if not path.exists():
        cpu_model = model.float().to("cpu").eval()
        with _exportable():
            export_onnx(cpu_model, path, normalize_input=True, argmax=True, fp16=fp16, exporter=cfg.onnx_exporter)
    backend = OnnxBackend(path, device=variant.provider or "cpu", threads=cfg.threads or torch.get_num_threads())
    predictor = Predictor(backend, batch_size=batch)
    pool = uint8_pool(batch, cfg.size, cfg.seed + 3)

    def fn(images: np.ndarray) -> Any:
        return predictor.predict_arrays(list(images))

    note = "Predictor + OnnxBackend, uint8 NHWC in, normalisation and argmax in-graph, labels on host out"
    return Runner(fn=fn, inputs=pool, sync=torch.cuda.synchronize if cfg.device == "cuda" else None, note=note)


# --------------------------------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------------------------------

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
    with profile(activities=activities) as prof:
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
    return _summarise_profile(per_name, iterations, "GPU kernel time" if device == "cuda" else "CPU self time")


def _summarise_profile(per_name: dict[str, dict[str, float]], iterations: int, clock: str) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    """Everything a run produced: rows, the environment, and per-variant profiles of the headline model."""

    rows: list[dict[str, Any]]
    environment: dict[str, Any]
    config: dict[str, Any]
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)


def _base_row(env: dict[str, Any], run_id: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS, "")
    row.update({k: env.get(k, "") for k in ROW_FIELDS if k in env})
    row["run_id"] = run_id
    row["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


def run_benchmarks(cfg: BenchConfig, *, log: Callable[[str], None] | None = print) -> BenchResult:
    """Measure every configured (model, variant, batch) and return the rows (see :data:`ROW_FIELDS`).

    Failures of one variant (a missing library, a compile error) become rows with ``status`` ``skipped`` or
    ``error`` and a ``note``; they never abort the run, so a long GPU run always produces its table.
    """
    cfg.validate()
    say = log or (lambda _msg: None)
    saved_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = environment_info(cfg.device)
    run_id = cfg.run_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    device = torch.device(cfg.device)
    tmp = None
    if cfg.workdir:
        workdir = Path(cfg.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="blindnet-bench-")
        workdir = Path(tmp.name)
    rows: list[dict[str, Any]] = []
    profiles: dict[str, dict[str, Any]] = {}
    variants = cfg.variant_list()
    h, w = cfg.size
    try:
        for mi, spec in enumerate(model_specs(cfg)):
            headline = mi == 0
            cost = model_cost(spec, cfg.size)
            say(
                f"[bench] {spec.name}: {cost.params_deployable / 1e6:.2f} M params, {cost.flops_g:.1f} GFLOP at {w}x{h}"
            )
            batches = tuple(cfg.batches) if headline else (1,)
            for variant in variants:
                model, weights = load_models(spec, cfg, device)
                model._bench_name = f"{spec.name}-{h}x{w}"  # type: ignore[attr-defined]
                for batch in batches:
                    shape = (batch, 3, h, w)
                    trials = cfg.trials if batch == 1 else (cfg.batch_trials or cfg.trials)
                    row = _base_row(env, run_id)
                    row.update(_describe(spec, variant, cost, weights, batch, cfg.size, scope="network"))
                    want_profile = cfg.profile and headline and batch == 1
                    _measure(
                        row,
                        functools.partial(_make_runner, model, variant, shape, cfg, workdir),
                        cfg,
                        trials,
                        say,
                        profiles if want_profile else None,
                    )
                    rows.append(row)
                if cfg.end_to_end and headline and variant.end_to_end:
                    row = _base_row(env, run_id)
                    row.update(_describe(spec, variant, cost, weights, 1, cfg.size, scope="end-to-end"))
                    model_e2e, _ = load_models(spec, cfg, device)
                    make = functools.partial(_make_e2e, model_e2e, variant, cfg, workdir)
                    _measure(row, make, cfg, cfg.trials, say, None)
                    rows.append(row)
                    del model_e2e
                del model
                _free(cfg.device)
    finally:
        torch.set_num_threads(saved_threads)  # callers (a test session) keep their own setting
        if tmp is not None:
            tmp.cleanup()
    if cfg.backbones and cfg.backbones[0] == "resnet50" and "blindnet" in cfg.networks:
        paper = _base_row(env, run_id)
        paper.update(PAPER_ROW)
        paper.update(
            device_type="cuda",
            driver="",
            torch="",
            torchvision="",
            cuda="",
            cudnn="",
            onnxruntime="",
            tensorrt="",
            threads="",
            median_ms="",
            flops_g="",
            achieved_tflops=round(R50_FLOPS_2048 / (PAPER_ROW["mean_ms"] * 1e-3) / 1e12, 1),
            images_per_s=round(1000.0 / PAPER_ROW["mean_ms"], 2),
            note=PAPER_NOTE,
        )
        rows.append(paper)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}
    return BenchResult(rows=rows, environment=env, config=config, profiles=profiles)


def _make_runner(model: nn.Module, variant: Variant, shape: tuple[int, ...], cfg: BenchConfig, workdir: Path) -> Runner:
    if cfg.device not in variant.devices:
        raise Skip(f"{variant.name} runs on {'/'.join(variant.devices)} only")
    if variant.backend == "torch":
        return torch_runner(model, variant, shape, cfg)
    if variant.backend == "onnxruntime":
        return ort_runner(model, variant, shape, cfg, workdir)
    if variant.backend == "tensorrt":
        return trt_runner(model, variant, shape, cfg, workdir)
    raise Skip(f"unknown backend {variant.backend!r}")


def _make_e2e(model: nn.Module, variant: Variant, cfg: BenchConfig, workdir: Path) -> Runner:
    if cfg.device not in variant.devices:
        raise Skip(f"{variant.name} runs on {'/'.join(variant.devices)} only")
    if variant.precision == "float16" and cfg.device == "cpu":
        raise Skip("float16 is not supported on CPU")
    if variant.backend == "onnxruntime":
        return ort_end_to_end_runner(model, variant, 1, cfg, workdir)
    return end_to_end_runner(model, variant, 1, cfg)


def _describe(
    spec: ModelSpec,
    variant: Variant,
    cost: Cost,
    weights: str,
    batch: int,
    size: tuple[int, int],
    *,
    scope: str,
) -> dict[str, Any]:
    return {
        "model": spec.name,
        "network": spec.network,
        "backbone": spec.backbone,
        "weights": weights,
        "variant": variant.name,
        "backend": variant.backend,
        "precision": variant.precision,
        "memory_format": "channels_last" if variant.channels_last else "contiguous",
        "compile": variant.compile or "",
        "scope": scope,
        "batch": batch,
        "height": size[0],
        "width": size[1],
        "params_deployable": cost.params_deployable,
        "params_paper": "" if cost.params_paper is None else cost.params_paper,
        "macs_g": round(cost.macs_g, 3),
        "flops_g": round(cost.flops_g, 3),
        "flop_counter": cost.flop_counter,
    }


def _measure(
    row: dict[str, Any],
    make: Callable[[], Runner],
    cfg: BenchConfig,
    trials: int,
    say: Callable[[str], None],
    profiles: dict[str, dict[str, Any]] | None,
) -> None:
    """Build the runner, time it, fill ``row`` in place; a Skip or an exception becomes the row's status."""
    label = f"{row['model']} {row['variant']} {row['scope']} b{row['batch']}"
    variant_is_tf32 = row["precision"] == "tf32"
    try:
        with float32_matmul_mode(tf32=variant_is_tf32), torch.inference_mode():
            runner = make()
            timing = time_calls(
                runner.fn,
                runner.inputs,
                device=cfg.device,
                warmup=cfg.warmup,
                trials=trials,
                max_seconds=cfg.max_seconds,
                sync=runner.sync,
            )
            if runner.check is not None:
                runner.check()
            if profiles is not None and row["scope"] == "network":
                # A few calls suffice to attribute time; fewer when one call takes seconds (CPU at full size).
                iterations = int(max(1, min(5, 10_000 / max(float(np.median(timing.ms)), 1e-3))))
                if runner.profile is not None:
                    profiles[row["variant"]] = runner.profile(iterations)
                else:
                    profiles[row["variant"]] = profile_runner(runner, cfg.device, iterations)
    except Skip as exc:
        row.update(status="skipped", note=str(exc))
        say(f"[bench] {label}: skipped ({exc})")
        return
    except Exception as exc:  # noqa: BLE001 - one broken variant must not lose the rest of a long GPU run
        # Exporter messages carry terminal colour codes; keep the note plain text.
        message = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(exc).__name__}: {exc}")
        row.update(status="error", note=message[:500])
        say(f"[bench] {label}: ERROR {row['note'][:300]}")
        if os.environ.get("BLINDNET_BENCH_DEBUG"):
            traceback.print_exc()
        return
    finally:
        _free(cfg.device)
    stats = timing.stats()
    row.update({k: round(v, 4) for k, v in stats.items()})
    row.update(warmup=timing.warmup, trials=timing.trials, status="ok", note=runner.note)
    batch = int(row["batch"])
    row["images_per_s"] = round(batch * 1e3 / stats["median_ms"], 3)
    # Significant digits, not decimals: a CPU achieves ~0.01 TFLOP/s, an H100 hundreds.
    # GFLOP per ms is TFLOP per s.
    row["achieved_tflops"] = float(f"{float(row['flops_g']) * batch / stats['median_ms']:.5g}")
    say(
        f"[bench] {label}: median {stats['median_ms']:.3f} ms (p90 {stats['p90_ms']:.3f}), "
        f"{row['images_per_s']:.1f} img/s, {row['achieved_tflops']:.4g} TFLOP/s over {timing.trials} trials"
    )


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
