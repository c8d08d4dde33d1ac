"""A corpus of small real media files made at test time, the way users get them: video files written by the FFmpeg
command-line tool (the binary the ``imageio-ffmpeg`` package ships), variable-frame-rate clips written through PyAV,
cut-off copies, EXIF-rotated JPEGs and animated GIFs written by Pillow.

Frames are tiny (64 x 48) and few (8), with flat colour blocks that every lossy codec keeps nearly exactly, so tests
can check content, orientation and timing in well under a second per file.
"""

from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

W, H, N, FPS = 64, 48, 8, 10

#: name -> (FFmpeg encoder, file ending, extra encoder arguments); decoder names are PyAV's.
CODECS: dict[str, tuple[str, str, list[str]]] = {
    "h264.mp4": ("libx264", ".mp4", ["-pix_fmt", "yuv420p"]),
    "h264.mov": ("libx264", ".mov", ["-pix_fmt", "yuv420p"]),
    "hevc.mkv": ("libx265", ".mkv", ["-pix_fmt", "yuv420p", "-x265-params", "log-level=error"]),
    "hevc.mp4": ("libx265", ".mp4", ["-pix_fmt", "yuv420p", "-tag:v", "hvc1", "-x265-params", "log-level=error"]),
    "vp9.webm": ("libvpx-vp9", ".webm", ["-pix_fmt", "yuv420p", "-deadline", "realtime", "-cpu-used", "8"]),
    "vp9.mkv": ("libvpx-vp9", ".mkv", ["-pix_fmt", "yuv420p", "-deadline", "realtime", "-cpu-used", "8"]),
    "av1.mkv": ("libsvtav1", ".mkv", ["-pix_fmt", "yuv420p", "-preset", "12"]),
    "av1.mp4": ("libsvtav1", ".mp4", ["-pix_fmt", "yuv420p", "-preset", "12"]),
    "mjpeg.avi": ("mjpeg", ".avi", ["-pix_fmt", "yuvj420p", "-q:v", "2"]),
    "mjpeg.mov": ("mjpeg", ".mov", ["-pix_fmt", "yuvj420p", "-q:v", "2"]),
    "mpeg4.avi": ("mpeg4", ".avi", ["-q:v", "2"]),
}
#: the codec name PyAV's decoder reports for each encoder's output
DECODER = {"libx264": "h264", "libx265": "hevc", "libvpx-vp9": "vp9", "libsvtav1": "av1", "mjpeg": "mjpeg"}
DECODER["mpeg4"] = "mpeg4"


def ffmpeg() -> str:
    """The FFmpeg binary of the ``imageio-ffmpeg`` package."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def frames(n: int = N, h: int = H, w: int = W) -> np.ndarray:
    """``n x h x w x 3`` uint8: a red block in the top-left quarter, the rest a grey that brightens frame by frame
    (so frames are told apart and the picture's orientation can be read)."""
    out = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i] = 40 + (20 * i) % 200
        out[i, : h // 2, : w // 2] = (220, 30, 30)
    return out


def ffmpeg_encode(path: Path, encoder: str, extra: list[str], pictures: np.ndarray, fps: int = FPS) -> Path:
    """Pipe raw RGB frames into the FFmpeg command-line tool and let it write ``path``."""
    n, h, w, _ = pictures.shape
    cmd = [ffmpeg(), "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps)]
    cmd += ["-i", "-", "-c:v", encoder, *extra, str(path)]
    subprocess.run(cmd, input=pictures.tobytes(), check=True, capture_output=True)
    return path


def ffmpeg_has_encoder(encoder: str) -> bool:
    out = subprocess.run([ffmpeg(), "-v", "error", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    return any(line.split()[1:2] == [encoder] for line in out.splitlines() if line.startswith(" V"))


def pyav_has_decoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "r")
    except Exception:
        return False
    return True


def phone_clip(path: Path, rotation: int = -90) -> Path:
    """An H.264 MP4 stored landscape (64 x 48) with a display rotation, as phones record portrait video: FFmpeg's
    ``-display_rotation`` is counter-clockwise degrees, so -90 shows the picture turned clockwise (portrait)."""
    plain = ffmpeg_encode(path.with_name(path.stem + "_stored.mp4"), "libx264", ["-pix_fmt", "yuv420p"], frames())
    cmd = [ffmpeg(), "-v", "error", "-y", "-display_rotation:v:0", str(rotation), "-i", str(plain), "-c", "copy"]
    subprocess.run([*cmd, str(path)], check=True, capture_output=True)
    plain.unlink()
    return path


#: seconds of each frame of the variable-frame-rate clip: bursts and pauses, as a phone writes in low light
VFR_TIMES = (0.0, 0.1, 0.2, 0.5, 0.55, 0.6, 1.0, 1.3)


def vfr_clip(path: Path, encoder: str = "libx264") -> Path:
    """A clip whose frames sit at :data:`VFR_TIMES`, written through PyAV with explicit timestamps (ms)."""
    tb = Fraction(1, 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.time_base = stream.codec_context.time_base = tb
        for picture, t in zip(frames(len(VFR_TIMES)), VFR_TIMES):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = round(t / tb), tb
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def cut(path: Path, dest: Path, fraction: float = 0.6) -> Path:
    """A copy of ``path`` holding only its first ``fraction`` of bytes (a card pulled mid-copy)."""
    data = path.read_bytes()
    dest.write_bytes(data[: int(len(data) * fraction)])
    return dest


def exif_jpeg(path: Path, orientation: int, h: int = 24, w: int = 40) -> np.ndarray:
    """A JPEG stored ``h x w`` with EXIF ``orientation`` (6: viewers turn it 90 degrees clockwise); returns the
    stored pixels (a red block in their top-left quarter)."""
    stored = np.full((h, w, 3), 90, np.uint8)
    stored[: h // 2, : w // 2] = (220, 30, 30)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    return stored


def animated_gif(path: Path, n: int = 5, durations_ms: tuple[int, ...] = (100, 200, 100, 300, 100)) -> Path:
    """An animated GIF of ``n`` frames with the given per-frame durations."""
    pics = [Image.fromarray(f) for f in frames(n, 24, 32)]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=list(durations_ms[:n]), loop=0)
    return path
