"""Score networks on segmentation datasets: full resolution, single scale, no flip (the original protocol, facts §6).

Library: :func:`evaluate` (one model, one dataset -> :class:`~blindnet.metrics.SegScores`) and the table writers
:func:`miou_table` (rows = checkpoints, columns = target datasets; the paper's Table 1) and :func:`class_table`
(rows = checkpoint/target, columns = classes; Table 6).

CLI::

    python -m blindnet.train.evaluate --checkpoint runs/x/model.safetensors --dataset cityscapes --root data/cityscapes
    python -m blindnet.train.evaluate --checkpoint a.safetensors b.pt --config synthetic_full   # the preset's eval targets
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from blindnet.classes import class_names
from blindnet.metrics import ConfusionMatrix, SegScores
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
) -> SegScores:
    """Confusion-matrix scores of ``model`` on ``dataset`` (last weights as given; nothing is selected or tuned).

    Args:
        model: maps ``1 x 3 x H x W`` normalised images to ``1 x C x H x W`` logits (``DeepLabV3Plus``). Run in eval
            mode and restored to its previous mode afterwards.
        dataset: items ``{"image": 3 x H x W float, "label": H x W int64 (255 = ignore), ...}`` at full resolution;
            images may differ in size, so the batch is 1 (as in the original).
        amp: bfloat16 autocast (CUDA).
        max_images: score only the first ``max_images`` images (0 = all).

    Under ``torch.distributed`` each rank scores every ``world_size``-th image and the counts are summed, so every
    image is scored exactly once (the original's sampler dropped the remainder).
    """
    device = torch.device(device)
    info = current_dist_info()
    n = len(dataset) if max_images <= 0 else min(len(dataset), max_images)
    if n == 0:
        raise ValueError(f"{desc}: the evaluation dataset is empty")
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

        bar = tqdm(total=len(shard), desc=desc, unit="img", leave=False, dynamic_ncols=True)
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
            cm.update(logits.argmax(1), label)
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
) -> dict[str, dict[str, SegScores]]:
    """Score each checkpoint (row label -> file) on each dataset (target label -> dataset, built once for all rows).

    Returns ``{row label: {target label: SegScores}}``, the input of :func:`miou_table` and :func:`write_tables`.
    """
    from blindnet.checkpoint import load_model

    device = torch.device(device)
    results: dict[str, dict[str, SegScores]] = {}
    for label, ckpt in checkpoints.items():
        model = load_model(ckpt, device=device)
        results[label] = {
            target: evaluate(
                model,
                ds,
                device=device,
                amp=device.type == "cuda",
                num_workers=num_workers,
                max_images=max_images,
                progress=progress,
                desc=f"{label} on {target}",
            )
            for target, ds in datasets.items()
        }
    return results


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _csv(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


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
    return _markdown(header, rows), _csv(header, rows)


def class_table(results: Mapping[str, Mapping[str, SegScores]], metric: str = "iou") -> tuple[str, str]:
    """Table 6 shape: one row per (checkpoint, target), one column per class, then mIoU and mAcc (percent)."""
    rows, names = [], None
    for label, per_target in results.items():
        for target, s in per_target.items():
            names = names or s.class_names
            vals = getattr(s, metric)
            rows.append([f"{label} / {target}", *[_fmt(v * 100) for v in vals], _fmt(s.miou * 100), _fmt(s.macc * 100)])
    header = ["method / target", *(names or []), "mIoU", "mAcc"]
    return _markdown(header, rows), _csv(header, rows)


def write_tables(results: Mapping[str, Mapping[str, SegScores]], out_dir: str | Path) -> dict[str, Path]:
    """Write ``miou.md/csv``, ``class_iou.md/csv`` and ``class_acc.md/csv`` into ``out_dir``; returns the paths."""
    from blindnet.io import atomic_write

    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    tables = {
        "miou": miou_table(results, "mIoU"),
        "macc": miou_table(results, "mAcc"),
        "class_iou": class_table(results, "iou"),
        "class_acc": class_table(results, "acc"),
    }
    for stem, (md, cs) in tables.items():
        for ext, text in (("md", md), ("csv", cs)):
            p = out_dir / f"{stem}.{ext}"
            atomic_write(p, lambda tmp, text=text: Path(tmp).write_text(text))
            paths[f"{stem}.{ext}"] = p
    return paths


# ---- CLI ---------------------------------------------------------------------------------------------------------
def _parse_options(items: Sequence[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--option {item!r} must look like key=value")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def _row_label(path: Path) -> str:
    # runs/<name>/model.safetensors -> <name>; anything else -> file stem.
    return path.parent.name if path.stem in ("model", "final") else path.stem


def main(argv: Sequence[str] | None = None, prog: str = "python -m blindnet.train.evaluate") -> int:
    from blindnet.train.config import DatasetSpec, load_config
    from blindnet.train.data import build_eval_dataset

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="+", required=True, help="deployable .safetensors or training .pt file(s)")
    p.add_argument("--label", nargs="*", default=None, help="row labels (default: run folder or file name)")
    p.add_argument("--dataset", nargs="*", default=[], help="dataset name(s), keys of blindnet.data.DATASETS")
    p.add_argument("--root", nargs="*", default=[], help="dataset root(s), one per --dataset")
    p.add_argument("--split", default="val")
    p.add_argument("--option", nargs="*", default=[], help="dataset keyword arguments key=value (e.g. appearance=fog)")
    p.add_argument("--config", default=None, help="take the targets from this preset's eval.targets")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override for --config (a.b=v)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--out", default=None, help="folder for the Markdown/CSV tables")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from blindnet.checkpoint import CheckpointError

    specs: list[DatasetSpec] = []
    if args.config:
        cfg = load_config(args.config, args.overrides)
        specs += list(cfg.eval.targets)
    if len(args.dataset) != len(args.root):
        p.error(f"give one --root per --dataset ({len(args.dataset)} datasets, {len(args.root)} roots)")
    options = _parse_options(args.option)
    specs += [DatasetSpec(d, r, args.split, options=dict(options)) for d, r in zip(args.dataset, args.root)]
    if not specs:
        p.error("nothing to evaluate: give --dataset/--root or --config")
    labels = args.label or [_row_label(Path(c)) for c in args.checkpoint]
    if len(labels) != len(args.checkpoint):
        p.error("give one --label per --checkpoint")
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    try:
        datasets = {s.label: build_eval_dataset(s) for s in specs}
        results = evaluate_checkpoints(
            dict(zip(labels, args.checkpoint)),
            datasets,
            device=device,
            num_workers=args.num_workers,
            max_images=args.max_images,
            progress=not args.no_progress,
        )
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    md, _ = miou_table(results)
    print(md)
    print(class_table(results)[0])
    if args.out:
        for path in write_tables(results, args.out).values():
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
