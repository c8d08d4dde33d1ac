"""The demo's Video tab: a driving video in, a browser-playable overlay video and class shares over time out.

Long videos are subsampled evenly (the output keeps the original duration), large frames are downscaled, and frames
are decoded one batch at a time, so memory never holds the whole video.
"""

from __future__ import annotations

import math
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from blindnet.classes import class_names
from blindnet.demo.views import legend_frame
from blindnet.inference import Predictor
from blindnet.io import MediaError
from blindnet.media import Frame, FrameSource, VideoWriter

DEFAULT_MAX_VIDEO_FRAMES = 300
#: frames with a longer side are downscaled first: CPU inference time and memory grow with the pixel count
DEFAULT_MAX_VIDEO_SIDE = 1024


class VideoError(ValueError):
    """A video upload cannot be processed (missing, empty, not a video, or a codec FFmpeg cannot decode)."""


# --------------------------------------------------------------------------------------------------------------------
# Video tab
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class VideoInfo:
    """What a video declares before decoding it (``frame_count`` 0 = unknown)."""

    fps: float
    frame_count: int


@dataclass
class VideoResult:
    """The Video tab's output.

    Attributes:
        path: the overlay video file (H.264 MP4: plays in browsers), each frame at its source time.
        frames: frames processed (= frames written).
        source_frames: frames in the upload as far as known (0 = unknown).
        stride: every ``stride``-th frame was processed.
        fps: frame rate of the output video.
        shares: per processed frame and class: ``frame``, ``time_s``, ``class``, ``share_pct`` (long format).
        legend: :func:`legend_frame` of the mean share of each class over the processed frames.
        notices: human-readable lines (subsampling, downscaling, codec fallback, throughput).
        seconds: wall time of the whole run.
    """

    path: Path
    frames: int
    source_frames: int
    stride: int
    fps: float
    shares: pd.DataFrame
    legend: pd.DataFrame
    notices: list[str] = field(default_factory=list)
    seconds: float = 0.0


def probe_video(path: str | Path) -> VideoInfo:
    """Read a video's header (PyAV); raises :class:`VideoError` for anything unusable."""
    path = Path(path)
    try:
        source = FrameSource(path)
    except MediaError as exc:
        raise VideoError(_upload_message(exc, path)) from None
    info = source.info
    # Matroska/WebM declare a duration, not a count.
    count = info.frames or (round(info.duration * info.fps) if info.duration else 0)
    return VideoInfo(info.fps, count)


def _upload_message(exc: MediaError, path: Path) -> str:
    # Name the upload by its file name, never the server's temp folder.
    return f"{path.name}: {str(exc).removeprefix(f'{path}: ')}"


def sampling_stride(frame_count: int, max_frames: int) -> int:
    """Keep every ``stride``-th frame so that at most ``max_frames`` of ``frame_count`` are processed (1 when the
    count is unknown: the reader then stops at ``max_frames``)."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    return max(1, math.ceil(frame_count / max_frames)) if frame_count > 0 else 1


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _even_size(width: int, height: int) -> tuple[int, int]:
    # 4:2:0 encoders need even sides; dropping one pixel row/column is invisible.
    return max(2, width - width % 2), max(2, height - height % 2)


def _read_batches(source: FrameSource, *, stride: int, max_frames: int, batch_size: int, plan: _Plan) -> Any:
    """Yield ``(batch, more)``: lists of :class:`~blindnet.media.Frame` (upright RGB, timestamp), every
    ``stride``-th frame, at most ``max_frames``, frames with a longer side than ``plan.max_side`` downscaled (the
    plan's notices say so once).

    Frames are decoded lazily, ``batch_size`` at a time, so memory holds one batch, never the whole video. ``more``
    is None until the last batch, which tells whether frames were left unread.
    """
    batch: list[Frame] = []
    kept = 0
    more = False
    for index, frame in enumerate(source):
        if kept >= max_frames:
            more = True
            break
        if index % stride:
            continue
        h, w = frame.rgb.shape[:2]
        scale = min(1.0, plan.max_side / max(w, h))
        size = _even_size(round(w * scale), round(h * scale))
        if scale < 1.0 and kept == 0:
            plan.notices.append(f"Frames were downscaled from {w}×{h} to {size[0]}×{size[1]} for speed.")
        if size != (w, h):
            frame = Frame(cv2.resize(frame.rgb, size, interpolation=cv2.INTER_AREA), frame.time)
        batch.append(frame)
        kept += 1
        if len(batch) == batch_size:
            yield batch, None
            batch = []
    yield batch, more


@dataclass
class _Plan:
    """How a video will be read: every ``stride``-th frame, longer sides than ``max_side`` scaled down; what to tell."""

    info: VideoInfo
    stride: int
    fps_in: float
    expected: int
    notices: list[str]
    max_side: int


def _plan(path: Path, max_frames: int, max_side: int) -> _Plan:
    info = probe_video(path)
    notices: list[str] = []
    stride = sampling_stride(info.frame_count, max_frames)
    fps_in = info.fps or 25.0
    expected = min(max_frames, math.ceil(info.frame_count / stride)) if info.frame_count else max_frames
    if stride > 1:
        notices.append(
            f"The video has {info.frame_count} frames, more than the limit of {max_frames}: every {_ordinal(stride)} "
            f"frame was processed ({expected} frames), and the result plays at {fps_in / stride:.1f} fps to keep its "
            "length."
        )
    return _Plan(info, stride, fps_in, expected, notices, max_side)


def _segment_frames(
    predictor: Predictor,
    source: FrameSource,
    plan: _Plan,
    writer: VideoWriter,
    *,
    alpha: float,
    max_frames: int,
    batch_size: int,
    progress: Callable[[float, str], None] | None,
) -> tuple[list[np.ndarray], bool]:
    """Write the overlay video (each frame at its source time, so the length is kept however many are skipped);
    returns the class pixel counts per processed frame and whether frames were left."""
    per_frame: list[np.ndarray] = []  # C ints per processed frame: tiny
    truncated = False
    for batch, more in _read_batches(
        source, stride=plan.stride, max_frames=max_frames, batch_size=batch_size, plan=plan
    ):
        if more is not None:
            truncated = more
        if not batch:
            continue
        for frame, pred in zip(batch, predictor.predict_arrays([f.rgb for f in batch])):
            writer.write(pred.overlay(float(alpha)), frame.time)
            per_frame.append(np.bincount(pred.labels.reshape(-1), minlength=pred.num_classes)[: pred.num_classes])
        if progress is not None:
            done = len(per_frame)
            progress(min(done / max(plan.expected, 1), 1.0), f"segmented {done}/{plan.expected} frames")
    return per_frame, truncated


def _shares(per_frame: list[np.ndarray], num_classes: int, stride: int, fps_in: float) -> tuple[pd.DataFrame, dict]:
    """Long-format class shares per processed frame, and the mean share of each class present."""
    frames = len(per_frame)
    counts = np.stack(per_frame).astype(np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    names = class_names(num_classes)
    present = [c for c in range(num_classes) if counts[:, c].any()]
    times = np.arange(frames) * stride / fps_in
    long = pd.DataFrame(
        {
            "frame": np.repeat(np.arange(frames) * stride, len(present)),
            "time_s": np.repeat(np.round(times, 3), len(present)),
            "class": [names[c] for c in present] * frames,
            "share_pct": np.round(100.0 * shares[:, present].reshape(-1), 3),
        }
    )
    return long, {names[c]: float(shares[:, c].mean()) for c in present}


def process_video(
    predictor: Predictor,
    path: str | Path,
    *,
    alpha: float = 0.5,
    max_frames: int = DEFAULT_MAX_VIDEO_FRAMES,
    max_side: int = DEFAULT_MAX_VIDEO_SIDE,
    batch_size: int = 8,
    out_dir: str | Path | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> VideoResult:
    """Segment a video file frame by frame and write a browser-playable overlay video.

    Args:
        predictor: the model.
        path: a video file FFmpeg decodes (H.264, H.265, VP9, AV1, MJPEG, ... in MP4, MOV, MKV, WebM, AVI); a display
            rotation is applied, a file cut off mid-way gives its frames before the damage (with a notice).
        alpha: label opacity of the overlay.
        max_frames: the most frames processed; longer videos are subsampled evenly over their whole length (the
            output keeps the original duration by lowering its frame rate) and the result says so.
        max_side: frames whose longer side exceeds this are downscaled before inference.
        batch_size: frames per predictor call (and the most frames held in memory at once).
        out_dir: folder for the output video (a temp folder when None).
        progress: ``progress(fraction, message)`` after each batch.

    Raises:
        VideoError: empty file, not a video, or no decodable frame (e.g. an unsupported codec).
    """
    t_start = time.perf_counter()
    path = Path(path)
    plan = _plan(path, max_frames, max_side)
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="blindnet-video-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = VideoWriter(out_dir / f"{path.stem[:40]}-overlay-{uuid.uuid4().hex[:8]}", plan.fps_in / plan.stride)
    source = FrameSource(path)
    try:
        per_frame, truncated = _segment_frames(
            predictor,
            source,
            plan,
            writer,
            alpha=alpha,
            max_frames=max_frames,
            batch_size=batch_size,
            progress=progress,
        )
    except MediaError as exc:
        writer.close(keep=False)
        raise VideoError(_upload_message(exc, path)) from None
    except BaseException:
        writer.close(keep=False)
        raise
    writer.close()
    frames = len(per_frame)
    notices = plan.notices
    if source.problem:
        notices.append(f"The file is damaged: {source.problem}; the frames before were processed.")
    if source.info.rotation:
        notices.append(f"The video asks to be shown turned by {source.info.rotation} degrees; frames were turned.")
    if truncated:
        notices.append(
            f"Only the first {frames} frames were processed (limit {max_frames}; the video's length was unknown)."
        )
    seconds = time.perf_counter() - t_start
    notices.append(f"{frames} frames in {seconds:.1f} s ({frames / max(seconds, 1e-9):.1f} frames/s end to end).")
    long, mean = _shares(per_frame, predictor.num_classes, plan.stride, plan.fps_in)
    return VideoResult(
        path=writer.path,
        frames=frames,
        source_frames=plan.info.frame_count,
        stride=plan.stride,
        fps=plan.fps_in / plan.stride,
        shares=long,
        legend=legend_frame(mean, predictor.num_classes),
        notices=notices,
        seconds=seconds,
    )
