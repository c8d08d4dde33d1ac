"""Media in and out: what kind of file an input is, the frames of a video or an animated image (upright, with their
timestamps), and H.264 MP4 / VP9 WebM writing.

Videos are decoded and encoded with PyAV, which ships FFmpeg (decoders for H.264, H.265, VP8/9, AV1, MJPEG, ... and
the libx264 / libvpx-vp9 encoders) inside its wheel, so what a run can read and write does not depend on the
machine's FFmpeg or on how OpenCV was built. Decoding follows what players show:

* a display rotation stored in the file (phones record landscape pixels plus a rotation) is applied to every frame;
* each frame keeps its own timestamp, so variable-frame-rate clips are written back with the same timing;
* a file cut off mid-way (a pulled card, an interrupted copy) yields the frames before the damage and says so in
  :attr:`FrameSource.problem`; one that cannot be opened at all raises :class:`~blindnet.io.MediaError` whose
  ``kind`` names the reason (``empty``, ``cut off``, ``unreadable``, ``unsupported type``).

Still images go through :func:`blindnet.io.decode_image` (EXIF orientation applied); animated images (GIF, APNG,
animated WebP) are frame sources like videos, timed by their per-frame durations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import cast

import av
import numpy as np
from PIL import Image, ImageOps, ImageSequence

from blindnet.io import MediaError, pil_to_array, to_rgb_uint8

#: File name endings read as videos (FFmpeg's demuxers recognise the content; the ending only routes the file).
VIDEO_SUFFIXES = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".wmv", ".flv", ".3gp",
    ".ogv",
)  # fmt: skip

#: Output video formats: name -> (PyAV encoder, file suffix, description, encoder options). H.264 in MP4 plays in
#: browsers, phones and editors; VP9 in WebM is the royalty-free option. ``yuv420p`` is what players decode.
VIDEO_FORMATS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "mp4": ("libx264", ".mp4", "H.264/MP4", {"crf": "20", "preset": "veryfast", "bf": "0"}),
    "webm": ("libvpx-vp9", ".webm", "VP9/WebM", {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
}

#: MP4/MOV timestamps are written in 1/90000 s ticks (the MPEG clock): exact for every common frame rate.
_MP4_TIME_BASE = Fraction(1, 90000)
#: Matroska/WebM store milliseconds whatever is asked.
_MKV_TIME_BASE = Fraction(1, 1000)


def image_suffixes() -> tuple[str, ...]:
    """Every file ending Pillow can open (not only save), lower case, with the dot."""
    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


def media_kind(path: str | Path) -> str:
    """``"video"``, ``"image"`` or ``"other"`` from the file name's ending (nothing is read)."""
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return "image" if suffix in image_suffixes() else "other"


@dataclass
class Frame:
    """One decoded frame: ``rgb`` is ``H x W x 3`` uint8 as displayed; ``time`` is seconds from the first frame."""

    rgb: np.ndarray
    time: float


@dataclass
class ClipInfo:
    """What a frame source declares before decoding (``frames``/``duration`` 0 = not declared)."""

    kind: str  # "video" or "animation"
    codec: str
    fps: float
    frames: int
    duration: float
    rotation: int = 0  # degrees counter-clockwise applied to the stored pixels (known once a frame is decoded)


class FrameSource:
    """The frames of a video or an animated image, decoded lazily in display order.

    Iterate it once. Afterwards :attr:`read` is the number of frames yielded and :attr:`problem` is None or a
    sentence saying the file was cut off or damaged after that many frames (the frames before were yielded).
    """

    def __init__(self, path: str | Path, max_frames: int | None = None) -> None:
        self.path = Path(path)
        self.max_frames = max_frames
        self.read = 0
        self.problem: str | None = None
        self.info = self._probe()

    def _probe(self) -> ClipInfo:
        size = _size_or_raise(self.path)
        if media_kind(self.path) == "image":
            with _open_image(self.path) as img:
                n = getattr(img, "n_frames", 1)
                durations = [_gif_duration(f) for f in ImageSequence.Iterator(img)] if n > 1 else [0.1]
            total = sum(durations)
            return ClipInfo("animation", f"{img.format} animation", n / total if total else 10.0, n, total)
        with _open_video(self.path, size) as (container, stream):
            return _video_info(container, stream)

    def __iter__(self) -> Iterator[Frame]:
        if self.info.kind == "animation":
            yield from self._animation_frames()
        else:
            yield from self._video_frames()

    def _animation_frames(self) -> Iterator[Frame]:
        t = 0.0
        with _open_image(self.path) as img:
            for frame in ImageSequence.Iterator(img):
                if self.max_frames is not None and self.read >= self.max_frames:
                    return
                upright = ImageOps.exif_transpose(frame.convert("RGBA"))
                yield Frame(to_rgb_uint8(pil_to_array(upright), name=str(self.path)), t)
                t += _gif_duration(frame)
                self.read += 1

    def _video_frames(self) -> Iterator[Frame]:
        """Decode, rotate upright and time-stamp each frame; stop at the first damage and say so."""
        last_end = 0.0
        stopped = False
        with _open_video(self.path, self.path.stat().st_size) as (container, stream):
            stream.thread_type = "AUTO"
            t0: float | None = None
            try:
                for frame in container.decode(stream):
                    if self.max_frames is not None and self.read >= self.max_frames:
                        stopped = True
                        break
                    t = float(frame.time) if frame.time is not None else self.read / self.info.fps
                    t0 = t if t0 is None else t0
                    rgb: np.ndarray = frame.to_ndarray(format="rgb24")
                    # The display matrix (side data FFmpeg attaches to each frame) in degrees counter-clockwise;
                    # getattr: a PyAV too old to expose it shows the stored pixels.
                    self.info.rotation = round(getattr(frame, "rotation", 0) or 0) % 360
                    turns = round(self.info.rotation / 90) % 4
                    if turns:
                        rgb = np.ascontiguousarray(np.rot90(rgb, turns))
                    step = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else 0.0
                    last_end = t - t0 + (step or 1.0 / self.info.fps)  # from the first frame, as durations are
                    yield Frame(rgb, max(t - t0, 0.0))
                    self.read += 1
            except av.error.FFmpegError as exc:
                self.problem = f"cut off or damaged after {self.read} frames ({exc.strerror or exc})"
        if self.read == 0:
            why = self.problem or "the video stream holds no frame"
            raise MediaError(
                f"{self.path}: no frame could be decoded ({why})", kind="unreadable" if self.problem else "empty"
            )
        if not stopped and self.problem is None:
            self.problem = _shortfall(self.info, self.read, last_end)


def _shortfall(info: ClipInfo, read: int, end: float) -> str | None:
    """A sentence when decoding ended well before the duration the file declares, else None.

    Time, not a frame count, is compared: AVI stores variable frame rates as a grid of mostly empty slots, so its
    declared count is not the number of pictures, but count / rate is its length. An AVI cut before its index has a
    duration guessed from the file size, and only the count in its header tells the real length.
    """
    declared = max(info.duration, info.frames / info.fps if info.frames else 0.0)
    # An audio track may run a little past the video; a gap of two frames (at least 0.25 s) is damage, not that.
    if declared and end < declared - max(2.0 / info.fps, 0.25):
        return f"cut off: decoding stopped at {end:.2f} s of the {declared:.2f} s it declares ({read} frames)"
    return None


def _size_or_raise(path: Path) -> int:
    if not path.is_file():
        raise MediaError(f"{path}: file not found", kind="unreadable")
    size = path.stat().st_size
    if size == 0:
        raise MediaError(f"{path}: empty file", kind="empty")
    return size


def _gif_duration(frame: Image.Image) -> float:
    # Browsers show a 0 or missing frame duration as 100 ms; so do we.
    ms = frame.info.get("duration") or 100
    return float(ms) / 1000.0


@contextlib.contextmanager
def _open_image(path: Path) -> Iterator[Image.Image]:
    try:
        with Image.open(path) as img:
            yield img
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"{path}: not an image Pillow can read ({exc})", kind="unreadable") from exc


@contextlib.contextmanager
def _open_video(path: Path, size: int) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    """The container and its first video stream, with a :class:`MediaError` naming why it cannot be read."""
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        _raise_if_cut_mp4(path)
        raise MediaError(f"{path}: not a video FFmpeg can open ({exc.strerror or exc})", kind="unreadable") from exc
    try:
        if not container.streams.video:
            _raise_if_cut_mp4(path)
            raise MediaError(f"{path}: holds no video stream", kind="unreadable")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise MediaError(f"{path}: no decoder for its video codec in this FFmpeg build", kind="unsupported type")
        yield container, stream
    finally:
        container.close()


def _raise_if_cut_mp4(path: Path) -> None:
    if _mp4_without_index(path):
        raise MediaError(
            f"{path}: cut off: the MP4/MOV ends before the end of its index (moov), so no frame can be located",
            kind="cut off",
        )


def _mp4_without_index(path: Path) -> bool:
    """True for an ISO-BMFF file (MP4/MOV) with an ``ftyp`` box but no complete ``moov`` box among its top-level
    boxes: cut off before or inside the index that recorders write last."""
    seen: set[bytes] = set()
    end = path.stat().st_size
    with open(path, "rb") as fh:
        while True:
            start = fh.tell()
            head = fh.read(8)
            if len(head) < 8:
                break
            size, kind = int.from_bytes(head[:4], "big"), head[4:]
            if size == 1:
                size = int.from_bytes(fh.read(8), "big")
            elif size == 0:  # "to the end of the file"
                size = end - start
            if size < 8 or start + size > end:
                break  # this box is cut off
            seen.add(kind)
            fh.seek(start + size)
    return b"ftyp" in seen and b"moov" not in seen


def _video_info(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> ClipInfo:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate and 0 < float(rate) <= 1000 else 25.0
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    else:
        duration = container.duration / av.time_base if container.duration else 0.0
    return ClipInfo("video", stream.codec_context.name, fps, max(int(stream.frames or 0), 0), duration)


class VideoWriter:
    """Writes RGB frames to a video file atomically: frames go to a hidden temporary sibling renamed on
    :meth:`close`, so a crash leaves no half-written video under the final name.

    ``fmt`` picks from :data:`VIDEO_FORMATS` (``mp4`` = H.264, the default; ``webm`` = VP9); ``path``'s suffix is set
    to the format's. Frames may carry timestamps (seconds): they are kept, so variable frame rates survive; without
    them frame ``i`` is shown at ``i / fps``. Odd frame sides are padded by one replicated row/column (4:2:0 needs
    even sides). The MP4 index goes first (``faststart``), so browsers start playing before the file has arrived.
    """

    def __init__(self, path: str | Path, fps: float, *, fmt: str = "mp4") -> None:
        if fmt not in VIDEO_FORMATS:
            raise ValueError(f"unknown video format {fmt!r}; choose from {', '.join(VIDEO_FORMATS)}")
        self._encoder, suffix, self.codec, self._options = VIDEO_FORMATS[fmt]
        self.path = Path(path).with_suffix(suffix)
        self.tmp = self.path.with_name(f".{self.path.stem}.tmp{suffix}")
        self.fps = float(fps) if fps and fps > 0 else 25.0
        self._tb = _MP4_TIME_BASE if suffix == ".mp4" else _MKV_TIME_BASE
        self._container: av.container.OutputContainer | None = None
        self._stream: av.video.stream.VideoStream | None = None
        self._last_pts = -1
        self.frames = 0

    def _open(self, height: int, width: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        options = {"movflags": "+faststart"} if self.path.suffix == ".mp4" else {}
        self._container = av.open(str(self.tmp), "w", options=options)
        # the encoder is a video codec (H.264 or VP9), so the stream is a VideoStream
        stream = cast(
            av.video.stream.VideoStream,
            self._container.add_stream(self._encoder, rate=Fraction(self.fps).limit_denominator(1001)),
        )
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.time_base = self._tb
        stream.codec_context.time_base = self._tb
        stream.options = dict(self._options)
        self._stream = stream

    def write(self, rgb: np.ndarray, time: float | None = None) -> None:
        """Append one ``H x W x 3`` RGB uint8 frame shown at ``time`` seconds (default ``frames / fps``)."""
        if self._container is None:
            self._open(rgb.shape[0], rgb.shape[1])
        assert self._stream is not None and self._container is not None
        w, h = self._stream.width, self._stream.height
        if rgb.shape[:2] != (h, w):
            rgb = np.pad(rgb, ((0, h - rgb.shape[0]), (0, w - rgb.shape[1]), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        seconds = self.frames / self.fps if time is None else time
        # Timestamps must increase strictly; a repeated or backwards one (a damaged source) moves one tick on.
        pts = max(round(seconds / self._tb), self._last_pts + 1)
        frame.pts, frame.time_base, self._last_pts = pts, self._tb, pts
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self, keep: bool = True) -> None:
        """Finish the file (rename into place) or, with ``keep=False`` or no frames, remove it."""
        try:
            if self._container is not None:
                if keep and self.frames:
                    assert self._stream is not None
                    for packet in self._stream.encode():
                        self._container.mux(packet)
                self._container.close()
        finally:
            self._container = None
            if keep and self.frames:
                self.tmp.replace(self.path)
            else:
                self.tmp.unlink(missing_ok=True)
