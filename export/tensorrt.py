"""TensorRT export (library): calibration data, ModelOpt Q/DQ quantisation, engine build, parity check.

The build core and the runtime live in :mod:`blindnet.tensorrt_backend` (an installed package can build an engine
on first use); this module adds the export-stage pieces. Everything needs ``tensorrt`` and an NVIDIA GPU except
:func:`load_calibration_images` and the metadata helpers; without TensorRT, :func:`require_tensorrt` raises
:class:`TensorRTUnavailable` whose message says ``pip install 'blindnet[tensorrt]'``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from blindnet.inference import IMAGE_SUFFIXES, load_image
from blindnet.tensorrt_backend import (
    INSTALL_HINT,
    PRECISIONS,
    EngineMismatchError,
    Profile,
    TensorRTBackend,
    TensorRTUnavailable,
    build_engine,
    check_engine_compatibility,
    default_profiles,
    import_tensorrt,
    metadata_path,
    onnx_has_qdq,
    read_engine_metadata,
    tensorrt_available,
)

__all__ = [
    "INSTALL_HINT",
    "PRECISIONS",
    "EngineMismatchError",
    "Profile",
    "TensorRTBackend",
    "TensorRTUnavailable",
    "build_engine",
    "check_engine_compatibility",
    "default_profiles",
    "load_calibration_images",
    "metadata_path",
    "quantize_onnx",
    "read_engine_metadata",
    "require_tensorrt",
    "tensorrt_available",
    "verify_engine",
]

#: Label agreement asked of quantised engines (reported next to latency; int8 typically loses ~0.2-1 mIoU).
QUANTIZED_MIN_AGREEMENT = 0.98


def require_tensorrt() -> Any:
    """``import tensorrt`` or raise :class:`TensorRTUnavailable` (message: how to install, needs an NVIDIA GPU)."""
    return import_tensorrt()


def load_calibration_images(source: str | Path, *, count: int = 256, size: tuple[int, int] = (1024, 2048),
                            seed: int = 0) -> np.ndarray:
    """Calibration/quantisation images from a dataset the user names: a folder of images (searched recursively,
    e.g. ``cityscapes/leftImg8bit/val``) or a ``.npy`` array ``N x H x W x 3`` uint8.

    Returns:
        uint8 ``N x H x W x 3`` at ``size`` (bilinear resize), ``N = min(count, available)``, a seeded random subset.
    """
    import cv2

    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"calibration data not found: {source}")
    h, w = size
    if source.suffix == ".npy":
        arr = np.load(source, mmap_mode="r")
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"{source}: expected N x H x W x 3 uint8, got {arr.shape} {arr.dtype}")
        idx = np.random.default_rng(seed).permutation(len(arr))[:count]
        return np.stack([cv2.resize(np.asarray(arr[i]), (w, h), interpolation=cv2.INTER_LINEAR) for i in idx])
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)}) found for calibration")
    pick = [files[i] for i in np.random.default_rng(seed).permutation(len(files))[:count]]
    return np.stack([cv2.resize(load_image(p), (w, h), interpolation=cv2.INTER_LINEAR) for p in pick])


def quantize_onnx(onnx_path: str | Path, out_path: str | Path, calibration: np.ndarray, *, mode: str = "int8") -> Path:
    """Insert Q/DQ nodes with NVIDIA ModelOpt ONNX PTQ (the int8/fp8 route on TensorRT 11, and fp8 everywhere).

    ``calibration`` is uint8 ``N x H x W x 3``; it is converted to the graph's input format first.
    """
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        raise ImportError(
            f"{mode} quantisation needs NVIDIA ModelOpt: `pip install nvidia-modelopt[onnx]` ({exc})"
        ) from exc
    import onnxruntime as ort

    from blindnet.onnx_backend import io_spec_from_session, prepare_input

    spec = io_spec_from_session(ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]))
    data = prepare_input(calibration, spec)
    calib_file = Path(out_path).with_suffix(".calib.npy")
    np.save(calib_file, data)
    quantize(onnx_path=str(onnx_path), quantize_mode=mode, calibration_data_path=str(calib_file),
             output_path=str(out_path), high_precision_dtype="fp16")
    return Path(out_path)


def verify_engine(engine_path: str | Path, model: nn.Module, *, shapes: tuple[tuple[int, int, int], ...] | None = None,
                  seed: int = 0, write_report: bool = True, verbose: bool = True) -> dict[str, Any]:
    """Parity of a TensorRT engine against PyTorch float32, like :func:`export.onnx.verify_onnx`.

    Thresholds: float32 (built without TF32) logits rel error <= 1e-4 and labels >= 99.9%, float16 labels >= 99.5%,
    int8/fp8 labels >= 98%.
    """
    from blindnet.export.onnx import (
        FP16_MIN_AGREEMENT,
        FP32_MAX_REL_ERROR,
        FP32_MIN_AGREEMENT,
        compare_outputs,
        reference_logits,
        write_check_report,
    )

    engine_path = Path(engine_path)
    backend = TensorRTBackend(engine_path)
    if shapes is None:
        p = backend.profiles[0]
        shapes = ((p.opt[0], p.opt[1], p.opt[2]), (p.min[0], max(p.min[1], (p.opt[1] // 2) | 1),
                                                     max(p.min[2], (p.opt[2] // 2) | 1)))
    minimum = {"float32": FP32_MIN_AGREEMENT, "float16": FP16_MIN_AGREEMENT}.get(backend.precision,
                                                                                 QUANTIZED_MIN_AGREEMENT)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    checks = []
    for b, h, w in shapes:
        images = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
        ref = reference_logits(model, images)
        out = backend.infer(images, return_logits=not backend.outputs_labels)
        kind = "labels" if backend.outputs_labels else "logits"
        agreement, max_abs, rel = compare_outputs(ref, out.labels if kind == "labels" else out.logits,
                                                  output_kind=kind)
        checks.append({"batch": b, "height": h, "width": w, "label_agreement": agreement, "max_abs_error": max_abs,
                       "rel_error": rel, "passed": agreement >= minimum and (
                           backend.precision != "float32" or rel is None or rel <= FP32_MAX_REL_ERROR)})
    report = {
        "path": str(engine_path), "runtime": f"tensorrt {backend.meta['tensorrt_version']}",
        "gpu": backend.meta["gpu_name"], "precision": backend.precision,
        "thresholds": {"min_label_agreement": minimum}, "checks": checks,
        "passed": all(c["passed"] for c in checks), "seconds": round(time.perf_counter() - t0, 3),
    }
    if write_report:
        report["report_path"] = str(write_check_report(engine_path, report))
    if verbose:
        worst = min(c["label_agreement"] for c in checks)
        print(f"[{'PASS' if report['passed'] else 'FAIL'}] {engine_path} (TensorRT, {backend.precision}): "
              f"min label agreement {worst:.5f}, threshold {minimum}")
    return report


def build_tensorrt(
    onnx_path: str | Path,
    out_dir: str | Path,
    *,
    precision: str = "float16",
    profiles: list[Profile] | None = None,
    calibration: str | Path | None = None,
    calibration_count: int = 256,
    workspace_gib: float = 4.0,
    name: str = "model",
) -> dict[str, Any]:
    """Build ``<out_dir>/<name>.plan`` (+ ``.plan.json``) from an ONNX export, choosing the route the installed
    TensorRT supports for ``precision`` (flags on TensorRT 10; typed ONNX / ModelOpt Q/DQ on 11 and for fp8)."""
    trt = require_tensorrt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profiles = profiles or default_profiles()
    calib_images = None
    # A Q/DQ graph carries its own scales (explicit quantisation): no calibration data needed.
    if precision in ("int8", "fp8") and not onnx_has_qdq(onnx_path):
        if calibration is None:
            raise ValueError(f"{precision} needs calibration data: --calibration DIR_OR_NPY (a dataset you name)")
        p = profiles[0]
        calib_images = load_calibration_images(calibration, count=calibration_count, size=(p.opt[1], p.opt[2]))
        flags_gone = not hasattr(trt.BuilderFlag, "INT8")
        if (precision == "fp8" or flags_gone) and not onnx_has_qdq(onnx_path):
            onnx_path = quantize_onnx(onnx_path, out_dir / f"{name}.{precision}.qdq.onnx", calib_images,
                                      mode=precision)
            calib_images = None
    return build_engine(
        onnx_path, out_dir / f"{name}.plan", precision=precision, profiles=profiles, workspace_gib=workspace_gib,
        timing_cache=out_dir / "timing.cache", calibration=calib_images,
        calibration_cache=out_dir / f"{name}.int8.calib" if precision == "int8" else None,
    )
