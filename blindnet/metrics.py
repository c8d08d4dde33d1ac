"""Segmentation metrics: a confusion matrix accumulated with ``bincount`` and the scores derived from it.

The definitions follow the original evaluation (``utils/misc.py``): pixels whose ground truth is outside
``[0, num_classes)`` (255 = ignore) are skipped; IoU_c = TP / (TP + FP + FN); mIoU is the *nanmean* over classes, so a
class absent from both the ground truth and the prediction is skipped, while a class that is predicted but absent from
the ground truth scores 0. Counts are kept as int64 (the original all-reduced float32, which loses exactness beyond
2^24 pixels per cell) and summed across ranks with :meth:`ConfusionMatrix.all_reduce`.
"""

from __future__ import annotations

import math
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


# ---- cross-appearance consistency ---------------------------------------------------------------------------------
@dataclass
class ConsistencyScores:
    """How alike a model's predictions are for the same scene layout in different appearances (needs no labels).

    Attributes:
        appearances: the ``A`` appearances, in matrix order.
        agreement: ``A x A`` fraction of pixels where the two appearances' predicted classes are equal, over all
            pixels of all scenes seen in both (diagonal 1).
        miou: ``A x A`` mIoU of one appearance's prediction scored against the other's as ground truth, confusion
            counts summed over scenes (nanmean over classes present in either; symmetric; diagonal 1).
        scenes: ``A x A`` number of scenes that contributed to each pair.
        correct: ``A x A``; row i, column j: of the pixels predicted correctly in appearance i, the fraction also
            predicted correctly in appearance j (NaN where no labels were given). Unlike ``agreement`` it does not
            reward a model for repeating the same wrong label in every appearance.
    """

    appearances: list[str]
    agreement: list[list[float]]
    miou: list[list[float]]
    scenes: list[list[int]]
    correct: list[list[float]] | None = None

    def mean_off_diagonal(self, which: str = "agreement") -> float:
        """Mean over the pairs ``i != j`` of ``agreement``, ``miou`` or ``correct`` (NaN with fewer than two
        appearances, or for ``correct`` without labels)."""
        m = getattr(self, which)
        if m is None:
            return float("nan")
        vals = [m[i][j] for i in range(len(m)) for j in range(len(m)) if i != j and not math.isnan(m[i][j])]
        return sum(vals) / len(vals) if vals else float("nan")


class CrossAppearanceConsistency:
    """Accumulates :class:`ConsistencyScores` from per-image predictions tagged with ``(scene, appearance)``.

    A scene's predictions are buffered (CPU, uint8/int16) until all ``appearances`` of it have arrived, then every
    pair is counted and the buffer dropped, so memory stays at one scene unless a scene's appearances arrive far
    apart (e.g. one dataset per appearance); :meth:`scores` counts whatever pairs incomplete scenes have.
    """

    def __init__(self, appearances: Sequence[str], num_classes: int) -> None:
        if len(set(appearances)) != len(appearances):
            raise ValueError(f"appearances must be distinct, got {list(appearances)}")
        self.appearances = list(appearances)
        self.num_classes = num_classes
        n = len(self.appearances)
        self._agree = [[0] * n for _ in range(n)]
        self._pixels = [[0] * n for _ in range(n)]
        self._scenes = [[0] * n for _ in range(n)]
        self._cm = {(i, j): ConfusionMatrix(num_classes) for i in range(n) for j in range(i + 1, n)}
        self._both_right = [[0] * n for _ in range(n)]
        self._right = [[0] * n for _ in range(n)]
        self._labelled = True  # every update so far came with its label
        self._pending: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor | None]]] = {}

    def update(self, scene: str, appearance: str, pred: torch.Tensor, label: torch.Tensor | None = None) -> None:
        """Add the ``H x W`` integer prediction for ``scene`` in ``appearance`` (unknown appearances are ignored),
        with its ``H x W`` label map when known (ignored pixels carry a value no prediction takes, e.g. 255)."""
        if appearance not in self.appearances:
            return
        slot = self._pending.setdefault(scene, {})
        a = self.appearances.index(appearance)
        if a in slot:
            raise ValueError(f"scene {scene!r} in appearance {appearance!r} was given twice")
        if label is not None and label.shape != pred.shape:
            raise ValueError(f"label {tuple(label.shape)} does not match prediction {tuple(pred.shape)}")
        self._labelled &= label is not None
        small = torch.uint8 if self.num_classes <= 256 else torch.int16
        # labels are class ids or the ignore value 255, so they fit the predictions' small dtype too
        slot[a] = (pred.detach().to("cpu", small), None if label is None else label.detach().to("cpu", small))
        if len(slot) == len(self.appearances):
            self._count(self._pending.pop(scene))

    def _count(self, preds: dict[int, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        right = {i: None if y is None else p == y for i, (p, y) in preds.items()}
        for i in sorted(preds):
            for j in sorted(preds):
                if j <= i:
                    continue
                pi, pj = preds[i][0], preds[j][0]
                if pi.shape != pj.shape:
                    raise ValueError(f"predictions of one scene differ in size: {tuple(pi.shape)} vs {tuple(pj.shape)}")
                same = int((pi == pj).sum())
                ri, rj = right[i], right[j]
                both = int((ri & rj).sum()) if ri is not None and rj is not None else 0
                for a, b in ((i, j), (j, i)):
                    self._agree[a][b] += same
                    self._pixels[a][b] += pi.numel()
                    self._scenes[a][b] += 1
                    self._both_right[a][b] += both
                if ri is not None and rj is not None:
                    self._right[i][j] += int(ri.sum())
                    self._right[j][i] += int(rj.sum())
                self._cm[(i, j)].update(pj.long(), pi.long())

    def scores(self) -> ConsistencyScores:
        """The scores so far (incomplete scenes included)."""
        for preds in self._pending.values():
            self._count(preds)
        self._pending.clear()
        n = len(self.appearances)
        agreement = [[1.0 if i == j else float("nan") for j in range(n)] for i in range(n)]
        miou = [[1.0 if i == j else float("nan") for j in range(n)] for i in range(n)]
        for i in range(n):
            for j in range(n):
                if i != j and self._pixels[i][j]:
                    agreement[i][j] = self._agree[i][j] / self._pixels[i][j]
                    miou[i][j] = self._cm[(min(i, j), max(i, j))].miou()
        scenes = [[self._scenes[i][j] for j in range(n)] for i in range(n)]
        correct = None
        if self._labelled:
            correct = [
                [1.0 if i == j else self._both_right[i][j] / self._right[i][j] if self._right[i][j] else float("nan")
                 for j in range(n)]
                for i in range(n)
            ]  # fmt: skip
        return ConsistencyScores(list(self.appearances), agreement, miou, scenes, correct)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment between two representations of the same samples.

    ``x`` is ``n x p`` and ``y`` is ``n x q`` (row i of both describes sample i), or feature maps ``N x C x H x W``
    (each pixel of each image is a sample, its channels the features; both maps must have the same ``N, H, W``).
    Returns ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on column-centred features: 1 for representations that
    differ by an orthogonal transform and an isotropic scale, near ``min(p, q) / n`` for independent random ones.
    Computed in float64 in feature space (``p x q`` Gram matrices), so ``n`` may be large. Used to ask whether an
    encoder maps two appearances of one layout to the same features.
    """
    if x.dim() == 4 and y.dim() == 4:
        if (x.shape[0], *x.shape[2:]) != (y.shape[0], *y.shape[2:]):
            raise ValueError(f"feature maps must share N, H, W; got {tuple(x.shape)} and {tuple(y.shape)}")
        x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected n x p and n x q with the same n, got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.detach().double()
    y = y.detach().double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if float(norm) == 0.0:
        raise ValueError("CKA is undefined for a constant representation (all samples equal)")
    return float(cross / norm)
