"""Backend names -> constructors (a plain dict), and ``auto``: the fastest correct path on this machine.

``auto`` is what ``blindnet segment``, the server and the demo use unless told otherwise (see :func:`choose_backend`):
PyTorch on CUDA when a GPU is present; on CPU, ONNX Runtime on the checkpoint exported once into the cache (keyed by
the file's content and the export settings, parity-checked against PyTorch), and PyTorch (channels_last) when ONNX
Runtime is not installed or the export fails.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from blindnet.backends.base import Backend
from blindnet.backends.onnxruntime_backend import CHECKPOINT_SUFFIXES, ONNX_SUFFIXES, OnnxBackend
from blindnet.backends.tensorrt_backend import ENGINE_SUFFIXES, TensorRTBackend
from blindnet.backends.torch_backend import TorchBackend
from blindnet.checkpoint import load_model
from blindnet.extras import EXTRAS, missing_modules
from blindnet.resolve import cached_engine, cached_int8_for_checkpoint, cached_onnx_for_checkpoint, resolve_checkpoint


def _torch(path: str | Path | None, *, device: str = "cpu", precision: str | None = None, **kw) -> Backend:
    # None means "the backend's default", as for the exported backends: float32 for a checkpoint.
    return TorchBackend(load_model(resolve_checkpoint(path)), device=device, precision=precision or "float32", **kw)


def _onnx(path: str | Path | None, *, device: str = "cpu", precision: str | None = None, **kw) -> OnnxBackend:
    """An ``.onnx`` file as it is, or a checkpoint through its cached export (INT8 Q/DQ with ``precision="int8"``;
    float16 with ``"float16"``; else float32)."""
    path = resolve_checkpoint(path)
    cache_dir, exporter = kw.pop("cache_dir", None), kw.pop("exporter", "auto")
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        if precision == "int8":
            # The Q/DQ export of the checkpoint, quantised once and checked on held-out generated scenes.
            path = cached_int8_for_checkpoint(path, cache_dir=cache_dir, exporter=exporter)
        elif precision in (None, "float32", "float16"):
            path = cached_onnx_for_checkpoint(path, fp16=precision == "float16", cache_dir=cache_dir, exporter=exporter)
            precision = precision or "float32"
        else:
            raise ValueError(f"ONNX precision must be 'float32', 'float16' or 'int8', got {precision!r}")
    elif path.suffix.lower() not in ONNX_SUFFIXES:
        raise ValueError(f"{path}: expected an .onnx file or a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
    return OnnxBackend.from_path(path, device=device, precision=precision, **kw)


def _tensorrt(path: str | Path | None, *, device: str = "cuda", precision: str | None = None, **kw) -> Backend:
    """A TensorRT engine as it is, or one built once (and cached) from a checkpoint or an ``.onnx`` file."""
    path = resolve_checkpoint(path)
    cache_dir = kw.pop("cache_dir", None)
    if path.suffix.lower() not in ENGINE_SUFFIXES:
        path = cached_engine(path, precision=precision, cache_dir=cache_dir)
        precision = precision or "float16"
    return TensorRTBackend.from_path(path, device=device, precision=precision, **kw)


@dataclass(frozen=True)
class BackendChoice:
    """What ``auto`` picked: backend ``name`` on ``device``, with ``precision`` (None: the backend's), and ``why``."""

    name: str
    device: str
    precision: str | None
    why: str


#: ONNX Runtime's CPU provider has no bfloat16 kernels for this network; those runs stay on torch.
ORT_CPU_PRECISIONS = (None, "float32", "int8")


def choose_backend(
    path: str | Path | None, *, device: str | None = None, precision: str | None = None
) -> BackendChoice:
    """The backend ``auto`` uses for the model at ``path`` (None: the shipped checkpoint) on ``device``.

    ``device`` None or ``"auto"`` means CUDA when torch sees a GPU, else CPU. Nothing is loaded or exported here.
    """
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    suffix = Path(path).suffix.lower() if path is not None else ".safetensors"
    if suffix in ONNX_SUFFIXES:
        return BackendChoice("onnx", device, precision, "an exported ONNX file was given")
    if suffix not in CHECKPOINT_SUFFIXES:
        return BackendChoice("tensorrt", device, precision, "a TensorRT engine was given")
    if device.startswith("cuda"):
        return BackendChoice("torch", device, precision, "a CUDA GPU is present")
    if precision not in ORT_CPU_PRECISIONS:
        return BackendChoice("torch", device, precision, f"ONNX Runtime on CPU has no {precision} path")
    missing = missing_modules(EXTRAS["onnx"][1])
    if missing:
        return BackendChoice(
            "torch",
            device,
            precision,
            f"{', '.join(missing)} not installed; pip install 'blindnet[cpu]' for the faster ONNX Runtime path",
        )
    return BackendChoice("onnx", device, precision, "ONNX Runtime is the fastest CPU path here (see `blindnet bench`)")


def _auto(path: str | Path | None, *, device: str | None = None, precision: str | None = None, **kw) -> Backend:
    """Build :func:`choose_backend`'s pick and print one line saying which path runs and why (stderr)."""
    choice = choose_backend(path, device=device, precision=precision)
    backend: Backend | None = None
    if choice.name == "onnx" and choice.device == "cpu" and path_is_checkpoint(path):
        try:
            backend = _onnx(path, device="cpu", precision=precision, **kw)
            line = f"onnxruntime on CPU (cached export {backend.path}; {choice.why})"
        except (ImportError, RuntimeError) as exc:  # ExportError is a RuntimeError: a failed export or parity check
            choice = BackendChoice("torch", "cpu", precision, f"the ONNX export failed ({exc}); torch instead")
    if backend is None and choice.name == "torch":
        # channels_last: the faster layout for these convolutions on CPU and CUDA, same results.
        backend = _torch(path, device=choice.device, precision=choice.precision, channels_last=True, **kw)
        line = f"torch on {choice.device} ({choice.why})"
    elif backend is None:
        backend = BACKENDS[choice.name](path, device=choice.device, precision=precision, **kw)
        line = f"{choice.name} on {choice.device} ({choice.why})"
    backend.selection = line
    print(f"backend: {line}", file=sys.stderr)
    return backend


def path_is_checkpoint(path: str | Path | None) -> bool:
    """Whether ``path`` (None: the shipped model) is a checkpoint rather than an exported file."""
    return path is None or Path(path).suffix.lower() in CHECKPOINT_SUFFIXES


BACKENDS: dict[str, Callable[..., Backend]] = {"torch": _torch, "onnx": _onnx, "tensorrt": _tensorrt, "auto": _auto}


def make_backend(name: str, path: str | Path | None = None, **kwargs) -> Backend:
    """Build backend ``name`` for the model at ``path`` (a checkpoint, an exported file for onnx/tensorrt, or a model
    name such as ``blindnet-r50-gtav``: its cached file, fetched on first use)."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}") from None
    # Names become files here, once, so that every backend (and `auto`'s choice by file suffix) sees a path.
    return factory(None if path is None else resolve_checkpoint(path), **kwargs)
