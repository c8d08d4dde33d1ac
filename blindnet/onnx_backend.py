"""ONNX: the graph contract, the exporter core, and the ONNX Runtime backend for the :class:`Predictor`.

The exporter core lives here (not in the ``export`` stage folder) so that an installed ``blindnet`` can turn a
checkpoint into an ONNX file on first use (``OnnxBackend.from_path("model.safetensors")``); ``python -m blindnet.export``
adds the CLI, the parity check and the other formats on top.

Graph contract (also written into the model's ``metadata_props`` so that any consumer can read it back):

* input ``images``:
    - default: float32 ``N x 3 x H x W``, already ImageNet-normalised (what :class:`DeepLabV3Plus` takes);
    - ``normalize_input=True``: uint8 RGB ``N x H x W x 3`` (``input_layout="NHWC"``, the layout decoders and the
      :class:`~blindnet.inference.Predictor` produce) or ``N x 3 x H x W`` (``"NCHW"``); the ImageNet normalisation
      runs in-graph, so a server uploads 1 byte per channel instead of 4.
* output:
    - default ``logits``: float32 ``N x C x H x W``;
    - ``argmax=True``: ``labels`` ``N x H x W`` uint8 (or int32), about 80x smaller than float logits for 19 classes.
* ``fp16=True``: weights and compute in float16; the float input/output (if any) stays float32 (casts in-graph), so
  callers and Triton configs do not change with the precision.

Batch, height and width are dynamic by default. The dynamo exporter (``torch.onnx.export(dynamo=True)``, the default
since torch 2.9) is tried first; the TorchScript exporter is the fallback, and :class:`ExportResult` says which one
produced the file.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from blindnet.inference import IMAGENET_MEAN, IMAGENET_STD, Backend, BackendOutput, norm_stride_of

#: Key prefix of the facts written into the ONNX ``metadata_props``.
META_PREFIX = "blindnet."
INPUT_NAME = "images"
LOGITS_NAME = "logits"
LABELS_NAME = "labels"
LABEL_DTYPES: dict[str, torch.dtype] = {"uint8": torch.uint8, "int32": torch.int32}
LAYOUTS = ("NHWC", "NCHW")
#: Smallest height/width the dynamic graph accepts. Below 32 px the /16 feature map collapses to 1 x 1 and
#: torch.export specialises on it; nobody segments thumbnails that small.
MIN_SIDE = 32
MAX_SIDE = 8192
MAX_BATCH = 1024



class ExportError(RuntimeError):
    """Export failed, or the exported file failed its own verification."""


@dataclass
class ExportResult:
    """What :func:`export_onnx` produced.

    Attributes:
        path: the ``.onnx`` file.
        exporter: ``"dynamo"`` or ``"torchscript"`` (the fallback, used only when dynamo failed).
        opset: ONNX opset of the default domain.
        input_name/input_dtype/input_layout: the input tensor (``"NCHW"`` float32 normalised or uint8 RGB).
        output_name/output_dtype: ``logits`` (float32) or ``labels`` (uint8/int32).
        normalize_input, argmax, fp16, dynamic: the export options.
        num_classes: classes of the network.
        dynamo_error: why the dynamo exporter failed, when the fallback was used.
        seconds: wall time of the export.
    """

    path: Path
    exporter: str
    opset: int
    input_name: str
    input_dtype: str
    input_layout: str
    output_name: str
    output_dtype: str
    normalize_input: bool
    argmax: bool
    fp16: bool
    dynamic: bool
    num_classes: int
    dynamo_error: str | None = None
    seconds: float = 0.0
    model_config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


class DeployWrapper(nn.Module):
    """The network plus optional in-graph pre-processing (uint8 -> normalised float) and argmax.

    ``forward``: ``images`` (see module docstring) -> logits ``N x C x H x W`` float32 or labels ``N x H x W``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        normalize_input: bool = False,
        input_layout: str = "NHWC",
        argmax: bool = False,
        label_dtype: str = "uint8",
        fp16: bool = False,
    ) -> None:
        super().__init__()
        if input_layout not in LAYOUTS:
            raise ValueError(f"input_layout must be one of {LAYOUTS}, got {input_layout!r}")
        if label_dtype not in LABEL_DTYPES:
            raise ValueError(f"label_dtype must be one of {sorted(LABEL_DTYPES)}, got {label_dtype!r}")
        num_classes = int(getattr(getattr(model, "config", None), "num_classes", 19))
        if argmax and label_dtype == "uint8" and num_classes > 256:
            raise ValueError(f"{num_classes} classes do not fit uint8 labels; use label_dtype='int32'")
        self.model = model
        self.normalize_input = normalize_input
        self.input_layout = input_layout
        self.argmax = argmax
        self.label_dtype = LABEL_DTYPES[label_dtype]
        self.fp16 = fp16
        # (x/255 - mean)/std folded into one multiply-add: x * scale + shift, computed in float32 (uint8 range
        # is exact there) before any cast to float16.
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if self.normalize_input:
            if self.input_layout == "NHWC":
                x = x.permute(0, 3, 1, 2)
            x = x.to(torch.float32) * self.scale + self.shift
        if self.fp16:
            x = x.to(torch.float16)
        logits = self.model(x)
        if self.fp16:
            # Back to float32 before argmax/output: callers keep one float type, and ArgMax over float16 is not
            # implemented by every runtime (ONNX Runtime CPU among them).
            logits = logits.to(torch.float32)
        if self.argmax:
            return logits.argmax(dim=1).to(self.label_dtype)
        return logits


def example_input(
    *, batch: int = 2, size: tuple[int, int] = (64, 96), normalize_input: bool = False, input_layout: str = "NHWC",
    seed: int = 0,
) -> torch.Tensor:
    """A random input of the graph's kind: uint8 images (``N x H x W x 3`` or ``N x 3 x H x W``) or normalised
    float32 ``N x 3 x H x W``."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    if normalize_input:
        shape = (batch, h, w, 3) if input_layout == "NHWC" else (batch, 3, h, w)
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return torch.randn(batch, 3, h, w, generator=g)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = 18,
    dynamic: bool = True,
    normalize_input: bool = False,
    input_layout: str = "NHWC",
    argmax: bool = False,
    label_dtype: str = "uint8",
    fp16: bool = False,
    size: tuple[int, int] = (64, 96),
    batch: int = 2,
    exporter: str = "auto",
) -> ExportResult:
    """Export ``model`` (a :class:`~blindnet.models.DeepLabV3Plus`) to ONNX and check it with ``onnx.checker``.

    Args:
        model: the deployable network (any device/dtype; it is copied to CPU float32 first).
        path: destination ``.onnx`` file.
        opset: ONNX opset (>= 17).
        dynamic: dynamic batch, height and width (``[1, 1024] x [32, 8192]^2``); else fixed at ``batch x size``.
        normalize_input: take uint8 RGB and normalise in-graph (see module docstring).
        input_layout: ``"NHWC"`` or ``"NCHW"`` for the uint8 input (ignored without ``normalize_input``).
        argmax: output ``labels`` ``N x H x W`` (``label_dtype``) instead of float32 logits.
        label_dtype: ``"uint8"`` (<= 256 classes) or ``"int32"``.
        fp16: float16 weights and compute, float32 at the graph boundary.
        size: ``(H, W)`` of the example input (the fixed size when ``dynamic=False``).
        batch: batch of the example input (>= 2, so that the batch dimension is not specialised to 1).
        exporter: ``"auto"`` (dynamo, then TorchScript on failure), ``"dynamo"`` or ``"torchscript"``.

    Returns:
        :class:`ExportResult` describing the file.

    Raises:
        ExportError: both exporters failed, or the file does not pass ``onnx.checker``.
    """
    import onnx

    if opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNorm/Resize semantics we rely on), got {opset}")
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    if dynamic and min(size) < MIN_SIDE:
        raise ValueError(f"example size {size} is below the dynamic graph's minimum side of {MIN_SIDE}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    num_classes = int(getattr(config, "num_classes", 19))
    base = _cpu_copy(model)
    if fp16:
        base = base.half()
    wrapper = DeployWrapper(
        base, normalize_input=normalize_input, input_layout=input_layout, argmax=argmax,
        label_dtype=label_dtype, fp16=fp16,
    ).eval()
    x = example_input(batch=batch, size=size, normalize_input=normalize_input, input_layout=input_layout)
    output_name = LABELS_NAME if argmax else LOGITS_NAME

    t0 = time.perf_counter()
    dynamo_error: str | None = None
    used = None
    if exporter in ("auto", "dynamo"):
        try:
            _export_dynamo(wrapper, x, path, opset, dynamic, normalize_input, input_layout, output_name)
            used = "dynamo"
        except Exception as exc:  # the dynamo exporter raises many types; all mean "try the other one"
            dynamo_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
            if exporter == "dynamo":
                raise ExportError(f"dynamo ONNX export failed: {dynamo_error}") from exc
    if used is None:
        try:
            _export_torchscript(wrapper, x, path, min(opset, 20), dynamic, normalize_input, input_layout, output_name)
            used = "torchscript"
        except Exception as exc:
            raise ExportError(
                f"ONNX export failed with both exporters. dynamo: {dynamo_error}; torchscript: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
    seconds = time.perf_counter() - t0

    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"{path}: exported graph fails onnx.checker: {exc}") from exc
    in_dtype = "uint8" if normalize_input else "float32"
    out_dtype = label_dtype if argmax else "float32"
    layout = input_layout if normalize_input else "NCHW"
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    result = ExportResult(
        path=path, exporter=used, opset=int(opset_used), input_name=INPUT_NAME, input_dtype=in_dtype,
        input_layout=layout, output_name=output_name, output_dtype=out_dtype, normalize_input=normalize_input,
        argmax=argmax, fp16=fp16, dynamic=dynamic, num_classes=num_classes, dynamo_error=dynamo_error,
        seconds=round(seconds, 3), model_config=config.to_dict() if hasattr(config, "to_dict") else {},
    )
    _write_metadata(proto, result)
    if not argmax:
        # The TorchScript exporter leaves the class axis symbolic; pin it so consumers (Triton configs, TensorRT)
        # see N x C x H x W with the real C.
        dim = proto.graph.output[0].type.tensor_type.shape.dim[1]
        if not dim.HasField("dim_value"):
            dim.Clear()
            dim.dim_value = num_classes
    onnx.save(proto, str(path))
    return result


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()


def _dynamic_dims(normalize_input: bool, input_layout: str) -> tuple[int, int, int]:
    """Indices of (batch, height, width) in the input tensor."""
    return (0, 1, 2) if normalize_input and input_layout == "NHWC" else (0, 2, 3)


def _export_dynamo(
    wrapper: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic: bool, normalize_input: bool,
    input_layout: str, output_name: str,
) -> None:
    from torch.export import Dim

    kwargs: dict[str, Any] = {}
    if dynamic:
        b, h, w = _dynamic_dims(normalize_input, input_layout)
        kwargs["dynamic_shapes"] = {
            "images": {
                b: Dim("batch", min=1, max=MAX_BATCH),
                h: Dim("height", min=MIN_SIDE, max=MAX_SIDE),
                w: Dim("width", min=MIN_SIDE, max=MAX_SIDE),
            }
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (x,), str(path), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[output_name], external_data=False, verbose=False, **kwargs,
        )


def _export_torchscript(
    wrapper: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic: bool, normalize_input: bool,
    input_layout: str, output_name: str,
) -> None:
    kwargs: dict[str, Any] = {}
    if dynamic:
        b, h, w = _dynamic_dims(normalize_input, input_layout)
        out_axes = {0: "batch", 1: "height", 2: "width"} if output_name == LABELS_NAME else {
            0: "batch", 2: "height", 3: "width"}
        kwargs["dynamic_axes"] = {INPUT_NAME: {b: "batch", h: "height", w: "width"}, output_name: out_axes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (x,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[output_name], do_constant_folding=True, **kwargs,
        )


def _write_metadata(proto: Any, result: ExportResult) -> None:
    facts = {
        "format": "blindnet-onnx",
        "input_name": result.input_name,
        "input_dtype": result.input_dtype,
        "input_layout": result.input_layout,
        "normalize_input": str(int(result.normalize_input)),
        "output_name": result.output_name,
        "output_kind": "labels" if result.argmax else "logits",
        "output_dtype": result.output_dtype,
        "precision": "float16" if result.fp16 else "float32",
        "num_classes": str(result.num_classes),
        "exporter": result.exporter,
        "mean": json.dumps(IMAGENET_MEAN),
        "std": json.dumps(IMAGENET_STD),
        "model_config": json.dumps(result.model_config),
    }
    del proto.metadata_props[:]
    for key, value in facts.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value


def read_onnx_metadata(path_or_proto: str | Path | Any) -> dict[str, str]:
    """The ``blindnet.*`` facts of an exported file, prefix stripped (empty for a foreign ONNX file)."""
    import onnx

    proto = onnx.load(str(path_or_proto), load_external_data=False) if isinstance(path_or_proto, (str, Path)) \
        else path_or_proto
    return {p.key[len(META_PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}


def _json_or_empty(text: str | None) -> dict[str, Any]:
    """A metadata value holding a JSON object, or ``{}`` when it is absent or not one."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def normalize_nhwc(images: np.ndarray) -> np.ndarray:
    """uint8 ``N x H x W x 3`` -> float32 ``N x 3 x H x W`` ImageNet-normalised."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def io_spec_from_session(sess: Any, meta: dict[str, str] | None = None) -> dict[str, Any]:
    """How to feed and read an ONNX Runtime session: from our metadata when present, else from the graph's I/O types.

    Returns a dict with ``input_name``, ``input_dtype`` (``uint8``/``float32``/``float16``), ``input_layout``,
    ``normalize_input``, ``output_name``, ``output_kind`` (``logits``/``labels``), ``precision``, ``num_classes``.
    """
    meta = meta if meta is not None else dict(sess.get_modelmeta().custom_metadata_map or {})
    meta = {k[len(META_PREFIX):] if k.startswith(META_PREFIX) else k: v for k, v in meta.items()}
    inp = sess.get_inputs()[0]
    out = sess.get_outputs()[0]
    in_dtype = _ort_type(inp.type)
    out_dtype = _ort_type(out.type)
    normalize_input = in_dtype == "uint8"
    layout = meta.get("input_layout")
    if layout is None:
        # A foreign graph: uint8 with 3 in the last axis is NHWC; everything else NCHW.
        layout = "NHWC" if normalize_input and inp.shape and inp.shape[-1] == 3 else "NCHW"
    output_kind = "labels" if out_dtype in ("uint8", "int32", "int64") else "logits"
    num_classes = meta.get("num_classes")
    if num_classes is None and output_kind == "logits" and isinstance(out.shape[1], int):
        num_classes = out.shape[1]
    return {
        "input_name": inp.name,
        "input_dtype": in_dtype,
        "input_layout": layout,
        "normalize_input": normalize_input,
        "output_name": out.name,
        "output_kind": output_kind,
        "output_dtype": out_dtype,
        "precision": meta.get("precision", "float16" if in_dtype == "float16" else "float32"),
        "num_classes": int(num_classes) if num_classes is not None else 19,
    }


_ORT_TYPES = {
    "tensor(uint8)": "uint8", "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(float)": "float32",
    "tensor(float16)": "float16",
}


def _ort_type(t: str) -> str:
    try:
        return _ORT_TYPES[t]
    except KeyError:
        raise ValueError(f"unsupported ONNX I/O type {t}; expected one of {sorted(_ORT_TYPES)}") from None


def prepare_input(images: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """uint8 ``N x H x W x 3`` images -> the array the graph takes (see :func:`io_spec_from_session`)."""
    if spec["normalize_input"]:
        if spec["input_layout"] == "NCHW":
            return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        return np.ascontiguousarray(images)
    x = normalize_nhwc(images)
    return x.astype(np.float16) if spec["input_dtype"] == "float16" else x


# --------------------------------------------------------------------------------------------------------------------
# The ONNX Runtime backend
# --------------------------------------------------------------------------------------------------------------------

ONNX_SUFFIXES = (".onnx",)
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")


def cuda_available_for_ort() -> bool:
    """True when ONNX Runtime has a CUDA execution provider *and* a CUDA device is visible to torch."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


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
            self.device_id = int(device.split(":")[1]) if ":" in device else 0
            providers: list[Any] = [
                # HEURISTIC: EXHAUSTIVE re-searches conv algorithms at every new input shape (slow first calls).
                ("CUDAExecutionProvider", {"device_id": self.device_id, "cudnn_conv_algo_search": "HEURISTIC"}),
                "CPUExecutionProvider",
            ]
        elif device == "cpu":
            self.device_id = -1
            providers = ["CPUExecutionProvider"]
        else:
            raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:
            raise RuntimeError(f"{path}: ONNX Runtime cannot load this file ({type(exc).__name__}: {exc})") from exc
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
        self._labels_dtype = np.uint8 if self.num_classes <= 256 else np.int32

    @classmethod
    def from_path(
        cls,
        path: str | Path | None,
        *,
        device: str = "cpu",
        precision: str | None = None,
        cache_dir: str | Path | None = None,
        exporter: str = "auto",
        **kwargs: Any,
    ) -> OnnxBackend:
        """Backend for an ``.onnx`` file, or for a checkpoint (exported once into ``cache_dir`` and reused).

        ``path`` None means the shipped default checkpoint. A checkpoint is exported with in-graph normalisation
        (uint8 NHWC input), float logits output (so scores stay available), dynamic shapes, and float16 when
        ``precision="float16"`` (float32 when None). An ``.onnx`` file runs in the precision it was exported in; a
        given ``precision`` must match it.
        """
        from blindnet.resolve import resolve_checkpoint

        path = resolve_checkpoint(path)
        if path.suffix.lower() in ONNX_SUFFIXES:
            return cls(path, device=device, precision=precision, **kwargs)
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise ValueError(f"{path}: expected an .onnx file or a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
        precision = precision or "float32"
        if precision not in ("float32", "float16"):
            raise ValueError(f"ONNX precision must be 'float32' or 'float16', got {precision!r}")
        onnx_path = cached_onnx_for_checkpoint(path, fp16=precision == "float16", cache_dir=cache_dir,
                                               exporter=exporter)
        return cls(onnx_path, device=device, precision=precision, **kwargs)

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
        labels = logits.argmax(axis=1).astype(self._labels_dtype)
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
        x = torch.from_numpy(np.ascontiguousarray(images)).to(dev).permute(0, 3, 1, 2).float()
        mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1) * 255.0
        dtype = torch.float16 if self.spec["input_dtype"] == "float16" else torch.float32
        x = ((x - mean) / std).to(dtype).contiguous()
        torch.cuda.synchronize(dev)  # ORT runs on its own stream: the buffer must be ready
        binding = self.session.io_binding()
        binding.bind_input(self.spec["input_name"], "cuda", self.device_id,
                           np.float16 if dtype == torch.float16 else np.float32, tuple(x.shape), x.data_ptr())
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


def default_cache_dir() -> Path:
    """``$BLINDNET_CACHE`` or ``~/.cache/blindnet``."""
    import os

    return Path(os.environ.get("BLINDNET_CACHE", Path.home() / ".cache" / "blindnet"))


def checkpoint_digest(checkpoint: str | Path) -> str:
    """First 16 hex digits of the SHA-256 of the file's bytes: the cache key of everything derived from it."""
    import hashlib

    digest = hashlib.sha256()
    with open(checkpoint, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def cached_onnx_path(checkpoint: str | Path, *, fp16: bool = False, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`cached_onnx_for_checkpoint` keeps the export of ``checkpoint`` (content hash + export settings)."""
    checkpoint = Path(checkpoint)
    key = (f"{checkpoint.stem}-{checkpoint_digest(checkpoint)}-{'fp16' if fp16 else 'fp32'}-u8nhwc-"
           f"torch{torch.__version__}")
    return Path(cache_dir or default_cache_dir() / "onnx") / f"{key}.onnx"


def check_report_passed(artifact: str | Path) -> bool:
    """Whether ``<artifact>.check.json`` exists and records a passed parity check."""
    report = Path(artifact).with_name(Path(artifact).name + ".check.json")
    try:
        return bool(json.loads(report.read_text()).get("passed"))
    except (OSError, ValueError):
        return False


def cached_onnx_for_checkpoint(
    checkpoint: str | Path, *, fp16: bool = False, cache_dir: str | Path | None = None, exporter: str = "auto",
    verify: bool = True,
) -> Path:
    """Export ``checkpoint`` to ONNX once; later calls with the same file content and options reuse the file.

    With ``verify`` (the default) the file is parity-checked against PyTorch like every export (the report is stored
    next to it as ``<file>.check.json``); a file that fails is deleted and :class:`ExportError` is raised, so a cache
    entry in use has always passed.
    """
    from blindnet.checkpoint import load_model
    from blindnet.io import atomic_write

    checkpoint = Path(checkpoint)
    target = cached_onnx_path(checkpoint, fp16=fp16, cache_dir=cache_dir)
    if target.exists() and (not verify or check_report_passed(target)):
        return target
    model = load_model(checkpoint)  # raises CheckpointError with a clear message for missing/corrupt files
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Export to a temporary sibling and rename: a concurrent reader never sees half a file.
        atomic_write(target, lambda tmp: export_onnx(model, Path(tmp), normalize_input=True, fp16=fp16,
                                                              exporter=exporter))
    if verify:
        # blindnet.export.onnx imports this module, so its parity check is imported at call time (no import cycle).
        from blindnet.export.onnx import verify_onnx

        report = verify_onnx(target, model, verbose=False)
        if not report.passed:
            target.unlink(missing_ok=True)
            raise ExportError(f"cached export of {checkpoint} failed its parity check: {report.summary()}")
    return target
