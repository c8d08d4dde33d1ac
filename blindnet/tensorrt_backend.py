"""TensorRT: engine build core, build metadata and its compatibility check, and the backend for the :class:`Predictor`.

TensorRT is an optional extra (``pip install 'blindnet[tensorrt]'``) and needs an NVIDIA GPU. Everything that does
not touch the GPU (metadata, compatibility rules, profile shapes) works without it, so it is tested everywhere.

TensorRT 10 vs 11 (the 11.x wheel is what ``pip install tensorrt`` gives now):

* 10.x: ``BuilderFlag.FP16`` / ``INT8`` (+ an ``IInt8EntropyCalibrator2``) select precision on a weakly typed network;
  ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` makes the ONNX file's own types authoritative instead.
* 11.x: those flags and the calibrator API are gone; every network is strongly typed. float16 comes from a float16
  ONNX (``export_onnx(fp16=True)``), int8/fp8 from Q/DQ nodes (NVIDIA ModelOpt ONNX PTQ).

Engines are tied to the TensorRT version and the GPU architecture: :func:`check_engine_compatibility` refuses an engine
whose metadata names another version or GPU, with a message that says so, instead of TensorRT's opaque
deserialisation error.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blindnet.inference import IMAGENET_MEAN, IMAGENET_STD, Backend, BackendOutput, norm_stride_of

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


# --------------------------------------------------------------------------------------------------------------------
# Profiles and metadata
# --------------------------------------------------------------------------------------------------------------------


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
                raise ValueError(f"profile {name}: need 1 <= min <= opt <= max, got {self.min[i]}, {self.opt[i]}, "
                                 f"{self.max[i]}")

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
    return {"tensorrt_version": str(trt.__version__), "gpu_name": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}"}


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
            f"refusing to load {meta.get('engine', 'the engine')}: it was built for " + " and ".join(problems)
            + ". Engines are specific to the TensorRT version and GPU; rebuild it here with "
            "`python -m blindnet.export --format tensorrt --checkpoint CKPT --out DIR` (or pass strict_gpu=False to accept "
            "another GPU model of the same architecture)."
        )


def _dtype_name(trt: Any, dt: Any) -> str:
    names = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64",
             "UINT8": "uint8", "BOOL": "bool", "BF16": "bfloat16", "FP8": "fp8"}
    for attr, name in names.items():
        if hasattr(trt.DataType, attr) and dt == getattr(trt.DataType, attr):
            return name
    return str(dt)


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8, "int32": torch.int32,
                 "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------------------------


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
        onnx_path: the ONNX file (from :func:`blindnet.onnx_backend.export_onnx`). For ``float16`` on TensorRT 11 it
            must be a float16 export; for ``int8``/``fp8`` on TensorRT 11 (and ``fp8`` always) it must carry Q/DQ
            nodes (see :func:`export.tensorrt.quantize_onnx`).
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
    platform = current_platform()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    from blindnet.onnx_backend import read_onnx_metadata

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    onnx_meta = read_onnx_metadata(onnx_path)
    onnx_precision = onnx_meta.get("precision", "float32")
    qdq = onnx_has_qdq(onnx_path)
    major = trt_major(trt)
    has_flag = hasattr(trt, "BuilderFlag") and hasattr(trt.BuilderFlag, "FP16")

    # Strongly typed when the ONNX types are already what we want (or TRT 11, where it is the only mode).
    strongly_typed = major >= 11 or not has_flag or qdq or (precision == "float16" and onnx_precision == "float16")
    if strongly_typed:
        if precision == "float16" and onnx_precision != "float16":
            raise ValueError(
                f"TensorRT {trt.__version__} builds strongly typed networks: float16 needs a float16 ONNX "
                "(export_onnx(fp16=True) / `python -m blindnet.export --fp16`), got a float32 one"
            )
        if precision in ("int8", "fp8") and not qdq:
            raise ValueError(
                f"{precision} on TensorRT {trt.__version__} needs an ONNX with Q/DQ nodes (NVIDIA ModelOpt PTQ: "
                "`pip install nvidia-modelopt`, then `python -m blindnet.export --format tensorrt --precision int8 "
                "--calibration DATA`)"
            )
    if precision == "fp8" and not qdq:
        raise ValueError("fp8 needs an ONNX with FP8 Q/DQ nodes (NVIDIA ModelOpt PTQ)")

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

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    build_seconds = time.perf_counter() - t0
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    from blindnet.io import atomic_write

    atomic_write(engine_path, lambda tmp: Path(tmp).write_bytes(bytes(serialized)))
    if timing_cache is not None:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))

    io = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        io.append({"name": t.name, "mode": "input", "dtype": _dtype_name(trt, t.dtype), "shape": list(t.shape)})
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io.append({"name": t.name, "mode": "output", "dtype": _dtype_name(trt, t.dtype), "shape": list(t.shape)})
    meta = {
        "format": "blindnet-tensorrt",
        "engine": str(engine_path.name),
        "onnx": str(onnx_path),
        **platform,
        "tensorrt_major": major,
        "precision": precision,
        "strongly_typed": bool(strongly_typed),
        "qdq": qdq,
        "int8_calibrator": calibrator is not None,
        "profiles": [asdict(p) for p in profiles],
        "input_layout": layout,
        "normalize_input": onnx_meta.get("normalize_input", "0") == "1",
        "output_kind": onnx_meta.get("output_kind", "logits"),
        "num_classes": int(onnx_meta.get("num_classes", 19)),
        "model_config": json.loads(onnx_meta.get("model_config", "{}")),
        "io": io,
        "workspace_gib": workspace_gib,
        "optimization_level": optimization_level,
        "timing_cache": str(timing_cache) if timing_cache else None,
        "build_seconds": round(build_seconds, 1),
        "torch_version": torch.__version__,
    }
    metadata_path(engine_path).write_text(json.dumps(meta, indent=2))
    return meta


def _entropy_calibrator(
    trt: Any, images: np.ndarray, onnx_meta: dict[str, str], profile: Profile, cache_file: str | Path | None
) -> Any:
    """A TensorRT 10 ``IInt8EntropyCalibrator2`` over uint8 images (converted to the graph's input format)."""
    from blindnet.onnx_backend import prepare_input

    spec = {
        "normalize_input": onnx_meta.get("normalize_input", "0") == "1",
        "input_layout": onnx_meta.get("input_layout", "NCHW"),
        "input_dtype": "uint8" if onnx_meta.get("normalize_input", "0") == "1" else "float32",
    }
    batch = max(1, min(profile.opt[0], len(images)))
    batches = [prepare_input(images[i:i + batch], spec) for i in range(0, len(images) - batch + 1, batch)]
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
                cache_path.write_bytes(bytes(cache))

    return _Calibrator()


# --------------------------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------------------------


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
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255.0
        self._mean, self._std = mean, std
        self.path = engine_path

    @classmethod
    def from_path(
        cls, path: str | Path | None, *, device: str = "cuda", precision: str | None = None, cache_dir: str | Path | None
        = None, **kwargs: Any,
    ) -> TensorRTBackend:
        """Backend for a ``.plan`` engine, or for an ``.onnx``/checkpoint (engine built once into ``cache_dir``).

        An engine runs in the precision it was built in (a given ``precision`` must match); a build defaults to float16.
        """
        import_tensorrt()  # fail early, with the installation hint, before any export work
        from blindnet.onnx_backend import cached_onnx_for_checkpoint, default_cache_dir
        from blindnet.resolve import resolve_checkpoint

        path = resolve_checkpoint(path)
        if path.suffix.lower() in ENGINE_SUFFIXES:
            return cls(path, device=device, precision=precision, **kwargs)
        precision = precision or "float16"
        onnx_path = path if path.suffix.lower() == ".onnx" else cached_onnx_for_checkpoint(
            path, fp16=precision == "float16", cache_dir=cache_dir)
        plat = current_platform()
        tag = f"{plat['gpu_name'].replace(' ', '_')}-trt{plat['tensorrt_version']}-{precision}"
        engine = Path(cache_dir or default_cache_dir() / "tensorrt") / f"{onnx_path.stem}-{tag}.plan"
        if not engine.exists():
            build_engine(onnx_path, engine, precision=precision, timing_cache=engine.parent / "timing.cache")
        return cls(engine, device=device, precision=precision, **kwargs)

    def _select_profile(self, b: int, h: int, w: int, stream: torch.cuda.Stream) -> None:
        for i, p in enumerate(self.profiles):
            if p.contains(b, h, w):
                if i != self._profile_index:
                    self.context.set_optimization_profile_async(i, stream.cuda_stream)
                    self._profile_index = i
                return
        ranges = "; ".join(f"batch {p.min[0]}..{p.max[0]}, {p.min[1]}x{p.min[2]}..{p.max[1]}x{p.max[2]}"
                           for p in self.profiles)
        raise ValueError(f"batch of {b} x {h}x{w} is outside the engine's profiles ({ranges}); resize the input "
                         "(Predictor input_size) or rebuild with a wider profile")

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
            x = ((x.permute(0, 3, 1, 2).float() - self._mean) / self._std).to(self.input_dtype)
        x = x.contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                          device=self.device)
        self.context.set_tensor_address(self.input_name, int(x.data_ptr()))
        self.context.set_tensor_address(self.output_name, int(out.data_ptr()))
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the log above)")
        label_type = torch.uint8 if self.num_classes <= 256 else torch.int32
        if self.outputs_labels:
            return BackendOutput(labels=out.to(label_type).cpu().numpy())
        labels = out.argmax(1).to(label_type).cpu().numpy()
        return BackendOutput(labels=labels, logits=out.float().cpu().numpy() if return_logits else None)

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "device": str(self.device), "precision": self.precision,
                "tensorrt": str(self.meta.get("tensorrt_version")), "gpu": str(self.meta.get("gpu_name")),
                "engine": str(self.path)}
