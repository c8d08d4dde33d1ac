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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blindnet.cliparse import JobParser
from blindnet.config import ConfigError, key_value_pairs
from blindnet.data import build_eval_dataset
from blindnet.io import atomic_write, write_text
from blindnet.train.config import load_config
from blindnet.train.evaluate import csv_table, evaluate_checkpoints, markdown_table

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


def score_run(run: Run, config: str | Path, protocols: Sequence[str] = PROTOCOLS, device: str = "cpu") -> dict:
    """Score the run's final weights on ``config``'s evaluation targets under each protocol, reusing the cached
    scores in ``<run>/experiment_eval.json`` for protocols already done. Returns and stores
    ``{protocol: {"miou": {target: %}, "class_iou": {target: {class: %}}, "consistency": {group: {...}}}}``."""
    cache = run.path / CACHE_NAME
    scores: dict[str, Any] = json.loads(cache.read_text()) if cache.exists() else {}
    targets = load_config(config).eval.targets
    for protocol in protocols:
        if protocol in scores:
            continue
        if not (run.path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{run.path}: no model.safetensors to score the {protocol!r} protocol with")
        datasets = {
            s.label: build_eval_dataset(s.dataset, s.root, s.split, protocol=protocol, **s.options) for s in targets
        }
        consistency: dict = {}
        result = evaluate_checkpoints(
            {run.path.name: run.path / "model.safetensors"}, datasets, device=device, progress=False,
            consistency=consistency,
        )[run.path.name]  # fmt: skip
        groups = consistency.get(run.path.name, {})
        scores[protocol] = {
            "miou": {t: round(s.miou * 100, 3) for t, s in result.items()},
            "class_iou": {t: {n: round(v * 100, 3) for n, v in zip(s.class_names, s.iou)} for t, s in result.items()},
            "consistency": {
                g: {
                    "agreement": round(c.mean_off_diagonal("agreement") * 100, 3),
                    "miou": round(c.mean_off_diagonal("miou") * 100, 3),
                    "appearances": c.appearances,
                    "agreement_matrix": [[round(v * 100, 2) for v in row] for row in c.agreement],
                }
                for g, c in groups.items()
            },
        }
        write_text(cache, json.dumps(scores, indent=1))
    run.scores = scores
    return scores


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value; NaN for none)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def _pm(values: Sequence[float]) -> str:
    m, s = mean_std(values)
    return "n/a" if math.isnan(m) else f"{m:.1f} ± {s:.1f}"


def _short(target: str) -> str:
    return target.split(":", 1)[-1]


def run_metrics(run: Run, protocol: str, unseen: Sequence[str]) -> dict[str, float]:
    """Flat metrics of one scored run: mIoU per target (short names), ``unseen mean``, consistency means, wall time."""
    s = run.scores[protocol]
    out = {_short(t): v for t, v in s["miou"].items()}
    hidden = [out[u] for u in unseen if u in out]
    out["unseen mean"] = sum(hidden) / len(hidden) if hidden else float("nan")
    groups = list(s["consistency"].values())
    out["agreement"] = groups[0]["agreement"] if groups else float("nan")
    out["pairwise mIoU"] = groups[0]["miou"] if groups else float("nan")
    out["wall min"] = run.wall_s / 60.0
    return out


def summary_tables(
    runs: Sequence[Run], labels: Mapping[str, str], reference: str, unseen: Sequence[str], protocol: str = "clean"
) -> dict[str, tuple[str, str]]:
    """``{"summary": (markdown, csv), "runs": (markdown, csv)}``: arms x metrics as mean ± std over seeds, paired
    differences to ``reference`` (same seed), and one row per run."""
    metrics = {id(r): run_metrics(r, protocol, unseen) for r in runs}
    keys = list(next(iter(metrics.values())))
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
        for k in keys[:-1]:  # wall time is not a result to difference
            d = [x[k] - y[k] for x, y in paired]
            m, s = mean_std(d)
            wins = sum(v > 0 for v in d)
            cells.append("n/a" if math.isnan(m) else f"{m:+.1f} ± {s:.1f} ({wins}/{len(d)})")
            csv_rows.append([a, f"minus {reference}", k, f"{m:.3f}", f"{s:.3f}", str(len(d))])
        diff_rows.append([f"{labels.get(a, a)} − {labels.get(reference, reference)}", str(len(paired)), *cells])
    md = markdown_table(header, md_rows)
    if diff_rows:
        md += "\nPaired differences (same seed), mean ± std over seeds (seeds where the arm is higher):\n\n"
        md += markdown_table(header[:-1], diff_rows)
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
    device: str = "cpu",
) -> dict[str, Path]:
    """Score every finished run under ``runs_root`` (one folder or several, see :func:`find_runs`; cached) and write
    the tables, the plot and each run's small files into ``out`` (runs already in ``out`` are not copied onto
    themselves). ``arms``: arm -> label, in table order (default: every arm found, by name). ``unnormalised_arms``: the
    arms also scored on un-normalised inputs (default: all; scoring costs a pass over every target). Returns the
    paths."""
    labels = dict(arms or {})
    runs = find_runs(runs_root, list(labels) or None)
    if not runs:
        raise FileNotFoundError(f"no finished <arm>_s<seed> runs (weights or cached scores) under {runs_root}")
    if reference and reference not in {r.arm for r in runs}:
        raise ValueError(f"reference arm {reference!r} has no finished run under {runs_root}")
    for run in runs:
        extra = unnormalised_arms is None or run.arm in unnormalised_arms
        score_run(run, config, PROTOCOLS if extra else ("clean",), device)
    out = Path(out)
    tables = summary_tables(runs, labels, reference, unseen)
    tables["trend"] = trend_table(runs, labels, in_domain)
    tables["classes_unseen"] = class_table(runs, labels, unseen)
    tables["classes_in_domain"] = class_table(runs, labels, in_domain)
    if any("unnormalised" in r.scores for r in runs):
        tables["protocols"] = protocol_table(runs, labels, unseen)
    paths = {}
    for stem, (md, cs) in tables.items():
        paths[f"{stem}.md"] = write_text(out / f"{stem}.md", md)
        paths[f"{stem}.csv"] = write_text(out / f"{stem}.csv", cs)
    paths["summary.png"] = plot_summary(runs, labels, out / "summary.png")
    for run in runs:
        if run.path.resolve() == (out / run.path.name).resolve():
            continue
        for name in RUN_FILES:
            if (run.path / name).exists():
                src = run.path / name
                atomic_write(out / run.path.name / name, functools.partial(shutil.copyfile, src))
    return paths


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
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads for scoring (0: PyTorch's default; 1 beside training runs)"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """CLI entry: parse and call :func:`summarise_experiment`; prints the summary table."""
    args = _parse(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        arms = key_value_pairs(args.arm, "--arm", form="ARM=LABEL", value_optional=True)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from exc
    paths = summarise_experiment(
        args.runs, args.config, args.out, arms=arms, reference=args.reference, in_domain=args.in_domain,
        unseen=args.unseen, unnormalised_arms=args.unnormalised_arms, device=args.device,
    )  # fmt: skip
    print(paths["summary.md"].read_text())
    return paths


if __name__ == "__main__":
    main()
