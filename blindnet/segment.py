"""Segment images, folders and videos with a :class:`Predictor`, and the main job: a synthetic clip in appearances
the model never saw, segmented and scored against its generated masks.

``blindnet segment`` (and ``python -m blindnet segment``) parses arguments and calls :func:`segment_paths` and
:func:`run_synthetic_showcase`; tests call them directly.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from blindnet.classes import colorize
from blindnet.data.synthetic import APPEARANCES, write_clip
from blindnet.inference import Predictor
from blindnet.io import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    ImageError,
    MediaError,
    VideoWriter,
    iter_video_frames,
    load_image,
    video_fps,
    write_png,
)
from blindnet.metrics import ConfusionMatrix


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
            found = sorted(
                q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES
            )
            if not found:
                problems[str(p)] = "folder holds no image or video files"
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            problems[str(p)] = "no such file or folder"
    return files, problems


@dataclass
class VideoResult:
    """What :func:`segment_video` wrote and measured."""

    frames: int
    seconds: float
    overlay: Path
    codec: str
    confusion: ConfusionMatrix | None = None
    kept: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # frame -> (RGB, labels)


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
    keep_frames: Sequence[int] = (),
) -> VideoResult:
    """Segment a video in batches of ``predictor.batch_size`` frames.

    Writes an overlay video (default ``<out_dir>/<stem>_overlay.<ext>``, the extension of the best codec available)
    and, with ``save_labels``, one label PNG per frame. With ``masks`` (``H x W`` label maps, one per frame) the
    result's ``confusion`` scores the predictions frame by frame; ``keep_frames`` returns those frames' input and
    labels in ``kept``.
    """
    fps = video_fps(path)
    res = VideoResult(0, 0.0, Path(), "", ConfusionMatrix(predictor.num_classes) if masks is not None else None)
    writer: VideoWriter | None = None
    batch: list[np.ndarray] = []
    bar = tqdm(desc=path.name, unit="frame", leave=False, disable=None)

    def flush() -> None:
        nonlocal writer
        t0 = time.perf_counter()
        preds = predictor.predict_arrays(batch)
        res.seconds += time.perf_counter() - t0
        for image, pred in zip(batch, preds):
            if writer is None:
                writer = VideoWriter(overlay_path or out_dir / f"{path.stem}_overlay.mp4", fps, pred.labels.shape)
            writer.write(pred.overlay(alpha))
            if save_labels:
                write_png(out_dir / f"{path.stem}_labels" / f"frame_{res.frames:06d}.png", pred.labels)
            if res.confusion is not None and masks is not None and res.frames < len(masks):
                truth = torch.from_numpy(masks[res.frames].astype(np.int64))
                res.confusion.update(torch.from_numpy(pred.labels.astype(np.int64)), truth)
            if res.frames in keep_frames:
                res.kept[res.frames] = (image, pred.labels)
            res.frames += 1
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
    assert writer is not None  # iter_video_frames raises when a video has no frame
    writer.close()
    res.overlay, res.codec = writer.path, writer.codec
    return res


def _segment_image(predictor: Predictor, f: Path, out: Path, alpha: float, report: SegmentReport) -> float:
    image = load_image(f)
    t0 = time.perf_counter()
    pred = predictor.predict_arrays([image], sources=[str(f)])[0]
    seconds = time.perf_counter() - t0
    lab, ovl = out / f"{f.stem}_labels.png", out / f"{f.stem}_overlay.png"
    write_png(lab, pred.labels)
    write_png(ovl, pred.overlay(alpha))
    report.images += 1
    report.written += [str(lab), str(ovl)]
    report.per_input[str(f)] = {"shares": pred.class_shares()}
    return seconds


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
    ``<stem>_overlay.<ext>`` (videos) into ``out_dir``. Unreadable or missing inputs are reported (on stderr and in
    the report) and skipped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = SegmentReport()
    files, problems = expand_inputs(inputs)
    for name, why in problems.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    report.skipped.update(problems)
    for f in tqdm(files, desc="segment", unit="file", disable=None if len(files) > 1 else True):
        try:
            if f.suffix.lower() in VIDEO_SUFFIXES:
                res = segment_video(
                    predictor, f, out, alpha=alpha, max_frames=max_frames, save_labels=save_video_labels
                )
                report.frames += res.frames
                report.seconds += res.seconds
                report.written.append(str(res.overlay))
                report.per_input[str(f)] = {"frames": res.frames, "seconds": round(res.seconds, 3), "codec": res.codec}
            else:
                report.seconds += _segment_image(predictor, f, out, alpha, report)
        except (ImageError, MediaError, OSError, RuntimeError) as exc:
            report.skipped[str(f)] = str(exc)
            print(f"skipped {f}: {exc}", file=sys.stderr)
    return report


def contact_sheet(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], num_classes: int) -> np.ndarray:
    """One row per frame: input | prediction | ground truth (colourised), as an ``H x W x 3`` uint8 image.

    Each row is ``(rgb (h, w, 3) uint8, predicted labels (h, w), true labels (h, w))``; 4-pixel white gutters.
    """
    gutter = 4
    tiles = []
    for rgb, pred, truth in rows:
        h = rgb.shape[0]
        sep = np.full((h, gutter, 3), 255, np.uint8)
        tiles.append(np.concatenate([rgb, sep, colorize(pred, num_classes), sep, colorize(truth, num_classes)], 1))
        tiles.append(np.full((gutter, tiles[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(tiles[:-1], 0)


def run_synthetic_showcase(
    predictor: Predictor,
    out_dir: str | Path,
    *,
    appearances: Sequence[str] = ("night", "fog", "rain"),
    frames: int = 24,
    seed: int = 2024,
    size: tuple[int, int] = (256, 512),
    alpha: float = 0.5,
    sheet_frames: int = 4,
) -> dict:
    """Render, segment and score one clip per appearance.

    Writes ``<out_dir>/synthetic/<appearance>.mp4`` (input), ``<out_dir>/synthetic_<appearance>_overlay.<ext>`` (the
    best browser-playable codec available) and ``<out_dir>/synthetic_<appearance>_sheet.png`` (``sheet_frames``
    frames: input | prediction | ground truth).

    Returns:
        ``{appearance: {"miou", "pixel_accuracy", "frames", "fps", "overlay", "codec", "sheet", ...}}`` plus
        ``"mean_miou"``.
    """
    unknown = [a for a in appearances if a not in APPEARANCES]
    if unknown:
        raise ValueError(f"unknown appearance(s) {unknown}; choose from {list(APPEARANCES)}")
    out = Path(out_dir)
    print(
        f"rendering a {frames}-frame synthetic clip ({size[0]}x{size[1]}) in {', '.join(appearances)}", file=sys.stderr
    )
    clip = write_clip(
        out / "synthetic", seed=seed, num_frames=frames, height=size[0], width=size[1], appearances=tuple(appearances)
    )
    masks = [np.array(Image.open(p)) for p in clip["masks"]]
    keep = sorted({round(i * (frames - 1) / max(sheet_frames - 1, 1)) for i in range(sheet_frames)})
    results: dict = {}
    for app in appearances:
        video = Path(clip["videos"][app])
        t0 = time.perf_counter()
        res = segment_video(
            predictor,
            video,
            out,
            alpha=alpha,
            masks=masks,
            overlay_path=out / f"synthetic_{app}_overlay.mp4",
            keep_frames=keep,
        )
        sheet = write_png(
            out / f"synthetic_{app}_sheet.png",
            contact_sheet([(*res.kept[i], masks[i]) for i in keep if i in res.kept], predictor.num_classes),
        )
        miou, acc = res.confusion.miou() * 100.0, res.confusion.pixel_accuracy()
        results[app] = {
            "miou": round(miou, 2),
            "pixel_accuracy": round(float(acc) * 100.0, 2),
            "frames": res.frames,
            "fps": round(res.frames / max(res.seconds, 1e-9), 2),
            "wall_seconds": round(time.perf_counter() - t0, 2),
            "overlay": str(res.overlay),
            "codec": res.codec,
            "sheet": str(sheet),
            "input_video": str(video),
        }
        print(
            f"{app:>8}: mIoU {miou:5.1f}  pixel acc {acc * 100:5.1f}  {results[app]['fps']:.1f} frames/s  "
            f"-> {sheet.name}, {res.overlay.name} ({res.codec})"
        )
    results["mean_miou"] = round(float(np.mean([results[a]["miou"] for a in appearances])), 2)
    print(f"mean mIoU over {', '.join(appearances)}: {results['mean_miou']:.1f}")
    return results
