"""Summarise a multi-arm, multi-seed experiment: every run scored once, then mean +/- std and paired differences.

A run folder is named ``<arm>_s<seed>`` (e.g. ``blindnet_s1``) and holds a finished training run
(``model.safetensors``, ``config.yaml``, ``train_log.csv``, ``eval.csv``). Runs of different arms with the same seed are
paired: the same initialisation and the same data order (``--set data.seed=S --set runtime.seed=S``), so an arm's
difference to the reference arm is measured seed by seed, which removes the part of the spread the two runs share.

Per run, the final weights are scored once on the preset's evaluation targets under each protocol (cached in
``<run>/experiment_eval.json``, so adding a seed later scores only the new runs): mIoU per target, per-class IoU, and on
aligned targets the cross-appearance consistency (pixel agreement and pairwise mIoU between the predictions for the
same layout in different appearances). The summary (``summary.md``, ``summary.csv``, ``runs.csv``, ``summary.png``)
and a copy of each run's small files go to ``--out``.

    python -m blindnet.train.experiment --runs runs/evidence --config dg_cpu_shufflenetv2 --reference baseline2 \\
        --arm baseline1="Baseline, one view" baseline2="Baseline, two views" blindnet=BlindNet --out docs/results/x
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import re
import shutil
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blindnet.cliparse import JobParser
from blindnet.config import ConfigError, key_value_pairs
from blindnet.data import build_eval_dataset
from blindnet.io import atomic_write, csv_table, markdown_table, write_text
from blindnet.train.config import load_config
from blindnet.train.data import prepare_data
from blindnet.train.distributed import DistInfo
from blindnet.train.evaluate import evaluate_checkpoints
from blindnet.train.readouts import Choice, choose_recipe, encoder_cka, paired_interval

RUN_NAME = re.compile(r"^(?P<arm>.+)_s(?P<seed>\d+)$")
CACHE_NAME = "experiment_eval.json"
#: Files copied from each run folder into the results folder (small, and together they reproduce every number).
RUN_FILES = ("config.yaml", "train_log.csv", "eval.csv", CACHE_NAME)
PROTOCOLS = ("clean", "unnormalised")


@dataclass
class Run:
    """One finished run: its arm, its seed and what scoring it gave (``{protocol: {...}}``, see :func:`score_run`)."""

    arm: str
    seed: int
    path: Path
    scores: dict[str, Any] = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        """Training wall time from the last row of ``train_log.csv`` (NaN when absent)."""
        rows = (
            list(csv.DictReader((self.path / "train_log.csv").open())) if (self.path / "train_log.csv").exists() else []
        )
        return float(rows[-1]["elapsed_s"]) if rows else float("nan")

    def trend(self, targets: Sequence[str]) -> dict[int, float]:
        """Mean mIoU over ``targets`` (short names: ``noon``) at every evaluated step of the run (``eval.csv``)."""
        path = self.path / "eval.csv"
        by_step: dict[int, list[float]] = {}
        for row in csv.DictReader(path.open()) if path.exists() else []:
            if _short(row["target"]) in targets:
                by_step.setdefault(int(row["step"]), []).append(float(row["mIoU"]))
        return {k: sum(v) / len(v) for k, v in sorted(by_step.items()) if len(v) == len(targets)}


def find_runs(roots: str | Path | Sequence[str | Path], arms: Sequence[str] | None = None) -> list[Run]:
    """The finished ``<arm>_s<seed>`` run folders under ``roots`` (one folder or several), sorted by arm order
    (``arms``, else by name) and seed. Finished = it has ``model.safetensors``, or scores cached by an earlier summary
    (a results folder that kept only the small files). A run name found under several roots is taken from the first.
    Folders of other arms, and unfinished runs, are left out."""
    found: dict[str, Run] = {}
    for root in [roots] if isinstance(roots, (str, Path)) else roots:
        for path in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
            m = RUN_NAME.match(path.name)
            if not m or not path.is_dir() or path.name in found or (arms is not None and m["arm"] not in arms):
                continue
            if (path / "model.safetensors").is_file() or (path / CACHE_NAME).is_file():
                found[path.name] = Run(m["arm"], int(m["seed"]), path)
    order = {a: i for i, a in enumerate(arms or sorted({r.arm for r in found.values()}))}
    return sorted(found.values(), key=lambda r: (order[r.arm], r.seed))


def _cached(run: Run) -> dict[str, Any]:
    cache = run.path / CACHE_NAME
    run.scores = json.loads(cache.read_text()) if cache.exists() else {}
    return run.scores


def _weights(run: Run, what: str) -> Path:
    if not (run.path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{run.path}: no model.safetensors to score {what} with")
    return run.path / "model.safetensors"


def score_run(run: Run, config: str | Path, protocols: Sequence[str] = PROTOCOLS, device: str = "cpu") -> dict:
    """Score the run's final weights on ``config``'s evaluation targets under each protocol, reusing the cached
    scores in ``<run>/experiment_eval.json`` for protocols already done. Returns and stores
    ``{protocol: {"miou": {target: %}, "class_iou": {target: {class: %}}, "consistency": {group: {...}}}}``."""
    scores = _cached(run)
    targets = load_config(config).eval.targets
    for protocol in protocols:
        if protocol in scores:
            continue
        weights = _weights(run, f"the {protocol!r} protocol")
        datasets = {
            s.label: build_eval_dataset(s.dataset, s.root, s.split, protocol=protocol, **s.options) for s in targets
        }
        consistency: dict = {}
        result = evaluate_checkpoints(
            {run.path.name: weights}, datasets, device=device, progress=False, consistency=consistency
        )[run.path.name]
        groups = consistency.get(run.path.name, {})
        scores[protocol] = {
            "miou": {t: round(s.miou * 100, 3) for t, s in result.items()},
            "class_iou": {t: {n: round(v * 100, 3) for n, v in zip(s.class_names, s.iou)} for t, s in result.items()},
            "consistency": {
                g: {
                    "agreement": round(c.mean_off_diagonal("agreement") * 100, 3),
                    "miou": round(c.mean_off_diagonal("miou") * 100, 3),
                    "correct": round(c.mean_off_diagonal("correct") * 100, 3),
                    "appearances": c.appearances,
                    "agreement_matrix": [[round(v * 100, 2) for v in row] for row in c.agreement],
                }
                for g, c in groups.items()
            },
        }
        write_text(run.path / CACHE_NAME, json.dumps(scores, indent=1))
    return scores


def score_selection(run: Run, config: str | Path, device: str = "cpu") -> dict:
    """mIoU of the run's final weights on the selection preset ``config``'s targets (clean inputs), cached under
    ``"select"`` next to the reported scores and never mixed into them."""
    scores = _cached(run)
    if "select" not in scores:
        targets = load_config(config).eval.targets
        datasets = {s.label: build_eval_dataset(s.dataset, s.root, s.split, **s.options) for s in targets}
        result = evaluate_checkpoints({"run": _weights(run, "the selection split")}, datasets, device=device,
                                      progress=False)["run"]  # fmt: skip
        scores["select"] = {"miou": {t: round(s.miou * 100, 3) for t, s in result.items()}}
        write_text(run.path / CACHE_NAME, json.dumps(scores, indent=1))
    return scores


def score_cka(run: Run, config: str | Path, reference: str, device: str = "cpu") -> dict:
    """Encoder CKA against ``reference`` on ``config``'s aligned targets (:func:`encoder_cka`), cached as ``"cka"``."""
    scores = _cached(run)
    if scores.get("cka_reference") != reference:
        scores["cka"] = encoder_cka(_weights(run, "encoder CKA"), config, reference, device=device)
        scores["cka_reference"] = reference
        write_text(run.path / CACHE_NAME, json.dumps(scores, indent=1))
    return scores


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value; NaN for none)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def _pm(values: Sequence[float], digits: int = 1) -> str:
    m, s = mean_std(values)
    return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _short(target: str) -> str:
    return target.split(":", 1)[-1]


def _group_means(miou: Mapping[str, float], groups: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """``{group: mean mIoU over its targets (short names)}``; NaN for a group none of whose targets was scored."""
    short = {_short(t): v for t, v in miou.items()}
    out = {}
    for name, members in groups.items():
        vals = [short[m] for m in members if m in short]
        out[name] = sum(vals) / len(vals) if vals else float("nan")
    return out


def run_metrics(
    run: Run, protocol: str, unseen: Sequence[str], groups: Mapping[str, Sequence[str]] | None = None
) -> dict[str, float]:
    """Flat metrics of one scored run: mIoU per target (short names), ``unseen mean``, the mean of each of
    ``groups`` (name -> targets), consistency means (agreement, agreement on correctly labelled pixels, pairwise
    mIoU) and wall time."""
    s = run.scores[protocol]
    out = {_short(t): v for t, v in s["miou"].items()}
    out.update(_group_means(s["miou"], {"unseen mean": unseen, **(groups or {})}))
    consistency = list(s["consistency"].values())
    out["agreement"] = consistency[0]["agreement"] if consistency else float("nan")
    out["correct agreement"] = consistency[0].get("correct", float("nan")) if consistency else float("nan")
    out["pairwise mIoU"] = consistency[0]["miou"] if consistency else float("nan")
    out["wall min"] = run.wall_s / 60.0
    return out


def _measured(metrics: Iterable[Mapping[str, float]]) -> list[str]:
    """The metric names (in :func:`run_metrics` order) that at least one run has: a measure no run has (e.g.
    correct-pixel agreement in scores cached before it existed) gets no column."""
    rows = list(metrics)
    return [k for k in rows[0] if any(not math.isnan(m[k]) for m in rows)]


def summary_tables(
    runs: Sequence[Run],
    labels: Mapping[str, str],
    reference: str,
    unseen: Sequence[str],
    protocol: str = "clean",
    groups: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, tuple[str, str]]:
    """``{"summary": (markdown, csv), "runs": (markdown, csv)}``: arms x metrics (see :func:`run_metrics`) as
    mean ± std over seeds, paired differences to ``reference`` (same seed), and one row per run."""
    metrics = {id(r): run_metrics(r, protocol, unseen, groups) for r in runs}
    keys = _measured(metrics.values())
    arms = list(dict.fromkeys(r.arm for r in runs))
    by_arm = {a: [r for r in runs if r.arm == a] for a in arms}
    header = ["arm", "seeds", *keys]
    md_rows, csv_rows = [], []
    for a in arms:
        vals = {k: [metrics[id(r)][k] for r in by_arm[a]] for k in keys}
        md_rows.append([labels.get(a, a), str(len(by_arm[a])), *[_pm(vals[k]) for k in keys]])
        for k in keys:
            m, s = mean_std(vals[k])
            csv_rows.append([a, "value", k, f"{m:.3f}", f"{s:.3f}", str(len(vals[k]))])
    diff_rows = []
    ref = {r.seed: metrics[id(r)] for r in by_arm.get(reference, [])}
    for a in arms:
        if a == reference:
            continue
        paired = [(metrics[id(r)], ref[r.seed]) for r in by_arm[a] if r.seed in ref]
        if not paired:
            continue
        cells = []
        for k in [k for k in keys if k != "wall min"]:  # wall time is not a result to difference
            d = [x[k] - y[k] for x, y in paired]
            m, s = mean_std(d)
            wins = sum(v > 0 for v in d)
            cells.append("n/a" if math.isnan(m) else f"{m:+.1f} ± {s:.1f} ({wins}/{len(d)})")
            csv_rows.append([a, f"minus {reference}", k, f"{m:.3f}", f"{s:.3f}", str(len(d))])
        diff_rows.append([f"{labels.get(a, a)} − {labels.get(reference, reference)}", str(len(paired)), *cells])
    md = markdown_table(header, md_rows)
    if diff_rows:
        md += "\nPaired differences (same seed), mean ± std over seeds (seeds where the arm is higher):\n\n"
        md += markdown_table([h for h in header if h != "wall min"], diff_rows)
    run_header = ["arm", "seed", *keys]
    run_rows = [[r.arm, str(r.seed), *[f"{metrics[id(r)][k]:.2f}" for k in keys]] for r in runs]
    return {
        "summary": (md, csv_table(["arm", "kind", "metric", "mean", "std", "n"], csv_rows)),
        "runs": (markdown_table(run_header, run_rows), csv_table(run_header, run_rows)),
    }


def protocol_table(runs: Sequence[Run], labels: Mapping[str, str], unseen: Sequence[str]) -> tuple[str, str]:
    """Per arm: mean mIoU (all targets) and unseen mean under ``clean`` and ``unnormalised`` inputs, and the drop."""
    arms = list(dict.fromkeys(r.arm for r in runs))
    header = ["arm", "clean mean", "unnormalised mean", "change", "clean unseen", "unnormalised unseen", "change"]
    rows = []
    for a in arms:
        rs = [r for r in runs if r.arm == a and "unnormalised" in r.scores]
        if not rs:
            continue
        cells = []
        for which in ("all", "unseen"):
            per = {p: [_mean_of(r, p, unseen if which == "unseen" else None) for r in rs] for p in PROTOCOLS}
            d = [u - c for c, u in zip(per["clean"], per["unnormalised"])]
            cells += [_pm(per["clean"]), _pm(per["unnormalised"]), _pm(d)]
        rows.append([labels.get(a, a), *cells])
    return markdown_table(header, rows), csv_table(["arm", *header[1:]], rows)


def paired_table(
    runs: Sequence[Run],
    labels: Mapping[str, str],
    pairs: Sequence[tuple[str, str]],
    unseen: Sequence[str],
    groups: Mapping[str, Sequence[str]] | None = None,
    protocol: str = "clean",
) -> tuple[str, str]:
    """For each pair ``(a, b)``: the seed-by-seed difference ``a - b`` of every metric, mean with a 95% Student-t
    interval, the paired t-test's p-value and the seeds where ``a`` is higher (see :func:`paired_interval`)."""
    metrics = {(r.arm, r.seed): run_metrics(r, protocol, unseen, groups) for r in runs}
    keys = [k for k in _measured(metrics.values()) if k != "wall min"]
    md_rows, csv_rows = [], []
    for a, b in pairs:
        seeds = sorted({s for arm, s in metrics if arm == a} & {s for arm, s in metrics if arm == b})
        if not seeds:
            continue
        cells = []
        for k in keys:
            iv = paired_interval([metrics[(a, s)][k] - metrics[(b, s)][k] for s in seeds])
            cells.append(iv.cell())
            csv_rows.append([a, b, k, str(iv.n), *(f"{v:.3f}" for v in (iv.mean, iv.low, iv.high, iv.p)), str(iv.wins)])
        md_rows.append([f"{labels.get(a, a)} − {labels.get(b, b)}", str(len(seeds)), *cells])
    md = markdown_table(["difference", "seeds", *keys], md_rows)
    return md, csv_table(["a", "b", "metric", "n", "mean", "ci95 low", "ci95 high", "p", "a higher"], csv_rows)


def selection_table(
    runs: Sequence[Run], labels: Mapping[str, str], order: Sequence[str], groups: Mapping[str, Sequence[str]]
) -> tuple[str, str, Choice]:
    """The shipped-recipe rule on the selection scores (``scores["select"]``): per arm the group means and the
    selection score (mean of the group means) as mean ± std over seeds, and the :class:`Choice`."""
    per_run = {id(r): _group_means(r.scores["select"]["miou"], groups) for r in runs if "select" in r.scores}
    score = {i: sum(g.values()) / len(g) for i, g in per_run.items()}
    header = ["arm", "seeds", *groups, "selection score"]
    rows = []
    for a in order:
        rs = [r for r in runs if r.arm == a and id(r) in per_run]
        if rs:
            rows.append([labels.get(a, a), str(len(rs)), *[_pm([per_run[id(r)][g] for r in rs]) for g in groups],
                         _pm([score[id(r)] for r in rs])])  # fmt: skip
    choice = choose_recipe({a: {r.seed: score[id(r)] for r in runs if r.arm == a and id(r) in score} for a in order},
                           order)  # fmt: skip
    md = markdown_table(header, rows)
    verdict = labels.get(choice.arm, choice.arm) if choice.arm else "none yet"
    md += f"\nRule applied: **{verdict}** ({choice.reason}).\n"
    return md, csv_table(header, rows), choice


def cka_table(runs: Sequence[Run], labels: Mapping[str, str], groups: Mapping[str, Sequence[str]]) -> tuple[str, str]:
    """Encoder invariance (``scores["cka"]``, see :func:`encoder_cka`): per arm, level and group of appearances, the
    linear CKA against the reference appearance, averaged over the group and then mean ± std over seeds."""
    scored = [r for r in runs if "cka" in r.scores]
    levels = list(dict.fromkeys(lv for r in scored for lv in r.scores["cka"]))
    cols = [(lv, g) for lv in levels for g in groups]
    rows = []
    for a in dict.fromkeys(r.arm for r in scored):
        rs = [r for r in scored if r.arm == a]
        # three decimals: CKA lives in [0, 1] and arms differ in the second decimal
        cells = [_pm([_group_means(r.scores["cka"][lv], {g: groups[g]})[g] for r in rs], 3) for lv, g in cols]
        rows.append([labels.get(a, a), str(len(rs)), *cells])
    header = ["arm", "seeds", *[f"{lv} {g}" for lv, g in cols]]
    return markdown_table(header, rows), csv_table(header, rows)


def _mean_of(run: Run, protocol: str, only: Sequence[str] | None) -> float:
    vals = [v for t, v in run.scores[protocol]["miou"].items() if only is None or _short(t) in only]
    return sum(vals) / len(vals)


def trend_table(runs: Sequence[Run], labels: Mapping[str, str], in_domain: Sequence[str]) -> tuple[str, str]:
    """In-domain mIoU (mean over the ``in_domain`` targets, short names) at each evaluated step, mean ± std per arm:
    has it stopped rising by the last step?"""
    arms = list(dict.fromkeys(r.arm for r in runs))
    trends = {id(r): r.trend(in_domain) for r in runs}
    steps = sorted({s for t in trends.values() for s in t})
    header = ["arm", *[f"step {s}" for s in steps]]
    rows = [
        [labels.get(a, a), *[_pm([trends[id(r)].get(s, math.nan) for r in runs if r.arm == a]) for s in steps]]
        for a in arms
    ]
    return markdown_table(header, rows), csv_table(header, rows)


def class_table(runs: Sequence[Run], labels: Mapping[str, str], targets: Sequence[str]) -> tuple[str, str]:
    """Per-class IoU (clean inputs) averaged over ``targets`` (short names) and seeds: arms x classes. Classes no run
    ever predicted or saw there (NaN everywhere) are left out. Says which classes an arm wins or loses on."""
    arms = list(dict.fromkeys(r.arm for r in runs))
    per_arm: dict[str, dict[str, list[float]]] = {a: {} for a in arms}
    for r in runs:
        for t, per_class in r.scores["clean"].get("class_iou", {}).items():
            if _short(t) in targets:
                for name, v in per_class.items():
                    per_arm[r.arm].setdefault(name, []).append(v)
    classes = [c for c in dict.fromkeys(n for a in arms for n in per_arm[a]) if any(
        not math.isnan(mean_std(per_arm[a].get(c, []))[0]) for a in arms)]  # fmt: skip
    header = ["arm", *classes]
    rows = [[labels.get(a, a), *[f"{mean_std(per_arm[a].get(c, []))[0]:.1f}" for c in classes]] for a in arms]
    return markdown_table(header, rows), csv_table(header, rows)


def plot_summary(runs: Sequence[Run], labels: Mapping[str, str], path: str | Path, protocol: str = "clean") -> Path:
    """Grouped bars: mIoU per appearance and the cross-appearance pixel agreement, one bar per arm (mean over seeds,
    whiskers = std, dots = seeds)."""
    import matplotlib  # imported lazily because only the report needs it (the ``train`` extra has it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r.arm for r in runs))
    metrics = {id(r): run_metrics(r, protocol, ()) for r in runs}
    keys = [k for k in metrics[id(runs[0])] if k not in ("unseen mean", "pairwise mIoU", "wall min")]
    fig, ax = plt.subplots(figsize=(1.6 * len(keys) + 2, 4.2))
    width = 0.8 / len(arms)
    for i, a in enumerate(arms):
        vals = [[metrics[id(r)][k] for r in runs if r.arm == a] for k in keys]
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(keys))]
        ax.bar(xs, [mean_std(v)[0] for v in vals], width, yerr=[mean_std(v)[1] for v in vals], capsize=2,
               label=labels.get(a, a))  # fmt: skip
        for x, v in zip(xs, vals):
            ax.scatter([x] * len(v), v, s=6, color="black", zorder=3)
    ax.set_xticks(range(len(keys)), [k if k != "agreement" else "consistency\n(agreement)" for k in keys])
    ax.set_ylabel("percent")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def summarise_experiment(
    runs_root: str | Path | Sequence[str | Path],
    config: str | Path,
    out: str | Path,
    *,
    arms: Mapping[str, str] | None = None,
    reference: str = "",
    in_domain: Sequence[str] = ("noon", "sunset"),
    unseen: Sequence[str] = ("night", "fog", "rain"),
    unnormalised_arms: Sequence[str] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    pairs: Sequence[tuple[str, str]] = (),
    select_config: str | Path | None = None,
    cka_reference: str = "",
    device: str = "cpu",
) -> dict[str, Path]:
    """Score every finished run under ``runs_root`` (one folder or several, see :func:`find_runs`; cached) and write
    the tables, the plot and each run's small files into ``out`` (runs already in ``out`` are not copied onto
    themselves). ``arms``: arm -> label, in table order and, for the selection rule, from the simplest recipe up
    (default: every arm found, by name). ``unnormalised_arms``: the arms also scored on un-normalised inputs
    (default: all; scoring costs a pass over every target). ``groups``: named sets of targets whose mean mIoU gets a
    column (and, with ``select_config``, make up the selection score). ``pairs``: ``(a, b)`` arms whose paired
    differences get intervals (``pairs.md``). ``select_config``: the selection preset; its scores feed the
    shipped-recipe rule (``selection.md``) and nothing else. ``cka_reference``: the appearance encoder CKA is measured
    against (``cka.md``; off when empty). Returns the paths."""
    labels = dict(arms or {})
    runs = find_runs(runs_root, list(labels) or None)
    if not runs:
        raise FileNotFoundError(f"no finished <arm>_s<seed> runs (weights or cached scores) under {runs_root}")
    found = {r.arm for r in runs}
    if reference and reference not in found:
        raise ValueError(f"reference arm {reference!r} has no finished run under {runs_root}")
    for arm in (a for pair in pairs for a in pair if a not in found):
        raise ValueError(f"arm {arm!r} of --pair has no finished run under {runs_root}")
    for preset in [config] + ([select_config] if select_config else []):  # synthetic splits render if missing
        prepare_data(load_config(preset), DistInfo())
    for run in runs:
        extra = unnormalised_arms is None or run.arm in unnormalised_arms
        score_run(run, config, PROTOCOLS if extra else ("clean",), device)
        if select_config:
            score_selection(run, select_config, device)
        if cka_reference:
            score_cka(run, config, cka_reference, device)
    out = Path(out)
    tables = _tables(runs, labels, reference, in_domain, unseen, groups or {}, pairs)
    if select_config:
        md, cs, _ = selection_table(runs, labels, list(labels or dict.fromkeys(r.arm for r in runs)), groups or {})
        tables["selection"] = (md, cs)
    if cka_reference:
        tables["cka"] = cka_table(runs, labels, groups or {"all": [a for a in unseen if a != cka_reference]})
    paths = {}
    for stem, (md, cs) in tables.items():
        paths[f"{stem}.md"] = write_text(out / f"{stem}.md", md)
        paths[f"{stem}.csv"] = write_text(out / f"{stem}.csv", cs)
    paths["summary.png"] = plot_summary(runs, labels, out / "summary.png")
    _copy_run_files(runs, out)
    return paths


def _tables(
    runs: Sequence[Run],
    labels: Mapping[str, str],
    reference: str,
    in_domain: Sequence[str],
    unseen: Sequence[str],
    groups: Mapping[str, Sequence[str]],
    pairs: Sequence[tuple[str, str]],
) -> dict[str, tuple[str, str]]:
    tables = summary_tables(runs, labels, reference, unseen, groups=groups)
    tables["trend"] = trend_table(runs, labels, in_domain)
    tables["classes_unseen"] = class_table(runs, labels, unseen)
    tables["classes_in_domain"] = class_table(runs, labels, in_domain)
    if any("unnormalised" in r.scores for r in runs):
        tables["protocols"] = protocol_table(runs, labels, unseen)
    if pairs:
        tables["pairs"] = paired_table(runs, labels, pairs, unseen, groups)
    return tables


def _copy_run_files(runs: Sequence[Run], out: Path) -> None:
    for run in runs:
        if run.path.resolve() == (out / run.path.name).resolve():
            continue
        for name in RUN_FILES:
            if (run.path / name).exists():
                src = run.path / name
                atomic_write(out / run.path.name / name, functools.partial(shutil.copyfile, src))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = JobParser(
        prog="python -m blindnet.train.experiment",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[-1],
    )
    p.add_argument("--runs", nargs="+", required=True, help="folder(s) holding <arm>_s<seed> run folders")
    p.add_argument("--config", required=True, help="preset whose eval.targets every run is scored on")
    p.add_argument("--out", required=True, help="folder for the tables, the plot and the runs' small files")
    p.add_argument("--arm", nargs="*", default=[], metavar="ARM=LABEL", help="arms in table order, with labels")
    p.add_argument("--reference", default="", help="arm the paired differences are taken against")
    p.add_argument("--in-domain", nargs="+", default=["noon", "sunset"], help="appearances seen in training")
    p.add_argument("--unseen", nargs="+", default=["night", "fog", "rain"], help="appearances never seen in training")
    p.add_argument(
        "--unnormalised-arms", nargs="*", default=None, help="arms also scored on un-normalised inputs (default: all)"
    )
    p.add_argument(
        "--group",
        nargs="*",
        default=[],
        metavar="NAME=T1,T2",
        help="named sets of targets (short names) whose mean mIoU gets a column, e.g. lighting=night,fog,rain",
    )
    p.add_argument(
        "--pair",
        nargs="*",
        default=[],
        metavar="A:B",
        help="arm pairs whose paired differences A - B get 95%% intervals and p-values (pairs.md)",
    )
    p.add_argument("--select-config", default="", help="selection preset: its scores feed the shipped-recipe rule")
    p.add_argument(
        "--cka",
        default="",
        metavar="APPEARANCE",
        help="measure encoder CKA (layer3, layer4) of every appearance against this one (cka.md)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads for scoring (0: PyTorch's default; 1 beside training runs)"
    )
    return p.parse_args(argv)


def _pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition(":")
    if not (sep and a and b) or ":" in b:
        raise ConfigError(f"--pair {text!r}: expected A:B (two arm names)")
    return a, b


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """CLI entry: parse and call :func:`summarise_experiment`; prints the summary table."""
    args = _parse(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        arms = key_value_pairs(args.arm, "--arm", form="ARM=LABEL", value_optional=True)
        groups = {k: v.split(",") for k, v in key_value_pairs(args.group, "--group", form="NAME=T1,T2").items()}
        pairs = [_pair(text) for text in args.pair]
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from exc
    try:
        paths = summarise_experiment(
            args.runs, args.config, args.out, arms=arms, reference=args.reference, in_domain=args.in_domain,
            unseen=args.unseen, unnormalised_arms=args.unnormalised_arms, groups=groups, pairs=pairs,
            select_config=args.select_config or None, cka_reference=args.cka, device=args.device,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, ConfigError) as exc:  # a wrong arm, folder or preset: one line, exit 1
        raise SystemExit(f"error: {exc}") from exc
    print(paths["summary.md"].read_text())
    return paths


if __name__ == "__main__":
    main()
