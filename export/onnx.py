"""ONNX export: the graph contract, the exporter, and the parity check against PyTorch.

One library serves every caller: ``blindnet export``, the runtime's cache of exported checkpoints
(:mod:`blindnet.resolve`) and the benchmarks. Parity thresholds: float32 logits within a relative error of 1e-4 and
labels agreeing on >= 99.9% of pixels; float16 labels agreeing on >= 99.5%.

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
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from blindnet.export.ort import (
    INPUT_NAME,
    LABEL_DTYPES,
    LABELS_NAME,
    LAYOUTS,
    LOGITS_NAME,
    META_PREFIX,
    io_spec_from_session,
    normalize_nhwc,
    ort_session,
    prepare_input,
    read_onnx_metadata,
)
from blindnet.io import atomic_write
from blindnet.models.inputs import IMAGENET_MEAN, IMAGENET_STD, normalize

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

    # registered buffers (constants of the exported graph)
    scale: torch.Tensor
    shift: torch.Tensor

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
        # The same rule as blindnet.backends.base.normalize, folded: scale = normalize(1) - normalize(0) and
        # shift = normalize(0) per channel.
        zero = normalize(torch.zeros(1, 3, 1, 1), channels_last=False)
        self.register_buffer("scale", normalize(torch.ones(1, 3, 1, 1), channels_last=False) - zero, persistent=False)
        self.register_buffer("shift", zero, persistent=False)

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
    *,
    batch: int = 2,
    size: tuple[int, int] = (64, 96),
    normalize_input: bool = False,
    input_layout: str = "NHWC",
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
        base,
        normalize_input=normalize_input,
        input_layout=input_layout,
        argmax=argmax,
        label_dtype=label_dtype,
        fp16=fp16,
    ).eval()
    x = example_input(batch=batch, size=size, normalize_input=normalize_input, input_layout=input_layout)
    output_name = LABELS_NAME if argmax else LOGITS_NAME

    t0 = time.perf_counter()
    used, dynamo_error = _run_exporters(
        wrapper, x, path, exporter, opset, dynamic, normalize_input, input_layout, output_name
    )
    seconds = time.perf_counter() - t0
    return _check_and_describe(
        path,
        used,
        opset,
        dynamic=dynamic,
        normalize_input=normalize_input,
        input_layout=input_layout,
        argmax=argmax,
        label_dtype=label_dtype,
        fp16=fp16,
        output_name=output_name,
        config=config,
        num_classes=num_classes,
        dynamo_error=dynamo_error,
        seconds=seconds,
    )


def _check_and_describe(
    path: Path,
    used: str,
    opset: int,
    *,
    dynamic: bool,
    normalize_input: bool,
    input_layout: str,
    argmax: bool,
    label_dtype: str,
    fp16: bool,
    output_name: str,
    config: Any,
    num_classes: int,
    dynamo_error: str | None,
    seconds: float,
) -> ExportResult:
    """Run ``onnx.checker`` on the written file, then store the graph contract in its metadata."""
    import onnx  # optional dependency (the 'export' extra)

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
        path=path,
        exporter=used,
        opset=int(opset_used),
        input_name=INPUT_NAME,
        input_dtype=in_dtype,
        input_layout=layout,
        output_name=output_name,
        output_dtype=out_dtype,
        normalize_input=normalize_input,
        argmax=argmax,
        fp16=fp16,
        dynamic=dynamic,
        num_classes=num_classes,
        dynamo_error=dynamo_error,
        seconds=round(seconds, 3),
        model_config=config.to_dict() if hasattr(config, "to_dict") else {},
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


def _run_exporters(
    wrapper: nn.Module,
    x: torch.Tensor,
    path: Path,
    exporter: str,
    opset: int,
    dynamic: bool,
    normalize_input: bool,
    input_layout: str,
    output_name: str,
) -> tuple[str, str | None]:
    """Write ``path`` with the dynamo exporter, or the TorchScript one when dynamo fails (``auto``) or is not asked
    for; returns ``(exporter used, dynamo's error or None)``."""
    dynamo_error: str | None = None
    if exporter in ("auto", "dynamo"):
        try:
            _export_dynamo(wrapper, x, path, opset, dynamic, normalize_input, input_layout, output_name)
            return "dynamo", None
        except Exception as exc:  # the dynamo exporter raises many types; all mean "try the other one"
            dynamo_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
            if exporter == "dynamo":
                raise ExportError(f"dynamo ONNX export failed: {dynamo_error}") from exc
    try:
        _export_torchscript(wrapper, x, path, min(opset, 20), dynamic, normalize_input, input_layout, output_name)
    except Exception as exc:
        raise ExportError(
            f"ONNX export failed with both exporters. dynamo: {dynamo_error}; torchscript: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    return "torchscript", dynamo_error


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()


def _dynamic_dims(normalize_input: bool, input_layout: str) -> tuple[int, int, int]:
    """Indices of (batch, height, width) in the input tensor."""
    return (0, 1, 2) if normalize_input and input_layout == "NHWC" else (0, 2, 3)


def _export_dynamo(
    wrapper: nn.Module,
    x: torch.Tensor,
    path: Path,
    opset: int,
    dynamic: bool,
    normalize_input: bool,
    input_layout: str,
    output_name: str,
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
            wrapper,
            (x,),
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            external_data=False,
            verbose=False,
            **kwargs,
        )


def _export_torchscript(
    wrapper: nn.Module,
    x: torch.Tensor,
    path: Path,
    opset: int,
    dynamic: bool,
    normalize_input: bool,
    input_layout: str,
    output_name: str,
) -> None:
    kwargs: dict[str, Any] = {}
    if dynamic:
        b, h, w = _dynamic_dims(normalize_input, input_layout)
        out_axes = (
            {0: "batch", 1: "height", 2: "width"}
            if output_name == LABELS_NAME
            else {0: "batch", 2: "height", 3: "width"}
        )
        kwargs["dynamic_axes"] = {INPUT_NAME: {b: "batch", h: "height", w: "width"}, output_name: out_axes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (x,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            do_constant_folding=True,
            **kwargs,
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


# Where the thresholds come from (ONNX Runtime CPU vs PyTorch on random networks at the parity-check sizes, measured
# with PyTorch's default kernels (AVX-512) and with ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41):
# * float32 logits differ only by summation order: at most 1.8e-5 of the largest logit (MobileNetV2; ShuffleNetV2
#   2.2e-6, ResNet-50 3.3e-6), so 1e-4 is >= 5x the worst. Relative to the largest logit, not per element: a logit
#   near zero has no meaningful relative error.
# * float32 labels change only where the top two logits are closer than that error: measured 100% agreement; 99.9%
#   allows a few such near-ties per image on another CPU.
# * float16 keeps 11 significant bits: logits move by 1.2e-3 relative and 99.97% of labels agree (measured); 99.5%
#   allows 17x the measured share of flipped labels.
FP32_MAX_REL_ERROR = 1e-4
FP32_MIN_AGREEMENT = 0.999
FP16_MIN_AGREEMENT = 0.995


def op_histogram(path_or_proto: str | Path | Any) -> dict[str, int]:
    """Number of nodes per op type in the main graph (``{"Conv": 71, ...}``), largest first."""
    import onnx  # optional dependency (the 'export' extra)

    proto = onnx.load(str(path_or_proto)) if isinstance(path_or_proto, (str, Path)) else path_or_proto
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in proto.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# --------------------------------------------------------------------------------------------------------------------
# Parity check
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ParityCheck:
    """One comparison at one input shape.

    ``rel_error`` = max |onnx - torch| / max |torch| over all logits (relative to the logits' range; per-element
    relative error is meaningless where a logit crosses zero). None for label-only graphs.
    """

    batch: int
    height: int
    width: int
    label_agreement: float
    max_abs_error: float | None
    rel_error: float | None
    passed: bool


@dataclass
class ParityReport:
    """Result of :func:`verify_onnx` (also written next to the file as ``<name>.onnx.check.json``)."""

    path: str
    runtime: str
    providers: list[str]
    precision: str
    output_kind: str
    checker_ok: bool
    max_rel_error: float | None
    min_label_agreement: float
    thresholds: dict[str, float]
    checks: list[ParityCheck]
    passed: bool
    seconds: float = 0.0
    report_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        rel = "n/a" if self.max_rel_error is None else f"{self.max_rel_error:.2e}"
        shapes = ", ".join(f"{c.batch}x{c.height}x{c.width}" for c in self.checks)
        return (
            f"[{'PASS' if self.passed else 'FAIL'}] {self.path} ({self.runtime}, {self.precision}, {self.output_kind}): "
            f"max rel error {rel}, min label agreement {self.min_label_agreement:.5f} at {shapes}; "
            f"thresholds {self.thresholds}"
        )

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise ExportError(f"parity check failed: {self.summary()}")


def thresholds_for(precision: str, output_kind: str) -> dict[str, float]:
    """The acceptance thresholds: float32 logits rel error <= 1e-4 and labels >= 99.9%; float16 labels >= 99.5%."""
    if precision == "float16":
        return {"min_label_agreement": FP16_MIN_AGREEMENT}
    t = {"min_label_agreement": FP32_MIN_AGREEMENT}
    if output_kind == "logits":
        t["max_rel_error"] = FP32_MAX_REL_ERROR
    return t


def reference_logits(model: nn.Module, images_uint8_nhwc: np.ndarray) -> np.ndarray:
    """PyTorch float32 CPU logits ``N x C x H x W`` for uint8 ``N x H x W x 3`` images (TorchBackend's maths)."""
    import copy

    ref = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    x = normalize_nhwc(images_uint8_nhwc)
    with torch.inference_mode():
        return ref(torch.from_numpy(x)).numpy()


def compare_outputs(
    reference: np.ndarray, output: np.ndarray, *, output_kind: str
) -> tuple[float, float | None, float | None]:
    """``(label_agreement, max_abs_error, rel_error)`` of an engine's output against reference logits."""
    ref_labels = reference.argmax(1)
    if output_kind == "labels":
        return float((output.astype(np.int64) == ref_labels).mean()), None, None
    out = output.astype(np.float32)
    max_abs = float(np.abs(out - reference).max())
    rel = max_abs / max(float(np.abs(reference).max()), 1e-12)
    return float((out.argmax(1) == ref_labels).mean()), max_abs, rel


def verify_onnx(
    path: str | Path,
    model: nn.Module,
    *,
    shapes: tuple[tuple[int, int, int], ...] = ((2, 64, 96), (1, 80, 112)),
    seed: int = 0,
    providers: list[str] | None = None,
    write_report: bool = True,
    verbose: bool = True,
) -> ParityReport:
    """Check an exported file: ``onnx.checker``, then ONNX Runtime against PyTorch on fresh random images.

    Args:
        path: the ``.onnx`` file (its ``blindnet.*`` metadata says how to feed it; see :func:`export_onnx`).
        model: the PyTorch network it was exported from (float32 reference on CPU).
        shapes: ``(batch, H, W)`` triples; use at least two sizes, one not divisible by 16, to exercise dynamic axes.
        seed: seed of the random uint8 images.
        providers: ONNX Runtime execution providers (default: CPU, so the check is deterministic everywhere).
        write_report: store the report as JSON next to the file (``<file>.check.json``).
        verbose: print the one-line summary.

    Returns:
        :class:`ParityReport`; ``passed`` is False when a threshold of :func:`thresholds_for` is missed.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    t0 = time.perf_counter()
    try:
        onnx.checker.check_model(str(path), full_check=True)
        checker_ok = True
    except Exception:
        checker_ok = False
    meta = read_onnx_metadata(path)
    providers = providers or ["CPUExecutionProvider"]
    sess = ort_session(path, providers=providers)
    spec = io_spec_from_session(sess, meta)
    thresholds = thresholds_for(spec["precision"], spec["output_kind"])
    rng = np.random.default_rng(seed)
    checks: list[ParityCheck] = []
    # A bar only on a terminal, and only when the summary line is printed too.
    for b, h, w in tqdm(shapes, desc="parity check", unit="shape", leave=False, disable=None if verbose else True):
        images = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
        ref = reference_logits(model, images)
        out = sess.run([spec["output_name"]], {spec["input_name"]: prepare_input(images, spec)})[0]
        agreement, max_abs, rel = compare_outputs(ref, out, output_kind=spec["output_kind"])
        ok = agreement >= thresholds["min_label_agreement"] and (
            "max_rel_error" not in thresholds or (rel is not None and rel <= thresholds["max_rel_error"])
        )
        checks.append(ParityCheck(b, h, w, agreement, max_abs, rel, ok))
    rels = [c.rel_error for c in checks if c.rel_error is not None]
    report = ParityReport(
        path=str(path),
        runtime=f"onnxruntime {ort.__version__}",
        providers=list(sess.get_providers()),
        precision=spec["precision"],
        output_kind=spec["output_kind"],
        checker_ok=checker_ok,
        max_rel_error=max(rels) if rels else None,
        min_label_agreement=min(c.label_agreement for c in checks),
        thresholds=thresholds,
        checks=checks,
        passed=checker_ok and all(c.passed for c in checks),
        seconds=round(time.perf_counter() - t0, 3),
    )
    if write_report:
        report.report_path = str(write_check_report(path, report.to_dict()))
    if verbose:
        print(report.summary())
    return report


def write_check_report(artifact: Path, report: dict[str, Any]) -> Path:
    """Write ``<artifact>.check.json`` next to the artifact (atomically)."""

    target = artifact.with_name(artifact.name + ".check.json")
    text = json.dumps(report, indent=2, default=str)
    return atomic_write(target, lambda tmp: Path(tmp).write_text(text))
