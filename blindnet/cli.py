"""The ``blindnet`` command: one subcommand per job.

``blindnet <job> ...`` is the same as ``python -m blindnet <job> ...``; the jobs that live in their own folder also
run as ``python -m blindnet.<module>`` (``blindnet.train``, ``blindnet.train.evaluate``, ``blindnet.export``,
``blindnet.serve``, ``blindnet.demo``, ``blindnet.benchmarks``), which is what ``torchrun -m blindnet.train`` needs.

This module imports nothing heavy: a job's modules (and PyTorch) are imported only once that job is chosen, so
``blindnet --help`` and every ``blindnet <job> --help`` answer at once.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blindnet.architectures import BACKBONE_NAMES
from blindnet.backends import BACKEND_NAMES
from blindnet.cliparse import JobParser, cuda_device_count
from blindnet.extras import require_extra
from blindnet.precisions import INFERENCE_PRECISIONS

# job -> (module holding ``main(argv)``, one line of help). A plain dict: adding a job is one line here.
JOBS: dict[str, tuple[str, str]] = {
    "segment": ("blindnet.cli", "segment images, folders and videos, or a synthetic clip scored against its masks"),
    "convert": ("blindnet.cli", "convert an official BlindNet/RobustNet checkpoint into a deployable one"),
    "info": ("blindnet.cli", "describe a checkpoint or an exported ONNX model"),
    "models": ("blindnet.zoo_cli", "list the models --checkpoint NAME accepts (the published one, terms, cache)"),
    "train": ("blindnet.train.__main__", "train BlindNet or a baseline from a preset (torchrun for DDP)"),
    "evaluate": ("blindnet.train.evaluate_cli", "score checkpoints on evaluation datasets (mIoU tables)"),
    "export": ("blindnet.export.__main__", "export ONNX / TensorRT / a Triton repository, checked against PyTorch"),
    "serve": ("blindnet.serve.__main__", "batched HTTP inference server (KServe v2 / Triton protocol)"),
    "demo": ("blindnet.demo.__main__", "Gradio app for driving images and videos"),
    "bench": ("blindnet.benchmarks.__main__", "latency, throughput and cost tables"),
}


def _usage() -> str:
    width = max(map(len, JOBS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in JOBS.items()]
    return (
        "usage: blindnet <job> [options]     (blindnet <job> --help for a job's options)\n\n"
        "BlindNet style-blind semantic segmentation: train, export, serve, demo, benchmark.\n\njobs:\n"
        + "\n".join(lines)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to the chosen job's ``main``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        from importlib.metadata import version

        print(f"blindnet {version('blindnet')}")
        return 0
    job, rest = args[0], args[1:]
    if job not in JOBS:
        close = difflib.get_close_matches(job, JOBS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; choose one of {', '.join(JOBS)}"
        print(f"blindnet: unknown job {job!r}{hint}", file=sys.stderr)
        return 2
    module = JOBS[job][0]
    if module == __name__:
        return BASE_JOBS[job](rest)
    # Lazy CLI dispatch: only the chosen job's modules are imported.
    return int(importlib.import_module(module).main(rest, prog=f"blindnet {job}") or 0)


def _predictor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        help="checkpoint (.safetensors/.pt), exported model, or a model name such as blindnet-r50-gtav (`blindnet "
        "models`; fetched once); default: the shipped model",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKEND_NAMES,
        help="inference backend (default: auto, the fastest correct path here: torch on CUDA; on CPU "
        "ONNX Runtime on a cached, parity-checked export, torch when onnxruntime is missing)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present for auto, else cpu)")
    p.add_argument(
        "--precision",
        default=None,
        choices=INFERENCE_PRECISIONS,
        help="default: float32 for checkpoints, the file's own precision for exported models",
    )
    p.add_argument("--batch-size", type=int, default=4, help="images (or video frames) per network call")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="resize to H W before the network")


def segment_parser(prog: str = "blindnet segment") -> argparse.ArgumentParser:
    p = JobParser(prog=prog, description="Segment images, folders and videos, or a synthetic clip.")
    p.add_argument(
        "inputs", nargs="*", help="image files (any format Pillow reads), folders (searched recursively), or videos"
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder; the input tree is mirrored inside it (default: a new numbered folder under "
        f"{SEGMENT_OUT_ROOT}/, never an existing one)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace outputs that exist (default: keep them and skip the inputs they belong to, so a re-run into "
        "the same --out finishes an interrupted job)",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the label colours")
    p.add_argument("--legend", action="store_true", help="draw a legend of the classes present under each overlay")
    p.add_argument(
        "--video-format",
        default="mp4",
        choices=["mp4", "webm"],
        help="overlay videos as H.264 in MP4 (default: plays in browsers, phones and editors) or VP9 in WebM",
    )
    p.add_argument("--max-frames", type=int, default=None, help="stop each video after this many frames")
    p.add_argument("--save-video-labels", action="store_true", help="also write a label PNG per video frame")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on a terminal)")
    p.add_argument(
        "--synthetic",
        metavar="APPEARANCES",
        help="render a synthetic driving clip on the spot in these appearances (e.g. night,fog,rain), segment it and "
        "score it against its generated masks",
    )
    p.add_argument("--frames", type=int, default=24, help="frames per synthetic clip")
    p.add_argument("--seed", type=int, default=2024, help="seed of the synthetic clip")
    p.add_argument(
        "--clip-size",
        type=int,
        nargs=2,
        default=(256, 512),
        metavar=("H", "W"),
        help="frame size of the synthetic clip",
    )
    _predictor_args(p)
    return p


#: Where ``blindnet segment`` writes when no ``--out`` is given: ``<this>/<N>``, N one more than the largest there.
SEGMENT_OUT_ROOT = "outputs/segment"


def new_numbered_folder(root: str | Path) -> Path:
    """Create and return ``root/<N>``, N one more than the largest number there (1 in a new root); never one that
    exists, even when two runs start at once (``mkdir`` without ``exist_ok`` decides)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n = max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0)
    while True:
        n += 1
        try:
            (root / str(n)).mkdir()
            return root / str(n)
        except FileExistsError:
            continue


#: The appearances ``--synthetic`` renders (blindnet.data.synthetic.APPEARANCES, named here so that a typo is reported
#: before PyTorch loads; a test keeps the two equal).
SYNTHETIC_APPEARANCES = ("noon", "sunset", "night", "fog", "rain")


def segment_args_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with ``blindnet segment``'s arguments, in one line, found before any model loads; None if fine.

    Checks that every input exists, that ``--synthetic`` names known appearances and that ``--device cuda`` has a
    CUDA device (asked of the driver, without importing PyTorch).
    """
    missing = [x for x in args.inputs if not Path(x).exists()]
    if missing:
        return f"no such file or folder: {', '.join(missing)}"
    unknown = [a.strip() for a in (args.synthetic or "").split(",") if a.strip() not in SYNTHETIC_APPEARANCES]
    if args.synthetic is not None and unknown:
        return f"--synthetic: unknown appearance(s) {', '.join(unknown)}; choose from {','.join(SYNTHETIC_APPEARANCES)}"
    if args.device and args.device.split(":")[0] not in ("cpu", "cuda"):
        return f"--device must be cpu, cuda or cuda:N, got {args.device!r}"
    if args.device and args.device.startswith("cuda") and cuda_device_count() == 0:
        return f"--device {args.device}: no CUDA device is available here (use --device cpu)"
    return None


def segment_main(argv: Sequence[str]) -> int:
    """``blindnet segment``: exit 0 when every media input was segmented (or done before), 1 when an image or video
    could not be used or only in part (files that are not media are listed but do not count), 2 on errors."""
    args = segment_parser().parse_args(argv)
    if not args.inputs and not args.synthetic:
        print(
            "blindnet segment: error: give INPUT files/folders/videos, or --synthetic night,fog,rain", file=sys.stderr
        )
        return 2
    problem = segment_args_problem(args)
    if problem:
        print(f"blindnet segment: error: {problem}", file=sys.stderr)
        return 2
    # Lazy CLI dispatch: a job's modules (and PyTorch) load only once that job runs.
    from blindnet import segment
    from blindnet.inference import Predictor
    from blindnet.io import write_text

    out = Path(args.out) if args.out else new_numbered_folder(SEGMENT_OUT_ROOT)
    progress = False if args.no_progress else None
    failed = False
    try:
        print(f"loading the model ({args.backend} on {args.device or 'the default device'})", file=sys.stderr)
        predictor = Predictor.from_checkpoint(
            args.checkpoint,
            backend=args.backend,
            device=args.device,
            precision=args.precision,
            input_size=tuple(args.input_size) if args.input_size else None,
            batch_size=args.batch_size,
        )
        summary: dict = {}
        if args.inputs:
            options = segment.SegmentOptions(
                alpha=args.alpha,
                max_frames=args.max_frames,
                save_video_labels=args.save_video_labels,
                overwrite=args.overwrite,
                legend=args.legend,
                video_format=args.video_format,
                progress=progress,
            )
            print(_existing_policy(out, args.overwrite), file=sys.stderr)
            report = segment.segment_paths(predictor, args.inputs, out, options)
            summary["inputs"] = report.to_dict()
            failed = bool(report.failed)
            print(_segment_line(report))
        if args.synthetic:
            summary["synthetic"] = segment.run_synthetic_showcase(
                predictor,
                out,
                appearances=[a.strip() for a in args.synthetic.split(",") if a.strip()],
                frames=args.frames,
                seed=args.seed,
                size=tuple(args.clip_size),
                alpha=args.alpha,
                video_format=args.video_format,
                progress=progress,
            )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"blindnet segment: error: {exc}", file=sys.stderr)
        if not args.out and not any(out.iterdir()):
            out.rmdir()  # the numbered folder made for this run holds nothing: do not leave it behind
        return 2
    write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    print(f"outputs in {out} (summary: {out / 'summary.json'})")
    return 1 if failed else 0


def _existing_policy(out: Path, overwrite: bool) -> str:
    if overwrite:
        return f"--overwrite: outputs that exist in {out} are replaced"
    return f"outputs that exist in {out} are kept: inputs they belong to are skipped (--overwrite replaces them)"


def _segment_line(report: Any) -> str:
    """One line: what was segmented, done before, replaced, and skipped (by reason)."""
    counts = report.counts()
    parts = [
        f"segmented {report.images} image(s) and {report.frames} video frame(s) at {report.fps:.1f} images/s",
        f"{counts.get('done before', 0)} input(s) done before (skipped)",
    ]
    if report.replaced:
        parts.append(f"{report.replaced} existing output(s) replaced")
    if report.partial:
        parts.append(f"{len(report.partial)} video(s) cut off, segmented up to the damage")
    other = {k: v for k, v in counts.items() if k not in ("segmented", "done before")}
    parts.append(
        f"{sum(other.values())} skipped" + (f" ({', '.join(f'{v} {k}' for k, v in other.items())})" if other else "")
    )
    return "; ".join(parts)


def convert_main(argv: Sequence[str]) -> int:
    """``blindnet convert SRC DST``: an official checkpoint -> a deployable safetensors file; ``blindnet convert SRC
    --name NAME``: into the model cache under a model name (a file downloaded by hand), checked like a download."""
    p = JobParser(prog="blindnet convert", description=JOBS["convert"][1])
    p.add_argument("src", help="the official checkpoint (.pth as the original saves it, or a bare state dict)")
    p.add_argument("dst", nargs="?", help="the deployable checkpoint to write (.safetensors); or give --name")
    p.add_argument(
        "--name",
        help="store it in the model cache as this model name instead (e.g. blindnet-r50-gtav, downloaded by hand; "
        "see `blindnet models`); then --checkpoint NAME uses it",
    )
    p.add_argument(
        "--backbone",
        default="resnet50",
        choices=BACKBONE_NAMES,
        help="the checkpoint's backbone",
    )
    variant = p.add_mutually_exclusive_group()
    variant.add_argument(
        "--variant",
        choices=["blindnet", "baseline"],
        default=None,
        help="BlindNet (InstanceNorm layers) or the plain DeepLabV3+ baseline; required for mobilenetv2/shufflenetv2, "
        "whose two variants have the same keys (resnet50: read from the keys when omitted)",
    )
    variant.add_argument("--baseline", action="store_true", help="same as --variant baseline")
    p.add_argument("--output-stride", type=int, default=16, choices=[8, 16], help="the checkpoint's output stride")
    p.add_argument(
        "--no-variant-check",
        action="store_true",
        help="convert even if the checkpoint's BatchNorm statistics contradict the chosen variant",
    )
    args = p.parse_args(argv)
    if (args.dst is None) == (args.name is None):
        p.error("give either DST (a .safetensors file to write) or --name NAME (the model cache), not both")
    if args.name:
        return _register_main(args.src, args.name)
    # Lazy CLI dispatch: PyTorch loads only once the job runs.
    from blindnet.checkpoint import convert_official_checkpoint, read_metadata

    chosen = "baseline" if args.baseline else args.variant
    try:
        model = convert_official_checkpoint(
            args.src,
            args.dst,
            backbone=args.backbone,
            instance_norm=None if chosen is None else chosen == "blindnet",
            output_stride=args.output_stride,
            check_variant=not args.no_variant_check,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"blindnet convert: error: {exc}", file=sys.stderr)
        return 2
    cfg = model.config
    built = "BlindNet (3 InstanceNorm layers)" if cfg.instance_norm else "baseline DeepLabV3+ (no InstanceNorm)"
    meta = read_metadata(args.dst)
    print(
        f"wrote {args.dst}: {cfg.backbone}, output stride {cfg.output_stride}, {built}, "
        f"{sum(p.numel() for p in model.parameters()):,} params; variant check: {meta.get('variant_check', '-')}"
    )
    return 0


def _register_main(src: str, name: str) -> int:
    """``blindnet convert SRC --name NAME``: the zoo entry says backbone and variant; prints where it was stored."""
    # Lazy CLI dispatch: the zoo loads PyTorch.
    from blindnet import zoo

    try:
        path = zoo.register(name, src)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # ZooError/CheckpointError are RuntimeErrors
        print(f"blindnet convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"registered {name}: {path}; use it with --checkpoint {name}")
    return 0


def info_main(argv: Sequence[str]) -> int:
    """``blindnet info [MODEL]``: what a checkpoint or an ONNX file holds, as JSON."""
    p = JobParser(prog="blindnet info", description=JOBS["info"][1])
    p.add_argument(
        "model",
        nargs="?",
        help="a .safetensors/.pt checkpoint, a .onnx file or a model name (default: the shipped model)",
    )
    args = p.parse_args(argv)
    # Lazy CLI dispatch, as above.
    from blindnet import info
    from blindnet.resolve import resolve_checkpoint

    try:
        path = resolve_checkpoint(args.model)
        if path.suffix == ".onnx":
            require_extra("info", "onnx")
        print(json.dumps(info.describe(path), indent=2, default=str))
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"blindnet info: error: {exc}", file=sys.stderr)
        return 2
    return 0


BASE_JOBS = {"segment": segment_main, "convert": convert_main, "info": info_main}


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
