"""Backend names -> constructors (a plain dict)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from blindnet.inference import Backend, TorchBackend
from blindnet.resolve import resolve_checkpoint


def _torch(path: str | Path | None, *, device: str = "cpu", precision: str | None = None, **kw) -> Backend:
    from blindnet.checkpoint import load_model

    # None means "the backend's default", as for the exported backends: float32 for a checkpoint.
    return TorchBackend(load_model(resolve_checkpoint(path)), device=device, precision=precision or "float32", **kw)


def _onnx(path: str | Path | None, *, device: str = "cpu", precision: str | None = None, **kw) -> Backend:
    from blindnet.onnx_backend import OnnxBackend

    return OnnxBackend.from_path(path, device=device, precision=precision, **kw)


def _tensorrt(path: str | Path | None, *, device: str = "cuda", precision: str | None = None, **kw) -> Backend:
    from blindnet.tensorrt_backend import TensorRTBackend

    return TensorRTBackend.from_path(path, device=device, precision=precision, **kw)


BACKENDS: dict[str, Callable[..., Backend]] = {"torch": _torch, "onnx": _onnx, "tensorrt": _tensorrt}


def make_backend(name: str, path: str | Path | None = None, **kwargs) -> Backend:
    """Build backend ``name`` for the model at ``path`` (a checkpoint, or an exported file for onnx/tensorrt)."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}") from None
    return factory(path, **kwargs)
