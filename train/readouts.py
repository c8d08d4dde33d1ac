"""Readouts of a multi-arm experiment beyond mean ± std: paired intervals, encoder invariance, the selection rule.

- :func:`paired_interval`: mean of seed-by-seed differences with a two-sided Student-t confidence interval and the
  paired t-test's p-value (what two arms differ by, and whether the seeds can tell).
- :func:`encoder_cka`: linear CKA between the encoder features a network gives two appearances of the same layouts
  (inference only): 1 when the encoder maps them to the same features up to rotation and scale.
- :func:`choose_recipe`: the shipped-recipe rule of ``docs/results/styles/shipped_default_rule.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from blindnet.checkpoint import load_model
from blindnet.data import build_eval_dataset
from blindnet.metrics import linear_cka
from blindnet.models import DeepLabV3Plus
from blindnet.train.config import DatasetSpec, load_config

#: Encoder levels whose invariance :func:`encoder_cka` measures (names of :class:`SegFeatures` fields).
CKA_LEVELS = ("layer3", "layer4")


@dataclass(frozen=True)
class PairedInterval:
    """Seed-by-seed differences ``a - b``: their mean, a two-sided ``level`` Student-t interval and the paired t-test's
    p-value (NaN intervals and p for fewer than two pairs; an interval of zero width and p = 0 or 1 when every
    difference is the same)."""

    n: int
    mean: float
    low: float
    high: float
    p: float
    wins: int

    def cell(self) -> str:
        """``+1.2 [-0.3, +2.7] p=0.09 (2/3)`` for a table."""
        if self.n == 0:
            return "n/a"
        ci = "" if math.isnan(self.low) else f" [{self.low:+.1f}, {self.high:+.1f}]"
        p = "" if math.isnan(self.p) else f" p={self.p:.2f}"
        return f"{self.mean:+.1f}{ci}{p} ({self.wins}/{self.n})"


def paired_interval(diffs: Sequence[float], level: float = 0.95) -> PairedInterval:
    """Summarise paired differences (NaNs dropped). Student t with ``n - 1`` degrees of freedom, as a paired t-test
    assumes: the seed-to-seed spread of a difference is estimated from the same few seeds."""
    from scipy import stats  # imported here: only this summary needs scipy (the ``train`` extra has it)

    d = [float(v) for v in diffs if not math.isnan(v)]
    n = len(d)
    wins = sum(v > 0 for v in d)
    if n == 0:
        return PairedInterval(0, math.nan, math.nan, math.nan, math.nan, 0)
    mean = sum(d) / n
    if n == 1:
        return PairedInterval(1, mean, math.nan, math.nan, math.nan, wins)
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    if sd == 0.0:
        return PairedInterval(n, mean, mean, mean, 1.0 if mean == 0.0 else 0.0, wins)
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    p = float(2 * stats.t.sf(abs(mean / se), n - 1))
    return PairedInterval(n, mean, mean - half, mean + half, p, wins)


def _targets_by_appearance(config: str | Path) -> dict[str, DatasetSpec]:
    """``{appearance: DatasetSpec}`` of the preset's single-appearance aligned evaluation targets."""
    out: dict[str, DatasetSpec] = {}
    for spec in load_config(config).eval.targets:
        app = spec.options.get("appearance")
        if spec.dataset == "aligned" and isinstance(app, str):
            out[app] = spec
    return out


@torch.no_grad()
def _features(model: DeepLabV3Plus, spec: DatasetSpec, levels: Sequence[str], device: torch.device) -> dict[str, dict]:
    """``{level: {layout name: C x h x w float32 CPU tensor}}`` for every image of one target."""
    ds = build_eval_dataset(spec.dataset, spec.root, spec.split, **spec.options)
    out: dict[str, dict] = {lv: {} for lv in levels}
    for i in range(len(ds)):
        item = ds[i]
        feats = model.forward_features(item["image"].unsqueeze(0).to(device))
        for lv in levels:
            out[lv][str(item["name"])] = getattr(feats, lv)[0].float().cpu()
    return out


def encoder_cka(
    checkpoint: str | Path,
    config: str | Path,
    reference: str = "noon",
    *,
    levels: Sequence[str] = CKA_LEVELS,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """Linear CKA of each encoder level between ``reference`` and every other appearance of ``config``'s aligned
    evaluation targets: ``{level: {appearance: cka}}``.

    The samples are the feature-map cells of all layouts (layout by layout, cell by cell, so cell k of layout l in
    one appearance is paired with the same cell in the other), the features their channels. Pooling the layouts
    matters: one 256x512 layout gives 16x32 = 512 cells at stride 16, fewer than the encoder's 1024 channels, and
    two independent random 1024-channel features of 512 samples already score 0.66 (0.04 with 25,600 samples, the
    size of 50 layouts).
    """
    by_app = _targets_by_appearance(config)
    if reference not in by_app:
        raise ValueError(f"{config}: no aligned evaluation target in appearance {reference!r} (have {sorted(by_app)})")
    dev = torch.device(device)
    model = load_model(checkpoint, device=dev)
    ref = _features(model, by_app[reference], levels, dev)
    names = sorted(ref[levels[0]])
    result: dict[str, dict[str, float]] = {lv: {} for lv in levels}
    for app, spec in by_app.items():
        if app == reference:
            continue
        other = _features(model, spec, levels, dev)
        if sorted(other[levels[0]]) != names:
            raise ValueError(f"{config}: {app!r} and {reference!r} do not hold the same layouts")
        for lv in levels:
            x = torch.stack([ref[lv][n] for n in names])
            y = torch.stack([other[lv][n] for n in names])
            result[lv][app] = round(linear_cka(x, y), 5)
    return result


@dataclass(frozen=True)
class Choice:
    """What :func:`choose_recipe` decided: the arm (empty when the rule cannot be applied yet), the best arm, each
    arm's mean selection score and why."""

    arm: str
    best: str
    means: dict[str, float]
    reason: str


def choose_recipe(
    scores: Mapping[str, Mapping[int, float]], order: Sequence[str], min_seeds: int = 3, level: float = 0.95
) -> Choice:
    """The shipped-recipe rule. ``scores``: arm -> {seed: selection score}; ``order``: arms from simplest up.

    The best arm has the highest mean score; the first arm in ``order`` whose paired difference to the best (same
    seeds) has a ``level`` interval containing zero is chosen (the best arm itself qualifies). Not applied, arm
    ``""``, while any arm in ``order`` has fewer than ``min_seeds`` seeds.
    """
    means = {a: sum(scores[a].values()) / len(scores[a]) for a in order if scores.get(a)}
    short = [a for a in order if len(scores.get(a, {})) < min_seeds]
    if short or not means:
        best = max(means, key=means.__getitem__) if means else ""
        return Choice("", best, means, f"not applied: fewer than {min_seeds} seeds for {', '.join(short)}")
    best = max(means, key=means.__getitem__)
    for arm in order:
        if arm == best:
            simpler = "" if arm == order[0] else "; every simpler arm is worse with 95% confidence"
            return Choice(arm, best, means, f"the best arm{simpler}")
        shared = sorted(set(scores[arm]) & set(scores[best]))
        iv = paired_interval([scores[best][s] - scores[arm][s] for s in shared], level)
        if len(shared) >= 2 and iv.low <= 0.0 <= iv.high:
            return Choice(arm, best, means, f"tied with the best ({best}): best minus it {iv.cell()}")
    raise AssertionError("unreachable: the best arm is in order")
