"""``python -m blindnet.export --checkpoint CKPT --format onnx|tensorrt|triton|all --out DIR [options]``."""

from __future__ import annotations

import argparse
import sys

from blindnet.extras import require_extra

FORMATS = ("onnx", "tensorrt", "triton", "all")


def build_parser(prog: str = "python -m blindnet.export") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--checkpoint", default=None, help="deployable .safetensors or training .pt (default: shipped one)")
    p.add_argument(
        "--format",
        dest="formats",
        nargs="+",
        choices=FORMATS,
        default=None,
        help="artifacts to build (default: onnx, or none when only --cost-report is asked for)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fp16", action="store_true", help="float16 weights/compute (float32 at the graph boundary)")
    p.add_argument("--argmax", action="store_true", help="output an N x H x W label map instead of logits")
    p.add_argument("--label-dtype", choices=("uint8", "int32"), default="uint8", help="dtype of the --argmax labels")
    p.add_argument("--uint8-input", action="store_true", help="uint8 RGB input, ImageNet normalisation in-graph")
    p.add_argument("--layout", choices=("NHWC", "NCHW"), default="NHWC", help="layout of the uint8 input")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument(
        "--exporter",
        choices=("auto", "dynamo", "torchscript"),
        default="auto",
        help="ONNX exporter (auto: dynamo, the TorchScript exporter when dynamo fails)",
    )
    p.add_argument("--cost-report", action="store_true", help="write cost.json / cost.md")
    p.add_argument("--cost-onnx", action="store_true", help="cost report: compare BlindNet vs baseline ONNX graphs")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=(1024, 2048),
        help="deployment size: TensorRT profile opt/max, extra cost-report size",
    )
    p.add_argument(
        "--min-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="TensorRT profile min size (default: 256x256 or --size, whichever is smaller)",
    )
    p.add_argument(
        "--max-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="TensorRT profile max size (default: --size)",
    )
    p.add_argument("--max-batch", type=int, default=4, help="TensorRT profile max batch")
    p.add_argument(
        "--precision",
        choices=("float32", "float16", "int8", "fp8"),
        default=None,
        help="TensorRT precision (default: float16 with --fp16, else float32); int8 also writes "
        "<name>.int8.qdq.onnx (ONNX Runtime static Q/DQ, calibrated on generated scenes), which ONNX "
        "Runtime runs on CPU and TensorRT builds from",
    )
    p.add_argument("--calibration", default=None, help="int8/fp8: folder of images or .npy (N x H x W x 3 uint8)")
    p.add_argument("--triton-name", default="blindnet", help="model name in the Triton repository")
    p.add_argument("--triton-max-batch", type=int, default=None, help="Triton max_batch_size (default: the profile's)")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m blindnet.export") -> int:
    args = build_parser(prog).parse_args(argv)
    formats = args.formats if args.formats is not None else ([] if args.cost_report else ["onnx"])
    if formats:
        require_extra("export")
    # Lazy CLI dispatch: --help answers before PyTorch is imported.
    from blindnet.backends.tensorrt_backend import TensorRTUnavailable
    from blindnet.checkpoint import CheckpointError
    from blindnet.export.pipeline import run_export

    try:
        run_export(
            args.checkpoint,
            args.out,
            formats=formats,
            fp16=args.fp16,
            argmax=args.argmax,
            uint8_input=args.uint8_input,
            label_dtype=args.label_dtype,
            input_layout=args.layout,
            opset=args.opset,
            exporter=args.exporter,
            cost_report=args.cost_report,
            cost_onnx=args.cost_onnx,
            size=tuple(args.size),
            precision=args.precision,
            max_batch=args.max_batch,
            min_size=tuple(args.min_size) if args.min_size else None,
            max_size=tuple(args.max_size) if args.max_size else None,
            calibration=args.calibration,
            triton_model_name=args.triton_name,
            triton_max_batch=args.triton_max_batch,
        )
    except (CheckpointError, TensorRTUnavailable, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
