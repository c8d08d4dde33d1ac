"""The robustness tab's numbers for every example and style, as a table: ``python -m blindnet.demo.robustness``.

The tab shows one image at a time; this runs the same comparison (:func:`blindnet.demo.views.compare_style`: the
label agreement between a model's prediction for the clean image and for its style-shifted version, beside the
classes it predicts and the entropy of its labels) over a set of images and every style shift, and writes the per-image numbers and their mean as JSON and a Markdown table (with
``--figure``, also the first image's comparison as one picture). No browser is needed, so the README's robustness
numbers and picture can be re-made on any machine."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from blindnet.checkpoint import CheckpointError
from blindnet.classes import colorize
from blindnet.cliparse import JobParser
from blindnet.demo.__main__ import model_specs
from blindnet.demo.app import default_examples
from blindnet.demo.styles import STYLES
from blindnet.demo.views import ModelComparison, RobustnessResult, compare_style, label_confusion, labels_beside
from blindnet.inference import Predictor
from blindnet.io import ImageError, load_image, markdown_table, write_png, write_text
from blindnet.legend import draw_legend, legend_entries, title_band
from blindnet.metrics import ConfusionMatrix

#: The strength the demo's slider starts at.
DEFAULT_STRENGTH = 0.8


def robustness_table(
    predictors: Mapping[str, Predictor],
    images: Mapping[str, np.ndarray],
    *,
    styles: Sequence[str] = tuple(STYLES),
    strength: float = DEFAULT_STRENGTH,
    progress: bool | None = None,
    labels: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Clean-vs-shifted label agreement for each model, style and image (``H x W x 3`` uint8 RGB), and beside it
    what exposes a model that agrees with itself only because it predicts almost nothing: the classes it predicts and
    the entropy of its label distribution (:func:`blindnet.demo.views.label_stats`).

    Returns ``{"strength", "styles", "images", "agreement": {model: {style: {image: fraction}}}, "mean": {model:
    {style: fraction}}, "classes": {model: {"clean" | style: mean count}}, "entropy": {model: {"clean" | style: mean
    bits}}}``; fractions are of pixels, in [0, 1]; ``classes``/``entropy`` under a style are of the shifted images.
    ``progress`` None shows a bar over the image and style pairs on a terminal, False never.
    With ``labels`` (image name -> ``H x W`` true train ids, for some or all images) also ``"miou": {model: {"clean" |
    style: fraction}}`` over the labelled images (one confusion matrix per model and column, summed over the images,
    as ``blindnet evaluate`` scores a dataset) and ``"labelled_images"``.
    """
    labels = {k: v for k, v in (labels or {}).items() if k in images}
    cms: dict[str, dict[str, ConfusionMatrix]] = {}
    agreement: dict[str, dict[str, dict[str, float]]] = {name: {s: {} for s in styles} for name in predictors}
    stats: dict[str, dict[str, dict[str, list[float]]]] = {
        key: {name: {k: [] for k in ("clean", *styles)} for name in predictors} for key in ("classes", "entropy")
    }
    bar = tqdm(
        total=len(images) * len(styles), desc="robustness", unit="shift", disable=True if progress is False else None
    )
    for image_name, image in images.items():
        for i, style in enumerate(styles):
            # One call per image and style: the shift is computed once and every model segments the same pair.
            for model in compare_style(predictors, image, style, strength).models:
                agreement[model.name][style][image_name] = model.agreement
                if image_name in labels:
                    _add_confusions(cms, model, style, labels[image_name], first=i == 0)
                st = model.stats()
                stats["classes"][model.name][style].append(st["classes_shifted"])
                stats["entropy"][model.name][style].append(st["entropy_shifted"])
                if i == 0:  # the clean prediction is the same under every style
                    stats["classes"][model.name]["clean"].append(st["classes_clean"])
                    stats["entropy"][model.name]["clean"].append(st["entropy_clean"])
            bar.update(1)
    bar.close()
    mean = {name: {s: float(np.mean(list(v.values()))) for s, v in per.items()} for name, per in agreement.items()}
    means = {
        key: {name: {k: float(np.mean(v)) for k, v in per.items()} for name, per in by_model.items()}
        for key, by_model in stats.items()
    }
    out = {
        "strength": strength,
        "styles": list(styles),
        "images": list(images),
        "agreement": agreement,
        "mean": mean,
        **means,
    }
    if cms:
        out["labelled_images"] = list(labels)
        out["miou"] = {name: {k: cm.miou() for k, cm in per.items()} for name, per in cms.items()}
    return out


def _add_confusions(
    cms: dict[str, dict[str, ConfusionMatrix]], model: ModelComparison, style: str, labels: np.ndarray, first: bool
) -> None:
    """Add ``model``'s shifted prediction (and, for the first style, its clean one) against ``labels`` to ``cms``."""
    per = cms.setdefault(model.name, {})
    pairs = [(style, model.shifted)] + ([("clean", model.clean)] if first else [])
    for key, pred in pairs:
        cm = label_confusion(pred.labels, labels, pred.num_classes)
        per[key] = per[key].merge(cm) if key in per else cm


def markdown(table: Mapping[str, Any]) -> str:
    """The mean agreement per model (rows) and style (columns), in percent; then the classes predicted and the label
    entropy, clean and per style, which tell a robust model from one that predicts almost nothing."""
    styles = table["styles"]
    n = len(table["images"])
    blocks = [
        f"Label agreement between clean and shifted image, %, strength {table['strength']}, mean over {n} images\n\n"
        + markdown_table(
            ["model", *styles],
            [[name, *(f"{100.0 * per[s]:.1f}" for s in styles)] for name, per in table["mean"].items()],
        ),
        f"Classes predicted / label entropy in bits, clean and shifted, mean over {n} images (a model that keeps its "
        "labels by predicting one or two classes shows it here)\n\n"
        + markdown_table(
            ["model", "clean", *styles],
            [
                [
                    name,
                    *(f"{table['classes'][name][k]:.1f} / {table['entropy'][name][k]:.2f}" for k in ("clean", *styles)),
                ]
                for name in table["mean"]
            ],
        ),  # fmt: skip
    ]
    if "miou" in table:
        blocks.append(
            f"mIoU against the true labels, %, clean and shifted, over the {len(table['labelled_images'])} images "
            "whose labels are known\n\n"
            + markdown_table(
                ["model", "clean", *styles],
                [[name, *(f"{100.0 * per[k]:.1f}" for k in ("clean", *styles))] for name, per in table["miou"].items()],
            )
        )
    return "\n".join(blocks)


def _captioned(tile: np.ndarray, caption: str) -> np.ndarray:
    """``tile`` (``H x W x 3`` uint8) under a white band holding ``caption`` (the legend's font, so it reads at any
    size and looks the same on every machine)."""
    return np.concatenate([title_band([(0, tile.shape[1], caption)], tile.shape[1]), tile], axis=0)


def figure(result: RobustnessResult) -> np.ndarray:
    """What the tab shows, as one picture: the clean and shifted image, then per model its two label maps, and a
    legend of the classes those maps hold.

    Returns ``(1 + models) * (band + H) + legend x 2W x 3`` uint8 RGB, ``band`` the caption's height.
    """
    style = f"{result.style} {result.strength:g}"
    rows = [np.concatenate([_captioned(result.image, "clean"), _captioned(result.shifted, style)], axis=1)]
    maps = []
    for m in result.models:
        clean = _captioned(colorize(m.clean.labels, m.clean.num_classes), f"{m.name}: clean")
        shifted = _captioned(
            colorize(m.shifted.labels, m.shifted.num_classes), f"{m.name}: {style}, {100.0 * m.agreement:.1f}% kept"
        )
        rows.append(np.concatenate([clean, shifted], axis=1))
        maps += [m.clean.labels, m.shifted.labels]
    picture = np.concatenate(rows, axis=0)
    if not maps:
        return picture
    # one legend for every map: which classes appear, without the shares (they differ per map)
    entries = legend_entries(np.concatenate([x.ravel() for x in maps]), result.models[0].clean.num_classes)
    return np.concatenate([picture, draw_legend(entries, picture.shape[1], shares=False)], axis=0)


def main(argv: list[str] | None = None) -> int:
    p = JobParser(prog="python -m blindnet.demo.robustness", description=__doc__)
    p.add_argument(
        "--checkpoint",
        action="append",
        metavar="[NAME=]PATH",
        help="model to compare (repeatable; default: the shipped model)",
    )
    p.add_argument("--images", type=Path, nargs="*", help="images to shift (default: the demo's examples)")
    p.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, help="style-shift strength in [0, 1]")
    p.add_argument("--out", type=Path, default=Path("outputs/robustness"), help="folder for table.json and table.md")
    p.add_argument(
        "--figure",
        metavar="STYLE",
        choices=list(STYLES),
        help="also write figure.png: the first image under STYLE, as the tab shows it, every model's label maps",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")
    args = p.parse_args(argv)
    paths = args.images or default_examples()
    if not paths:
        p.error("no images: pass --images (the demo's examples are not installed)")
    try:
        images = {path.name: load_image(path) for path in paths}
        # True labels where an image has them as <folder>/labels/<name> (the demo's examples do).
        labels = {path.name: lab for path in paths if (lab := labels_beside(path)) is not None}
    except ImageError as exc:
        p.error(str(exc))
    try:
        predictors = {name: Predictor.from_checkpoint(path) for name, path in model_specs(args.checkpoint, None)}
    except (CheckpointError, FileNotFoundError) as exc:
        p.error(str(exc))
    progress = False if args.no_progress else None
    table = robustness_table(predictors, images, strength=args.strength, progress=progress, labels=labels)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "table.json", json.dumps(table, indent=2))
    text = markdown(table)
    write_text(args.out / "table.md", text)
    if args.figure:
        first = next(iter(images.values()))
        write_png(args.out / "figure.png", figure(compare_style(predictors, first, args.figure, args.strength)))
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
