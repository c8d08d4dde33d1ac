"""``blindnet`` command line: ``segment`` images/folders/videos, ``convert`` official checkpoints, ``info``.

Each sub-command parses its arguments and calls one library function (``segment_paths``, ``convert_official_checkpoint``,
``describe_checkpoint``) that tests call directly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from blindnet.checkpoint import convert_official_checkpoint, read_metadata
from blindnet.inference import IMAGE_SUFFIXES, VIDEO_SUFFIXES, ImageError, Predictor, load_image


@dataclass
class SegmentReport:
    """What :func:`segment_paths` did: outputs written, inputs skipped (with the reason), throughput."""

    written: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    images: int = 0
    frames: int = 0
    seconds: float = 0.0
    per_input: dict[str, dict] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        n = self.images + self.frames
        return n / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "written": self.written,
            "skipped": self.skipped,
            "images": self.images,
            "frames": self.frames,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.fps, 3),
            "per_input": self.per_input,
        }


def expand_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], dict[str, str]]:
    """Files and folders (searched recursively for images and videos) -> (files in order, problems by input)."""
    files: list[Path] = []
    problems: dict[str, str] = {}
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
            if not found:
                problems[str(p)] = "folder holds no image or video files"
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            problems[str(p)] = "no such file or folder"
    return files, problems


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    from blindnet.checkpoint import atomic_write

    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def iter_video_frames(path: Path, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Yield RGB uint8 frames of a video file; raises ImageError if OpenCV cannot open or decode it."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ImageError(f"{path}: cannot open video (unsupported codec or not a video)")
    n = 0
    try:
        while max_frames is None or n < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            n += 1
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()
    if n == 0:
        raise ImageError(f"{path}: video has no decodable frames")


def video_fps(path: Path, default: float = 10.0) -> float:
    import cv2

    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS) if cap.isOpened() else 0.0
    cap.release()
    return float(fps) if fps and fps > 0 and np.isfinite(fps) else default


class VideoWriter:
    """Writes RGB frames to an mp4 (mp4v) file atomically: frames go to a temp file renamed on close."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]) -> None:
        import cv2

        self.path = path
        self.tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = size
        self._w = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        if not self._w.isOpened():
            raise RuntimeError(f"OpenCV cannot write {path}")
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        import cv2

        self._w.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self, keep: bool = True) -> None:
        self._w.release()
        if keep and self.frames:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def segment_video(
    predictor: Predictor,
    path: Path,
    out_dir: Path,
    *,
    alpha: float = 0.5,
    max_frames: int | None = None,
    save_labels: bool = False,
    masks: Sequence[np.ndarray] | None = None,
    overlay_path: Path | None = None,
) -> dict:
    """Segment a video in batches; write ``overlay_path`` (default ``<out_dir>/<stem>_overlay.mp4``) and label PNGs
    per frame if asked.

    Returns:
        ``{"frames", "seconds", "overlay", "confusion"}`` where ``confusion`` (a ConfusionMatrix, when ``masks`` are
        given) scores the predictions against the ground-truth masks frame by frame.
    """
    from tqdm import tqdm

    from blindnet.metrics import ConfusionMatrix

    writer: VideoWriter | None = None
    fps = video_fps(path)
    frames = 0
    seconds = 0.0
    conf = ConfusionMatrix(predictor.num_classes) if masks is not None else None
    batch: list[np.ndarray] = []
    bar = tqdm(desc=path.name, unit="frame", leave=False, disable=None)

    def flush() -> None:
        nonlocal writer, frames, seconds
        t0 = time.perf_counter()
        preds = predictor.predict_arrays(batch)
        seconds += time.perf_counter() - t0
        for pred in preds:
            if writer is None:
                writer = VideoWriter(overlay_path or out_dir / f"{path.stem}_overlay.mp4", fps, pred.labels.shape)
            writer.write(pred.overlay(alpha))
            if save_labels:
                _write_png(out_dir / f"{path.stem}_labels" / f"frame_{frames:06d}.png", pred.labels)
            if conf is not None and masks is not None and frames < len(masks):
                conf.update(torch.from_numpy(pred.labels.astype(np.int64)), torch.from_numpy(masks[frames].astype(np.int64)))
            frames += 1
        bar.update(len(batch))
        batch.clear()

    try:
        for frame in iter_video_frames(path, max_frames):
            batch.append(frame)
            if len(batch) == predictor.batch_size:
                flush()
        if batch:
            flush()
    except BaseException:
        if writer is not None:
            writer.close(keep=False)
        raise
    finally:
        bar.close()
    assert writer is not None
    writer.close()
    return {"frames": frames, "seconds": seconds, "overlay": str(writer.path), "confusion": conf}


def segment_paths(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    alpha: float = 0.5,
    max_frames: int | None = None,
    save_video_labels: bool = False,
) -> SegmentReport:
    """Segment images, folders and videos; write ``<stem>_labels.png`` / ``<stem>_overlay.png`` (images) and
    ``<stem>_overlay.mp4`` (videos) into ``out_dir``. Unreadable inputs are reported and skipped."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = SegmentReport()
    files, problems = expand_inputs(inputs)
    report.skipped.update(problems)
    t_all = 0.0
    for f in tqdm(files, desc="segment", unit="file", disable=None if len(files) > 1 else True):
        try:
            if f.suffix.lower() in VIDEO_SUFFIXES:
                res = segment_video(predictor, f, out, alpha=alpha, max_frames=max_frames, save_labels=save_video_labels)
                report.frames += res["frames"]
                t_all += res["seconds"]
                report.written.append(res["overlay"])
                report.per_input[str(f)] = {"frames": res["frames"], "seconds": round(res["seconds"], 3)}
            else:
                image = load_image(f)
                t0 = time.perf_counter()
                pred = predictor.predict_arrays([image], sources=[str(f)])[0]
                t_all += time.perf_counter() - t0
                lab, ovl = out / f"{f.stem}_labels.png", out / f"{f.stem}_overlay.png"
                _write_png(lab, pred.labels)
                _write_png(ovl, pred.overlay(alpha))
                report.images += 1
                report.written += [str(lab), str(ovl)]
                report.per_input[str(f)] = {"shares": pred.class_shares()}
        except (ImageError, OSError, RuntimeError) as exc:
            report.skipped[str(f)] = str(exc)
            print(f"skipped {f}: {exc}", file=sys.stderr)
    report.seconds = t_all
    return report


def describe_checkpoint(path: str | Path) -> dict:
    """Config, parameter count and metadata of a checkpoint."""
    from blindnet.checkpoint import load_checkpoint_state, load_model
    from blindnet.models import count_parameters

    cfg, _, meta = load_checkpoint_state(path)
    model = load_model(path)
    return {"path": str(path), "model_config": cfg.to_dict(), "parameters": count_parameters(model), "metadata": meta}


# --------------------------------------------------------------------------------------------------------------------


def _add_predictor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="checkpoint (.safetensors/.pt) or exported model; default: the shipped model")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "tensorrt"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float32 for checkpoints, the file's own precision for exported models")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="resize to H W before the network")


def build_predictor(args: argparse.Namespace) -> Predictor:
    return Predictor.from_checkpoint(
        args.checkpoint,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        input_size=tuple(args.input_size) if args.input_size else None,
        batch_size=args.batch_size,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blindnet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment images, folders and videos")
    seg.add_argument("inputs", nargs="*", help="image files, folders, or videos (mp4/avi/mov)")
    seg.add_argument("--out", required=True, help="output folder")
    seg.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the label colours")
    seg.add_argument("--max-frames", type=int, default=None, help="stop each video after this many frames")
    seg.add_argument("--save-video-labels", action="store_true", help="also write a label PNG per video frame")
    seg.add_argument(
        "--synthetic",
        metavar="APPEARANCES",
        help="render a synthetic driving clip on the spot in these appearances (e.g. night,fog,rain), segment it and "
        "score it against its generated masks",
    )
    seg.add_argument("--frames", type=int, default=24, help="frames per synthetic clip")
    seg.add_argument("--seed", type=int, default=2024, help="seed of the synthetic clip")
    seg.add_argument("--clip-size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    _add_predictor_args(seg)

    conv = sub.add_parser("convert", help="convert an official BlindNet/RobustNet checkpoint")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--backbone", default="resnet50", choices=["resnet50", "mobilenetv2", "shufflenetv2"])
    variant = conv.add_mutually_exclusive_group()
    variant.add_argument(
        "--variant",
        choices=["blindnet", "baseline"],
        default=None,
        help="BlindNet (InstanceNorm layers) or the plain DeepLabV3+ baseline; required for mobilenetv2/shufflenetv2, "
        "whose two variants have the same keys (resnet50: read from the keys when omitted)",
    )
    variant.add_argument("--baseline", action="store_true", help="same as --variant baseline")
    conv.add_argument("--output-stride", type=int, default=16)
    conv.add_argument(
        "--no-variant-check",
        action="store_true",
        help="convert even if the checkpoint's BatchNorm statistics contradict the chosen variant",
    )

    info = sub.add_parser("info", help="print a checkpoint's config and size")
    info.add_argument("checkpoint", nargs="?")

    args = parser.parse_args(argv)
    try:
        if args.command == "segment":
            return _cmd_segment(args)
        if args.command == "convert":
            return _cmd_convert(args)
        if args.command == "info":
            from blindnet.backends import resolve_checkpoint

            print(json.dumps(describe_checkpoint(resolve_checkpoint(args.checkpoint)), indent=2))
            return 0
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"blindnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 2


def _cmd_convert(args: argparse.Namespace) -> int:
    chosen = "baseline" if args.baseline else args.variant
    model = convert_official_checkpoint(
        args.src,
        args.dst,
        backbone=args.backbone,
        instance_norm=None if chosen is None else chosen == "blindnet",
        output_stride=args.output_stride,
        check_variant=not args.no_variant_check,
    )
    cfg = model.config
    built = "BlindNet (3 InstanceNorm layers)" if cfg.instance_norm else "baseline DeepLabV3+ (no InstanceNorm)"
    meta = read_metadata(args.dst)
    print(
        f"wrote {args.dst}: {cfg.backbone}, output stride {cfg.output_stride}, {built}, "
        f"{sum(p.numel() for p in model.parameters()):,} params; variant check: {meta.get('variant_check', '-')}"
    )
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    if not args.inputs and not args.synthetic:
        print(
            "blindnet segment: error: give INPUT files/folders/videos, or --synthetic night,fog,rain", file=sys.stderr
        )
        return 2
    predictor = build_predictor(args)
    out = Path(args.out)
    summary: dict = {}
    failed = False
    if args.inputs:
        report = segment_paths(
            predictor,
            args.inputs,
            out,
            alpha=args.alpha,
            max_frames=args.max_frames,
            save_video_labels=args.save_video_labels,
        )
        summary["inputs"] = report.to_dict()
        failed = bool(report.skipped)
        print(
            f"segmented {report.images} image(s) and {report.frames} video frame(s) at {report.fps:.1f} images/s; "
            f"{len(report.skipped)} skipped; outputs in {out}"
        )
    if args.synthetic:
        from blindnet.showcase import run_synthetic_showcase

        summary["synthetic"] = run_synthetic_showcase(
            predictor,
            out,
            appearances=[a.strip() for a in args.synthetic.split(",") if a.strip()],
            frames=args.frames,
            seed=args.seed,
            size=tuple(args.clip_size),
            alpha=args.alpha,
        )
    from blindnet.checkpoint import atomic_write

    text = json.dumps(summary, indent=2, default=str)
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(text))
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
