"""``blindnet export``'s library function: turn a checkpoint into deployable artifacts and verify each one.

:func:`run_export` runs one stage per artifact (ONNX, TensorRT, Triton, cost report); each stage checks what it
built against PyTorch before the next one uses it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from torch import nn
from tqdm import tqdm

from blindnet.backends.tensorrt_backend import TensorRTBackend
from blindnet.checkpoint import load_model
from blindnet.export.cost import cost_report as make_cost_report
from blindnet.export.cost import render_markdown
from blindnet.export.engine import Profile, TensorRTUnavailable, import_tensorrt
from blindnet.export.int8 import INT8_MIN_AGREEMENT, check_int8, quantize_int8
from blindnet.export.onnx import (
    FP16_MIN_AGREEMENT,
    FP32_MAX_REL_ERROR,
    FP32_MIN_AGREEMENT,
    ExportError,
    compare_outputs,
    export_onnx,
    reference_logits,
    verify_onnx,
    write_check_report,
)
from blindnet.export.tensorrt import QUANTIZED_MIN_AGREEMENT, build_tensorrt
from blindnet.export.triton import write_triton_repository
from blindnet.io import write_text
from blindnet.resolve import resolve_checkpoint

FORMATS = ("onnx", "tensorrt", "triton", "all")


def run_export(
    checkpoint: str | Path | None,
    out_dir: str | Path,
    *,
    formats: tuple[str, ...] | list[str] = ("onnx",),
    fp16: bool = False,
    argmax: bool = False,
    uint8_input: bool = False,
    label_dtype: str = "uint8",
    input_layout: str = "NHWC",
    opset: int = 18,
    exporter: str = "auto",
    cost_report: bool = False,
    cost_onnx: bool = False,
    size: tuple[int, int] = (1024, 2048),
    verify_shapes: tuple[tuple[int, int, int], ...] = ((2, 64, 96), (1, 80, 112)),
    precision: str | None = None,
    max_batch: int = 4,
    min_size: tuple[int, int] | None = None,
    max_size: tuple[int, int] | None = None,
    calibration: str | Path | None = None,
    triton_model_name: str = "blindnet",
    triton_max_batch: int | None = None,
    name: str = "model",
    force_int8: bool = False,
    int8_min_agreement: float = INT8_MIN_AGREEMENT,
) -> dict[str, Any]:
    """Export ``checkpoint`` into ``out_dir`` and verify every artifact; returns (and writes ``export.json``) a summary.

    Args:
        checkpoint: a deployable ``.safetensors`` or training ``.pt``; None: the shipped default checkpoint.
        out_dir: output folder.
        formats: any of ``onnx``, ``tensorrt``, ``triton``, ``all``.
        fp16: float16 ONNX (TensorRT float16 is built from it, which TensorRT 11 requires).
        argmax: labels out instead of logits (``label_dtype`` uint8/int32).
        uint8_input: uint8 RGB in (``input_layout`` NHWC/NCHW) with in-graph ImageNet normalisation.
        opset, exporter: ONNX opset and exporter (``auto``: dynamo, TorchScript fallback).
        cost_report: write ``cost.json`` and ``cost.md`` (params, MACs/FLOPs at 2048x1024 and at ``size``).
        cost_onnx: include the BlindNet-vs-baseline ONNX graph comparison in the cost report.
        size: ``(H, W)`` the deployment runs at: TensorRT profile opt/max size and the extra cost-report size.
        verify_shapes: ``(batch, H, W)`` shapes for the ONNX parity check (two sizes, dynamic axes exercised).
        precision: TensorRT precision (default float16 with ``fp16``, else float32); int8/fp8 need ``calibration``.
        max_batch, min_size, max_size: TensorRT profile range (batch 1..max_batch, min_size..max_size).
        calibration: a folder of images or an ``.npy`` (N x H x W x 3 uint8) for int8/fp8.
        triton_model_name, triton_max_batch: Triton repository model name and batch limit.
        name: file stem of the artifacts.
        force_int8: keep an INT8 file that misses its own thresholds (label agreement with float32 at least
            ``int8_min_agreement``, mIoU drop at most 1 point). Without it such a file is discarded and the export
            falls back to float32, with one line saying why.

    Layout: ``formats=["triton"]`` alone makes ``out_dir`` the Triton model repository itself: exactly
    ``<out_dir>/<triton_model_name>/config.pbtxt``, ``labels.txt``, ``export.json`` and ``1/model.onnx``, nothing
    at the top. With other formats the artifacts sit in ``out_dir`` and the repository in ``out_dir/triton``.

    Raises:
        CheckpointError: missing or corrupt checkpoint. TensorRTUnavailable: TensorRT requested but not installed.
        ExportError: an artifact failed its parity check.
    """
    opts = ExportOptions(
        fp16=fp16,
        argmax=argmax,
        uint8_input=uint8_input,
        label_dtype=label_dtype,
        input_layout=input_layout,
        opset=opset,
        exporter=exporter,
        cost_onnx=cost_onnx,
        size=cast("tuple[int, int]", tuple(size)),  # a list (from JSON or YAML) becomes a tuple
        verify_shapes=verify_shapes,
        precision=precision,
        max_batch=max_batch,
        min_size=min_size,
        max_size=max_size,
        calibration=calibration,
        triton_model_name=triton_model_name,
        triton_max_batch=triton_max_batch,
        name=name,
        force_int8=force_int8,
        int8_min_agreement=int8_min_agreement,
    )
    skipped: dict[str, str] = {}
    wanted = _wanted_formats(formats, skipped)
    if "tensorrt" in wanted and precision == "float16":
        opts.fp16 = True  # TensorRT float16 is built from a float16 ONNX: the only route on TensorRT 11, typed on 10
    ckpt = resolve_checkpoint(checkpoint)
    model = load_model(ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "model_config": model.config.to_dict(),
        "artifacts": {},
        "skipped": skipped,
    }
    repository_only = wanted == {"triton"} and not cost_report
    # A repository alone: build in a scratch folder inside out_dir (same file system, so the model moves into place)
    # and leave nothing but the model folder behind.
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out)) if repository_only else out
    try:
        summary_path = _stages(model, out, work, wanted, opts, summary, cost_report, repository_only)
    finally:
        if repository_only:
            shutil.rmtree(work, ignore_errors=True)
    write_text(summary_path, json.dumps(summary, indent=2, default=str))
    return summary


def _stages(
    model: nn.Module,
    out: Path,
    work: Path,
    wanted: set[str],
    opts: ExportOptions,
    summary: dict[str, Any],
    cost_report: bool,
    repository_only: bool,
) -> Path:
    """Run the wanted stages (artifacts into ``work``); returns where ``export.json`` belongs."""
    artifacts = summary["artifacts"]
    if wanted & {"onnx", "tensorrt", "triton"}:
        artifacts.update(_onnx_stage(model, work, opts))
    if "tensorrt" in wanted:
        artifacts.update(_tensorrt_stage(model, work, opts))
    if "triton" in wanted:
        repo = out if repository_only else out / "triton"
        artifacts.update(_triton_stage(work, repo, opts, from_engine="tensorrt" in wanted, move=repository_only))
    if cost_report:
        artifacts.update(_cost_stage(model, out, opts))
    return out / opts.triton_model_name / "export.json" if repository_only else out / "export.json"


@dataclass
class ExportOptions:
    """How :func:`run_export` builds each artifact (its keyword arguments, documented there)."""

    fp16: bool = False
    argmax: bool = False
    uint8_input: bool = False
    label_dtype: str = "uint8"
    input_layout: str = "NHWC"
    opset: int = 18
    exporter: str = "auto"
    cost_onnx: bool = False
    size: tuple[int, int] = (1024, 2048)
    verify_shapes: tuple[tuple[int, int, int], ...] = ((2, 64, 96), (1, 80, 112))
    precision: str | None = None
    max_batch: int = 4
    min_size: tuple[int, int] | None = None
    max_size: tuple[int, int] | None = None
    calibration: str | Path | None = None
    triton_model_name: str = "blindnet"
    triton_max_batch: int | None = None
    name: str = "model"
    force_int8: bool = False
    int8_min_agreement: float = INT8_MIN_AGREEMENT


def _wanted_formats(formats: tuple[str, ...] | list[str], skipped: dict[str, str]) -> set[str]:
    """The formats to build; with ``all``, TensorRT is skipped (and ``skipped`` says why) where it is missing."""
    wanted = set(formats)
    unknown = wanted - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown format(s) {sorted(unknown)}; choose from {FORMATS}")
    if "tensorrt" in wanted or "all" in wanted:
        try:
            import_tensorrt()  # fail before minutes of ONNX export, with the installation hint
        except TensorRTUnavailable as exc:
            if "tensorrt" in wanted:
                raise
            skipped["tensorrt"] = str(exc)  # --format all: do what this machine can, say what it skipped
            print(f"skipping TensorRT: {exc}")
    if "all" in wanted:
        wanted = {"onnx", "triton"} | ({"tensorrt"} if "tensorrt" not in skipped else set())
    return wanted


def _onnx_stage(model: nn.Module, out: Path, o: ExportOptions) -> dict[str, Any]:
    """``<name>.onnx`` checked against PyTorch (and, for INT8, the Q/DQ file both INT8 runtimes use)."""
    res = export_onnx(
        model,
        out / f"{o.name}.onnx",
        opset=o.opset,
        normalize_input=o.uint8_input,
        input_layout=o.input_layout,
        argmax=o.argmax,
        label_dtype=o.label_dtype,
        fp16=o.fp16,
        exporter=o.exporter,
    )
    print(
        f"exported {res.path} with the {res.exporter} exporter in {res.seconds:.1f} s"
        + (f" (dynamo failed: {res.dynamo_error})" if res.dynamo_error else "")
    )
    report = verify_onnx(res.path, model, shapes=o.verify_shapes)
    artifacts: dict[str, Any] = {"onnx": {"export": res.to_dict(), "check": report.to_dict()}}
    report.raise_if_failed()
    if o.precision == "int8" and not o.fp16:
        artifacts.update(_int8_stage(res.path, out, o))
    return artifacts


def _int8_stage(float_onnx: Path, out: Path, o: ExportOptions) -> dict[str, Any]:
    """One Q/DQ file for both INT8 runtimes (ONNX Runtime on CPU runs it, TensorRT builds its engine from it), kept
    only when it meets its thresholds or ``force_int8`` says so; otherwise ``o.precision`` falls back to float32."""
    qdq = quantize_int8(float_onnx, out / f"{o.name}.int8.qdq.onnx")
    check = check_int8(qdq, float_onnx, min_label_agreement=o.int8_min_agreement)
    found = (
        f"label agreement {check['label_agreement']:.4f} (needs {o.int8_min_agreement}), mIoU change "
        f"{check['miou_change']:+.2f} points on held-out generated scenes"
    )
    if check["passed"]:
        print(f"quantised {qdq}: {found}")
        return {"onnx_int8": {"path": str(qdq), "check": check}}
    if o.force_int8:
        print(f"quantised {qdq}: {found}; below its thresholds, kept because of --force-int8")
        return {"onnx_int8": {"path": str(qdq), "check": check, "forced": True}}
    qdq.unlink(missing_ok=True)
    o.precision = "float32"
    print(f"INT8 rejected ({found}); exporting float32 instead (--force-int8 keeps INT8 anyway)")
    return {"onnx_int8": {"rejected": True, "check": check}}


def _tensorrt_stage(model: nn.Module, out: Path, o: ExportOptions) -> dict[str, Any]:
    """``<name>.plan`` built from the ONNX file (the Q/DQ one for INT8) and checked against PyTorch."""
    h, w = o.max_size or o.size
    mh, mw = o.min_size or (min(256, h), min(256, w))
    profile = Profile(min=(1, mh, mw), opt=(1, *o.size), max=(o.max_batch, h, w))
    prec = o.precision or ("float16" if o.fp16 else "float32")
    qdq = out / f"{o.name}.int8.qdq.onnx"
    source = qdq if prec == "int8" and qdq.exists() else out / f"{o.name}.onnx"
    meta = build_tensorrt(source, out, precision=prec, profiles=[profile], calibration=o.calibration, name=o.name)
    check = verify_engine(out / f"{o.name}.plan", model)
    if not check["passed"]:
        raise ExportError(f"TensorRT parity check failed: {json.dumps(check['checks'])}")
    return {"tensorrt": {"metadata": meta, "check": check}}


def _triton_stage(work: Path, repo: Path, o: ExportOptions, *, from_engine: bool, move: bool) -> dict[str, Any]:
    """A Triton model repository ``repo`` around the engine (or the ONNX file) built in ``work``."""
    source = work / f"{o.name}.plan" if from_engine else work / f"{o.name}.onnx"
    model_dir = write_triton_repository(
        source, repo, model_name=o.triton_model_name, max_batch_size=o.triton_max_batch, copy=not move
    )
    print(f"wrote Triton model repository {repo} (model {o.triton_model_name!r} in {model_dir})")
    return {"triton": {"repository": str(repo), "model": str(model_dir)}}


def _cost_stage(model: nn.Module, out: Path, o: ExportOptions) -> dict[str, Any]:
    """``cost.json`` and ``cost.md``: parameters and MACs/FLOPs at 2048x1024, the deployment size and 1024x1024."""
    sizes = list(dict.fromkeys([(1024, 2048), cast("tuple[int, int]", tuple(o.size)), (1024, 1024)]))
    cost = make_cost_report(model, sizes=sizes, onnx=o.cost_onnx, onnx_exporter=o.exporter)
    write_text(out / "cost.json", json.dumps(cost, indent=2, default=str))
    write_text(out / "cost.md", render_markdown(cost))
    print(render_markdown(cost))
    return {"cost": {"json": str(out / "cost.json"), "markdown": str(out / "cost.md")}}


def verify_engine(
    engine_path: str | Path,
    model: nn.Module,
    *,
    shapes: tuple[tuple[int, int, int], ...] | None = None,
    seed: int = 0,
    write_report: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Parity of a TensorRT engine against PyTorch float32, like :func:`export.onnx.verify_onnx`.

    Thresholds: float32 (built without TF32) logits rel error <= 1e-4 and labels >= 99.9%, float16 labels >= 99.5%,
    int8/fp8 labels >= 98%.
    """

    engine_path = Path(engine_path)
    backend = TensorRTBackend(engine_path)
    if shapes is None:
        p = backend.profiles[0]
        shapes = (
            (p.opt[0], p.opt[1], p.opt[2]),
            (p.min[0], max(p.min[1], (p.opt[1] // 2) | 1), max(p.min[2], (p.opt[2] // 2) | 1)),
        )
    minimum = {"float32": FP32_MIN_AGREEMENT, "float16": FP16_MIN_AGREEMENT}.get(
        backend.precision, QUANTIZED_MIN_AGREEMENT
    )
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    checks: list[dict[str, Any]] = []
    # A bar only on a terminal, and only when the summary line is printed too.
    for b, h, w in tqdm(shapes, desc="parity check", unit="shape", leave=False, disable=None if verbose else True):
        images = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
        ref = reference_logits(model, images)
        out = backend.infer(images, return_logits=not backend.outputs_labels)
        kind = "labels" if backend.outputs_labels else "logits"
        got = out.labels if kind == "labels" else out.logits
        assert got is not None  # logits were asked for where the engine outputs them
        agreement, max_abs, rel = compare_outputs(ref, got, output_kind=kind)
        checks.append(
            {
                "batch": b,
                "height": h,
                "width": w,
                "label_agreement": agreement,
                "max_abs_error": max_abs,
                "rel_error": rel,
                "passed": agreement >= minimum
                and (backend.precision != "float32" or rel is None or rel <= FP32_MAX_REL_ERROR),
            }
        )
    report = {
        "path": str(engine_path),
        "runtime": f"tensorrt {backend.meta['tensorrt_version']}",
        "gpu": backend.meta["gpu_name"],
        "precision": backend.precision,
        "thresholds": {"min_label_agreement": minimum},
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if write_report:
        report["report_path"] = str(write_check_report(engine_path, report))
    if verbose:
        worst = min(c["label_agreement"] for c in checks)
        print(
            f"[{'PASS' if report['passed'] else 'FAIL'}] {engine_path} (TensorRT, {backend.precision}): "
            f"min label agreement {worst:.5f}, threshold {minimum}"
        )
    return report
