"""Export a checkpoint to ONNX, TensorRT or a Triton model repository, each checked against PyTorch.

Examples:

    blindnet export --out exported/                                  # the shipped model as ONNX
    blindnet export --format triton --out model_repository/          # model_repository/blindnet/{config.pbtxt,1/model.onnx}
    blindnet export --checkpoint runs/x/model.safetensors --format onnx --precision int8 --out exported/

The Triton repository takes the same input and output as `blindnet serve` unless told otherwise: uint8 RGB images
N x H x W x 3 in, uint8 labels N x H x W out (--no-uint8-input / --no-argmax for float32 NCHW in, logits out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blindnet.cliparse import JobParser
from blindnet.extras import require_extra
from blindnet.modelnames import is_model_name

FORMATS = ("onnx", "tensorrt", "triton", "all")


def build_parser(prog: str = "python -m blindnet.export") -> argparse.ArgumentParser:
    head, rest = __doc__.split("\n\n", 1)
    p = JobParser(prog=prog, description=head, epilog=rest)
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
    p.add_argument(
        "--argmax",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="output an N x H x W label map instead of logits (default: on for --format triton, as `blindnet serve` "
        "answers; off otherwise)",
    )
    p.add_argument("--label-dtype", choices=("uint8", "int32"), default="uint8", help="dtype of the --argmax labels")
    p.add_argument(
        "--uint8-input",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="uint8 RGB input, ImageNet normalisation in-graph (default: on for --format triton, as `blindnet serve` "
        "takes; off otherwise)",
    )
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
    p.add_argument(
        "--force-int8",
        action="store_true",
        help="keep an INT8 file that misses its accuracy thresholds (default: fall back to float32 and say why)",
    )
    p.add_argument("--calibration", default=None, help="int8/fp8: folder of images or .npy (N x H x W x 3 uint8)")
    p.add_argument("--triton-name", default="blindnet", help="model name in the Triton repository")
    p.add_argument("--triton-max-batch", type=int, default=None, help="Triton max_batch_size (default: the profile's)")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m blindnet.export") -> int:
    args = build_parser(prog).parse_args(argv)
    formats = args.formats if args.formats is not None else ([] if args.cost_report else ["onnx"])
    for flag, path in (("--checkpoint", args.checkpoint), ("--calibration", args.calibration)):
        if path is not None and not Path(path).exists() and not (flag == "--checkpoint" and is_model_name(path)):
            # Before PyTorch and the model load; a model name (blindnet-r50-gtav) is fetched later, when it runs.
            print(f"error: {flag}: no such file: {path}", file=sys.stderr)
            return 2
    # The Triton repository serves what `blindnet serve` serves, unless the flags say otherwise.
    serving_contract = bool({"triton", "all"} & set(formats))
    uint8_input = serving_contract if args.uint8_input is None else args.uint8_input
    argmax = serving_contract if args.argmax is None else args.argmax
    if formats:
        require_extra("export")
    # Lazy CLI dispatch: --help answers before PyTorch is imported.
    from blindnet.checkpoint import CheckpointError
    from blindnet.export.engine import TensorRTUnavailable
    from blindnet.export.pipeline import run_export

    try:
        run_export(
            args.checkpoint,
            args.out,
            formats=formats,
            fp16=args.fp16,
            argmax=argmax,
            uint8_input=uint8_input,
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
            force_int8=args.force_int8,
        )
    except (CheckpointError, TensorRTUnavailable, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
