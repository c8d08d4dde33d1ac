"""TensorRT export (library): calibration data, ModelOpt Q/DQ quantisation, engine build.

Engine files and profiles live in :mod:`blindnet.export.engine`, the runtime in
:mod:`blindnet.backends.tensorrt_backend`, and the parity check of a built engine (which runs it through that
backend) in :mod:`blindnet.export.pipeline`. Everything needs ``tensorrt`` and an NVIDIA GPU except
:func:`load_calibration_images` and the metadata helpers; without TensorRT, :func:`import_tensorrt` raises
:class:`TensorRTUnavailable` whose message says ``pip install 'blindnet[tensorrt]'``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blindnet.export.engine import (
    PRECISIONS,
    Profile,
    _dtype_name,
    current_platform,
    default_profiles,
    import_tensorrt,
    metadata_path,
    trt_major,
)
from blindnet.export.ort import io_spec_from_session, ort_session, prepare_input, read_onnx_metadata
from blindnet.io import IMAGE_SUFFIXES, atomic_write, load_image

#: Label agreement asked of quantised engines (reported next to latency; int8 typically loses ~0.2-1 mIoU).
QUANTIZED_MIN_AGREEMENT = 0.98


def load_calibration_images(
    source: str | Path, *, count: int = 256, size: tuple[int, int] = (1024, 2048), seed: int = 0
) -> np.ndarray:
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
    spec = io_spec_from_session(ort_session(onnx_path))
    data = prepare_input(calibration, spec)
    calib_file = Path(out_path).with_suffix(".calib.npy")
    np.save(calib_file, data)
    quantize(
        onnx_path=str(onnx_path),
        quantize_mode=mode,
        calibration_data_path=str(calib_file),
        output_path=str(out_path),
        high_precision_dtype="fp16",
    )
    return Path(out_path)


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
    trt = import_tensorrt()
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
            onnx_path = quantize_onnx(onnx_path, out_dir / f"{name}.{precision}.qdq.onnx", calib_images, mode=precision)
            calib_images = None
    return build_engine(
        onnx_path,
        out_dir / f"{name}.plan",
        precision=precision,
        profiles=profiles,
        workspace_gib=workspace_gib,
        timing_cache=out_dir / "timing.cache",
        calibration=calib_images,
        calibration_cache=out_dir / f"{name}.int8.calib" if precision == "int8" else None,
    )


def onnx_has_qdq(onnx_path: str | Path) -> bool:
    """True when the graph carries explicit quantisation (QuantizeLinear/DequantizeLinear) nodes."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    precision: str = "float16",
    profiles: list[Profile] | None = None,
    workspace_gib: float = 4.0,
    optimization_level: int = 3,
    timing_cache: str | Path | None = None,
    calibration: np.ndarray | None = None,
    calibration_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Build a serialized TensorRT engine from an ONNX file with the TensorRT Python API; write metadata beside it.

    Args:
        onnx_path: the ONNX file (from :func:`blindnet.export.onnx.export_onnx`). For ``float16`` on TensorRT 11 it
            must be a float16 export; for ``int8``/``fp8`` on TensorRT 11 (and ``fp8`` always) it must carry Q/DQ
            nodes (see :func:`quantize_onnx`).
        engine_path: destination ``.plan``; ``<engine>.json`` receives the build metadata.
        precision: ``float32``, ``float16``, ``int8`` or ``fp8``.
        profiles: optimisation profiles (default :func:`default_profiles`).
        workspace_gib: builder workspace limit.
        optimization_level: builder optimisation level 0..5.
        timing_cache: file to load/save the timing cache (makes rebuilds much faster).
        calibration: TensorRT 10 int8 only, without Q/DQ: uint8 ``N x H x W x 3`` calibration images (N >= 1), fed in
            batches of the profile's opt batch through ``IInt8EntropyCalibrator2``.
        calibration_cache: file for the int8 calibration cache.

    Returns:
        The metadata dict (also written to ``<engine>.json``).
    """
    trt = import_tensorrt()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    onnx_meta = read_onnx_metadata(onnx_path)
    onnx_precision = onnx_meta.get("precision", "float32")
    qdq = onnx_has_qdq(onnx_path)

    strongly_typed = _strongly_typed(trt, precision, onnx_precision, qdq)

    builder, network, parser = _parse_network(trt, onnx_path, strongly_typed)  # the parser owns the weights

    config, profiles, layout, calibrator = _builder_config(
        trt,
        builder,
        network,
        onnx_meta,
        precision=precision,
        strongly_typed=strongly_typed,
        profiles=profiles,
        workspace_gib=workspace_gib,
        optimization_level=optimization_level,
        timing_cache=timing_cache,
        calibration=calibration,
        calibration_cache=calibration_cache,
    )

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    build_seconds = time.perf_counter() - t0
    engine_path.parent.mkdir(parents=True, exist_ok=True)

    atomic_write(engine_path, lambda tmp: Path(tmp).write_bytes(bytes(serialized)))
    if timing_cache is not None:
        # atomic: a build killed mid-write must not leave a cache the next build trips over
        cache_bytes = bytes(config.get_timing_cache().serialize())
        atomic_write(timing_cache, lambda tmp: Path(tmp).write_bytes(cache_bytes))

    meta = _engine_metadata(
        trt,
        network,
        onnx_path,
        engine_path,
        onnx_meta,
        precision=precision,
        strongly_typed=strongly_typed,
        qdq=qdq,
        calibrated=calibrator is not None,
        profiles=profiles,
        layout=layout,
        workspace_gib=workspace_gib,
        optimization_level=optimization_level,
        timing_cache=timing_cache,
        build_seconds=build_seconds,
    )
    text = json.dumps(meta, indent=2)
    atomic_write(metadata_path(engine_path), lambda tmp: Path(tmp).write_text(text))
    return meta


def _entropy_calibrator(
    trt: Any, images: np.ndarray, onnx_meta: dict[str, str], profile: Profile, cache_file: str | Path | None
) -> Any:
    """A TensorRT 10 ``IInt8EntropyCalibrator2`` over uint8 images (converted to the graph's input format)."""

    spec = {
        "normalize_input": onnx_meta.get("normalize_input", "0") == "1",
        "input_layout": onnx_meta.get("input_layout", "NCHW"),
        "input_dtype": "uint8" if onnx_meta.get("normalize_input", "0") == "1" else "float32",
    }
    batch = max(1, min(profile.opt[0], len(images)))
    batches = [prepare_input(images[i : i + batch], spec) for i in range(0, len(images) - batch + 1, batch)]
    cache_path = Path(cache_file) if cache_file else None

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self._next = 0
            self._device: torch.Tensor | None = None  # kept alive while TensorRT reads it

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._next >= len(batches):
                return None
            self._device = torch.from_numpy(batches[self._next]).cuda()
            self._next += 1
            return [int(self._device.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path and cache_path.exists() else None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_path:
                data = bytes(cache)
                atomic_write(cache_path, lambda tmp: Path(tmp).write_bytes(data))

    return _Calibrator()


def _strongly_typed(trt: Any, precision: str, onnx_precision: str, qdq: bool) -> bool:
    """Whether to build a strongly typed network (the ONNX types decide precision), refusing combinations that
    cannot give ``precision``."""
    major = trt_major(trt)
    has_flag = hasattr(trt, "BuilderFlag") and hasattr(trt.BuilderFlag, "FP16")
    # Strongly typed when the ONNX types are already what we want (or TRT 11, where it is the only mode).
    strongly_typed = major >= 11 or not has_flag or qdq or (precision == "float16" and onnx_precision == "float16")
    if strongly_typed:
        if precision == "float16" and onnx_precision != "float16":
            raise ValueError(
                f"TensorRT {trt.__version__} builds strongly typed networks: float16 needs a float16 ONNX "
                "(export_onnx(fp16=True) / `blindnet export --fp16`), got a float32 one"
            )
        if precision in ("int8", "fp8") and not qdq:
            raise ValueError(
                f"{precision} on TensorRT {trt.__version__} needs an ONNX with Q/DQ nodes (`blindnet export --format "
                "tensorrt --precision int8` writes one; fp8 needs NVIDIA ModelOpt)"
            )
    if precision == "fp8" and not qdq:
        raise ValueError("fp8 needs an ONNX with FP8 Q/DQ nodes (NVIDIA ModelOpt PTQ)")

    return strongly_typed


def _builder_config(
    trt: Any,
    builder: Any,
    network: Any,
    onnx_meta: dict[str, str],
    *,
    precision: str,
    strongly_typed: bool,
    profiles: list[Profile] | None,
    workspace_gib: float,
    optimization_level: int,
    timing_cache: str | Path | None,
    calibration: np.ndarray | None,
    calibration_cache: str | Path | None,
) -> tuple[Any, list[Profile], str, Any]:
    """The builder config: memory, precision flags (weakly typed builds only), optimisation profiles, the int8
    calibrator where one is needed, and the timing cache. Returns ``(config, profiles, input layout, calibrator)``."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = int(optimization_level)
    if not strongly_typed:
        if precision in ("float16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)  # int8 engines fall back to fp16 where int8 is slower/unsupported
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        if precision == "float32" and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # true float32, so parity with PyTorch holds to 1e-4

    inp = network.get_input(0)
    layout = onnx_meta.get("input_layout") or ("NHWC" if inp.shape[-1] == 3 else "NCHW")
    profiles = profiles or default_profiles()
    trt_profiles = []
    for p in profiles:
        prof = builder.create_optimization_profile()
        prof.set_shape(inp.name, *p.shapes(layout))
        config.add_optimization_profile(prof)
        trt_profiles.append(prof)

    calibrator = None
    if precision == "int8" and not strongly_typed:
        if calibration is None or len(calibration) == 0:
            raise ValueError("int8 without Q/DQ nodes needs calibration images (`--calibration DIR_OR_NPY`)")
        config.set_calibration_profile(trt_profiles[0])
        calibrator = _entropy_calibrator(trt, calibration, onnx_meta, profiles[0], calibration_cache)
        config.int8_calibrator = calibrator

    cache_bytes = b""
    if timing_cache is not None and Path(timing_cache).exists():
        cache_bytes = Path(timing_cache).read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    return config, profiles, layout, calibrator


def _engine_io(trt: Any, network: Any) -> list[dict[str, Any]]:
    """Name, direction, dtype and shape of every network input and output, for the engine's metadata."""
    io = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        io.append({"name": t.name, "mode": "input", "dtype": _dtype_name(trt, t.dtype), "shape": list(t.shape)})
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io.append({"name": t.name, "mode": "output", "dtype": _dtype_name(trt, t.dtype), "shape": list(t.shape)})
    return io


def _parse_network(trt: Any, onnx_path: Path, strongly_typed: bool) -> tuple[Any, Any, Any]:
    """``(builder, network, parser)`` for the ONNX file; the parser must outlive the build (it holds the weights)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    return builder, network, parser


def _engine_metadata(
    trt: Any,
    network: Any,
    onnx_path: Path,
    engine_path: Path,
    onnx_meta: dict[str, str],
    *,
    precision: str,
    strongly_typed: bool,
    qdq: bool,
    calibrated: bool,
    profiles: list[Profile],
    layout: str,
    workspace_gib: float,
    optimization_level: int,
    timing_cache: str | Path | None,
    build_seconds: float,
) -> dict[str, Any]:
    """What ``<engine>.json`` records: the platform it was built on (checked before loading), the graph contract
    taken over from the ONNX file, and the build settings."""
    return {
        "format": "blindnet-tensorrt",
        "engine": str(engine_path.name),
        "onnx": str(onnx_path),
        **current_platform(),
        "tensorrt_major": trt_major(trt),
        "precision": precision,
        "strongly_typed": bool(strongly_typed),
        "qdq": qdq,
        "int8_calibrator": calibrated,
        "profiles": [asdict(p) for p in profiles],
        "input_layout": layout,
        "normalize_input": onnx_meta.get("normalize_input", "0") == "1",
        "output_kind": onnx_meta.get("output_kind", "logits"),
        "num_classes": int(onnx_meta.get("num_classes", 19)),
        "model_config": json.loads(onnx_meta.get("model_config", "{}")),
        "io": _engine_io(trt, network),
        "workspace_gib": workspace_gib,
        "optimization_level": optimization_level,
        "timing_cache": str(timing_cache) if timing_cache else None,
        "build_seconds": round(build_seconds, 1),
        "torch_version": torch.__version__,
    }
