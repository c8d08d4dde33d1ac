"""TensorRT as a backend (runtime only): load an engine built for this GPU and TensorRT version and run it.

Building engines (and INT8/FP8 calibration) lives in :mod:`blindnet.export.tensorrt`, engine files and profiles in
:mod:`blindnet.export.engine`.
"""

from __future__ import annotations

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
from blindnet.export.engine import _TORCH_DTYPES, _dtype_name

# Engine files, profiles and compatibility are the export library's (building needs them); re-exported here for
# the backend's users.
from blindnet.export.engine import ENGINE_SUFFIXES as ENGINE_SUFFIXES
from blindnet.export.engine import INSTALL_HINT as INSTALL_HINT
from blindnet.export.engine import PRECISIONS as PRECISIONS
from blindnet.export.engine import EngineMismatchError as EngineMismatchError
from blindnet.export.engine import Profile as Profile
from blindnet.export.engine import TensorRTUnavailable as TensorRTUnavailable
from blindnet.export.engine import check_engine_compatibility as check_engine_compatibility
from blindnet.export.engine import current_platform as current_platform
from blindnet.export.engine import default_profiles as default_profiles
from blindnet.export.engine import import_tensorrt as import_tensorrt
from blindnet.export.engine import metadata_path as metadata_path
from blindnet.export.engine import read_engine_metadata as read_engine_metadata
from blindnet.export.engine import tensorrt_available as tensorrt_available
from blindnet.export.engine import trt_major as trt_major


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
