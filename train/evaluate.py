"""Score networks on segmentation datasets: single scale, no flip, batch 1.

Input protocols (see ``docs/original_implementation.md``):

* ``clean`` (default): every dataset at full resolution with ImageNet normalisation, as the network was trained;
* ``original`` (``--protocol original``): the original evaluation's per-dataset quirks, for like-for-like comparison
  with published numbers: Cityscapes on un-normalised [0, 1] inputs, Mapillary resized to height 1024 and
  centre-cropped to 1024 x 1024 (portrait images padded with label 0); other datasets as ``clean``;
* ``unnormalised`` (``--protocol unnormalised``): the Cityscapes quirk alone on every dataset, to measure it anywhere.

Library: :func:`evaluate` (one model, one dataset -> :class:`~blindnet.metrics.SegScores`), the table writers
:func:`miou_table` (rows = checkpoints, columns = target datasets; the paper's Table 1) and :func:`class_table`
(rows = checkpoint/target, columns = classes; Table 6), and, for aligned multi-appearance datasets, cross-appearance
consistency (:func:`consistency_table`, :func:`plot_consistency`): per pair of appearances, the pixel agreement of the
predictions for the same layout and the mIoU of one appearance's prediction scored against the other's.

CLI::

    python -m blindnet.train.evaluate --checkpoint runs/x/model.safetensors --dataset cityscapes --root data/cityscapes
    python -m blindnet.train.evaluate --checkpoint a.safetensors b.pt --config synthetic_full   # the preset's eval targets
    python -m blindnet.train.evaluate --checkpoint a.safetensors --dataset mapillary --root data/mapillary --protocol original
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sized
from pathlib import Path
from typing import cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from blindnet.checkpoint import load_model
from blindnet.classes import class_names
from blindnet.data.datasets import AlignedAppearanceDataset
from blindnet.io import atomic_write, csv_table, file_slug, markdown_table, write_text
from blindnet.metrics import ConfusionMatrix, ConsistencyScores, CrossAppearanceConsistency, SegScores
from blindnet.train.distributed import current_dist_info


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    amp: bool = False,
    channels_last: bool = False,
    num_workers: int = 0,
    max_images: int = 0,
    progress: bool = True,
    desc: str = "eval",
    consistency: CrossAppearanceConsistency | None = None,
) -> SegScores:
    """Confusion-matrix scores of ``model`` on ``dataset`` (last weights as given; nothing is selected or tuned).

    Args:
        model: maps ``1 x 3 x H x W`` normalised images to ``1 x C x H x W`` logits (``DeepLabV3Plus``). Run in eval
            mode and restored to its previous mode afterwards.
        dataset: items ``{"image": 3 x H x W float, "label": H x W int64 (255 = ignore), ...}`` at full resolution;
            images may differ in size, so the batch is 1 (as in the original).
        amp: bfloat16 autocast (CUDA).
        max_images: score only the first ``max_images`` images (0 = all).
        consistency: also feed every prediction (``H x W``) to this accumulator under the item's ``"name"`` (the
            scene) and ``"appearance"``; items without an appearance are skipped. Single process only.

    Under ``torch.distributed`` each rank scores every ``world_size``-th image and the counts are summed, so every
    image is scored exactly once (the original's sampler dropped the remainder).
    """
    device = torch.device(device)
    info = current_dist_info()
    size = len(cast(Sized, dataset))  # a map-style dataset: it has a length
    n = size if max_images <= 0 else min(size, max_images)
    if n == 0:
        raise ValueError(f"{desc}: the evaluation dataset is empty")
    if consistency is not None and info.world_size > 1:
        # Ranks see different items, so a scene's appearances would be split over processes.
        raise ValueError(f"{desc}: cross-appearance consistency needs a single process")
    shard = Subset(dataset, list(range(info.rank, n, info.world_size)))
    # An explicit generator keeps DataLoader from drawing its seed from the global RNG: evaluating mid-training must
    # not change the training run's random stream (exact resume).
    loader = DataLoader(shard, batch_size=1, shuffle=False, num_workers=num_workers, generator=torch.Generator())
    num_classes = num_classes or int(getattr(getattr(model, "config", None), "num_classes", 19))
    cm = ConfusionMatrix(num_classes, device=device)
    was_training = model.training
    model.eval()
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        # disable=None: a bar on a terminal only, never hundreds of redraw lines in a log file
        bar = tqdm(total=len(shard), desc=desc, unit="img", leave=False, dynamic_ncols=True, disable=None)
    try:
        for batch in loader:
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            if channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(image)
            if logits.shape[-2:] != label.shape[-2:]:
                raise RuntimeError(f"{desc}: logits {tuple(logits.shape)} do not match label {tuple(label.shape)}")
            pred = logits.max(1).indices  # = argmax(1), ~4x faster on a CPU
            cm.update(pred, label)
            if consistency is not None and "appearance" in batch:
                consistency.update(str(batch["name"][0]), str(batch["appearance"][0]), pred[0], label[0])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    cm.all_reduce()
    return cm.scores(class_names(num_classes))


# ---- tables ------------------------------------------------------------------------------------------------------
def evaluate_checkpoints(
    checkpoints: Mapping[str, str | Path],
    datasets: Mapping[str, Dataset],
    *,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    max_images: int = 0,
    progress: bool = True,
    consistency: dict[str, dict[str, ConsistencyScores]] | None = None,
) -> dict[str, dict[str, SegScores]]:
    """Score each checkpoint (row label -> file) on each dataset (target label -> dataset, built once for all rows).

    Returns ``{row label: {target label: SegScores}}``, the input of :func:`miou_table` and :func:`write_tables`.
    When ``consistency`` is a dict it is filled with ``{row label: {group label: ConsistencyScores}}`` for the
    aligned datasets (see :func:`consistency_groups`), from the same forward passes.
    """

    device = torch.device(device)
    groups = consistency_groups(datasets) if consistency is not None else {}
    results: dict[str, dict[str, SegScores]] = {}
    for label, ckpt in checkpoints.items():
        model = load_model(ckpt, device=device)
        num_classes = model.config.num_classes
        accumulators = {g: CrossAppearanceConsistency(apps, num_classes) for g, (apps, _) in groups.items()}
        target_group = {t: g for g, (_, targets) in groups.items() for t in targets}
        results[label] = {}
        for target, ds in datasets.items():
            results[label][target] = evaluate(
                model,
                ds,
                device=device,
                amp=device.type == "cuda",
                num_workers=num_workers,
                max_images=max_images,
                progress=progress,
                desc=f"{label} on {target}",
                consistency=accumulators.get(target_group.get(target, "")),
            )
        if consistency is not None and accumulators:
            consistency[label] = {g: acc.scores() for g, acc in accumulators.items()}
    return results


def consistency_groups(datasets: Mapping[str, Dataset]) -> dict[str, tuple[list[str], list[str]]]:
    """Aligned evaluation datasets whose scenes can be compared across appearances.

    Datasets over the same folder and split (e.g. one target per appearance) form one group, so their predictions
    for a scene are compared with each other. Returns ``{group label: (appearances, target labels)}`` for groups
    with at least two appearances; the label is the target's own when one dataset holds them all.
    """
    found: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    for target, ds in datasets.items():
        if not isinstance(ds, AlignedAppearanceDataset) or ds.train:
            continue
        apps, targets = found.setdefault((str(ds.root.resolve()), ds.split), ([], []))
        apps.extend(a for a in ds.appearances if a not in apps)
        targets.append(target)
    out: dict[str, tuple[list[str], list[str]]] = {}
    for (root, split), (apps, targets) in found.items():
        if len(apps) < 2:
            continue
        name = targets[0] if len(targets) == 1 else f"aligned:{Path(root).name}/{split}"
        out[name] = (apps, targets)
    return out


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def miou_table(results: Mapping[str, Mapping[str, SegScores]], metric: str = "mIoU") -> tuple[str, str]:
    """Table 1 shape: one row per checkpoint/method, one column per target dataset, plus their mean.

    Args:
        results: ``{row label: {target label: scores}}``.
        metric: ``mIoU`` or ``mAcc``.

    Returns:
        ``(markdown, csv)`` texts, values in percent.
    """
    targets: list[str] = []
    for per_target in results.values():
        targets += [t for t in per_target if t not in targets]
    header = ["method", *targets, "mean"]
    rows = []
    for label, per_target in results.items():
        vals = [getattr(per_target[t], metric.lower()) * 100 if t in per_target else float("nan") for t in targets]
        finite = [v for v in vals if not math.isnan(v)]
        mean = sum(finite) / len(finite) if finite else float("nan")
        rows.append([label, *map(_fmt, vals), _fmt(mean)])
    return markdown_table(header, rows), csv_table(header, rows)


def class_table(results: Mapping[str, Mapping[str, SegScores]], metric: str = "iou") -> tuple[str, str]:
    """Table 6 shape: one row per (checkpoint, target), one column per class, then mIoU and mAcc (percent)."""
    rows, names = [], None
    for label, per_target in results.items():
        for target, s in per_target.items():
            names = names or s.class_names
            vals = getattr(s, metric)
            rows.append([f"{label} / {target}", *[_fmt(v * 100) for v in vals], _fmt(s.miou * 100), _fmt(s.macc * 100)])
    header = ["method / target", *(names or []), "mIoU", "mAcc"]
    return markdown_table(header, rows), csv_table(header, rows)


def consistency_table(consistency: Mapping[str, Mapping[str, ConsistencyScores]]) -> tuple[str, str]:
    """Cross-appearance consistency in percent.

    Markdown: per (method, group) a summary line and an appearance x appearance matrix whose cells read
    ``agreement / mIoU``. CSV (long format): ``method, target, appearance_a, appearance_b, agreement, mIoU, scenes``.
    """
    blocks: list[str] = []
    rows: list[list[str]] = []
    for label, per_group in consistency.items():
        for group, c in per_group.items():
            n = len(c.appearances)
            blocks.append(
                f"**{label} / {group}**: mean pixel agreement {_fmt(c.mean_off_diagonal('agreement') * 100)}, "
                f"mean pairwise mIoU {_fmt(c.mean_off_diagonal('miou') * 100)} (cells: agreement / mIoU, percent)\n"
            )
            cells = [
                [c.appearances[i], *[f"{_fmt(c.agreement[i][j] * 100)} / {_fmt(c.miou[i][j] * 100)}" for j in range(n)]]
                for i in range(n)
            ]
            blocks.append(markdown_table(["appearance", *c.appearances], cells))
            for i in range(n):
                for j in range(n):
                    if i != j:
                        rows.append(
                            [label, group, c.appearances[i], c.appearances[j], _fmt(c.agreement[i][j] * 100),
                             _fmt(c.miou[i][j] * 100), str(c.scenes[i][j])]
                        )  # fmt: skip
    header = ["method", "target", "appearance_a", "appearance_b", "agreement", "mIoU", "scenes"]
    return "\n".join(blocks), csv_table(header, rows)


def plot_consistency(scores: ConsistencyScores, path: str | Path, title: str = "") -> Path:
    """Two annotated heatmaps (pixel agreement, pairwise mIoU; percent) of one :class:`ConsistencyScores` as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    apps = scores.appearances
    n = len(apps)
    fig, axes = plt.subplots(1, 2, figsize=(4.2 * 2, 0.6 * n + 2.2), constrained_layout=True)
    for ax, name, mat in zip(axes, ("pixel agreement (%)", "mIoU vs. the other (%)"), (scores.agreement, scores.miou)):
        vals = [[v * 100 for v in row] for row in mat]
        im = ax.imshow(vals, vmin=0, vmax=100, cmap="viridis")
        ax.set_xticks(range(n), apps, rotation=45, ha="right")
        ax.set_yticks(range(n), apps)
        ax.set_title(name)
        for i in range(n):
            for j in range(n):
                v = vals[i][j]
                ax.text(j, i, "-" if math.isnan(v) else f"{v:.0f}", ha="center", va="center",
                        color="black" if v > 60 else "white", fontsize=8)  # fmt: skip
        fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def write_tables(
    results: Mapping[str, Mapping[str, SegScores]],
    out_dir: str | Path,
    consistency: Mapping[str, Mapping[str, ConsistencyScores]] | None = None,
) -> dict[str, Path]:
    """Write ``miou.md/csv``, ``class_iou.md/csv`` and ``class_acc.md/csv`` into ``out_dir``; returns the paths.

    With ``consistency`` (see :func:`evaluate_checkpoints`) also ``consistency.md/csv`` and one heatmap
    ``consistency_<method>_<target>.png`` per method and group.
    """
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    tables = {
        "miou": miou_table(results, "mIoU"),
        "macc": miou_table(results, "mAcc"),
        "class_iou": class_table(results, "iou"),
        "class_acc": class_table(results, "acc"),
    }
    if consistency:
        tables["consistency"] = consistency_table(consistency)
        for label, per_group in consistency.items():
            for group, c in per_group.items():
                name = f"consistency_{file_slug(label)}_{file_slug(group)}.png"
                paths[name] = plot_consistency(c, out_dir / name, f"{label} / {group}")
    for stem, (md, cs) in tables.items():
        for ext, text in (("md", md), ("csv", cs)):
            p = out_dir / f"{stem}.{ext}"
            write_text(p, text)
            paths[f"{stem}.{ext}"] = p
    return paths


# ---- CLI ---------------------------------------------------------------------------------------------------------


if __name__ == "__main__":  # ``python -m blindnet.train.evaluate``: the same CLI as ``blindnet evaluate``
    from blindnet.train.evaluate_cli import main

    raise SystemExit(main())
