"""The main job: render a synthetic driving clip in unseen appearances, segment it, score it against its masks.

Used by ``blindnet segment --synthetic night,fog,rain``: no dataset and no download needed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from blindnet.inference import Predictor


def run_synthetic_showcase(
    predictor: Predictor,
    out_dir: str | Path,
    *,
    appearances: Sequence[str] = ("night", "fog", "rain"),
    frames: int = 24,
    seed: int = 2024,
    size: tuple[int, int] = (256, 512),
    alpha: float = 0.5,
) -> dict:
    """Render, segment and score one clip per appearance.

    Writes ``<out_dir>/synthetic/<appearance>.mp4`` (input) and ``<out_dir>/synthetic_<appearance>_overlay.mp4``.

    Returns:
        ``{appearance: {"miou", "pixel_accuracy", "frames", "fps", "overlay"}}`` plus ``"mean_miou"``.
    """
    from blindnet.cli import segment_video
    from blindnet.data.synthetic import APPEARANCES, write_clip

    unknown = [a for a in appearances if a not in APPEARANCES]
    if unknown:
        raise ValueError(f"unknown appearance(s) {unknown}; choose from {list(APPEARANCES)}")
    out = Path(out_dir)
    clip = write_clip(out / "synthetic", seed=seed, num_frames=frames, height=size[0], width=size[1],
                      appearances=tuple(appearances))
    masks = [np.array(Image.open(p)) for p in clip["masks"]]
    results: dict = {}
    for app in appearances:
        video = Path(clip["videos"][app])
        final = out / f"synthetic_{app}_overlay.mp4"
        t0 = time.perf_counter()
        res = segment_video(predictor, video, out, alpha=alpha, masks=masks, overlay_path=final)
        conf = res["confusion"]
        miou, acc = conf.miou() * 100.0, conf.pixel_accuracy()
        results[app] = {
            "miou": round(miou, 2),
            "pixel_accuracy": round(float(acc) * 100.0, 2),
            "frames": res["frames"],
            "fps": round(res["frames"] / max(res["seconds"], 1e-9), 2),
            "wall_seconds": round(time.perf_counter() - t0, 2),
            "overlay": str(final),
            "input_video": str(video),
        }
        print(f"{app:>8}: mIoU {miou:5.1f}  pixel acc {acc * 100:5.1f}  {results[app]['fps']:.1f} frames/s  -> {final}")
    results["mean_miou"] = round(float(np.mean([results[a]["miou"] for a in appearances])), 2)
    print(f"mean mIoU over {', '.join(appearances)}: {results['mean_miou']:.1f}")
    return results
