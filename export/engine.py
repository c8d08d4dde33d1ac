"""TensorRT engines as files: optimisation profiles, the metadata JSON beside each engine, platform compatibility,
and importing TensorRT with a clear message where it is missing.

Part of the export library (building and checking engines need it); the TensorRT backend
(:mod:`blindnet.backends.tensorrt_backend`) loads engines through the same functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

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
        # as ints; the checks below read three entries of each
        self.min, self.opt, self.max = (
            cast("tuple[int, int, int]", tuple(int(v) for v in t)) for t in (self.min, self.opt, self.max)
        )
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
