"""Render the demo's example inputs with the synthetic scene generator: ``python -m blindnet.demo.make_examples``.

Writes small 256 x 512 street scenes (PNG), their true labels (``labels/<name>``, train ids, which the Robustness
tab and ``blindnet.demo.robustness`` score predictions against) and one short driving clip (VP8 WebM, so the browser can preview it; the
demo reads it back with OpenCV like any upload) into ``demo/examples``. Deterministic: the same seeds give the same
files, so re-running only changes them when the generator changes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from blindnet.cliparse import JobParser
from blindnet.data.synthetic import render_clip, render_scene
from blindnet.io import write_png

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
#: (file name, seed, appearance): a clean daytime scene first (the Robustness tab shifts it), then real shifts
SCENES: tuple[tuple[str, int, str], ...] = (
    ("01_noon.png", 11, "noon"),
    ("02_sunset.png", 12, "sunset"),
    ("03_fog.png", 13, "fog"),
    ("04_rain.png", 14, "rain"),
    ("05_night.png", 15, "night"),
)
CLIP = ("clip_noon.webm", 21, "noon")


def write_examples(
    out_dir: str | Path = EXAMPLES_DIR, *, height: int = 256, width: int = 512, clip_frames: int = 20, fps: int = 10
) -> list[Path]:
    """Render :data:`SCENES` and :data:`CLIP` into ``out_dir``; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, seed, appearance in SCENES:
        images, mask = render_scene(seed, height, width, appearances=[appearance])
        path = out / name
        if not cv2.imwrite(str(path), np.ascontiguousarray(images[appearance][:, :, ::-1])):
            raise OSError(f"could not write {path}")
        written += [path, write_png(out / "labels" / name, mask)]
    name, seed, appearance = CLIP
    frames, _ = render_clip(seed, clip_frames, height, width, appearances=[appearance])
    path = out / name
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"VP80"), float(fps), (width, height))
    if not writer.isOpened():
        raise OSError(f"this OpenCV build cannot write VP8/WebM ({path})")
    for frame in frames[appearance]:
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = JobParser(prog="python -m blindnet.demo.make_examples", description=__doc__)
    p.add_argument("--out", type=Path, default=EXAMPLES_DIR, help="output folder (default: demo/examples)")
    args = p.parse_args(argv)
    for path in write_examples(args.out):
        print(f"{path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
