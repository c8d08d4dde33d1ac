"""TensorRT as a backend (runtime only): load an engine built for this GPU and TensorRT version and run it.

Building engines (and INT8/FP8 calibration) lives in :mod:`blindnet.export.tensorrt`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blindnet.backends.base import (
    Backend,
    BackendOutput,
    norm_stride_of,
    normalize,
    torch_labels_dtype,
)

INSTALL_HINT = (
    "TensorRT is not installed. Install the optional extra with `pip install 'blindnet[tensorrt]'` "
    "(or `pip install tensorrt`); TensorRT runs only on an NVIDIA GPU with a matching CUDA driver. "
    "Without it, use the ONNX Runtime backend (`--backend onnx`) or export with `--format onnx`."
)


PRECISIONS = ("float32", "float16", "int8", "fp8")


ENGINE_SUFFIXES = (".plan", ".engine")


class TensorRTUnavailable(ImportError):
    """``import tensorrt`` failed; the message says how to install it."""


class EngineMismatchError(RuntimeError):
    """An engine was built for another TensorRT version or GPU."""


def import_tensorrt() -> Any:
    """``import tensorrt`` or raise :class:`TensorRTUnavailable` with installation instructions."""
    try:
        import tensorrt as trt
    except ImportError as exc:  # also OSError-derived import failures of the native libraries
        raise TensorRTUnavailable(f"{INSTALL_HINT} (import error: {exc})") from exc
    except OSError as exc:
        raise TensorRTUnavailable(f"{INSTALL_HINT} (the native libraries failed to load: {exc})") from exc
    return trt


def tensorrt_available() -> bool:
    """True when ``import tensorrt`` works (a GPU is still needed to build or run)."""
    try:
        import_tensorrt()
    except TensorRTUnavailable:
        return False
    return True


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


@dataclass
class Profile:
    """One optimisation profile as ``(batch, height, width)`` triples; channels/layout come from the graph."""

    min: tuple[int, int, int]
    opt: tuple[int, int, int]
    max: tuple[int, int, int]

    def __post_init__(self) -> None:
        self.min, self.opt, self.max = (tuple(int(v) for v in t) for t in (self.min, self.opt, self.max))
        for i, name in enumerate(("batch", "height", "width")):
            if not 1 <= self.min[i] <= self.opt[i] <= self.max[i]:
                raise ValueError(
                    f"profile {name}: need 1 <= min <= opt <= max, got {self.min[i]}, {self.opt[i]}, {self.max[i]}"
                )

    def contains(self, batch: int, height: int, width: int) -> bool:
        return all(lo <= v <= hi for lo, v, hi in zip(self.min, (batch, height, width), self.max))

    def shapes(self, layout: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(min, opt, max)`` full input shapes in ``layout`` (``NHWC`` or ``NCHW``)."""

        def full(t: tuple[int, int, int]) -> tuple[int, ...]:
            b, h, w = t
            return (b, h, w, 3) if layout == "NHWC" else (b, 3, h, w)

        return full(self.min), full(self.opt), full(self.max)


def default_profiles(size: tuple[int, int] = (1024, 2048), max_batch: int = 4, min_side: int = 256) -> list[Profile]:
    """One profile: batch 1..``max_batch``, sizes from ``min_side`` up to ``size``, tuned for batch 1 at ``size``."""
    h, w = size
    return [Profile(min=(1, min(min_side, h), min(min_side, w)), opt=(1, h, w), max=(max_batch, h, w))]


def metadata_path(engine: str | Path) -> Path:
    """``model.plan`` -> ``model.plan.json`` (the build metadata beside the engine)."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def read_engine_metadata(engine: str | Path) -> dict[str, Any]:
    """The build metadata of an engine (see :func:`build_engine`)."""
    path = metadata_path(engine)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: the engine's build metadata is missing, so its TensorRT version and GPU are unknown; rebuild "
            "it with `python -m blindnet.export --format tensorrt`"
        )
    return json.loads(path.read_text())


def current_platform() -> dict[str, Any]:
    """TensorRT version, GPU name and compute capability of this machine (what an engine must match)."""
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT needs an NVIDIA GPU, and torch sees no CUDA device on this machine")
    major, minor = torch.cuda.get_device_capability()
    return {
        "tensorrt_version": str(trt.__version__),
        "gpu_name": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
    }


def check_engine_compatibility(
    meta: dict[str, Any], *, tensorrt_version: str, gpu_name: str, compute_capability: str, strict_gpu: bool = True
) -> None:
    """Refuse an engine built for another TensorRT version or GPU.

    TensorRT engines are only valid for the exact TensorRT version and GPU architecture they were built with (unless
    built version/hardware-compatible, which we do not). ``strict_gpu`` also refuses another GPU model of the same
    architecture, whose tactic choices were not timed there.

    Raises:
        EngineMismatchError: with both platforms and the rebuild command in the message.
    """
    problems = []
    if meta.get("tensorrt_version") != tensorrt_version:
        problems.append(f"TensorRT {meta.get('tensorrt_version')} (this machine: {tensorrt_version})")
    if meta.get("compute_capability") != compute_capability:
        problems.append(
            f"GPU architecture sm_{str(meta.get('compute_capability')).replace('.', '')} "
            f"(this machine: sm_{compute_capability.replace('.', '')})"
        )
    elif strict_gpu and meta.get("gpu_name") != gpu_name:
        problems.append(f"GPU {meta.get('gpu_name')!r} (this machine: {gpu_name!r})")
    if problems:
        raise EngineMismatchError(
            f"refusing to load {meta.get('engine', 'the engine')}: it was built for "
            + " and ".join(problems)
            + ". Engines are specific to the TensorRT version and GPU; rebuild it here with "
            "`python -m blindnet.export --format tensorrt --checkpoint CKPT --out DIR` (or pass strict_gpu=False to accept "
            "another GPU model of the same architecture)."
        )


def _dtype_name(trt: Any, dt: Any) -> str:
    names = {
        "FLOAT": "float32",
        "HALF": "float16",
        "INT8": "int8",
        "INT32": "int32",
        "INT64": "int64",
        "UINT8": "uint8",
        "BOOL": "bool",
        "BF16": "bfloat16",
        "FP8": "fp8",
    }
    for attr, name in names.items():
        if hasattr(trt.DataType, attr) and dt == getattr(trt.DataType, attr):
            return name
    return str(dt)


_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "int8": torch.int8,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "bfloat16": torch.bfloat16,
}


class TensorRTBackend(Backend):
    """A TensorRT engine on a CUDA device: uint8 upload, (optional) on-device normalisation, ``execute_async_v3``.

    Args:
        engine_path: a ``.plan`` built by :func:`build_engine` (its ``.json`` metadata must sit beside it).
        device: ``cuda`` or ``cuda:N``.
        precision: the precision the caller expects; must match the engine's (None: accept the engine's).
        strict_gpu: refuse an engine built on another GPU model of the same architecture.
    """

    name = "tensorrt"

    def __init__(
        self, engine_path: str | Path, *, device: str = "cuda", precision: str | None = None, strict_gpu: bool = True
    ) -> None:
        trt = import_tensorrt()
        engine_path = Path(engine_path)
        if not engine_path.exists():
            raise FileNotFoundError(f"TensorRT engine not found: {engine_path}")
        if not str(device).startswith("cuda"):
            raise ValueError(f"TensorRT runs on a CUDA device only, got device={device!r}")
        meta = read_engine_metadata(engine_path)
        check_engine_compatibility(meta, strict_gpu=strict_gpu, **current_platform())
        if precision is not None and precision != meta["precision"]:
            raise ValueError(f"{engine_path} is a {meta['precision']} engine but precision={precision!r} was requested")
        self.device = torch.device(device)
        self.meta = meta
        self.precision = meta["precision"]
        self.num_classes = int(meta.get("num_classes", 19))
        self.profiles = [Profile(**{k: tuple(v) for k, v in p.items()}) for p in meta["profiles"]]
        # Smaller inputs are padded up to what some profile takes, and tiny ones past the deepest InstanceNorm.
        self.min_size = (min(p.min[1] for p in self.profiles), min(p.min[2] for p in self.profiles))
        self.norm_stride = norm_stride_of(meta.get("model_config") or {})
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT could not deserialize {engine_path} (see the log above)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.input_dtype = _TORCH_DTYPES[_dtype_name(trt, self.engine.get_tensor_dtype(self.input_name))]
        self.output_dtype = _TORCH_DTYPES[_dtype_name(trt, self.engine.get_tensor_dtype(self.output_name))]
        self.layout = meta.get("input_layout", "NCHW")
        self.normalize_in_graph = bool(meta.get("normalize_input", False))
        self.outputs_labels = meta.get("output_kind") == "labels"
        self._profile_index = 0
        self.path = engine_path

    @classmethod
    def from_path(
        cls, path: str | Path, *, device: str = "cuda", precision: str | None = None, **kwargs: Any
    ) -> TensorRTBackend:
        """Backend for a ``.plan``/``.engine`` file (:func:`blindnet.resolve.cached_engine` builds one from a checkpoint
        or an ``.onnx`` file). An engine runs in the precision it was built in; a given ``precision`` must match."""
        path = Path(path)
        if path.suffix.lower() not in ENGINE_SUFFIXES:
            raise ValueError(f"{path}: expected a TensorRT engine ({', '.join(ENGINE_SUFFIXES)})")
        return cls(path, device=device, precision=precision, **kwargs)

    def _select_profile(self, b: int, h: int, w: int, stream: torch.cuda.Stream) -> None:
        for i, p in enumerate(self.profiles):
            if p.contains(b, h, w):
                if i != self._profile_index:
                    self.context.set_optimization_profile_async(i, stream.cuda_stream)
                    self._profile_index = i
                return
        ranges = "; ".join(
            f"batch {p.min[0]}..{p.max[0]}, {p.min[1]}x{p.min[2]}..{p.max[1]}x{p.max[2]}" for p in self.profiles
        )
        raise ValueError(
            f"batch of {b} x {h}x{w} is outside the engine's profiles ({ranges}); resize the input "
            "(Predictor input_size) or rebuild with a wider profile"
        )

    @torch.inference_mode()
    def infer(self, images: np.ndarray, *, return_logits: bool = False) -> BackendOutput:
        """``images`` ``N x H x W x 3`` uint8 -> labels ``N x H x W`` (+ float32 logits ``N x C x H x W``)."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected N x H x W x 3 uint8 images, got {images.shape} {images.dtype}")
        if return_logits and self.outputs_labels:
            raise ValueError(f"{self.path} outputs labels only (built from an argmax export); no logits available")
        b, h, w, _ = images.shape
        stream = torch.cuda.current_stream(self.device)
        self._select_profile(b, h, w, stream)
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        if self.normalize_in_graph:
            x = x if self.layout == "NHWC" else x.permute(0, 3, 1, 2)
        else:
            x = normalize(x.permute(0, 3, 1, 2), channels_last=False).to(self.input_dtype)
        x = x.contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = torch.empty(
            tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype, device=self.device
        )
        self.context.set_tensor_address(self.input_name, int(x.data_ptr()))
        self.context.set_tensor_address(self.output_name, int(out.data_ptr()))
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the log above)")
        ldtype = torch_labels_dtype(self.num_classes)
        if self.outputs_labels:
            return BackendOutput(labels=out.to(ldtype).cpu().numpy())
        labels = out.argmax(1).to(ldtype).cpu().numpy()
        return BackendOutput(labels=labels, logits=out.float().cpu().numpy() if return_logits else None)

    def describe(self) -> dict[str, str]:
        return {
            "backend": self.name,
            "device": str(self.device),
            "precision": self.precision,
            "tensorrt": str(self.meta.get("tensorrt_version")),
            "gpu": str(self.meta.get("gpu_name")),
            "engine": str(self.path),
        }
