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
from blindnet.io import available_codec, open_cv2_writer

DEFAULT_MAX_VIDEO_FRAMES = 300
#: frames with a longer side are downscaled first: CPU inference time and memory grow with the pixel count
DEFAULT_MAX_VIDEO_SIDE = 1024


class VideoError(ValueError):
    """A video upload cannot be processed (missing, empty, not a video, or a codec OpenCV cannot decode)."""


# --------------------------------------------------------------------------------------------------------------------
# Video tab
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class VideoInfo:
    """What OpenCV reports about a video before decoding it (``frame_count`` 0 = unknown)."""

    fps: float
    frame_count: int
    width: int
    height: int


@dataclass
class VideoResult:
    """The Video tab's output.

    Attributes:
        path: the overlay video file (browser-playable: H.264 MP4 or VP8 WebM).
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
    """Open ``path`` with OpenCV and read its header; raises :class:`VideoError` for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path.name}: file not found")
    if path.stat().st_size == 0:
        raise VideoError(f"{path.name}: empty file")
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoError(f"{path.name}: not a video OpenCV can open (unknown container or codec)")
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    finally:
        cap.release()
    if not math.isfinite(fps) or fps <= 0 or fps > 1000:
        fps = 0.0
    return VideoInfo(fps=fps, frame_count=max(count, 0), width=width, height=height)


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


def _read_batches(
    cap: cv2.VideoCapture, *, stride: int, max_frames: int, batch_size: int, size: tuple[int, int] | None
) -> Any:
    """Yield lists of RGB frames (each ``H x W x 3`` uint8), keeping every ``stride``-th, at most ``max_frames``.

    Frames are decoded lazily, ``batch_size`` at a time, so memory holds one batch, never the whole video.
    Yields ``(batch, more)`` where ``more`` tells, after the last batch, whether frames were left unread.
    """
    batch: list[np.ndarray] = []
    kept = 0
    index = 0
    while kept < max_frames:
        if index % stride:
            if not cap.grab():  # skipped frames are demuxed, not converted to RGB
                break
            index += 1
            continue
        ok, frame = cap.read()
        if not ok or frame is None:
            break
        index += 1
        if size is not None and (frame.shape[1], frame.shape[0]) != size:
            frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        batch.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        kept += 1
        if len(batch) == batch_size:
            yield batch, None
            batch = []
    more = kept >= max_frames and cap.grab()
    yield batch, bool(more)


@dataclass
class _Plan:
    """How a video will be read: every ``stride``-th frame, resized to ``size`` (None: as is), and what to tell."""

    info: VideoInfo
    stride: int
    fps_in: float
    expected: int
    size: tuple[int, int] | None
    notices: list[str]


def _plan(path: Path, max_frames: int, max_side: int) -> _Plan:
    info = probe_video(path)
    notices: list[str] = []
    stride = sampling_stride(info.frame_count, max_frames)
    fps_in = info.fps or 25.0
    if not info.fps:
        notices.append("The video reports no frame rate; assuming 25 fps.")
    expected = min(max_frames, math.ceil(info.frame_count / stride)) if info.frame_count else max_frames
    if stride > 1:
        notices.append(
            f"The video has {info.frame_count} frames, more than the limit of {max_frames}: every {_ordinal(stride)} "
            f"frame was processed ({expected} frames), and the result plays at {fps_in / stride:.1f} fps to keep its "
            "length."
        )
    size: tuple[int, int] | None = None
    if info.width and info.height:
        w, h = info.width, info.height
        scale = min(1.0, max_side / max(w, h))
        target = _even_size(round(w * scale), round(h * scale))
        if scale < 1.0:
            notices.append(f"Frames were downscaled from {w}×{h} to {target[0]}×{target[1]} for speed.")
        if target != (w, h):
            size = target
    return _Plan(info, stride, fps_in, expected, size, notices)


def _segment_frames(
    predictor: Predictor,
    path: Path,
    plan: _Plan,
    out_path: Path,
    *,
    alpha: float,
    max_frames: int,
    batch_size: int,
    progress: Callable[[float, str], None] | None,
) -> tuple[list[np.ndarray], bool]:
    """Write the overlay video; returns the class pixel counts per processed frame and whether frames were left."""
    fourcc, _, codec_desc = available_codec()
    writer: cv2.VideoWriter | None = None
    per_frame: list[np.ndarray] = []  # C ints per processed frame: tiny
    truncated = False
    cap = cv2.VideoCapture(str(path))
    try:
        for batch, more in _read_batches(
            cap, stride=plan.stride, max_frames=max_frames, batch_size=batch_size, size=plan.size
        ):
            if more is not None:
                truncated = more
            if not batch:
                continue
            if writer is None:
                # the header's size can be missing or odd; the first decoded frame is the truth
                write_size = _even_size(batch[0].shape[1], batch[0].shape[0])
                writer = open_cv2_writer(out_path, fourcc, plan.fps_in / plan.stride, write_size)
                if not writer.isOpened():
                    raise VideoError(f"could not open a {codec_desc} writer for the result")
            for pred in predictor.predict_arrays(batch):
                frame = cv2.cvtColor(pred.overlay(float(alpha)), cv2.COLOR_RGB2BGR)
                if (frame.shape[1], frame.shape[0]) != write_size:
                    frame = cv2.resize(frame, write_size, interpolation=cv2.INTER_AREA)
                writer.write(frame)
                per_frame.append(np.bincount(pred.labels.reshape(-1), minlength=pred.num_classes)[: pred.num_classes])
            if progress is not None:
                done = len(per_frame)
                progress(min(done / max(plan.expected, 1), 1.0), f"segmented {done}/{plan.expected} frames")
    finally:
        cap.release()
        if writer is not None:
            writer.release()
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
        path: an mp4/avi/mov/... file OpenCV can decode.
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
    fourcc, suffix, codec_desc = available_codec()
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="blindnet-video-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"{path.stem[:40]}-overlay-{uuid.uuid4().hex[:8]}{suffix}"
    per_frame, truncated = _segment_frames(
        predictor, path, plan, out_path, alpha=alpha, max_frames=max_frames, batch_size=batch_size, progress=progress
    )
    frames = len(per_frame)
    if frames == 0:
        out_path.unlink(missing_ok=True)
        raise VideoError(
            f"{path.name}: no frame could be decoded (an empty video, or a codec this OpenCV build cannot read)"
        )
    notices = plan.notices
    if truncated:
        notices.append(
            f"Only the first {frames} frames were processed (limit {max_frames}; the video's length was unknown)."
        )
    if suffix != ".mp4" or fourcc != "avc1":
        notices.append(f"Encoded as {codec_desc}: this OpenCV build has no H.264 encoder.")
    seconds = time.perf_counter() - t_start
    notices.append(f"{frames} frames in {seconds:.1f} s ({frames / max(seconds, 1e-9):.1f} frames/s end to end).")
    long, mean = _shares(per_frame, predictor.num_classes, plan.stride, plan.fps_in)
    return VideoResult(
        path=out_path,
        frames=frames,
        source_frames=plan.info.frame_count,
        stride=plan.stride,
        fps=plan.fps_in / plan.stride,
        shares=long,
        legend=legend_frame(mean, predictor.num_classes),
        notices=notices,
        seconds=seconds,
    )
