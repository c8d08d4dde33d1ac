"""Deterministic style shifts for the Robustness tab: night, fog, rain, strong colour jitter, blur.

Each shift maps an ``H x W x 3`` uint8 RGB image to a new ``H x W x 3`` uint8 RGB image of the same size and keeps
the scene's layout, so a style-robust model should give (nearly) the same label map before and after. ``strength``
in ``[0, 1]`` scales the shift (0 returns the image unchanged); ``seed`` fixes every random choice, so the same
inputs always give the same output (the demo and its tests rely on that).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

StyleFn = Callable[[np.ndarray, float, int], np.ndarray]


def _check(image: np.ndarray, strength: float) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"style shifts take H x W x 3 uint8 RGB images, got shape {arr.shape} dtype {arr.dtype}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be within [0, 1], got {strength}")
    return arr


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def night(image: np.ndarray, strength: float = 1.0, seed: int = 0) -> np.ndarray:
    """Dark, blue-tinted, desaturated and noisy, like a dashcam at night (gamma > 1 crushes the shadows first)."""
    arr = _check(image, strength).astype(np.float32) / 255.0
    gamma = 1.0 + 1.6 * strength
    dark = np.power(arr, gamma) * (1.0 - 0.55 * strength)
    grey = dark.mean(axis=2, keepdims=True)
    dark = grey + (dark - grey) * (1.0 - 0.6 * strength)  # colour fades before brightness does
    tint = np.array([1.0 - 0.25 * strength, 1.0 - 0.1 * strength, 1.0 + 0.25 * strength], dtype=np.float32)
    dark = dark * tint
    noise = np.random.default_rng(seed).normal(0.0, 0.025 * strength, size=arr.shape[:2] + (1,)).astype(np.float32)
    return _to_uint8((dark + noise) * 255.0)


def fog(image: np.ndarray, strength: float = 1.0, seed: int = 0) -> np.ndarray:
    """Atmospheric scattering ``I = J t + A (1 - t)`` with depth growing towards the horizon (upper rows are far
    in a forward-facing driving camera), so distant objects fade first, as in real fog."""
    del seed  # fog is fully determined by the image and the strength
    arr = _check(image, strength).astype(np.float32)
    h = arr.shape[0]
    rows = np.linspace(1.0, 0.0, h, dtype=np.float32)  # 1 at the top (far), 0 at the bottom (near)
    depth = 0.15 + 0.85 * np.clip(rows / 0.55, 0.0, 1.0)  # saturates above ~45% height: the sky and horizon
    transmission = np.exp(-3.0 * strength * depth)[:, None, None]
    airlight = np.array([215.0, 218.0, 222.0], dtype=np.float32)
    return _to_uint8(arr * transmission + airlight * (1.0 - transmission))


def rain(image: np.ndarray, strength: float = 1.0, seed: int = 0) -> np.ndarray:
    """Slanted bright streaks, a slightly darker and hazier scene, and a soft blur from water on the lens."""
    arr = _check(image, strength)
    if strength == 0.0:
        return arr.copy()
    h, w = arr.shape[:2]
    rng = np.random.default_rng(seed)
    streaks: np.ndarray = np.zeros((h, w), dtype=np.float32)
    count = int(strength * h * w / 90)
    length = max(3, int(round(0.06 * h * (0.5 + strength))))
    angle = np.deg2rad(rng.uniform(-20.0, -10.0))
    dx, dy = int(round(length * np.sin(angle))), int(round(length * np.cos(angle)))
    xs = rng.integers(0, w, size=count)
    ys = rng.integers(0, h, size=count)
    levels = rng.uniform(0.4, 1.0, size=count)
    for x, y, v in zip(xs.tolist(), ys.tolist(), levels.tolist()):
        cv2.line(streaks, (x, y), (x + dx, y + dy), float(v), 1, cv2.LINE_AA)
    streaks = cv2.GaussianBlur(streaks, (3, 3), 0)[:, :, None]
    base = cv2.GaussianBlur(arr, (0, 0), 0.6 + 0.8 * strength).astype(np.float32)
    base = base * (1.0 - 0.25 * strength) + 150.0 * 0.15 * strength  # overcast: darker, lower contrast
    out = base + (225.0 - base) * streaks * 0.75 * strength
    return _to_uint8(out)


def color_jitter(image: np.ndarray, strength: float = 1.0, seed: int = 0) -> np.ndarray:
    """Strong hue rotation and saturation/brightness/contrast changes, with the shifts drawn from ``seed``."""
    arr = _check(image, strength)
    if strength == 0.0:
        return arr.copy()  # the HSV round trip is lossy; 0 must mean "unchanged"
    rng = np.random.default_rng(seed)
    hue_shift = rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.5) * strength  # fraction of the hue circle
    sat = 1.0 + rng.choice([-0.6, 0.8]) * strength
    bright = 1.0 + rng.uniform(-0.35, 0.35) * strength
    contrast = 1.0 + rng.uniform(-0.4, 0.4) * strength
    hsv = cv2.cvtColor(arr, cv2.COLOR_RGB2HSV_FULL).astype(np.float32)  # hue spans 0..255 in the FULL variant
    hsv[:, :, 0] = np.mod(hsv[:, :, 0] + hue_shift * 256.0, 256.0)
    hsv[:, :, 1] = np.clip(hsv[:, :, 1] * sat, 0, 255)
    rgb = cv2.cvtColor(_to_uint8(hsv), cv2.COLOR_HSV2RGB_FULL).astype(np.float32)
    mean = rgb.mean()
    rgb = (rgb - mean) * contrast + mean * bright
    return _to_uint8(rgb)


def blur(image: np.ndarray, strength: float = 1.0, seed: int = 0) -> np.ndarray:
    """Gaussian defocus blur; sigma grows with the image size so the shift looks the same at any resolution."""
    del seed
    arr = _check(image, strength)
    sigma = strength * max(arr.shape[:2]) / 100.0
    if sigma < 0.1:
        return arr.copy()
    return cv2.GaussianBlur(arr, (0, 0), sigma)


STYLES: dict[str, StyleFn] = {
    "night": night,
    "fog": fog,
    "rain": rain,
    "color jitter": color_jitter,
    "blur": blur,
}


def apply_style(image: np.ndarray, style: str, strength: float = 1.0, seed: int = 0) -> np.ndarray:
    """Apply the style shift named ``style`` (a key of :data:`STYLES`) to an ``H x W x 3`` uint8 RGB image."""
    try:
        fn = STYLES[style]
    except KeyError:
        raise KeyError(f"unknown style {style!r}; choose one of {list(STYLES)}") from None
    return fn(image, float(strength), int(seed))
