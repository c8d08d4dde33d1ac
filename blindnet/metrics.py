"""Segmentation metrics: a confusion matrix accumulated with ``bincount`` and the scores derived from it.

The definitions follow the original evaluation (``utils/misc.py``): pixels whose ground truth is outside
``[0, num_classes)`` (255 = ignore) are skipped; IoU_c = TP / (TP + FP + FN); mIoU is the *nanmean* over classes, so a
class absent from both the ground truth and the prediction is skipped, while a class that is predicted but absent from
the ground truth scores 0. Counts are kept as int64 (the original all-reduced float32, which loses exactness beyond
2^24 pixels per cell) and summed across ranks with :meth:`ConfusionMatrix.all_reduce`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """``num_classes x num_classes`` pixel counts; rows are ground truth, columns are predictions."""

    def __init__(self, num_classes: int = 19, ignore_index: int = 255, device: str | torch.device = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` are integer tensors of the same shape (``N x H x W`` or ``H x W``).

        ``pred`` holds class indices (e.g. ``logits.argmax(1)``); ``target`` holds train ids, ``ignore_index`` (or any
        value outside ``[0, num_classes)``) is skipped.
        """
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        pred = pred.reshape(-1).to(device=self.mat.device, dtype=torch.int64)
        target = target.reshape(-1).to(device=self.mat.device, dtype=torch.int64)
        valid = (target >= 0) & (target < self.num_classes)
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"predictions must lie in [0, {self.num_classes}), got [{pred.min()}, {pred.max()}]")
        idx = target[valid] * self.num_classes + pred[valid]
        self.mat += torch.bincount(idx, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts into this one (same class count)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class counts into {self.num_classes}-class counts")
        self.mat += other.mat.to(self.mat.device)
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the counts over all ranks in place (no-op without an initialised process group)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)
        return self

    # ---- scores ------------------------------------------------------------------------------------------------
    def _tp_fp_fn(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.mat.to(torch.float64).cpu()
        tp = m.diag()
        return tp, m.sum(0) - tp, m.sum(1) - tp

    def iou(self) -> torch.Tensor:
        """Per-class IoU (float64, ``num_classes``); NaN where the class is in neither ground truth nor prediction."""
        tp, fp, fn = self._tp_fp_fn()
        denom = tp + fp + fn
        return torch.where(denom > 0, tp / denom.clamp(min=1), torch.full_like(tp, float("nan")))

    def accuracy(self) -> torch.Tensor:
        """Per-class accuracy (recall, TP / (TP + FN)); NaN where the class is absent from the ground truth."""
        tp, _, fn = self._tp_fp_fn()
        denom = tp + fn
        return torch.where(denom > 0, tp / denom.clamp(min=1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        return _nanmean(self.iou())

    def macc(self) -> float:
        return _nanmean(self.accuracy())

    def pixel_accuracy(self) -> float:
        total = int(self.mat.sum())
        return float(self.mat.diag().sum()) / total if total else float("nan")

    def scores(self, class_names: Sequence[str] | None = None) -> SegScores:
        """All scores as a :class:`SegScores` (fractions in [0, 1], NaN where undefined)."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        return SegScores(
            miou=self.miou(),
            macc=self.macc(),
            pixel_acc=self.pixel_accuracy(),
            iou=self.iou().tolist(),
            acc=self.accuracy().tolist(),
            class_names=names,
            pixels=int(self.mat.sum()),
        )


@dataclass
class SegScores:
    """Scores of one model on one dataset (fractions, not percent)."""

    miou: float
    macc: float
    pixel_acc: float
    iou: list[float]
    acc: list[float]
    class_names: list[str] = field(default_factory=list)
    pixels: int = 0

    def as_row(self, percent: bool = True) -> dict[str, float]:
        """Flat ``{"mIoU", "mAcc", "aAcc", "IoU.<class>", "Acc.<class>"}`` mapping, in percent by default."""
        k = 100.0 if percent else 1.0
        row = {"mIoU": self.miou * k, "mAcc": self.macc * k, "aAcc": self.pixel_acc * k}
        row.update({f"IoU.{n}": v * k for n, v in zip(self.class_names, self.iou)})
        row.update({f"Acc.{n}": v * k for n, v in zip(self.class_names, self.acc)})
        return row


def _nanmean(x: torch.Tensor) -> float:
    keep = ~torch.isnan(x)
    return float(x[keep].mean()) if bool(keep.any()) else float("nan")
