"""Styles: what a game-to-real shift changes while layout and lighting stay: per-class albedo palette, material
texture (amplitude and noise field) and the camera (white balance, tone curve, blur, sensor noise, JPEG).

An appearance is a lighting (``noon``, ``sunset``, ``night``, ``fog``, ``rain``) seen in a style. Style ``a`` is the
look the renderer always had, and its appearances keep their plain names; every other style ``s`` names its
appearances ``s-<lighting>`` (``b-noon``, ``b-fog``, ...). All of them come from the same object-id map, so every
appearance of a scene shares its mask exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

LIGHTINGS: tuple[str, ...] = ("noon", "sunset", "night", "fog", "rain")


@dataclass(frozen=True)
class Style:
    """One style. The defaults are style ``a``: the renderer's own look, with an identity camera.

    Attributes:
        palette_seed: None keeps each part's albedo; otherwise a per-class palette drawn from this seed sets every
            albedo's colour and brightness (:func:`styled_albedo`).
        palette_mix: how far albedos move towards that palette (0 none, 1 all the way).
        texture_gain: multiplies the strength of the material grain and blotches.
        noise_seed: seed of the texture noise fields (another seed, another grain pattern on every surface).
        white_balance: per-channel RGB gains of the camera.
        gamma: tone exponent applied to linear [0, 1] values (< 1 brightens shadows).
        contrast: strength of an S-shaped tone curve around mid-grey (0 off).
        blur_sigma: Gaussian lens blur in pixels at 512x1024, scaled with the image height (0 off).
        sensor_noise: standard deviation of Gaussian sensor noise in [0, 1] units (0 off).
        jpeg_quality: JPEG round trip at this quality (None off).
    """

    palette_seed: int | None = None
    palette_mix: float = 0.0
    texture_gain: float = 1.0
    noise_seed: int = 12345
    white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gamma: float = 1.0
    contrast: float = 0.0
    blur_sigma: float = 0.0
    sensor_noise: float = 0.0
    jpeg_quality: int | None = None


STYLES: dict[str, Style] = {
    "a": Style(),
    "b": Style(
        palette_seed=2024,
        palette_mix=0.85,
        texture_gain=1.8,
        noise_seed=777,
        white_balance=(1.1, 1.0, 0.82),
        gamma=0.8,
        contrast=0.45,
        blur_sigma=0.9,
        sensor_noise=0.025,
        jpeg_quality=45,
    ),
}

#: Every appearance name: the lightings in style ``a``, then ``<style>-<lighting>`` for each other style.
ALL_APPEARANCES: tuple[str, ...] = LIGHTINGS + tuple(f"{s}-{light}" for s in STYLES if s != "a" for light in LIGHTINGS)


def split_appearance(name: str) -> tuple[str, str]:
    """``"b-fog"`` -> ``("b", "fog")``; ``"fog"`` -> ``("a", "fog")``. KeyError naming the choices otherwise."""
    style, _, lighting = name.rpartition("-")
    style = style or "a"
    if style not in STYLES or lighting not in LIGHTINGS or name not in ALL_APPEARANCES:
        raise KeyError(f"unknown appearance {name!r}; available: {', '.join(ALL_APPEARANCES)}")
    return style, lighting


def styled_albedo(color: np.ndarray, cls: np.ndarray, style: Style) -> np.ndarray:
    """Part albedos (``P x 3`` float32, class ids ``cls``: ``P``) re-coloured by the style's per-class palette.

    The palette sets each class's colour and brightness (so the order of class brightness changes, as between a game
    and a camera); each part keeps 40% of its own brightness variation around the scene's mean.
    """
    if style.palette_seed is None or style.palette_mix == 0.0:
        return color
    rng = np.random.default_rng(style.palette_seed)
    palette = rng.uniform(0.08, 0.9, (256, 3)).astype(np.float32)  # per class id; ids are < 256
    lum = color.mean(axis=1, keepdims=True)
    target = palette[cls] * (0.6 + 0.4 * lum / (lum.mean() + 1e-6))
    return ((1.0 - style.palette_mix) * color + style.palette_mix * target).astype(np.float32)


def apply_camera(image: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """The style's camera on an ``H x W x 3`` uint8 RGB frame; identity (the same array) for style ``a``'s camera.

    Deterministic given ``rng`` (the sensor noise is drawn from it; the JPEG codec is deterministic).
    """
    if (
        style.white_balance == (1.0, 1.0, 1.0)
        and style.gamma == 1.0
        and style.contrast == 0.0
        and style.blur_sigma == 0.0
        and style.sensor_noise == 0.0
        and style.jpeg_quality is None
    ):
        return image
    x: np.ndarray = image.astype(np.float32) / 255.0
    x *= np.asarray(style.white_balance, np.float32)
    np.clip(x, 0.0, 1.0, out=x)
    if style.gamma != 1.0:
        x **= style.gamma
    if style.contrast:
        # A smooth S-curve through (0, 0), (0.5, 0.5), (1, 1): mix of identity and smoothstep.
        x = (1.0 - style.contrast) * x + style.contrast * (x * x * (3.0 - 2.0 * x))
    if style.blur_sigma:
        x = cv2.GaussianBlur(x, (0, 0), style.blur_sigma * image.shape[0] / 512.0)
    if style.sensor_noise:
        x += rng.normal(0.0, style.sensor_noise, x.shape).astype(np.float32)
    out: np.ndarray = cv2.convertScaleAbs(np.clip(x, 0.0, 1.0), alpha=255.0)
    if style.jpeg_quality is not None:
        ok, buf = cv2.imencode(".jpg", out[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(style.jpeg_quality)])
        decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else None
        if decoded is None:
            raise RuntimeError("JPEG round trip failed (encoding or decoding)")
        out = decoded[:, :, ::-1]
    return np.ascontiguousarray(out)


def affine_r2(reference: np.ndarray, image: np.ndarray) -> float:
    """How much of ``image`` a per-channel affine map of ``reference`` explains (both ``H x W x 3``, same scene).

    For each channel c the least-squares fit ``image_c ~ a_c * reference_c + b_c`` over all pixels; returns
    ``1 - SS_res / SS_tot`` pooled over the three channels. 1 means ``image`` is a brightness/contrast/colour-gain
    change of ``reference``; values near 0 mean no such map explains it (what a texture or palette change does).
    """
    x = reference.reshape(-1, 3).astype(np.float64)
    y = image.reshape(-1, 3).astype(np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    var_x = (xc * xc).sum(0)
    slope = np.divide((xc * yc).sum(0), var_x, out=np.zeros(3), where=var_x > 0)
    resid = yc - xc * slope
    total = float((yc * yc).sum())
    return 1.0 - float((resid * resid).sum()) / total if total > 0 else 1.0


def style_shift_table(seeds: range, height: int, width: int, reference: str = "noon") -> dict[str, float]:
    """Mean :func:`affine_r2` of every appearance against ``reference`` over the scenes ``seeds``."""
    from blindnet.data.synthetic.dataset import render_scene  # imported lazily because dataset imports this module

    sums = dict.fromkeys(ALL_APPEARANCES, 0.0)
    for seed in seeds:
        images, _ = render_scene(seed, height, width, appearances=ALL_APPEARANCES)
        for name, img in images.items():
            sums[name] += affine_r2(images[reference], img)
    return {name: total / len(seeds) for name, total in sums.items()}


def main(argv: list[str] | None = None) -> int:
    """``python -m blindnet.data.synthetic --out DIR``: the style-shift table and a picture of the styles."""
    import argparse
    import json
    from pathlib import Path

    from blindnet.data.synthetic.dataset import render_scene  # imported lazily because dataset imports this module
    from blindnet.io import write_png, write_text  # imported lazily because only the command line writes files

    p = argparse.ArgumentParser(prog="python -m blindnet.data.synthetic", allow_abbrev=False, description=main.__doc__)
    p.add_argument("--out", required=True, help="folder for style_shift.json / .md and styles.png")
    p.add_argument("--scenes", type=int, default=20, help="scenes averaged (seeds 0..N-1)")
    p.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"), help="render size")
    args = p.parse_args(argv)
    table = style_shift_table(range(args.scenes), *args.size)
    out = Path(args.out)
    write_text(
        out / "style_shift.json", json.dumps({"scenes": args.scenes, "size": list(args.size), "r2": table}, indent=2)
    )
    rows = ["| lighting | style a | style b |", "|---|---:|---:|"]
    rows += [f"| {light} | {table[light]:.2f} | {table['b-' + light]:.2f} |" for light in LIGHTINGS]
    write_text(
        out / "style_shift.md",
        "R^2 of a per-channel affine map of A-noon (mean over scenes)\n\n" + "\n".join(rows) + "\n",
    )
    height, width = args.size
    images, _ = render_scene(3, height, width, appearances=ALL_APPEARANCES)
    grid = [np.concatenate([images[f"{s}-{light}" if s != "a" else light] for light in LIGHTINGS], 1) for s in STYLES]
    write_png(out / "styles.png", np.concatenate(grid, 0))
    print("\n".join(rows))
    return 0
