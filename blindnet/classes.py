"""The 19 Cityscapes train-id classes, their colours, and colouring helpers shared by every front end."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255

CLASS_NAMES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

# Cityscapes colour of each train id (the palette every Cityscapes tool uses).
PALETTE: np.ndarray = np.array(
    [
        (128, 64, 128),
        (244, 35, 232),
        (70, 70, 70),
        (102, 102, 156),
        (190, 153, 153),
        (153, 153, 153),
        (250, 170, 30),
        (220, 220, 0),
        (107, 142, 35),
        (152, 251, 152),
        (70, 130, 180),
        (220, 20, 60),
        (255, 0, 0),
        (0, 0, 142),
        (0, 0, 70),
        (0, 60, 100),
        (0, 80, 100),
        (0, 0, 230),
        (119, 11, 32),
    ],
    dtype=np.uint8,
)


def class_names(num_classes: int) -> list[str]:
    """Names for ``num_classes`` classes: the Cityscapes names first, then ``class_<i>``."""
    return [CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"class_{i}" for i in range(num_classes)]


def palette(num_classes: int) -> np.ndarray:
    """A ``(max(num_classes, 256), 3)`` uint8 lookup table: Cityscapes colours, then deterministic extras.

    Index 255 (ignore) is black so that colourised ground truth shows unlabelled pixels plainly.
    """
    size = max(num_classes, 256)
    rng = np.random.default_rng(0)
    lut = rng.integers(0, 256, size=(size, 3), dtype=np.uint8)
    n = min(len(PALETTE), size)
    lut[:n] = PALETTE[:n]
    lut[IGNORE_INDEX] = 0
    return lut


def colorize(labels: np.ndarray, num_classes: int = 19) -> np.ndarray:
    """Colour a label map.

    Args:
        labels: ``(H, W)`` integer label map.
        num_classes: number of classes of the model (sizes the palette).

    Returns:
        ``(H, W, 3)`` uint8 RGB image.
    """
    return palette(num_classes)[labels.astype(np.int64)]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5, num_classes: int = 19) -> np.ndarray:
    """Blend the colourised ``labels`` over an RGB ``image`` (both ``H x W``); ``alpha`` is the label opacity."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    if image.shape[:2] != labels.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape[:2]} differ in size")
    colours = colorize(labels, num_classes).astype(np.float32)
    out = image.astype(np.float32) * (1.0 - alpha) + colours * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def class_shares(labels: np.ndarray, num_classes: int = 19) -> dict[str, float]:
    """Fraction of pixels per class present in ``labels`` (classes with no pixel are left out), largest first."""
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=num_classes)[:num_classes]
    total = max(int(labels.size), 1)
    names = class_names(num_classes)
    shares = {names[i]: float(c) / total for i, c in enumerate(counts) if c > 0}
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))
