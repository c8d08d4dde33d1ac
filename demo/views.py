"""What the demo's Image and Robustness tabs compute, as plain functions of numpy arrays (tests call them without a
browser), plus the legend helpers every tab shares.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from blindnet.classes import class_names, palette
from blindnet.demo.styles import apply_style
from blindnet.inference import Prediction, Predictor
from blindnet.io import ImageError, decode_image, load_image, to_rgb_uint8
from blindnet.legend import legend_entries
from blindnet.metrics import ConfusionMatrix

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


def label_confusion(pred: np.ndarray, target: np.ndarray, num_classes: int) -> ConfusionMatrix:
    """The confusion matrix of an ``H x W`` prediction against ``H x W`` true train ids (255 = ignored)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and labels {target.shape} differ in size")
    cm = ConfusionMatrix(num_classes)
    cm.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(target.astype(np.int64)))
    return cm


def labels_beside(image_path: str | Path) -> np.ndarray | None:
    """The true labels stored for an image as ``<folder>/labels/<name>`` (``H x W`` uint8 train ids), if any."""
    path = Path(image_path).parent / "labels" / Path(image_path).name
    if not path.is_file():
        return None
    with Image.open(path) as img:
        labels = np.asarray(img)
    if labels.ndim != 2:
        raise ImageError(f"{path}: a label map must be a single-channel PNG of train ids, got shape {labels.shape}")
    return labels.astype(np.uint8)


class KnownLabels:
    """True labels of known images (the demo's examples), found by image content: Gradio hands a callback a copy of
    an example under another path, so the pixels, not the file name, identify it."""

    def __init__(self, image_paths: Sequence[str | Path] = ()) -> None:
        self._by_digest: dict[str, np.ndarray] = {}
        for path in image_paths:
            labels = labels_beside(path)
            if labels is not None:
                self._by_digest[self.digest(load_image(path))] = labels

    @staticmethod
    def digest(image: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()

    def find(self, image: np.ndarray) -> np.ndarray | None:
        """The labels of ``image`` (``H x W x 3`` uint8 RGB) when it is one of the known images, else None."""
        return self._by_digest.get(self.digest(image)) if self._by_digest else None


@dataclass
class ModelComparison:
    """One model on the clean and the shifted image: colour maps ``H x W x 3`` and their pixel agreement, and, when
    the image's true labels are known, the mIoU (0..1) of each prediction against them."""

    name: str
    clean: Prediction
    shifted: Prediction
    agreement: float
    miou_clean: float | None = None
    miou_shifted: float | None = None

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
    "class, higher for a varied map), and above all beside *mIoU against the true labels*, shown for the example "
    "images (generated scenes whose labels are known): a robust model keeps a high agreement **and** a high mIoU on "
    "the shifted image. A barely trained model can keep many labels and many classes while its mIoU stays near zero."
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
        """``model | agreement (%) | classes clean/shifted (n) | entropy clean/shifted (bits) | mIoU clean/shifted
        (%, or "no labels") | class names``."""
        rows = []
        for m in self.models:
            st = m.stats()
            rows.append(
                (
                    m.name,
                    round(100.0 * m.agreement, 2),
                    f"{st['classes_clean']} / {st['classes_shifted']}",
                    f"{st['entropy_clean']:.2f} / {st['entropy_shifted']:.2f}",
                    "no labels"
                    if m.miou_clean is None or m.miou_shifted is None
                    else f"{100.0 * m.miou_clean:.1f} / {100.0 * m.miou_shifted:.1f}",
                    ", ".join(m.clean.class_shares()),
                    ", ".join(m.shifted.class_shares()),
                )
            )
        columns = [
            "model",
            "agreement clean vs shifted (%)",
            "classes clean / shifted",
            "entropy clean / shifted (bits)",
            "mIoU vs true labels, clean / shifted (%)",
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
    predictors: Mapping[str, Predictor],
    image: np.ndarray,
    style: str,
    strength: float = 1.0,
    seed: int = 0,
    labels: np.ndarray | None = None,
) -> RobustnessResult:
    """Apply a style shift to ``image`` and segment both versions with each model in ``predictors`` (one or two).

    With ``labels`` (``H x W`` true train ids of ``image``; a style shift keeps every object where it is, so they
    hold for the shifted image too) each model's mIoU on both versions is computed as well.
    """
    if not predictors:
        raise ValueError("compare_style needs at least one model")
    shifted = apply_style(image, style, strength, seed)
    models = []
    for name, predictor in predictors.items():
        clean, shift = predictor.predict_arrays([image, shifted])
        m = ModelComparison(name, clean, shift, agreement(clean.labels, shift.labels))
        if labels is not None:
            m.miou_clean = label_confusion(clean.labels, labels, clean.num_classes).miou()
            m.miou_shifted = label_confusion(shift.labels, labels, shift.num_classes).miou()
        models.append(m)
    result = RobustnessResult(image=image, shifted=shifted, style=style, strength=float(strength), models=models)
    if len(models) >= 2:
        result.cross_clean = agreement(models[0].clean.labels, models[1].clean.labels)
        result.cross_shifted = agreement(models[0].shifted.labels, models[1].shifted.labels)
    return result
