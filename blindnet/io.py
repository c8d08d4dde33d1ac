"""The I/O floor: files written atomically, PNGs, and video frames in and out.

Nothing here imports the rest of the package, so every layer above (checkpoints, configs, exports, the jobs) writes
files the same way: a crash or a kill mid-write leaves the previous file, never a half-written one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")

# (fourcc, suffix, description), best first. OpenCV's pip wheels ship an FFmpeg without an H.264 encoder, so avc1
# usually fails there; VP8 in WebM is the browser-playable codec those wheels can always write. mp4v (MPEG-4 Part 2)
# is the last resort: it plays in VLC, not in browsers, and callers say so.
VIDEO_CODECS: tuple[tuple[str, str, str], ...] = (
    ("avc1", ".mp4", "H.264/MP4"),
    ("VP80", ".webm", "VP8/WebM"),
    ("mp4v", ".mp4", "MPEG-4/MP4 (may not play in a browser)"),
)


class MediaError(ValueError):
    """A video (or image) file cannot be opened or decoded; the message names the file and the reason."""


def atomic_write(path: str | Path, write_fn: Callable[[str], object]) -> Path:
    """Write a file through ``write_fn(tmp_path)`` into a temporary sibling, then rename it into place.

    A crash or kill mid-write leaves the previous file (if any) untouched and never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates the file 0600; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_png(path: str | Path, array: np.ndarray) -> Path:
    """Atomically write an ``H x W`` (labels) or ``H x W x 3`` (RGB) uint8 array as a PNG."""
    return atomic_write(path, lambda tmp: Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG"))


@contextlib.contextmanager
def quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's own log lines (e.g. the fourcc/container warning it prints for every VP8 writer)."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    # FFmpeg logs failed encoder probes (e.g. hardware H.264), and OpenCV's FFmpeg backend warns about the VP8 tag
    # in WebM on every writer it opens, straight to file descriptor 2, past Python's and OpenCV's log levels. Held
    # only while a writer opens (milliseconds), never around inference or request handling.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@functools.cache
def available_codec() -> tuple[str, str, str]:
    """The first entry of :data:`VIDEO_CODECS` this OpenCV build can actually write (probed once, on 2 frames)."""
    with quiet_opencv(), _quiet_native_stderr():  # a failed probe is expected, not an error
        with tempfile.TemporaryDirectory(prefix="blindnet-codec-") as tmp:
            for fourcc, suffix, desc in VIDEO_CODECS:
                probe = Path(tmp) / f"probe{suffix}"
                writer = cv2.VideoWriter(str(probe), cv2.VideoWriter_fourcc(*fourcc), 10.0, (64, 48))
                ok = writer.isOpened()
                if ok:
                    for _ in range(2):
                        writer.write(np.zeros((48, 64, 3), np.uint8))
                writer.release()
                if ok and probe.is_file() and probe.stat().st_size > 0:
                    return fourcc, suffix, desc
    raise RuntimeError("this OpenCV build cannot write any video codec (tried avc1, VP80, mp4v)")


def open_cv2_writer(path: str | Path, fourcc: str, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    """``cv2.VideoWriter`` for ``size = (W, H)`` frames, opened without OpenCV's and FFmpeg's harmless warnings."""
    with quiet_opencv(), _quiet_native_stderr():
        return cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)


def iter_video_frames(path: str | Path, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Yield the ``H x W x 3`` RGB uint8 frames of a video file; :class:`MediaError` if none can be decoded."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise MediaError(f"{path}: cannot open video (unsupported codec or not a video)")
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
        raise MediaError(f"{path}: video has no decodable frames")


def video_fps(path: str | Path, default: float = 10.0) -> float:
    """The frame rate a video's header reports, or ``default`` when it reports none."""
    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS) if cap.isOpened() else 0.0
    cap.release()
    return float(fps) if fps and fps > 0 and np.isfinite(fps) else default


class VideoWriter:
    """Writes RGB frames to a video file atomically: frames go to a temporary sibling renamed on :meth:`close`.

    ``path``'s suffix is replaced by the one of the best codec this OpenCV build can write (H.264 in .mp4, else VP8
    in .webm, else MPEG-4 Part 2 in .mp4); :attr:`path` and :attr:`codec` say what was chosen.
    """

    def __init__(self, path: str | Path, fps: float, size: tuple[int, int]) -> None:
        fourcc, suffix, self.codec = available_codec()
        self.path = Path(path).with_suffix(suffix)
        self.tmp = self.path.with_name(f".{self.path.stem}.tmp{suffix}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        h, w = size
        # 4:2:0 encoders need even sides; frames are padded by one row/column where needed.
        self._size = (w + w % 2, h + h % 2)
        self._w = open_cv2_writer(self.tmp, fourcc, fps, self._size)
        if not self._w.isOpened():
            raise OSError(f"OpenCV cannot write {self.path} ({self.codec})")
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        """Append one ``H x W x 3`` RGB uint8 frame."""
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if (bgr.shape[1], bgr.shape[0]) != self._size:
            bgr = cv2.copyMakeBorder(bgr, 0, self._size[1] - bgr.shape[0], 0, self._size[0] - bgr.shape[1],
                                     cv2.BORDER_REPLICATE)
        self._w.write(bgr)
        self.frames += 1

    def close(self, keep: bool = True) -> None:
        """Finish the file (rename into place) or, with ``keep=False`` or no frames, remove it."""
        self._w.release()
        if keep and self.frames:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)
