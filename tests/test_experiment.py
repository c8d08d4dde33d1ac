"""``train.experiment``: per-run scoring (cached), mean ± std over seeds, paired differences, trend and protocol tables."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from blindnet.data.synthetic import write_aligned_dataset
from blindnet.train.experiment import (
    Run,
    class_table,
    find_runs,
    mean_std,
    summarise_experiment,
    summary_tables,
    trend_table,
)

APPS = ("noon", "fog")


def _scored(tmp_path: Path, arm: str, seed: int, noon: float, fog: float, agreement: float, steps=()) -> Run:
    path = tmp_path / f"{arm}_s{seed}"
    path.mkdir()
    (path / "train_log.csv").write_text(f"step,loss,elapsed_s\n10,1.0,{60.0 * seed}\n")
    (path / "eval.csv").write_text("step,target,final,mIoU\n" + "".join(f"{s},aligned:noon,0,{v}\n" for s, v in steps))
    consistency = {"aligned:x/val": {"agreement": agreement, "miou": agreement / 2}}
    scores = {"clean": {"miou": {"aligned:noon": noon, "aligned:fog": fog}, "consistency": consistency}}
    return Run(arm, seed, path, scores)


def test_mean_std_is_the_sample_statistic() -> None:
    assert mean_std([30.0, 32.0, 34.0]) == (32.0, 2.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    m, s = mean_std([])
    assert m != m and s != s  # NaN for no value


def test_summary_means_and_paired_differences_have_the_known_values(tmp_path: Path) -> None:
    base = [_scored(tmp_path, "base", k, n, 10.0, 80.0) for k, n in zip((1, 2, 3), (30.0, 32.0, 34.0))]
    new = [_scored(tmp_path, "new", k, n, 12.0, 90.0 + k) for k, n in zip((1, 2, 3), (31.0, 35.0, 34.0))]
    md, cs = summary_tables(base + new, {"base": "Base", "new": "New"}, "base", unseen=["fog"])["summary"]
    # mean ± sample std over the three seeds
    assert "| Base | 3 | 32.0 ± 2.0 | 10.0 ± 0.0 | 10.0 ± 0.0 | 80.0 ± 0.0 | 40.0 ± 0.0 | 2.0 ± 1.0 |" in md
    assert "| New | 3 | 33.3 ± 2.1 | 12.0 ± 0.0 | 12.0 ± 0.0 | 92.0 ± 1.0 | 46.0 ± 0.5 | 2.0 ± 1.0 |" in md
    # noon differences per seed: +1, +3, 0 -> 1.33 ± 1.53, higher on 2 of 3 seeds; fog: +2 on every seed
    assert "| New − Base | 3 | +1.3 ± 1.5 (2/3) | +2.0 ± 0.0 (3/3) | +2.0 ± 0.0 (3/3) | +12.0 ± 1.0 (3/3) |" in md
    rows = {(r["arm"], r["kind"], r["metric"]): r for r in csv.DictReader(cs.splitlines())}
    assert float(rows[("new", "minus base", "noon")]["mean"]) == pytest.approx(4 / 3, abs=1e-3)
    assert float(rows[("new", "minus base", "noon")]["std"]) == pytest.approx(1.5275, abs=1e-3)
    # a seed the reference lacks is not paired
    extra = _scored(tmp_path, "new", 9, 50.0, 50.0, 50.0)
    md, _ = summary_tables(base + new + [extra], {}, "base", unseen=["fog"])["summary"]
    assert "| new | 4 |" in md and "| new − base | 3 |" in md


def test_class_table_averages_over_targets_and_seeds(tmp_path: Path) -> None:
    runs = []
    for seed, (road, car) in enumerate([(10.0, 30.0), (20.0, 50.0)], start=1):
        run = _scored(tmp_path, "a", seed, 0, 0, 0)
        nan = float("nan")
        run.scores["clean"]["class_iou"] = {
            "aligned:fog": {"road": road, "car": car, "bus": nan},
            "aligned:night": {"road": road + 2, "car": car, "bus": nan},
            "aligned:noon": {"road": 99.0, "car": 99.0, "bus": 99.0},  # not a requested target
        }
        runs.append(run)
    md, cs = class_table(runs, {"a": "A"}, ["fog", "night"])
    assert "| arm | road | car |" in md and "| A | 16.0 | 40.0 |" in md and "bus" not in cs


def test_trend_table_reads_every_evaluated_step(tmp_path: Path) -> None:
    runs = [_scored(tmp_path, "a", k, 0, 0, 0, steps=((500, 20.0 + k), (1000, 30.0 + k))) for k in (1, 2)]
    md, _ = trend_table(runs, {"a": "A"}, ["noon"])
    assert "| arm | step 500 | step 1000 |" in md and "| A | 21.5 ± 0.7 | 31.5 ± 0.7 |" in md


def test_find_runs_keeps_finished_seeded_runs_in_arm_order(tmp_path: Path) -> None:
    for name, finished in (("b_s2", True), ("b_s1", True), ("a_s1", True), ("a_s3", False), ("pilot_l2", True)):
        (tmp_path / name).mkdir()
        if finished:
            (tmp_path / name / "model.safetensors").write_bytes(b"")
    assert [(r.arm, r.seed) for r in find_runs(tmp_path, ["b", "a"])] == [("b", 1), ("b", 2), ("a", 1)]
    assert [(r.arm, r.seed) for r in find_runs(tmp_path)] == [("a", 1), ("b", 1), ("b", 2)]
    assert find_runs(tmp_path / "missing") == []
    # a results folder that kept only the cached scores counts as finished; the first root wins a name clash
    kept = tmp_path / "kept"
    for name in ("a_s3", "b_s1"):
        (kept / name).mkdir(parents=True)
        (kept / name / "experiment_eval.json").write_text("{}")
    runs = find_runs([tmp_path, kept], ["a", "b"])
    assert [(r.arm, r.seed, r.path.parent.name) for r in runs] == [
        ("a", 1, tmp_path.name), ("a", 3, "kept"), ("b", 1, tmp_path.name), ("b", 2, tmp_path.name)
    ]  # fmt: skip


def test_summarise_experiment_scores_real_runs_once(tmp_path: Path, tiny_checkpoint: Path) -> None:
    data = tmp_path / "data"
    write_aligned_dataset(data, 2, seed=3, height=32, width=64, appearances=APPS, split="val", progress=False)
    preset = tmp_path / "preset.yaml"
    targets = "".join(
        f"    - {{dataset: aligned, root: {data}, split: val, options: {{appearance: {a}}}}}\n" for a in APPS
    )
    preset.write_text(f"eval:\n  targets:\n{targets}")
    runs = tmp_path / "runs"
    for name in ("base_s1", "same_s1"):  # the same weights in two arms: every paired difference is exactly 0
        (runs / name).mkdir(parents=True)
        shutil.copyfile(tiny_checkpoint, runs / name / "model.safetensors")
        (runs / name / "train_log.csv").write_text("step,loss,elapsed_s\n1,1.0,120.0\n")
    out = tmp_path / "out"
    paths = summarise_experiment(runs, preset, out, arms={"base": "Base", "same": "Same"}, reference="base")
    md = paths["summary.md"].read_text()
    assert "| Same − Base | 1 | +0.0 ± 0.0 (0/1) | +0.0 ± 0.0 (0/1) |" in md
    protocols = paths["protocols.md"].read_text()
    assert "| Base |" in protocols and "| Same |" in protocols
    run_rows = list(csv.DictReader(paths["runs.csv"].open()))
    assert [r["arm"] for r in run_rows] == ["base", "same"] and run_rows[0]["noon"] == run_rows[1]["noon"]
    assert 0.0 <= float(run_rows[0]["agreement"]) <= 100.0 and float(run_rows[0]["wall min"]) == 2.0
    assert paths["summary.png"].read_bytes()[:4] == b"\x89PNG"
    assert (out / "base_s1" / "experiment_eval.json").is_file() and (out / "same_s1" / "train_log.csv").is_file()
    # scored once: a second summary reuses the cached scores without touching them
    cache = runs / "base_s1" / "experiment_eval.json"
    stamp = cache.stat().st_mtime_ns
    summarise_experiment(runs, preset, out, arms={"base": "Base", "same": "Same"}, reference="base")
    assert cache.stat().st_mtime_ns == stamp
    # un-normalised inputs scored only for the arms asked for
    (runs / "other_s1").mkdir()
    shutil.copyfile(tiny_checkpoint, runs / "other_s1" / "model.safetensors")
    paths = summarise_experiment(runs, preset, out, reference="base", unnormalised_arms=["base"])
    assert set(json.loads((runs / "other_s1" / "experiment_eval.json").read_text())) == {"clean"}
    assert "| other |" not in paths["protocols.md"].read_text() and "| base |" in paths["protocols.md"].read_text()
    with pytest.raises(ValueError, match="reference arm 'nope'"):
        summarise_experiment(runs, preset, out, reference="nope")
    # summarising the copies alone (no weights) works from their cached scores, and needs weights for a new protocol
    again = summarise_experiment(out, preset, tmp_path / "again", reference="base", unnormalised_arms=["base"])
    assert again["summary.md"].read_text() == paths["summary.md"].read_text()
    (out / "gone_s1").mkdir()  # neither weights nor scores: not a finished run
    assert [r.path.name for r in find_runs(out)] == ["base_s1", "other_s1", "same_s1"]
    with pytest.raises(FileNotFoundError, match="other_s1: no model.safetensors to score the 'unnormalised'"):
        summarise_experiment(out, preset, tmp_path / "again", unnormalised_arms=["other", "base", "same"])
    with pytest.raises(FileNotFoundError, match="no finished"):
        summarise_experiment(tmp_path / "empty", preset, out)
