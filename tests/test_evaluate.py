"""``train.evaluate``: cross-appearance consistency on aligned datasets, with a predictor whose answer is known."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from blindnet.data import build_eval_dataset
from blindnet.metrics import CrossAppearanceConsistency
from blindnet.train.evaluate import consistency_groups, evaluate, write_tables
from blindnet.train.evaluate_cli import main

SIZE = 8
APPS = ("noon", "night", "fog")


class RedIsOne(nn.Module):
    """Predicts class 1 where the (normalised) red channel is positive, else class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_classes=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([-x[:, 0], x[:, 0]], dim=1)


def _write_scenes(root: Path, scenes: int = 2, size: int = SIZE) -> None:
    """noon: left half red; night: black; fog: all red. Labels: class 0 everywhere."""
    red = np.zeros((size, size, 3), np.uint8)
    red[..., 2] = 255  # BGR on disk
    half = red.copy()
    half[:, size // 2 :] = 0
    images = {"noon": half, "night": np.zeros_like(red), "fog": red}
    split = root / "val"
    for i in range(scenes):
        for app, img in images.items():
            (split / app).mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(split / app / f"s{i}.png"), img)
        (split / "labels").mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(split / "labels" / f"s{i}.png"), np.zeros((size, size), np.uint8))
    (split / "meta.json").write_text(json.dumps({"appearances": list(APPS)}))


def _check_known_answer(c) -> None:
    i = {a: k for k, a in enumerate(c.appearances)}
    # noon vs night / fog: half the pixels agree; night vs fog: none.
    assert c.agreement[i["noon"]][i["night"]] == pytest.approx(0.5)
    assert c.agreement[i["noon"]][i["fog"]] == pytest.approx(0.5)
    assert c.agreement[i["night"]][i["fog"]] == 0.0
    # night scored against noon: class 0 IoU 32/64, class 1 IoU 0 -> 0.25; fog against night: 0.
    assert c.miou[i["noon"]][i["night"]] == pytest.approx(0.25)
    assert c.miou[i["night"]][i["noon"]] == pytest.approx(0.25)
    assert c.miou[i["night"]][i["fog"]] == 0.0
    assert c.scenes[i["noon"]][i["fog"]] == 2


def test_consistency_of_a_known_predictor_one_dataset_or_one_per_appearance(tmp_path: Path) -> None:
    _write_scenes(tmp_path)
    model = RedIsOne()
    # One dataset holding every appearance.
    whole = build_eval_dataset("aligned", tmp_path, "val")
    groups = consistency_groups({"aligned": whole})
    assert groups == {"aligned": (list(APPS), ["aligned"])}
    acc = CrossAppearanceConsistency(groups["aligned"][0], 2)
    scores = evaluate(model, whole, consistency=acc, progress=False)
    # The usual scores are unchanged: label 0 everywhere, class 0 predicted on 96 of 192 pixels per scene.
    assert scores.pixels == 2 * 3 * SIZE**2 and scores.miou == pytest.approx((0.5 + 0.0) / 2)
    _check_known_answer(acc.scores())
    # One dataset per appearance (the presets' eval targets): grouped by folder and split, compared across datasets.
    per_app = {f"aligned:{a}": build_eval_dataset("aligned", tmp_path, "val", appearance=a) for a in APPS}
    groups = consistency_groups(per_app)
    ((name, (apps, targets)),) = groups.items()
    assert apps == list(APPS) and targets == list(per_app) and name.startswith("aligned:")
    acc = CrossAppearanceConsistency(apps, 2)
    for ds in per_app.values():
        evaluate(model, ds, consistency=acc, progress=False)
    c = acc.scores()
    _check_known_answer(c)

    paths = write_tables({"red": {}}, tmp_path / "out", {"red": {name: c}})
    assert (tmp_path / "out" / "consistency.md").read_text().count("50.00 / 25.00") == 4  # noon-night, noon-fog, x2
    rows = list(csv.DictReader((tmp_path / "out" / "consistency.csv").open()))
    assert len(rows) == 6 and {(r["appearance_a"], r["appearance_b"], r["agreement"]) for r in rows} >= {
        ("night", "fog", "0.00"),
        ("noon", "night", "50.00"),
    }
    png = [p for k, p in paths.items() if k.endswith(".png")]
    assert len(png) == 1 and png[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_cli_writes_consistency_for_aligned_targets(tmp_path: Path, tiny_checkpoint: Path) -> None:
    _write_scenes(tmp_path / "scenes", scenes=1, size=32)  # the real network needs >= 32 px
    out = tmp_path / "eval"
    args = ["--checkpoint", str(tiny_checkpoint), "--dataset", "aligned", "--root", str(tmp_path / "scenes")]
    args += ["--out", str(out), "--no-progress", "--device", "cpu", "--num-workers", "0", "--protocol", "original"]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "consistency.csv").open()))
    assert len(rows) == 6 and all(0.0 <= float(r["agreement"]) <= 100.0 for r in rows)
    assert list(out.glob("consistency_tiny_aligned.png")) and (out / "miou.md").is_file()
