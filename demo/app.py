"""The Gradio demo: image, video and robustness tabs on top of the shared :class:`~blindnet.inference.Predictor`.

Every callback is a plain function of numpy arrays / paths (``segment_image``, ``segment_video``,
``compare_style``) so tests can call it without a browser; :func:`build_demo` only wires those functions to
components. Inputs arrive unpreprocessed (``preprocess=False``) so that a bad upload reaches *our* decoder and turns
into a readable message (``gr.Error``) instead of Gradio's generic processing error.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import gradio as gr
import numpy as np
import pandas as pd

from blindnet.classes import class_names, palette
from blindnet.inference import ImageError, Prediction, Predictor, decode_image, to_rgb_uint8
from blindnet.demo.styles import STYLES, apply_style

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
#: decompression-bomb guard for uploaded images (a 40 MP photo still fits)
MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_VIDEO_FRAMES = 300
#: frames with a longer side are downscaled first: CPU inference time and memory grow with the pixel count
DEFAULT_MAX_VIDEO_SIDE = 1024
#: output files older than this are swept from the demo's own output folder
OUTPUT_TTL_S = 3600.0
NO_MODEL = "(none)"
LEGEND_WIDTHS = ["22%", "48%", "30%"]

CSS = """
.bn-legend table td:first-child { width: 2.2em; }
#bn-header h1 { margin-bottom: 0.1em; }
"""


class VideoError(ValueError):
    """A video upload cannot be processed (missing, empty, not a video, or a codec OpenCV cannot decode)."""


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------------


def hex_colour(rgb: Sequence[int] | np.ndarray) -> str:
    """``(r, g, b)`` -> ``#rrggbb``."""
    r, g, b = (int(v) for v in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def class_colours(num_classes: int) -> dict[str, str]:
    """Class name -> ``#rrggbb`` Cityscapes colour, for legends and plot colour maps."""
    lut = palette(num_classes)
    return {name: hex_colour(lut[i]) for i, name in enumerate(class_names(num_classes))}


def read_image_upload(upload: Any, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode what a Gradio image input hands over into ``H x W x 3`` uint8 RGB.

    Args:
        upload: an unpreprocessed Gradio file payload (a dict with ``path`` and ``orig_name``), a file path, or an
            already decoded array.
        max_pixels: refuse larger images before decoding them.

    Raises:
        ImageError: nothing uploaded, an unreadable file, or data that is not an image; the message names the file
            by its original name (never the server's temp path).
    """
    if upload is None:
        raise ImageError("no image: upload one or pick an example")
    if isinstance(upload, np.ndarray):
        return to_rgb_uint8(upload, name="image")
    if isinstance(upload, dict):
        path, name = upload.get("path"), upload.get("orig_name") or "upload"
    else:
        path = upload
        name = Path(str(upload)).name
    if not path:
        raise ImageError(f"{name}: the upload did not arrive (no file path)")
    file = Path(path)
    if not file.is_file():
        raise ImageError(f"{name}: the uploaded file is missing on the server")
    return decode_image(file.read_bytes(), name=name, max_pixels=max_pixels)


def legend_frame(shares: Mapping[str, float], num_classes: int) -> pd.DataFrame:
    """Legend rows ``colour | class | share (%)`` for the classes in ``shares`` (largest first).

    The ``colour`` column holds the class's ``#rrggbb`` Cityscapes colour (the styled view paints the cell with it).
    """
    colours = class_colours(num_classes)
    rows = [(colours[name], name, round(100.0 * share, 2)) for name, share in shares.items()]
    rows.sort(key=lambda r: -r[2])
    return pd.DataFrame(rows, columns=["colour", "class", "share (%)"])


def legend_view(frame: pd.DataFrame) -> Any:
    """A pandas Styler of :func:`legend_frame` that paints each colour cell with its colour (Gradio renders it)."""

    def paint(col: pd.Series) -> list[str]:
        return [f"background-color: {c}; color: {c}" for c in col]

    return frame.style.apply(paint, subset=["colour"]).format({"share (%)": "{:.2f}"})


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels where two ``H x W`` label maps agree."""
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in size: {a.shape} vs {b.shape}")
    return float(np.mean(a == b)) if a.size else 1.0


def describe_predictor(name: str, predictor: Predictor) -> str:
    """One line about a loaded model: name, backbone (when known), backend facts."""
    facts = predictor.backend.describe()
    cfg = getattr(getattr(predictor.backend, "model", None), "config", None)
    parts = [f"**{name}**"]
    if cfg is not None:
        parts.append(f"{cfg.backbone}{' + InstanceNorm (BlindNet)' if cfg.instance_norm else ' (baseline)'}")
    parts.append(", ".join(f"{k}={v}" for k, v in facts.items()))
    return " · ".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# Image tab
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ImageResult:
    """What the Image tab shows for one image.

    Attributes:
        prediction: the :class:`Prediction` (labels ``H x W``, the input image).
        overlay: ``H x W x 3`` uint8 colour overlay at the requested opacity.
        colour_map: ``H x W x 3`` uint8 Cityscapes-coloured label map.
        legend: :func:`legend_frame` of the classes present.
        seconds: wall time of the prediction (decode excluded, pre/post-processing included).
    """

    prediction: Prediction
    overlay: np.ndarray
    colour_map: np.ndarray
    legend: pd.DataFrame
    seconds: float

    def timing_text(self, predictor: Predictor) -> str:
        h, w = self.prediction.labels.shape
        backend = predictor.backend.describe()
        where = backend.get("device", "")
        return (
            f"**{1000.0 * self.seconds:.1f} ms** inference · {w}×{h} px · backend {backend.get('backend', '?')}"
            + (f" on {where}" if where else "")
            + f" · {len(self.legend)} classes present"
        )


def segment_image(predictor: Predictor, image: np.ndarray, alpha: float = 0.5) -> ImageResult:
    """Segment one ``H x W x 3`` uint8 RGB image and build everything the Image tab displays."""
    t0 = time.perf_counter()
    pred = predictor.predict_one(image)
    seconds = time.perf_counter() - t0
    return ImageResult(
        prediction=pred,
        overlay=pred.overlay(float(alpha)),
        colour_map=pred.colorized(),
        legend=legend_frame(pred.class_shares(), pred.num_classes),
        seconds=seconds,
    )


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


# (fourcc, suffix, description), best first. OpenCV's pip wheels ship an FFmpeg without an H.264 encoder, so avc1
# usually fails there; VP8 in WebM is the browser-playable codec those wheels can always write. mp4v (MPEG-4 Part 2)
# is the last resort: it plays in VLC, not in browsers, and the notice says so.
VIDEO_CODECS: tuple[tuple[str, str, str], ...] = (
    ("avc1", ".mp4", "H.264/MP4"),
    ("VP80", ".webm", "VP8/WebM"),
    ("mp4v", ".mp4", "MPEG-4/MP4 (may not play in a browser)"),
)


@functools.cache
def available_codec() -> tuple[str, str, str]:
    """The first entry of :data:`VIDEO_CODECS` this OpenCV build can actually write (probed once, on 2 frames)."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # a failed probe is expected, not an error
    try:
        return _probe_codecs()
    finally:
        cv2.utils.logging.setLogLevel(level)


def _probe_codecs() -> tuple[str, str, str]:
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


def segment_video(
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
    info = probe_video(path)
    notices: list[str] = []
    stride = sampling_stride(info.frame_count, max_frames)
    fps_in = info.fps or 25.0
    if not info.fps:
        notices.append("The video reports no frame rate; assuming 25 fps.")
    expected = min(max_frames, math.ceil(info.frame_count / stride)) if info.frame_count else max_frames
    if stride > 1:
        notices.append(
            f"The video has {info.frame_count} frames, more than the limit of {max_frames}: every {_ordinal(stride)} frame "
            f"was processed ({expected} frames), and the result plays at {fps_in / stride:.1f} fps to keep its length."
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

    fourcc, suffix, codec_desc = available_codec()
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="blindnet-video-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"{path.stem[:40]}-overlay-{uuid.uuid4().hex[:8]}{suffix}"
    fps_out = fps_in / stride

    writer: cv2.VideoWriter | None = None
    per_frame: list[np.ndarray] = []  # class pixel counts per processed frame (C ints each: tiny)
    frames = 0
    truncated = False
    cap = cv2.VideoCapture(str(path))
    try:
        for batch, more in _read_batches(cap, stride=stride, max_frames=max_frames, batch_size=batch_size, size=size):
            if more is not None:
                truncated = more
            if not batch:
                continue
            if writer is None:
                # the header's size can be missing or odd; the first decoded frame is the truth
                write_size = _even_size(batch[0].shape[1], batch[0].shape[0])
                writer = cv2.VideoWriter(str(out_path), cv2.VideoWriter_fourcc(*fourcc), fps_out, write_size)
                if not writer.isOpened():
                    raise VideoError(f"could not open a {codec_desc} writer for the result")
            for pred in predictor.predict_arrays(batch):
                frame = cv2.cvtColor(pred.overlay(float(alpha)), cv2.COLOR_RGB2BGR)
                if (frame.shape[1], frame.shape[0]) != write_size:
                    frame = cv2.resize(frame, write_size, interpolation=cv2.INTER_AREA)
                writer.write(frame)
                per_frame.append(np.bincount(pred.labels.reshape(-1), minlength=pred.num_classes)[: pred.num_classes])
            frames += len(batch)
            if progress is not None:
                progress(min(frames / max(expected, 1), 1.0), f"segmented {frames}/{expected} frames")
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    if frames == 0:
        out_path.unlink(missing_ok=True)
        raise VideoError(
            f"{path.name}: no frame could be decoded (an empty video, or a codec this OpenCV build cannot read)"
        )
    if truncated:
        notices.append(
            f"Only the first {frames} frames were processed (limit {max_frames}; the video's length was unknown)."
        )
    if suffix != ".mp4" or fourcc != "avc1":
        notices.append(f"Encoded as {codec_desc}: this OpenCV build has no H.264 encoder.")
    seconds = time.perf_counter() - t_start
    notices.append(f"{frames} frames in {seconds:.1f} s ({frames / max(seconds, 1e-9):.1f} frames/s end to end).")

    num_classes = predictor.num_classes
    counts = np.stack(per_frame).astype(np.float64)
    totals = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    shares = counts / totals
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
    mean = {names[c]: float(shares[:, c].mean()) for c in present}
    return VideoResult(
        path=out_path,
        frames=frames,
        source_frames=info.frame_count,
        stride=stride,
        fps=fps_out,
        shares=long,
        legend=legend_frame(mean, num_classes),
        notices=notices,
        seconds=seconds,
    )


# --------------------------------------------------------------------------------------------------------------------
# Robustness tab
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelComparison:
    """One model on the clean and the shifted image: colour maps ``H x W x 3`` and their pixel agreement."""

    name: str
    clean: Prediction
    shifted: Prediction
    agreement: float


@dataclass
class RobustnessResult:
    """The Robustness tab's output: the shifted image, one :class:`ModelComparison` per model, and (with two models)
    how often the two models agree with each other on the clean and on the shifted image."""

    image: np.ndarray
    shifted: np.ndarray
    style: str
    strength: float
    models: list[ModelComparison]
    cross_clean: float | None = None
    cross_shifted: float | None = None

    def table(self) -> pd.DataFrame:
        """``model | agreement clean vs shifted (%) | classes clean | classes shifted``."""
        rows = [
            (
                m.name,
                round(100.0 * m.agreement, 2),
                ", ".join(m.clean.class_shares()),
                ", ".join(m.shifted.class_shares()),
            )
            for m in self.models
        ]
        return pd.DataFrame(
            rows, columns=["model", "agreement clean vs shifted (%)", "classes (clean)", "classes (shifted)"]
        )

    def summary(self) -> str:
        lines = [
            f"**{self.style}** at strength {self.strength:.2f}: "
            + "; ".join(f"{m.name} keeps **{100.0 * m.agreement:.1f}%** of its labels" for m in self.models)
            + "."
        ]
        if self.cross_clean is not None and self.cross_shifted is not None:
            a, b = self.models[0].name, self.models[1].name
            lines.append(
                f"{a} and {b} agree on {100.0 * self.cross_clean:.1f}% of the pixels of the clean image and on "
                f"{100.0 * self.cross_shifted:.1f}% of the shifted one."
            )
        return "\n\n".join(lines)


def compare_style(
    predictors: Mapping[str, Predictor], image: np.ndarray, style: str, strength: float = 1.0, seed: int = 0
) -> RobustnessResult:
    """Apply a style shift to ``image`` and segment both versions with each model in ``predictors`` (one or two)."""
    if not predictors:
        raise ValueError("compare_style needs at least one model")
    shifted = apply_style(image, style, strength, seed)
    models = []
    for name, predictor in predictors.items():
        clean, shift = predictor.predict_arrays([image, shifted])
        models.append(ModelComparison(name, clean, shift, agreement(clean.labels, shift.labels)))
    result = RobustnessResult(image=image, shifted=shifted, style=style, strength=float(strength), models=models)
    if len(models) >= 2:
        result.cross_clean = agreement(models[0].clean.labels, models[1].clean.labels)
        result.cross_shifted = agreement(models[0].shifted.labels, models[1].shifted.labels)
    return result


# --------------------------------------------------------------------------------------------------------------------
# UI
# --------------------------------------------------------------------------------------------------------------------


def default_examples() -> list[Path]:
    """The example images shipped in ``demo/examples`` (sorted), or none."""
    return sorted(EXAMPLES_DIR.glob("*.png")) if EXAMPLES_DIR.is_dir() else []


def default_video_examples() -> list[Path]:
    return sorted(p for p in EXAMPLES_DIR.glob("*") if p.suffix in (".mp4", ".webm")) if EXAMPLES_DIR.is_dir() else []


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into ``gr.Error`` messages and unexpected ones into a short message plus a log entry,
    so the page never shows a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ImageError, VideoError) as exc:
            raise gr.Error(str(exc), title="Bad upload", print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - the UI must stay usable; details go to the server log
            log.exception("demo callback %s failed", fn.__name__)
            raise gr.Error(f"{type(exc).__name__}: {exc}", title="Something went wrong") from None

    return wrapper


def _video_path(upload: Any) -> str | None:
    if upload is None:
        return None
    if isinstance(upload, dict):  # unpreprocessed gr.Video payload (Gradio 6: a FileData dict)
        inner = upload.get("video", upload)
        return inner.get("path") if isinstance(inner, dict) else inner
    return str(upload)


def _sweep(folder: Path, ttl_s: float) -> None:
    cutoff = time.time() - ttl_s
    for p in folder.glob("*"):
        try:
            if p.is_file() and p.stat().st_mtime < cutoff:
                p.unlink()
        except OSError:
            pass


def build_demo(
    predictors: Mapping[str, Predictor],
    *,
    examples: Sequence[str | Path] | None = None,
    video_examples: Sequence[str | Path] | None = None,
    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES,
    max_video_side: int = DEFAULT_MAX_VIDEO_SIDE,
    video_batch_size: int = 8,
    output_dir: str | Path | None = None,
    prefill: bool = True,
    selected_tab: str = "image",
    title: str = "BlindNet road-scene segmentation",
) -> gr.Blocks:
    """Build the demo app (not launched; see :func:`launch`).

    Args:
        predictors: model name -> :class:`Predictor`, in display order. With two or more, the Robustness tab compares
            the first two by default.
        examples: example image paths (default: ``demo/examples/*.png``).
        video_examples: example video paths (default: ``demo/examples/*.mp4|*.webm``).
        max_video_frames: the most frames one video run processes (longer videos are subsampled, with a notice).
        max_video_side: frames with a longer side are downscaled before inference.
        video_batch_size: frames per predictor call in the Video tab (bounds memory).
        output_dir: where overlay videos are written (a temp folder removed at exit when None).
        prefill: when examples exist, open the page with the first example already segmented in the Image and
            Robustness tabs (computed once here, so a visitor sees what the app does before uploading anything).
        selected_tab: ``image``, ``video`` or ``robustness``: the tab shown first.
        title: page title.

    Endpoints (``api_name``): ``/segment_image``, ``/set_overlay_opacity``, ``/segment_video``, ``/compare_styles``.
    """
    if not predictors:
        raise ValueError("build_demo needs at least one predictor")
    if max_video_frames < 1:
        raise ValueError(f"max_video_frames must be >= 1, got {max_video_frames}")
    names = list(predictors)
    first = names[0]
    examples = [str(p) for p in (default_examples() if examples is None else examples)]
    video_examples = [str(p) for p in (default_video_examples() if video_examples is None else video_examples)]
    if output_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="blindnet-demo-"))
        atexit.register(shutil.rmtree, out_dir, True)
    else:
        out_dir = Path(output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)

    def pick(name: str | None) -> Predictor:
        try:
            return predictors[name or first]
        except KeyError:
            raise gr.Error(f"unknown model {name!r}; loaded: {names}") from None

    # ---- callbacks: thin adapters from component values to the pure functions above --------------------------

    @_user_errors
    def on_image(upload: Any, alpha: float, model: str | None) -> tuple:
        if upload is None:  # the input was cleared: clear the outputs too, quietly
            return None, None, None, "", None
        predictor = pick(model)
        result = segment_image(predictor, read_image_upload(upload), alpha)
        return (
            result.overlay,
            result.colour_map,
            legend_view(result.legend),
            result.timing_text(predictor),
            result.prediction,
        )

    @_user_errors
    def on_opacity(prediction: Prediction | None, alpha: float) -> Any:
        if prediction is None:
            return gr.skip()
        return prediction.overlay(float(alpha))

    @_user_errors
    def on_video(upload: Any, alpha: float, model: str | None, progress: gr.Progress = gr.Progress()) -> tuple:
        path = _video_path(upload)
        if path is None:
            return None, "", None, None
        _sweep(out_dir, OUTPUT_TTL_S)
        progress(0.0, desc="reading video")
        result = segment_video(
            pick(model),
            path,
            alpha=alpha,
            max_frames=max_video_frames,
            max_side=max_video_side,
            batch_size=video_batch_size,
            out_dir=out_dir,
            progress=lambda frac, msg: progress(frac, desc=msg),
        )
        notice = "\n".join(f"- {line}" for line in result.notices)
        return str(result.path), notice, result.shares, legend_view(result.legend)

    @_user_errors
    def on_compare(upload: Any, style: str, strength: float, model_a: str | None, model_b: str | None) -> tuple:
        if upload is None:
            return None, None, None, None, None, None, ""
        chosen = {m: pick(m) for m in (model_a or first, model_b) if m and m != NO_MODEL}
        result = compare_style(chosen, read_image_upload(upload), style, strength)
        a = result.models[0]
        b = result.models[1] if len(result.models) > 1 else None
        return (
            result.shifted,
            a.clean.colorized(),
            a.shifted.colorized(),
            b.clean.colorized() if b else None,
            b.shifted.colorized() if b else None,
            result.table(),
            result.summary(),
        )

    # ---- initial values -----------------------------------------------------------------------------------------

    default_b = names[1] if len(names) > 1 else NO_MODEL
    img0: tuple = (None, None, None, "", None)
    rb0: tuple = (None,) * 6 + ("",)
    first_example = examples[0] if prefill and examples else None
    if first_example is not None:
        for predictor in predictors.values():  # the first call pays one-time setup; keep it out of the shown time
            predictor.predict_one(np.zeros((64, 128, 3), np.uint8))
        img0 = on_image(first_example, 0.5, first)
        rb0 = on_compare(first_example, "night", 0.8, first, default_b)

    # ---- layout -------------------------------------------------------------------------------------------------

    many = len(names) > 1
    colours = class_colours(predictors[first].num_classes)
    with gr.Blocks(title=title, delete_cache=(1800, 3600), analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}\n"
            "Semantic segmentation of driving scenes into the 19 Cityscapes classes. "
            "BlindNet is trained to ignore image *style* (weather, lighting, colour): try the Robustness tab.\n\n"
            + "\n".join(f"- {describe_predictor(n, p)}" for n, p in predictors.items()),
            elem_id="bn-header",
        )
        with gr.Tabs(selected=selected_tab):
            with gr.Tab("Image", id="image"):
                with gr.Row():
                    with gr.Column(scale=1):
                        img_in = gr.Image(
                            value=first_example,
                            type="filepath",
                            image_mode=None,
                            sources=["upload", "clipboard"],
                            label="Driving image",
                        )
                        img_model = gr.Dropdown(names, value=first, label="Model", visible=many)
                        img_alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
                        img_btn = gr.Button("Segment", variant="primary")
                        if examples:
                            gr.Examples(
                                [[p] for p in examples],
                                inputs=[img_in],
                                label="Examples (synthetic scenes)",
                                api_name="load_image_example",
                            )
                    with gr.Column(scale=2):
                        img_overlay = gr.Image(img0[0], label="Overlay", format="png", interactive=False)
                        with gr.Row():
                            img_labels = gr.Image(img0[1], label="Label map", format="png", interactive=False)
                            with gr.Column():
                                img_time = gr.Markdown(img0[3])
                                img_legend = gr.Dataframe(
                                    img0[2],
                                    label="Classes present",
                                    interactive=False,
                                    elem_classes=["bn-legend"],
                                    column_widths=LEGEND_WIDTHS,
                                )
                img_state = gr.State(img0[4])
            with gr.Tab("Video", id="video"):
                with gr.Row():
                    with gr.Column(scale=1):
                        vid_in = gr.Video(sources=["upload"], label="Driving video (mp4 / avi / mov)")
                        vid_model = gr.Dropdown(names, value=first, label="Model", visible=many)
                        vid_alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
                        vid_btn = gr.Button("Segment video", variant="primary")
                        gr.Markdown(
                            f"At most {max_video_frames} frames are processed (longer videos are subsampled) and "
                            f"frames are downscaled to {max_video_side} px on their longer side."
                        )
                        if video_examples:
                            gr.Examples(
                                [[p] for p in video_examples],
                                inputs=[vid_in],
                                label="Examples",
                                api_name="load_video_example",
                            )
                    with gr.Column(scale=2):
                        vid_out = gr.Video(label="Overlay video", interactive=False, autoplay=True, loop=True)
                        vid_notice = gr.Markdown()
                        vid_plot = gr.LinePlot(
                            x="time_s",
                            y="share_pct",
                            color="class",
                            color_map=colours,
                            x_title="time (s)",
                            y_title="pixels (%)",
                            label="Class shares over time",
                        )
                        vid_legend = gr.Dataframe(
                            label="Mean class shares",
                            interactive=False,
                            elem_classes=["bn-legend"],
                            column_widths=LEGEND_WIDTHS,
                        )
            with gr.Tab("Robustness", id="robustness"):
                with gr.Row():
                    with gr.Column(scale=1):
                        rb_in = gr.Image(
                            value=first_example,
                            type="filepath",
                            image_mode=None,
                            sources=["upload", "clipboard"],
                            label="Clean image",
                        )
                        rb_style = gr.Radio(list(STYLES), value="night", label="Style shift")
                        rb_strength = gr.Slider(0.0, 1.0, value=0.8, step=0.05, label="Strength")
                        with gr.Row():
                            rb_a = gr.Dropdown(names, value=first, label="Model A", visible=many)
                            rb_b = gr.Dropdown([NO_MODEL, *names], value=default_b, label="Model B", visible=many)
                        rb_btn = gr.Button("Compare", variant="primary")
                        if examples:
                            gr.Examples(
                                [[p] for p in examples],
                                inputs=[rb_in],
                                label="Examples",
                                api_name="load_robustness_example",
                            )
                    with gr.Column(scale=2):
                        rb_shifted = gr.Image(rb0[0], label="Shifted image", format="png", interactive=False)
                        rb_summary = gr.Markdown(rb0[6])
                        with gr.Row():
                            rb_a_clean = gr.Image(rb0[1], label="Model A: clean", format="png", interactive=False)
                            rb_a_shift = gr.Image(rb0[2], label="Model A: shifted", format="png", interactive=False)
                        with gr.Row(visible=many):
                            rb_b_clean = gr.Image(rb0[3], label="Model B: clean", format="png", interactive=False)
                            rb_b_shift = gr.Image(rb0[4], label="Model B: shifted", format="png", interactive=False)
                        rb_table = gr.Dataframe(rb0[5], label="Agreement", interactive=False)

        # ---- events: one inference at a time across tabs (one model, often one GPU) -------------------------
        common = {"concurrency_id": "inference", "concurrency_limit": 1, "preprocess": False}
        gr.on(
            [img_btn.click, img_in.change, img_model.change],
            on_image,
            inputs=[img_in, img_alpha, img_model],
            outputs=[img_overlay, img_labels, img_legend, img_time, img_state],
            api_name="segment_image",
            **common,
        )
        img_alpha.release(
            on_opacity,
            inputs=[img_state, img_alpha],
            outputs=[img_overlay],
            api_name="set_overlay_opacity",
            api_visibility="undocumented",  # needs the session's last prediction; useless to API clients
            show_progress="hidden",
        )
        gr.on(
            [vid_btn.click, vid_in.change],
            on_video,
            inputs=[vid_in, vid_alpha, vid_model],
            outputs=[vid_out, vid_notice, vid_plot, vid_legend],
            api_name="segment_video",
            **common,
        )
        gr.on(
            [rb_btn.click, rb_in.change, rb_style.change, rb_strength.release, rb_a.change, rb_b.change],
            on_compare,
            inputs=[rb_in, rb_style, rb_strength, rb_a, rb_b],
            outputs=[rb_shifted, rb_a_clean, rb_a_shift, rb_b_clean, rb_b_shift, rb_table, rb_summary],
            api_name="compare_styles",
            **common,
        )
    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo


def launch_kwargs() -> dict[str, Any]:
    """Look-and-feel arguments that Gradio 6 takes at ``launch()`` (no longer at ``Blocks()``)."""
    return {"theme": gr.themes.Soft(primary_hue="indigo"), "css": CSS}


def launch(
    demo: gr.Blocks,
    *,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    share: bool = False,
    max_file_size: str = "200mb",
    **kwargs: Any,
) -> Any:
    """Launch ``demo`` on loopback by default; exposing it (``host="0.0.0.0"``, ``share=True``) is opt-in."""
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=max_file_size,
        **{**launch_kwargs(), **kwargs},
    )
