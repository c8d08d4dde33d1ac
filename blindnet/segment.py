"""Segment images, folders and videos with a :class:`Predictor`, and the main job: a synthetic clip in appearances
the model never saw, segmented and scored against its generated masks.

``blindnet segment`` (and ``python -m blindnet segment``) parses arguments and calls :func:`segment_paths` and
:func:`run_synthetic_showcase`; tests call them directly.

What :func:`segment_paths` promises about a folder of user files:

* every file found is accounted for once in the report: segmented (with its outputs), or skipped with a reason that
  starts with one of ``unsupported type``, ``unreadable``, ``empty``, ``cut off`` or ``done before``; a video cut off
  mid-way is segmented up to the damage and carries a ``problem``;
* outputs mirror the input tree under the output folder, and no two inputs share an output name: where two files in
  one folder have the same stem (``x.jpg``, ``x.png``), their whole file name is the base (``x.jpg_labels.png``);
* an existing output is never replaced silently: an input whose outputs all exist is skipped as done before (so a
  long job re-run into the same folder finishes where it stopped), unless ``overwrite`` is set.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from blindnet.classes import colorize
from blindnet.data.synthetic import APPEARANCES, write_clip
from blindnet.inference import Predictor
from blindnet.io import ImageError, MediaError, load_image, write_png
from blindnet.legend import draw_legend, full_legend_height, legend_entries, title_band, with_legend
from blindnet.media import VIDEO_FORMATS, FrameSource, VideoWriter, media_kind
from blindnet.metrics import ConfusionMatrix

#: Pillow formats whose multi-frame files are animations (segmented as clips); other multi-frame formats (MPO
#: stereo pairs, multi-page TIFF) are segmented by their first picture.
ANIMATED_FORMATS = ("GIF", "PNG", "WEBP")


@dataclass
class SegmentOptions:
    """How :func:`segment_paths` writes: overlay opacity, frame cap, per-frame label PNGs, replacing existing
    outputs, a legend under overlays, the video format (a key of :data:`blindnet.media.VIDEO_FORMATS`), and progress
    bars (None: only on a terminal)."""

    alpha: float = 0.5
    max_frames: int | None = None
    save_video_labels: bool = False
    overwrite: bool = False
    legend: bool = False
    video_format: str = "mp4"
    progress: bool | None = None


@dataclass
class Job:
    """One input file: ``kind`` is ``image``, ``animation``, ``video`` or ``other``; outputs are named
    ``<base>_labels.png`` / ``<base>_overlay.png`` (images) or ``<base>_overlay.<mp4|webm>`` (clips)."""

    path: Path
    name: str
    kind: str
    base: Path | None = None

    def outputs(self, opts: SegmentOptions) -> list[Path]:
        assert self.base is not None
        b = self.base
        if self.kind == "image":
            return [b.with_name(b.name + "_labels.png"), b.with_name(b.name + "_overlay.png")]
        video = [b.with_name(b.name + "_overlay" + VIDEO_FORMATS[opts.video_format][1])]
        return video + ([b.with_name(b.name + "_labels")] if opts.save_video_labels else [])


@dataclass
class SegmentReport:
    """What :func:`segment_paths` did: one entry per input in ``items`` (``input``, ``kind``, ``status`` =
    segmented | skipped | done before, ``outputs`` relative to ``out``, ``reason`` or ``problem``), and throughput."""

    out: Path
    overwrite: bool = False
    items: list[dict] = field(default_factory=list)
    images: int = 0
    frames: int = 0
    seconds: float = 0.0
    replaced: int = 0

    @property
    def fps(self) -> float:
        n = self.images + self.frames
        return n / self.seconds if self.seconds > 0 else 0.0

    @property
    def skipped(self) -> dict[str, str]:
        """Input -> reason, for inputs not segmented this run (done-before ones included)."""
        return {i["input"]: i["reason"] for i in self.items if i["status"] != "segmented"}

    @property
    def partial(self) -> dict[str, str]:
        """Input -> problem, for videos segmented only up to damage (cut off mid-way)."""
        return {i["input"]: i["problem"] for i in self.items if i["status"] == "segmented" and i.get("problem")}

    @property
    def failed(self) -> dict[str, str]:
        """Input -> reason, for media that could not be used, or only in part (not the done-before or non-media
        files)."""
        unusable = {
            i["input"]: i["reason"]
            for i in self.items
            if i["status"] == "skipped" and not i["reason"].startswith("unsupported type")
        }
        return {**unusable, **self.partial}

    @property
    def written(self) -> list[str]:
        return [str(self.out / o) for i in self.items if i["status"] == "segmented" for o in i["outputs"]]

    def counts(self) -> dict[str, int]:
        """How many inputs ended how: ``segmented``, ``done before``, and each skip reason's category."""
        return dict(Counter(i["status"] if i["status"] != "skipped" else i["reason"].split(":")[0] for i in self.items))

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "existing_outputs": "replaced (--overwrite)" if self.overwrite else "kept: inputs done before are skipped",
            "counts": self.counts(),
            "replaced_outputs": self.replaced,
            "cut_off_but_segmented": len(self.partial),
            "images": self.images,
            "frames": self.frames,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.fps, 3),
            "items": self.items,
        }


# ---- what the inputs are and where their outputs go ----------------------------------------------------------------


def collect_jobs(inputs: Sequence[str | Path], out_dir: str | Path) -> list[Job]:
    """Every file named or found (recursively) under the inputs, once each, in order, with its kind and output base.

    A folder's files keep their path relative to it under ``out_dir`` (with several folders, under the folder's own
    name); files named directly go to ``out_dir`` itself. Files inside ``out_dir`` are never inputs. A missing input
    or an empty folder becomes a ``Job`` of kind ``other`` whose reason the caller reports.
    """
    out = Path(out_dir).resolve()
    seen: set[Path] = set()
    jobs: list[Job] = []
    several = sum(Path(i).is_dir() for i in inputs) > 1  # two folders may hold the same relative paths
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = [q for q in sorted(p.rglob("*")) if q.is_file() and not q.resolve().is_relative_to(out)]
            if not files:
                jobs.append(Job(p, str(p), "missing", None))
            for q in files:
                rel = q.relative_to(p).parent
                jobs.append(Job(q, str(q), _kind(q), Path(p.resolve().name if several else "") / rel))
        elif p.is_file():
            jobs.append(Job(p, str(p), _kind(p), Path("")))
        else:
            jobs.append(Job(p, str(p), "missing", None))
    unique = []
    for job in jobs:
        key = job.path.resolve()
        if job.kind == "missing" or key not in seen:
            seen.add(key)
            unique.append(job)
    _name_outputs(unique, out)
    return unique


def _kind(path: Path) -> str:
    """image / animation / video / other, from the name, and for images from the header (animated or not)."""
    kind = media_kind(path)
    if kind == "video":
        return kind
    try:
        with Image.open(path) as img:  # the header only; unknown endings are sniffed too
            animated = img.format in ANIMATED_FORMATS and getattr(img, "is_animated", False)
            return "animation" if animated else "image"
    except Exception:
        # Not an image Pillow recognises: an image ending means a damaged image (reported when read), else not media.
        return "image" if kind == "image" else "other"


def _name_outputs(jobs: list[Job], out: Path) -> None:
    """Give each job an output base: its stem, its whole file name where stems collide in one output folder, and a
    ``~N`` suffix if even that collides. Names compare case-insensitively (macOS and Windows folders do)."""
    media = [j for j in jobs if j.base is not None and j.kind != "other"]
    stems = Counter((j.base.as_posix().casefold(), j.path.stem.casefold()) for j in media)  # type: ignore[union-attr]
    taken: set[str] = set()
    for job in media:
        assert job.base is not None
        folder = job.base
        name = job.path.stem if stems[(folder.as_posix().casefold(), job.path.stem.casefold())] == 1 else job.path.name
        candidate, n = name, 1
        while (folder / candidate).as_posix().casefold() in taken:
            n += 1
            candidate = f"{name}~{n}"
        taken.add((folder / candidate).as_posix().casefold())
        job.base = out / folder / candidate


# ---- segmenting ----------------------------------------------------------------------------------------------------


def segment_paths(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    options: SegmentOptions | None = None,
) -> SegmentReport:
    """Segment images, animations, folders and videos into ``out_dir`` (see the module docstring for the promises).

    Images give ``<base>_labels.png`` (train ids) and ``<base>_overlay.png``; videos and animated images give
    ``<base>_overlay.mp4`` (H.264; ``webm``: VP9) with the source's timing, and with ``save_video_labels`` a
    ``<base>_labels/`` folder of per-frame label PNGs. Problems are printed on stderr and listed in the report.
    """
    opts = options or SegmentOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = SegmentReport(out=out, overwrite=opts.overwrite)
    jobs = collect_jobs(inputs, out)
    bar = tqdm(jobs, desc="segment", unit="file", disable=_disabled(opts.progress, len(jobs) > 1))
    for job in bar:
        item: dict[str, Any] = {"input": job.name, "kind": job.kind}
        report.items.append(item)
        reason = _reason_not_to_run(job, opts)
        if reason is not None:
            item.update(status="done before" if reason.startswith("done before") else "skipped", reason=reason)
            if job.base is not None and reason.startswith("done before"):
                item["outputs"] = [_rel(p, out) for p in job.outputs(opts)]
            elif not reason.startswith("done before"):
                tqdm.write(f"skipped {job.name}: {reason}", file=sys.stderr)
            continue
        report.replaced += sum(p.exists() for p in job.outputs(opts))
        try:
            if job.kind == "image":
                _segment_image(predictor, job, opts, report, item)
            else:
                _segment_clip(predictor, job, opts, report, item)
        except (ImageError, MediaError, OSError, RuntimeError) as exc:
            item.update(status="skipped", reason=_classify(exc, job.path))
            tqdm.write(f"skipped {job.name}: {item['reason']}", file=sys.stderr)
    return report


def _disabled(progress: bool | None, worth_it: bool = True) -> bool | None:
    """tqdm's ``disable`` for a ``progress`` setting: False (``--no-progress``) or nothing worth a bar -> True (off);
    otherwise None, which tqdm reads as "only on a terminal"."""
    return True if progress is False or not worth_it else None


def _rel(path: Path, out: Path) -> str:
    """``path`` relative to the output folder (job paths are absolute; ``out`` is as the user gave it)."""
    root = out.resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _reason_not_to_run(job: Job, opts: SegmentOptions) -> str | None:
    if job.kind == "missing":
        return "unreadable: " + ("folder holds no files" if job.path.is_dir() else "no such file or folder")
    if job.kind == "other":
        return f"unsupported type: not an image Pillow reads nor a video ({job.path.suffix or 'no ending'})"
    if not opts.overwrite and all(p.exists() for p in job.outputs(opts)):
        return "done before: its outputs exist (--overwrite replaces them)"
    return None


def _classify(exc: Exception, path: Path) -> str:
    """``<category>: <message>`` for a failed input, the category one of :data:`blindnet.io.MEDIA_PROBLEMS` (the
    input's own name, which the report lists beside it, is left out of the message)."""
    text = str(exc).removeprefix(f"{path}: ")
    if isinstance(exc, MediaError):
        kind = exc.kind
    elif "empty file" in text:
        kind = "empty"
    elif "truncated" in text:
        kind = "cut off"
    else:
        kind = "unreadable"
    return f"{kind}: {text}"


def _segment_image(predictor: Predictor, job: Job, opts: SegmentOptions, report: SegmentReport, item: dict) -> None:
    image = load_image(job.path)
    t0 = time.perf_counter()
    pred = predictor.predict_arrays([image], sources=[str(job.path)])[0]
    report.seconds += time.perf_counter() - t0
    lab, ovl = job.outputs(opts)
    write_png(lab, pred.labels)
    overlay = pred.overlay(opts.alpha)
    write_png(ovl, with_legend(overlay, pred.labels, pred.num_classes) if opts.legend else overlay)
    report.images += 1
    item.update(status="segmented", outputs=[_rel(lab, report.out), _rel(ovl, report.out)])
    item["shares"] = {k: round(v, 5) for k, v in pred.class_shares().items()}


def _segment_clip(predictor: Predictor, job: Job, opts: SegmentOptions, report: SegmentReport, item: dict) -> None:
    outputs = job.outputs(opts)
    res = segment_video(
        predictor,
        job.path,
        overlay_path=outputs[0],
        labels_dir=outputs[1] if opts.save_video_labels else None,
        alpha=opts.alpha,
        max_frames=opts.max_frames,
        legend=opts.legend,
        video_format=opts.video_format,
        progress=opts.progress,
    )
    report.frames += res.frames
    report.seconds += res.seconds
    item.update(status="segmented", outputs=[_rel(p, report.out) for p in outputs])
    item.update(frames=res.frames, seconds=round(res.seconds, 3), codec=res.codec, source_codec=res.source_codec)
    if res.rotation:
        item["rotation"] = res.rotation
    if res.problem:
        item["problem"] = res.problem
        tqdm.write(f"{job.name}: {res.problem}; the {res.frames} frames before it were segmented", file=sys.stderr)


@dataclass
class VideoResult:
    """What :func:`segment_video` wrote and measured; ``problem`` says if the source was cut off or damaged."""

    frames: int
    seconds: float
    overlay: Path
    codec: str
    source_codec: str = ""
    rotation: int = 0
    problem: str | None = None
    confusion: ConfusionMatrix | None = None
    kept: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # frame -> (RGB, labels)


def segment_video(
    predictor: Predictor,
    path: Path,
    *,
    overlay_path: Path,
    labels_dir: Path | None = None,
    alpha: float = 0.5,
    max_frames: int | None = None,
    masks: Sequence[np.ndarray] | None = None,
    keep_frames: Iterable[int] = (),
    legend: bool = False,
    video_format: str = "mp4",
    progress: bool | None = None,
) -> VideoResult:
    """Segment a video or animated image in batches of ``predictor.batch_size`` frames.

    Writes the overlay video at ``overlay_path`` (suffix set by ``video_format``), each frame at its source
    timestamp, and with ``labels_dir`` one label PNG per frame. With ``masks`` (``H x W`` label maps, one per frame)
    the result's ``confusion`` scores the predictions frame by frame; ``keep_frames`` returns those frames' input and
    labels in ``kept``. A source cut off mid-way gives the frames before the damage and a ``problem``.
    """
    source = FrameSource(path, max_frames)
    writer = VideoWriter(overlay_path, source.info.fps, fmt=video_format)
    res = VideoResult(0, 0.0, writer.path, writer.codec, source.info.codec)
    res.confusion = ConfusionMatrix(predictor.num_classes) if masks is not None else None
    keep = set(keep_frames)
    bar = tqdm(desc=path.name, unit="frame", total=source.info.frames or None, leave=False, disable=_disabled(progress))
    band = 0
    try:
        for batch in _batched(source, predictor.batch_size):
            t0 = time.perf_counter()
            preds = predictor.predict_arrays([f.rgb for f in batch])
            res.seconds += time.perf_counter() - t0
            for frame, pred in zip(batch, preds):
                picture = pred.overlay(alpha)
                if legend:
                    band = band or full_legend_height(picture.shape[1], pred.num_classes)
                    picture = with_legend(picture, pred.labels, pred.num_classes, height=band)
                writer.write(picture, frame.time)
                if labels_dir is not None:
                    write_png(labels_dir / f"frame_{res.frames:06d}.png", pred.labels)
                if res.confusion is not None and masks is not None and res.frames < len(masks):
                    truth = torch.from_numpy(masks[res.frames].astype(np.int64))
                    res.confusion.update(torch.from_numpy(pred.labels.astype(np.int64)), truth)
                if res.frames in keep:
                    res.kept[res.frames] = (frame.rgb, pred.labels)
                res.frames += 1
            bar.update(len(batch))
    except BaseException:
        writer.close(keep=False)
        raise
    finally:
        bar.close()
    writer.close()
    res.rotation, res.problem = source.info.rotation, source.problem
    return res


def _batched(source: Iterable, size: int) -> Iterable[list]:
    batch: list = []
    for item in source:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---- the main job: a synthetic clip scored against its masks -------------------------------------------------------


def contact_sheet(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], num_classes: int) -> np.ndarray:
    """One row per frame: input | prediction | ground truth (colourised), as an ``H x W x 3`` uint8 image.

    Each row is ``(rgb (h, w, 3) uint8, predicted labels (h, w), true labels (h, w))``; 4-pixel white gutters. A
    title band names the three columns on top; a legend names the classes present in the predictions or the truth
    (largest first), below.
    """
    gutter = 4
    tiles = []
    for rgb, pred, truth in rows:
        h = rgb.shape[0]
        sep = np.full((h, gutter, 3), 255, np.uint8)
        tiles.append(np.concatenate([rgb, sep, colorize(pred, num_classes), sep, colorize(truth, num_classes)], 1))
        tiles.append(np.full((gutter, tiles[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(tiles[:-1], 0)
    w = rows[0][0].shape[1]
    titles = [
        (0, w, "input"),
        (w + gutter, 2 * w + gutter, "prediction"),
        (2 * (w + gutter), grid.shape[1], "ground truth"),
    ]
    present = np.concatenate([np.concatenate([p.reshape(-1), t.reshape(-1)]) for _, p, t in rows])
    legend = draw_legend(legend_entries(present, num_classes), grid.shape[1], shares=False)
    return np.concatenate([title_band(titles, grid.shape[1]), grid, legend], 0)


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
    video_format: str = "mp4",
    progress: bool | None = None,
) -> dict:
    """Render, segment and score one clip per appearance.

    Writes ``<out_dir>/synthetic/<appearance>.mp4`` (input), ``<out_dir>/synthetic_<appearance>_overlay.mp4``
    (H.264; ``video_format="webm"``: VP9 WebM) and ``<out_dir>/synthetic_<appearance>_sheet.png`` (``sheet_frames``
    frames: input | prediction | ground truth, titled, with a legend).

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
        out / "synthetic",
        seed=seed,
        num_frames=frames,
        height=size[0],
        width=size[1],
        appearances=tuple(appearances),
        progress=None if progress is not False else False,
    )
    masks = [np.array(Image.open(p)) for p in clip["masks"]]
    keep = sorted({round(i * (frames - 1) / max(sheet_frames - 1, 1)) for i in range(sheet_frames)})
    results: dict = {}
    for app in tqdm(appearances, desc="showcase", unit="clip", disable=_disabled(progress, len(appearances) > 1)):
        video = Path(clip["videos"][app])
        t0 = time.perf_counter()
        res = segment_video(
            predictor,
            video,
            overlay_path=out / f"synthetic_{app}_overlay.mp4",
            alpha=alpha,
            masks=masks,
            keep_frames=keep,
            video_format=video_format,
            progress=progress,
        )
        sheet = write_png(
            out / f"synthetic_{app}_sheet.png",
            contact_sheet([(*res.kept[i], masks[i]) for i in keep if i in res.kept], predictor.num_classes),
        )
        assert res.confusion is not None
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
        tqdm.write(
            f"{app:>8}: mIoU {miou:5.1f}  pixel acc {acc * 100:5.1f}  {results[app]['fps']:.1f} frames/s  "
            f"-> {sheet.name}, {res.overlay.name} ({res.codec})"
        )
    results["mean_miou"] = round(float(np.mean([results[a]["miou"] for a in appearances])), 2)
    print(f"mean mIoU over {', '.join(appearances)}: {results['mean_miou']:.1f}")
    return results
