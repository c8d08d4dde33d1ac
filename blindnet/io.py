"""The I/O floor: files written atomically, PNGs, and images decoded as viewers show them (:mod:`blindnet.media`
is the video path: rotation, timestamps, damaged files, writing).

Nothing here imports the rest of the package, so every layer above (checkpoints, configs, exports, the jobs) writes
files the same way: a crash or a kill mid-write leaves the previous file, never a half-written one.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# HEIC/HEIF (what iPhones save photos as) decodes through the maintained pillow-heif plugin when the `heic` extra is
# installed; it turns the picture upright itself and clears the EXIF orientation, so nothing is turned twice.
with contextlib.suppress(ImportError):
    from pillow_heif import register_heif_opener

    register_heif_opener()

#: Why an input could not be used, as ``MediaError.kind`` and in ``summary.json``.
MEDIA_PROBLEMS = ("unsupported type", "unreadable", "empty", "cut off")


class MediaError(ValueError):
    """A video (or image) file cannot be opened or decoded; the message names the file and the reason, ``kind`` (one
    of :data:`MEDIA_PROBLEMS`) classifies it."""

    def __init__(self, message: str, *, kind: str = "unreadable") -> None:
        super().__init__(message)
        self.kind = kind


def atomic_write(path: str | Path, write_fn: Callable[[str], object], *, durable: bool = True) -> Path:
    """Write a file through ``write_fn(tmp_path)`` into a temporary sibling, then rename it into place.

    A crash or kill mid-write leaves the previous file (if any) untouched and never a half-written one.
    ``durable=False`` skips the fsync before the rename: for files that can be made again and are written by the
    thousand (generated datasets), where a power cut may lose the newest files but a kill never leaves a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        if durable:
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


def file_slug(text: str) -> str:
    """``text`` as a file-name part: letters, digits, ``-`` and ``_`` kept, anything else turned into ``_``."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text).strip("_") or "x"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 4 MiB chunks, so any size fits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (first column left-aligned, the others right-aligned), ending in a newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """CSV text with a header row."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_png(path: str | Path, array: np.ndarray) -> Path:
    """Atomically write an ``H x W`` (labels) or ``H x W x 3`` (RGB) uint8 array as a PNG."""
    return atomic_write(path, lambda tmp: Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG"))


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block: for native libraries that print harmless lines straight to
    it, past Python's and their own log levels (FFmpeg's failed encoder probes, OpenCV's VP8-tag warning, the PyTorch
    profiler's start/stop lines). Hold it briefly, never around inference or request handling."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---- images --------------------------------------------------------------------------------------------------------


class ImageError(ValueError):
    """An input could not be turned into an RGB uint8 image; the message says which input and why."""


class ImageTooLargeError(ImageError):
    """An encoded image declares more pixels than allowed (refused from its header, before any pixel is decoded)."""


def to_rgb_uint8(image: np.ndarray, *, name: str = "image") -> np.ndarray:
    """Convert an array to ``H x W x 3`` uint8 RGB.

    Accepts grayscale ``H x W`` / ``H x W x 1``, RGB, RGBA (alpha dropped), uint8, uint16 (scaled by 1/257), bool,
    and float images in ``[0, 1]``. Anything else raises :class:`ImageError`.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"{name}: expected an H x W, H x W x 1, x 3 or x 4 image, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"{name}: empty image of shape {arr.shape}")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError(f"{name}: float image contains NaN or Inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(f"{name}: float images must lie in [0, 1], found values in [{lo:.3g}, {hi:.3g}]")
        arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"{name}: unsupported pixel type {arr.dtype}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def decode_image(
    data: bytes, *, name: str = "upload", max_pixels: int | None = None, formats: Sequence[str] | None = None
) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, ...) to ``H x W x 3`` uint8 RGB as viewers show it (EXIF orientation
    applied); bad or truncated data raises. Of an animation, the first frame.

    Args:
        data: the encoded file.
        name: how error messages call the input.
        max_pixels: refuse (:class:`ImageTooLargeError`) an image whose header declares more ``H*W`` than this,
            before decoding any pixel.
        formats: Pillow format names to try (e.g. ``("PNG", "JPEG")``); None tries every format Pillow knows. A
            restricted list keeps container formats (ICO, ...), whose header size need not match what they decode to,
            away from the pixel check.
    """
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data), formats=list(formats) if formats is not None else None) as img:
            check_pixel_limit(img.width, img.height, max_pixels, name=name)
            img.load()  # the current (first) frame only, of the size checked above
            # Phones store pixels as the sensor saw them plus an EXIF orientation; viewers show them turned.
            arr = pil_to_array(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a recognised image format") from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: {exc}") from exc
    except Exception as exc:
        # Pillow's decoders raise many types on hostile bytes (OSError, SyntaxError, struct.error, IndexError, ...);
        # all of them mean the file is unusable.
        raise ImageError(f"{name}: corrupt or truncated image ({type(exc).__name__}: {exc})") from exc
    return to_rgb_uint8(arr, name=name)


def check_pixel_limit(width: int, height: int, max_pixels: int | None, *, name: str = "image") -> None:
    """Raise :class:`ImageTooLargeError` when ``width x height`` exceeds ``max_pixels`` (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name}: image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )


def load_image(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as ``H x W x 3`` uint8 RGB, with a clear error for missing, corrupt or odd files."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory")
    return decode_image(path.read_bytes(), name=str(path), max_pixels=max_pixels)


def pil_to_array(img: Image.Image) -> np.ndarray:
    """A Pillow image's pixels as an array :func:`to_rgb_uint8` accepts (palette, CMYK, 16-bit, ... converted)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.uint16)
    if img.mode == "I":  # 32-bit integer PNGs (often 16-bit data)
        arr = np.asarray(img)
        return arr.astype(np.uint16) if arr.max() < 65536 else (arr >> 16).astype(np.uint16)
    if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1", "F"):
        img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
    if img.mode == "LA":
        img = img.convert("RGBA")
    return np.asarray(img)
