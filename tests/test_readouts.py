"""``train.readouts`` and the experiment summary's readouts: paired intervals, encoder CKA, the shipped-recipe rule."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest

from blindnet.data.synthetic import write_aligned_dataset
from blindnet.train.experiment import summarise_experiment
from blindnet.train.readouts import choose_recipe, encoder_cka, paired_interval


def test_paired_interval_has_the_textbook_values() -> None:
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); t(0.975, 2 df) = 4.3027 (tables); t = 3.4641, p = 0.0742
    iv = paired_interval([1.0, 2.0, 3.0])
    assert (iv.n, iv.mean, iv.wins) == (3, 2.0, 3)
    assert iv.low == pytest.approx(2 - 4.3027 / math.sqrt(3), abs=1e-4)
    assert iv.high == pytest.approx(2 + 4.3027 / math.sqrt(3), abs=1e-4)
    assert iv.p == pytest.approx(0.0742, abs=1e-4)
    assert iv.cell() == "+2.0 [-0.5, +4.5] p=0.07 (3/3)"
    one = paired_interval([1.5, float("nan")])  # NaN dropped; one pair has no spread to estimate
    assert one.n == 1 and math.isnan(one.low) and one.cell() == "+1.5 (1/1)"
    assert paired_interval([]).cell() == "n/a"
    same = paired_interval([0.0, 0.0, 0.0])
    assert (same.low, same.high, same.p) == (0.0, 0.0, 1.0)


def test_choose_recipe_ties_go_to_the_simpler_arm() -> None:
    order = ["p", "i", "f"]
    # f best by 1.0 +- noise that the seeds cannot resolve; i clearly below f on every seed
    scores = {"p": {1: 10.0, 2: 12.0, 3: 9.0}, "i": {1: 5.0, 2: 5.5, 3: 5.2}, "f": {1: 12.0, 2: 11.0, 3: 11.0}}
    choice = choose_recipe(scores, order)
    assert choice.best == "f" and choice.arm == "p" and "tied with the best" in choice.reason
    # p clearly worse too: the best arm itself is chosen
    scores["p"] = {1: 1.0, 2: 1.2, 3: 0.9}
    choice = choose_recipe(scores, order)
    assert choice.arm == "f" and "every simpler arm is worse" in choice.reason
    # too few seeds for one arm: not applied
    scores["i"] = {1: 5.0, 2: 5.5}
    choice = choose_recipe(scores, order)
    assert choice.arm == "" and "fewer than 3 seeds for i" in choice.reason


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two layouts at 64x128 in noon and fog, plus ``copy``: noon's files under another appearance name."""
    root = tmp_path_factory.mktemp("scenes")
    split = write_aligned_dataset(root, 2, seed=5, height=64, width=128, appearances=("noon", "fog"), split="val",
                                  progress=False)  # fmt: skip
    shutil.copytree(split / "noon", split / "copy")
    return root


def _preset(path: Path, root: Path, apps: tuple[str, ...]) -> Path:
    lines = "".join(
        f"    - {{dataset: aligned, root: {root}, split: val, options: {{appearance: {a}}}}}\n" for a in apps
    )
    path.write_text(f"eval:\n  targets:\n{lines}")
    return path


def test_encoder_cka_is_one_for_identical_pictures_and_below_for_another_appearance(
    scenes: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    preset = _preset(tmp_path / "p.yaml", scenes, ("noon", "copy", "fog"))
    cka = encoder_cka(tiny_checkpoint, preset, "noon")
    assert set(cka) == {"layer3", "layer4"} and set(cka["layer4"]) == {"copy", "fog"}
    for level in cka.values():
        # the same pixels give the same features: 1 up to the rounding kept in the cache (5 decimals)
        assert level["copy"] == pytest.approx(1.0, abs=1e-5)
        assert 0.0 < level["fog"] < 0.999
    with pytest.raises(ValueError, match="no aligned evaluation target in appearance 'rain'"):
        encoder_cka(tiny_checkpoint, preset, "rain")


def test_summary_writes_pairs_selection_and_cka(scenes: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    preset = _preset(tmp_path / "p.yaml", scenes, ("noon", "fog"))
    select = _preset(tmp_path / "s.yaml", scenes, ("copy", "fog"))
    runs = tmp_path / "runs"
    for name in ("p_s1", "p_s2", "p_s3", "f_s1", "f_s2", "f_s3"):  # one set of weights everywhere: every difference 0
        (runs / name).mkdir(parents=True)
        shutil.copyfile(tiny_checkpoint, runs / name / "model.safetensors")
    paths = summarise_experiment(
        runs, preset, tmp_path / "out", arms={"p": "P", "f": "F"}, unseen=["fog"], groups={"shift": ["fog"]},
        pairs=[("f", "p")], select_config=select, cka_reference="noon", unnormalised_arms=[],
    )  # fmt: skip
    pairs = list(csv.DictReader(paths["pairs.csv"].open()))
    assert {r["metric"] for r in pairs} >= {"noon", "fog", "shift", "agreement", "correct agreement"}
    assert all(float(r["mean"]) == 0.0 and float(r["p"]) == 1.0 for r in pairs)
    # equal scores everywhere: the rule ties and picks the simpler arm
    assert "Rule applied: **P** (the best arm" in paths["selection.md"].read_text()
    cka = paths["cka.md"].read_text()
    assert "| P | 3 |" in cka and "layer4 shift" in cka
    with pytest.raises(ValueError, match="arm 'i' of --pair has no finished run"):
        summarise_experiment(runs, preset, tmp_path / "out", pairs=[("i", "p")], unnormalised_arms=[])
