"""Confusion-matrix metrics against hand-computed values and a brute-force reference.

Tolerances: every score is a ratio of integer counts (int64 confusion matrix) computed in float64, so the only error
is float64 rounding of a division and of a mean over at most 19 classes, a few ulp (2.2e-16 each). ``pytest.approx``'s
default (relative 1e-6) is that bound with a huge margin and does not depend on the CPU (measured: exact, or 1.4e-16
relative for the brute-force mean, with AVX-512 and with ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blindnet.metrics import ConfusionMatrix, CrossAppearanceConsistency
from blindnet.serve.client import free_port


def test_hand_computed_iou_acc_and_nanmean() -> None:
    # 3 classes; class 2 never appears in gt or prediction -> NaN, skipped by the means.
    target = torch.tensor([[0, 0, 1, 1], [0, 1, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 0]])  # the 2 under an ignore pixel must not count
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.mat.tolist() == [[2, 1, 0], [1, 2, 0], [0, 0, 0]]
    iou = cm.iou()
    assert iou[0].item() == pytest.approx(2 / 4) and iou[1].item() == pytest.approx(2 / 4)
    assert math.isnan(iou[2].item())
    assert cm.miou() == pytest.approx(0.5)
    assert cm.accuracy()[0].item() == pytest.approx(2 / 3)
    assert cm.macc() == pytest.approx(2 / 3)
    assert cm.pixel_accuracy() == pytest.approx(4 / 6)


def test_predicted_but_absent_class_scores_zero() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    iou = cm.iou()
    assert iou[2].item() == 0.0  # predicted, not in gt: counts as 0 like the original
    assert math.isnan(iou[1].item())
    assert cm.miou() == pytest.approx((0.5 + 0.0) / 2)
    assert math.isnan(cm.accuracy()[2].item())  # accuracy is recall: undefined without gt pixels


def test_matches_bruteforce_reference() -> None:
    g = torch.Generator().manual_seed(0)
    c = 19
    target = torch.randint(0, c, (3, 37, 53), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    pred = torch.randint(0, c, target.shape, generator=g)
    cm = ConfusionMatrix(c)
    for i in range(3):  # accumulation over images == one big update
        cm.update(pred[i], target[i])
    t, p = target.numpy().ravel(), pred.numpy().ravel()
    ref = np.zeros((c, c), np.int64)
    for a, b in zip(t, p):
        if a != 255:
            ref[a, b] += 1
    assert (cm.mat.numpy() == ref).all()
    inter = np.diag(ref)
    union = ref.sum(0) + ref.sum(1) - inter
    assert cm.miou() == pytest.approx(float(np.nanmean(inter / union)))
    scores = cm.scores()
    assert scores.pixels == int((t != 255).sum())
    row = scores.as_row()
    assert row["mIoU"] == pytest.approx(100 * cm.miou()) and "IoU.18" in row


def test_shape_and_range_errors() -> None:
    cm = ConfusionMatrix(4)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="predictions must lie"):
        cm.update(torch.tensor([7]), torch.tensor([1]))


def _reduce_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cm = ConfusionMatrix(3)
        cm.update(torch.tensor([rank, 1]), torch.tensor([rank, 2]))
        cm.all_reduce()
        out[rank] = cm.mat.tolist()
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_over_ranks() -> None:
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_reduce_worker, args=(free_port(), out), nprocs=2, join=True)
    expected = [[1, 0, 0], [0, 1, 0], [0, 2, 0]]
    assert out[0] == expected and out[1] == expected


def test_cross_appearance_consistency_known_answer() -> None:
    acc = CrossAppearanceConsistency(["a", "b", "c"], num_classes=3)
    t = torch.tensor
    s1 = {"a": t([[0, 0, 1, 1], [0, 0, 1, 1]]), "b": t([[0, 0, 1, 1], [0, 0, 0, 0]]), "c": torch.full((2, 4), 2)}
    s2 = {"a": t([[1, 1], [1, 1]]), "b": t([[1, 1], [1, 0]])}  # scene 2 never gets "c": counted at scores()
    acc.update("s1", "a", s1["a"])
    acc.update("s2", "a", s2["a"])
    acc.update("s1", "b", s1["b"])
    acc.update("s1", "c", s1["c"])
    acc.update("s2", "b", s2["b"])
    acc.update("s1", "rain", s1["a"])  # not one of the appearances: ignored
    c = acc.scores()
    assert c.appearances == ["a", "b", "c"]
    # a vs b: 6 of 8 pixels agree in s1, 3 of 4 in s2.
    assert c.agreement[0][1] == c.agreement[1][0] == pytest.approx(9 / 12)
    assert c.agreement[0][2] == c.agreement[1][2] == 0.0 and c.agreement[0][0] == 1.0
    # b scored against a (summed counts): class 0 TP 4, FP 3 -> 4/7; class 1 TP 5, FN 3 -> 5/8; class 2 absent.
    assert c.miou[0][1] == c.miou[1][0] == pytest.approx((4 / 7 + 5 / 8) / 2)
    assert c.miou[0][2] == 0.0 and c.miou[2][2] == 1.0
    assert c.scenes == [[0, 2, 1], [2, 0, 1], [1, 1, 0]]
    assert c.mean_off_diagonal("agreement") == pytest.approx((9 / 12) / 3)
    acc.update("s3", "a", s2["a"])
    with pytest.raises(ValueError, match="twice"):
        acc.update("s3", "a", s2["a"])


def test_correct_pixel_agreement_ignores_shared_mistakes() -> None:
    """Of the pixels right in one appearance, the share also right in the other; a label repeated wrongly in every
    appearance counts for ``agreement`` but not here, and ignored pixels (255) are never right."""
    acc = CrossAppearanceConsistency(["a", "b"], num_classes=3)
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    a = torch.tensor([[0, 0, 1, 0], [1, 1, 0, 0]])  # right at 3 pixels: (0,0) (0,1) (0,2)
    b = torch.tensor([[0, 1, 1, 0], [1, 1, 2, 2]])  # right at 2 pixels: (0,0) (0,2)
    acc.update("s", "a", a, label)
    acc.update("s", "b", b, label)
    c = acc.scores()
    assert c.agreement[0][1] == pytest.approx(5 / 8)  # (0,0) (0,2) (0,3) (1,0) (1,1) agree; three of them are wrong
    assert c.correct is not None
    assert c.correct[0][1] == pytest.approx(2 / 3) and c.correct[1][0] == 1.0
    assert c.mean_off_diagonal("correct") == pytest.approx((2 / 3 + 1) / 2)
    unlabelled = CrossAppearanceConsistency(["a", "b"], num_classes=3)
    unlabelled.update("s", "a", a)
    unlabelled.update("s", "b", b, label)  # one appearance without its label: no correct-pixel score at all
    assert unlabelled.scores().correct is None and math.isnan(unlabelled.scores().mean_off_diagonal("correct"))
    with pytest.raises(ValueError, match="does not match"):
        unlabelled.update("t", "a", a, label[:1])
