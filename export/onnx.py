"""ONNX export (library): export a network, check the file, compare it with PyTorch, count its nodes.

The graph contract and the exporter core live in :mod:`blindnet.onnx_backend` (so an installed package can export
a checkpoint on first use); this module adds what the ``export`` stage needs on top: the parity check whose result
is printed and stored next to the file (``<file>.check.json``), and per-op node counts.

Acceptance thresholds (issue 5): float32 logits relative error <= 1e-4 and label agreement >= 99.9%; float16 label
agreement >= 99.5%, each at two or more input sizes on fresh random images.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from blindnet.onnx_backend import (
    INPUT_NAME,
    LABELS_NAME,
    LOGITS_NAME,
    META_PREFIX,
    DeployWrapper,
    ExportError,
    ExportResult,
    example_input,
    export_onnx,
    io_spec_from_session,
    normalize_nhwc,
    prepare_input,
    read_onnx_metadata,
)

__all__ = [
    "FP16_MIN_AGREEMENT",
    "FP32_MAX_REL_ERROR",
    "FP32_MIN_AGREEMENT",
    "INPUT_NAME",
    "LABELS_NAME",
    "LOGITS_NAME",
    "META_PREFIX",
    "DeployWrapper",
    "ExportError",
    "ExportResult",
    "ParityCheck",
    "ParityReport",
    "compare_outputs",
    "example_input",
    "export_onnx",
    "io_spec_from_session",
    "op_histogram",
    "prepare_input",
    "read_onnx_metadata",
    "reference_logits",
    "thresholds_for",
    "verify_onnx",
    "write_check_report",
]

FP32_MAX_REL_ERROR = 1e-4
FP32_MIN_AGREEMENT = 0.999
FP16_MIN_AGREEMENT = 0.995


def op_histogram(path_or_proto: str | Path | Any) -> dict[str, int]:
    """Number of nodes per op type in the main graph (``{"Conv": 71, ...}``), largest first."""
    import onnx

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
    sess = ort.InferenceSession(str(path), providers=providers)
    spec = io_spec_from_session(sess, meta)
    thresholds = thresholds_for(spec["precision"], spec["output_kind"])
    rng = np.random.default_rng(seed)
    checks: list[ParityCheck] = []
    for b, h, w in shapes:
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
        path=str(path), runtime=f"onnxruntime {ort.__version__}", providers=list(sess.get_providers()),
        precision=spec["precision"], output_kind=spec["output_kind"], checker_ok=checker_ok,
        max_rel_error=max(rels) if rels else None, min_label_agreement=min(c.label_agreement for c in checks),
        thresholds=thresholds, checks=checks, passed=checker_ok and all(c.passed for c in checks),
        seconds=round(time.perf_counter() - t0, 3),
    )
    if write_report:
        report.report_path = str(write_check_report(path, report.to_dict()))
    if verbose:
        print(report.summary())
    return report


def write_check_report(artifact: Path, report: dict[str, Any]) -> Path:
    """Write ``<artifact>.check.json`` next to the artifact (atomically)."""
    from blindnet.io import atomic_write

    target = artifact.with_name(artifact.name + ".check.json")
    text = json.dumps(report, indent=2, default=str)
    return atomic_write(target, lambda tmp: Path(tmp).write_text(text))

