"""``blindnet export``'s library function: turn a checkpoint into deployable artifacts and verify each one."""


from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blindnet.backends.tensorrt_backend import Profile, TensorRTUnavailable, import_tensorrt
from blindnet.checkpoint import load_model
from blindnet.export.cost import cost_report as make_cost_report
from blindnet.export.cost import render_markdown
from blindnet.export.int8 import check_int8, quantize_int8
from blindnet.export.onnx import ExportError, export_onnx, verify_onnx
from blindnet.export.tensorrt import build_tensorrt, verify_engine
from blindnet.export.triton import write_triton_repository
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

    Raises:
        CheckpointError: missing or corrupt checkpoint. TensorRTUnavailable: TensorRT requested but not installed.
        ExportError: an artifact failed its parity check.
    """

    wanted = set(formats)
    unknown = wanted - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown format(s) {sorted(unknown)}; choose from {FORMATS}")
    skipped: dict[str, str] = {}
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
    if "tensorrt" in wanted and precision == "float16":
        fp16 = True  # TensorRT float16 is built from a float16 ONNX: the only route on TensorRT 11, typed on 10
    ckpt = resolve_checkpoint(checkpoint)
    model = load_model(ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"checkpoint": str(ckpt), "model_config": model.config.to_dict(), "artifacts": {},
                               "skipped": skipped}

    if wanted & {"onnx", "tensorrt", "triton"}:

        res = export_onnx(model, out / f"{name}.onnx", opset=opset, normalize_input=uint8_input,
                          input_layout=input_layout, argmax=argmax, label_dtype=label_dtype, fp16=fp16,
                          exporter=exporter)
        print(f"exported {res.path} with the {res.exporter} exporter in {res.seconds:.1f} s"
              + (f" (dynamo failed: {res.dynamo_error})" if res.dynamo_error else ""))
        report = verify_onnx(res.path, model, shapes=verify_shapes)
        summary["artifacts"]["onnx"] = {"export": res.to_dict(), "check": report.to_dict()}
        report.raise_if_failed()
        if precision == "int8" and not fp16:
            # One Q/DQ file for both INT8 runtimes: ONNX Runtime on CPU runs it, TensorRT builds its engine from it.

            qdq = quantize_int8(res.path, out / f"{name}.int8.qdq.onnx")
            int8_check = check_int8(qdq, res.path)
            summary["artifacts"]["onnx_int8"] = {"path": str(qdq), "check": int8_check}
            print(f"quantised {qdq}: label agreement {int8_check['label_agreement']:.4f}, mIoU change "
                  f"{int8_check['miou_change']:+.2f} points on held-out generated scenes")

    if "tensorrt" in wanted:

        h, w = max_size or size
        mh, mw = min_size or (min(256, h), min(256, w))
        profile = Profile(min=(1, mh, mw), opt=(1, *size), max=(max_batch, h, w))
        prec = precision or ("float16" if fp16 else "float32")
        qdq = out / f"{name}.int8.qdq.onnx"
        source = qdq if prec == "int8" and qdq.exists() else out / f"{name}.onnx"
        meta = build_tensorrt(source, out, precision=prec, profiles=[profile],
                              calibration=calibration, name=name)
        check = verify_engine(out / f"{name}.plan", model)
        summary["artifacts"]["tensorrt"] = {"metadata": meta, "check": check}
        if not check["passed"]:

            raise ExportError(f"TensorRT parity check failed: {json.dumps(check['checks'])}")

    if "triton" in wanted:

        source = out / f"{name}.plan" if "tensorrt" in wanted else out / f"{name}.onnx"
        model_dir = write_triton_repository(source, out / "triton", model_name=triton_model_name,
                                            max_batch_size=triton_max_batch)
        summary["artifacts"]["triton"] = {"repository": str(model_dir.parent), "model": str(model_dir)}
        print(f"wrote Triton model repository {model_dir.parent} (model {triton_model_name!r} from {source.name})")

    if cost_report:

        sizes = [(1024, 2048)] + ([tuple(size)] if tuple(size) != (1024, 2048) else []) + [(1024, 1024)]
        sizes = list(dict.fromkeys(sizes))
        cost = make_cost_report(model, sizes=sizes, onnx=cost_onnx, onnx_exporter=exporter)
        (out / "cost.json").write_text(json.dumps(cost, indent=2, default=str))
        (out / "cost.md").write_text(render_markdown(cost))
        summary["artifacts"]["cost"] = {"json": str(out / "cost.json"), "markdown": str(out / "cost.md")}
        print(render_markdown(cost))

    (out / "export.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
