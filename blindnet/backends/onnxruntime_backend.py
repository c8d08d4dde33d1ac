"""ONNX Runtime as a backend (runtime only): read a blindnet ONNX file's graph contract and run it on CPU or CUDA.

Exporting lives in :mod:`blindnet.export.onnx`; turning a checkpoint into a cached ONNX file in
:mod:`blindnet.resolve`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from blindnet.backends.base import (
    Backend,
    BackendOutput,
    argmax_channels,
    labels_dtype,
    norm_stride_of,
    normalize,
)

# The file contract and sessions are the export library's (exports are checked by running them); re-exported
# here for the backend's users.
from blindnet.export.ort import CHECKPOINT_SUFFIXES as CHECKPOINT_SUFFIXES
from blindnet.export.ort import INPUT_NAME as INPUT_NAME
from blindnet.export.ort import LABEL_DTYPES as LABEL_DTYPES
from blindnet.export.ort import LABELS_NAME as LABELS_NAME
from blindnet.export.ort import LAYOUTS as LAYOUTS
from blindnet.export.ort import LOGITS_NAME as LOGITS_NAME
from blindnet.export.ort import META_PREFIX as META_PREFIX
from blindnet.export.ort import ONNX_SUFFIXES as ONNX_SUFFIXES
from blindnet.export.ort import _json_or_empty
from blindnet.export.ort import cuda_available_for_ort as cuda_available_for_ort
from blindnet.export.ort import io_spec_from_session as io_spec_from_session
from blindnet.export.ort import normalize_nhwc as normalize_nhwc
from blindnet.export.ort import ort_providers as ort_providers
from blindnet.export.ort import ort_session as ort_session
from blindnet.export.ort import prepare_input as prepare_input
from blindnet.export.ort import read_onnx_metadata as read_onnx_metadata
from blindnet.export.ort import unsigned_activations as unsigned_activations


class OnnxBackend(Backend):
    """ONNX Runtime on CUDA (IO binding: the batch is uploaded once, the output read back once) or on CPU.

    Works with any graph :func:`export_onnx` writes: uint8 or normalised float input, logits or label output, float32
    or float16 inside; the file's metadata (or, for foreign files, its I/O types) says which.

    Args:
        path: the ``.onnx`` file.
        device: ``"cpu"``, ``"cuda"``/``"cuda:N"`` (error if CUDA is unavailable) or ``"auto"`` (CUDA when available).
        precision: the precision the caller expects; the file decides (it is baked in at export), and a mismatch is
            an error so that a benchmark row never mislabels what ran.
        threads: intra-op threads for the CPU provider (None: ONNX Runtime's default).
    """

    name = "onnx"

    def __init__(
        self, path: str | Path, *, device: str = "cpu", precision: str | None = None, threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"ONNX file not found: {path}")
        device = str(device)
        if device == "auto":
            device = "cuda" if cuda_available_for_ort() else "cpu"
        if device.startswith("cuda"):
            if not cuda_available_for_ort():
                raise RuntimeError(
                    "device 'cuda' requested but ONNX Runtime's CUDA execution provider or a CUDA GPU is not "
                    f"available (providers: {ort.get_available_providers()}, torch.cuda.is_available()="
                    f"{torch.cuda.is_available()}); use device='cpu'"
                )
        # HEURISTIC: EXHAUSTIVE re-searches conv algorithms at every new input shape (slow first calls).
        providers = ort_providers(device)
        self.device_id = int(device.split(":")[1]) if ":" in device else (0 if device.startswith("cuda") else -1)
        self.session = ort_session(path, providers=providers, threads=threads)
        self.path = path
        self.device = device
        self.spec = io_spec_from_session(self.session)
        self.num_classes = self.spec["num_classes"]
        # Pads tiny inputs exactly as the torch backend does (ONNX Runtime itself would run them, differently).
        meta = dict(self.session.get_modelmeta().custom_metadata_map or {})
        self.norm_stride = norm_stride_of(_json_or_empty(meta.get(META_PREFIX + "model_config")))
        if precision is not None and precision != self.spec["precision"]:
            raise ValueError(
                f"{path} holds a {self.spec['precision']} graph but precision={precision!r} was requested; "
                f"re-export with{'out' if precision == 'float32' else ''} --fp16 or pass precision="
                f"{self.spec['precision']!r}"
            )
        self.precision = self.spec["precision"]
        self.use_io_binding = device.startswith("cuda")
        self._labels_dtype = labels_dtype(self.num_classes)

    @classmethod
    def from_path(
        cls, path: str | Path, *, device: str = "cpu", precision: str | None = None, **kwargs: Any
    ) -> OnnxBackend:
        """Backend for an ``.onnx`` file (:func:`blindnet.resolve.cached_onnx_for_checkpoint` exports a checkpoint
        once). It runs in the precision it was exported in; a given ``precision`` must match it."""
        path = Path(path)
        if path.suffix.lower() not in ONNX_SUFFIXES:
            raise ValueError(f"{path}: expected an .onnx file (export a checkpoint with `blindnet export`)")
        return cls(path, device=device, precision=precision, **kwargs)

    def infer(self, images: np.ndarray, *, return_logits: bool = False) -> BackendOutput:
        """``images`` ``N x H x W x 3`` uint8 -> labels ``N x H x W`` (+ float32 logits ``N x C x H x W``)."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected N x H x W x 3 uint8 images, got {images.shape} {images.dtype}")
        if return_logits and self.spec["output_kind"] == "labels":
            raise ValueError(
                f"{self.path} outputs labels only (exported with argmax); re-export without --argmax for scores"
            )
        if self.use_io_binding and not self.spec["normalize_input"]:
            out = self._run_normalising_on_device(images)
        else:
            out = self._run(prepare_input(images, self.spec))
        if self.spec["output_kind"] == "labels":
            return BackendOutput(labels=out.astype(self._labels_dtype, copy=False))
        logits = out.astype(np.float32, copy=False)
        labels = argmax_channels(logits, self._labels_dtype)
        return BackendOutput(labels=labels, logits=logits if return_logits else None)

    def _run(self, x: np.ndarray) -> np.ndarray:
        if not self.use_io_binding:
            return self.session.run([self.spec["output_name"]], {self.spec["input_name"]: x})[0]
        import onnxruntime as ort

        # One upload, one download; the output is allocated on the device by ORT (its shape depends on H, W).
        binding = self.session.io_binding()
        value = ort.OrtValue.ortvalue_from_numpy(x, "cuda", self.device_id)
        binding.bind_ortvalue_input(self.spec["input_name"], value)
        binding.bind_output(self.spec["output_name"], "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _run_normalising_on_device(self, images: np.ndarray) -> np.ndarray:
        """Float-input graph on CUDA: upload uint8 (4x fewer bytes than float32), normalise with torch on the device,
        and bind that buffer directly."""
        dev = torch.device("cuda", self.device_id)
        x = torch.from_numpy(np.ascontiguousarray(images)).to(dev).permute(0, 3, 1, 2)
        dtype = torch.float16 if self.spec["input_dtype"] == "float16" else torch.float32
        x = normalize(x, channels_last=False).to(dtype).contiguous()
        torch.cuda.synchronize(dev)  # ORT runs on its own stream: the buffer must be ready
        binding = self.session.io_binding()
        binding.bind_input(
            self.spec["input_name"],
            "cuda",
            self.device_id,
            np.float16 if dtype == torch.float16 else np.float32,
            tuple(x.shape),
            x.data_ptr(),
        )
        binding.bind_output(self.spec["output_name"], "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def describe(self) -> dict[str, str]:
        return {
            "backend": self.name,
            "device": self.device,
            "precision": self.precision,
            "providers": ",".join(self.session.get_providers()),
            "input": f"{self.spec['input_dtype']} {self.spec['input_layout']}",
            "output": self.spec["output_kind"],
            "file": str(self.path),
        }
