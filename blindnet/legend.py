"""Legends and titles drawn into pictures: which colour is which class, and what each column of a contact sheet is.

One routine lists the entries (:func:`legend_entries`: the classes present, largest first, with their Cityscapes
colour and pixel share) and one draws them (:func:`draw_legend`); contact sheets, overlays written with
``--legend`` and the demo's legend table all use them, so they name and order classes the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from blindnet.classes import class_names, class_shares, palette

_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)
_PAD = 4


@dataclass(frozen=True)
class LegendEntry:
    """One class in a legend: its name, ``(r, g, b)`` colour and pixel share in ``[0, 1]``."""

    name: str
    colour: tuple[int, int, int]
    share: float


def legend_entries(source: np.ndarray | Mapping[str, float], num_classes: int = 19) -> list[LegendEntry]:
    """The classes present, largest share first.

    Args:
        source: an ``H x W`` label map, or ``{class name: share}`` (e.g. :func:`blindnet.classes.class_shares`).
        num_classes: size of the label set (names and colours).
    """
    shares = class_shares(source, num_classes) if isinstance(source, np.ndarray) else dict(source)
    lut = palette(num_classes)
    index = {name: i for i, name in enumerate(class_names(num_classes))}
    rgb = [(int(r), int(g), int(b)) for r, g, b in lut]
    entries = [LegendEntry(n, rgb[index[n]], float(s)) for n, s in shares.items() if n in index]
    return sorted(entries, key=lambda e: -e.share)


@functools.cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's bundled font: no system font is needed, so pictures look the same everywhere.
    return ImageFont.load_default(size=size)


def font_size_for(width: int) -> int:
    """A text size that reads at this picture width (11 px for small pictures, up to 20 px)."""
    return int(np.clip(width // 40, 11, 20))


def _layout(entries: Sequence[LegendEntry], width: int, size: int, shares: bool) -> list[tuple[int, int, str]]:
    """``(x, row, text)`` per entry, flowing left to right and wrapping at ``width``."""
    font, swatch = _font(size), size
    x, row, out = _PAD, 0, []
    for e in entries:
        pct = 100.0 * e.share
        text = (f"{e.name} {pct:.1f}%" if pct >= 0.05 else f"{e.name} <0.1%") if shares else e.name
        w = swatch + 4 + int(font.getlength(text)) + 3 * _PAD
        if x > _PAD and x + w > width:
            x, row = _PAD, row + 1
        out.append((x, row, text))
        x += w
    return out


def legend_height(entries: Sequence[LegendEntry], width: int, *, size: int | None = None, shares: bool = True) -> int:
    """Height in pixels :func:`draw_legend` needs for ``entries`` at ``width``."""
    size = size or font_size_for(width)
    rows = 1 + max((r for _, r, _ in _layout(entries, width, size, shares)), default=0)
    return rows * (size + _PAD) + _PAD


def draw_legend(
    entries: Sequence[LegendEntry],
    width: int,
    *,
    height: int | None = None,
    size: int | None = None,
    shares: bool = True,
) -> np.ndarray:
    """A ``height x width x 3`` uint8 white band: a colour swatch and the name (and share) of each entry.

    ``height`` defaults to :func:`legend_height`; a larger one (a video keeps one band height for every frame) leaves
    white below.
    """
    size = size or font_size_for(width)
    height = height or legend_height(entries, width, size=size, shares=shares)
    band = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(band)
    for entry, (x, row, text) in zip(entries, _layout(entries, width, size, shares)):
        y = _PAD + row * (size + _PAD)
        draw.rectangle([x, y, x + size - 1, y + size - 1], fill=entry.colour, outline=_INK)
        draw.text((x + size + 4, y), text, fill=_INK, font=_font(size))
    return np.asarray(band)


def title_band(titles: Sequence[tuple[int, int, str]], width: int, *, size: int | None = None) -> np.ndarray:
    """A white band with each ``(x0, x1, text)`` title centred over the columns ``x0 .. x1``."""
    size = size or font_size_for(width // max(len(titles), 1) * 3)
    band = Image.new("RGB", (width, size + 2 * _PAD), _BACKGROUND)
    draw = ImageDraw.Draw(band)
    for x0, x1, text in titles:
        w = _font(size).getlength(text)
        draw.text((x0 + max((x1 - x0 - w) / 2, 0), _PAD), text, fill=_INK, font=_font(size))
    return np.asarray(band)


def with_legend(
    image: np.ndarray, labels: np.ndarray, num_classes: int = 19, *, height: int | None = None
) -> np.ndarray:
    """``image`` (``H x W x 3`` uint8) with a legend of the classes in ``labels`` (``H x W``) added below it."""
    band = draw_legend(legend_entries(labels, num_classes), image.shape[1], height=height)
    return np.concatenate([image, band], 0)


def full_legend_height(width: int, num_classes: int = 19) -> int:
    """The band height that holds every class at ``width`` (frames of one video share it, so their size is fixed)."""
    every = [LegendEntry(n, (0, 0, 0), 1.0) for n in class_names(num_classes)]
    return legend_height(every, width)
