"""What the demo's Image and Robustness tabs compute, as plain functions of numpy arrays (tests call them without a
browser), plus the legend helpers every tab shares.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from blindnet.classes import class_names, palette
from blindnet.demo.styles import apply_style
from blindnet.inference import Prediction, Predictor
from blindnet.io import ImageError, decode_image, to_rgb_uint8
from blindnet.legend import legend_entries

#: decompression-bomb guard for uploaded images (a 40 MP photo still fits)
MAX_IMAGE_PIXELS = 40_000_000


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
    # The same entries, in the same order, as the legends drawn into pictures (blindnet.legend).
    rows = [(hex_colour(e.colour), e.name, round(100.0 * e.share, 2)) for e in legend_entries(shares, num_classes)]
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
# Robustness tab
# --------------------------------------------------------------------------------------------------------------------


def label_stats(labels: np.ndarray, num_classes: int) -> tuple[int, float]:
    """``(classes predicted, entropy in bits of the label distribution)`` of an ``H x W`` label map.

    Agreement between two maps alone rewards a model that predicts the same few classes everywhere (a constant map
    agrees with itself under any shift); these two numbers expose such a map: 1 class and 0 bits for a constant one,
    up to ``log2(num_classes)`` bits when every class covers the same area.
    """
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=num_classes)[:num_classes]
    p = counts[counts > 0] / max(int(counts.sum()), 1)
    return int((counts > 0).sum()), float(-(p * np.log2(p)).sum()) + 0.0


@dataclass
class ModelComparison:
    """One model on the clean and the shifted image: colour maps ``H x W x 3`` and their pixel agreement."""

    name: str
    clean: Prediction
    shifted: Prediction
    agreement: float

    def stats(self) -> dict[str, float]:
        """Classes predicted and label entropy (bits) on the clean and on the shifted image (:func:`label_stats`)."""
        c_n, c_h = label_stats(self.clean.labels, self.clean.num_classes)
        s_n, s_h = label_stats(self.shifted.labels, self.shifted.num_classes)
        return {"classes_clean": c_n, "classes_shifted": s_n, "entropy_clean": c_h, "entropy_shifted": s_h}


#: How to read the Robustness tab (shown under its table).
READING_GUIDE = (
    "**How to read this.** *Agreement* is the share of pixels whose label does not change under the shift. On its "
    "own it rewards a useless model: one that paints nearly everything as the same class agrees with itself under "
    "any shift. Read it beside *classes* (how many classes the map contains) and *entropy* (bits; 0 for a map of one "
    "class, higher for a varied map): a robust model keeps a high agreement **and** keeps its classes and entropy "
    "on the shifted image."
)


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
        """``model | agreement (%) | classes clean/shifted (n) | entropy clean/shifted (bits) | class names``."""
        rows = []
        for m in self.models:
            st = m.stats()
            rows.append(
                (
                    m.name,
                    round(100.0 * m.agreement, 2),
                    f"{st['classes_clean']} / {st['classes_shifted']}",
                    f"{st['entropy_clean']:.2f} / {st['entropy_shifted']:.2f}",
                    ", ".join(m.clean.class_shares()),
                    ", ".join(m.shifted.class_shares()),
                )
            )
        columns = [
            "model",
            "agreement clean vs shifted (%)",
            "classes clean / shifted",
            "entropy clean / shifted (bits)",
            "classes (clean)",
            "classes (shifted)",
        ]
        return pd.DataFrame(rows, columns=columns)

    def summary(self) -> str:
        lines = [
            f"**{self.style}** at strength {self.strength:.2f}: "
            + "; ".join(
                f"{m.name} keeps **{100.0 * m.agreement:.1f}%** of its labels ({m.stats()['classes_shifted']} classes, "
                f"{m.stats()['entropy_shifted']:.2f} bits on the shifted image)"
                for m in self.models
            )
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
