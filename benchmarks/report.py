"""Benchmark rows -> CSV, JSON, Markdown tables and a PNG plot.

Files (``<name>`` is the device slug, e.g. ``cuda-nvidia-h100-80gb-hbm3``, plus an optional tag):

* ``<name>.csv``: one line per row, columns :data:`blindnet.benchmarks.config.ROW_FIELDS`;
* ``<name>.json``: ``{"environment", "config", "command", "rows", "profiles"}``;
* ``<name>.md``: the cost table (the paper's Table 3 layout), end-to-end vs network, throughput by batch, the profile
  of the best path, and what was not measured and why;
* ``<name>.png``: latency by backend and precision (batch 1) and throughput by batch size.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from blindnet.benchmarks.config import ROW_FIELDS
from blindnet.benchmarks.latency import BenchResult

ROW_KEY = ("model", "variant", "scope", "batch", "height", "width")


def _num(v: Any) -> float | None:
    """A finite float, or None for blanks and non-numbers (CSV round trips give strings)."""
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(v: Any, digits: int = 2) -> str:
    f = _num(v)
    return "–" if f is None else f"{f:.{digits}f}"


def _sig(v: Any) -> str:
    """3 significant digits: CPU rows achieve ~0.01 TFLOP/s, GPU rows hundreds."""
    f = _num(v)
    return "–" if f is None else f"{f:.3g}"


def _millions(v: Any) -> str:
    f = _num(v)
    return "–" if f is None else f"{f / 1e6:.2f} M"


# --------------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------------


def merge_rows(old: Iterable[dict[str, Any]], new: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` rows not re-measured in ``new``, then ``new`` (a row is identified by :data:`ROW_KEY`)."""
    new = list(new)
    seen = {tuple(str(r.get(k, "")) for k in ROW_KEY) for r in new}
    return [r for r in old if tuple(str(r.get(k, "")) for k in ROW_KEY) not in seen] + new


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Rows as CSV with the fixed column order of :data:`ROW_FIELDS`."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(ROW_FIELDS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in ROW_FIELDS})
    return path


def write_results(
    result: BenchResult,
    out_dir: str | Path,
    name: str,
    *,
    command: str = "",
    append: bool = False,
    plot: bool = True,
) -> dict[str, Path]:
    """Write ``<name>.{csv,json,md,png}`` under ``out_dir``.

    With ``append``, rows (and profiles) already in ``<name>.json`` that this run did not re-measure are kept, so a long
    GPU run can be split over several invocations and still yield one table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    rows, profiles, commands = list(result.rows), dict(result.profiles), [command] if command else []
    if append and json_path.exists():
        old = json.loads(json_path.read_text())
        rows = merge_rows(old.get("rows", []), rows)
        profiles = {**old.get("profiles", {}), **profiles}
        prev = old.get("command", [])
        commands = (prev if isinstance(prev, list) else [prev]) + commands
    payload = {
        "environment": result.environment,
        "config": result.config,
        "command": commands,
        "rows": rows,
        "profiles": profiles,
    }
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    paths = {"json": json_path, "csv": write_csv(rows, out / f"{name}.csv")}
    md = markdown_report(rows, result.environment, profiles, commands)
    paths["md"] = out / f"{name}.md"
    paths["md"].write_text(md)
    if plot:
        paths["png"] = plot_results(rows, out / f"{name}.png", title=str(result.environment.get("device_name", "")))
    return paths


# --------------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------------


def _ok(rows: Iterable[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        if all(str(r.get(k)) == str(v) for k, v in match.items()):
            out.append(r)
    return out


def best_row(rows: Sequence[dict[str, Any]], *, model: str | None = None) -> dict[str, Any] | None:
    """The fastest (lowest median) batch-1 network row, of ``model`` if given (default: the first model measured)."""
    network = _ok(rows, scope="network", batch=1)
    if not network:
        return None
    model = model or str(network[0]["model"])
    candidates = [r for r in network if r["model"] == model]
    return min(candidates, key=lambda r: float(r["median_ms"])) if candidates else None


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return lines


def markdown_report(
    rows: Sequence[dict[str, Any]],
    environment: dict[str, Any],
    profiles: dict[str, dict[str, Any]] | None = None,
    commands: Sequence[str] = (),
) -> str:
    """The human-readable report of a run (see the module docstring for its sections)."""
    lines = _environment_section(environment, commands)
    lines += _cost_section(rows)
    lines += _end_to_end_section(rows)
    lines += _throughput_section(rows)
    lines += _profile_section(rows, profiles)
    lines += _not_measured_section(rows)
    lines += _method_section()
    return "\n".join(lines)


def _environment_section(env: dict[str, Any], commands: Sequence[str]) -> list[str]:
    """Title, the device and library facts, and the commands that produced the rows."""
    lines = [f"# Benchmarks: {env.get('device_name', '?')}", ""]
    facts = [
        ("device", f"{env.get('device_type', '')} / {env.get('device_name', '')}"),
        ("driver", env.get("driver") or "–"),
        ("clocks (sm, max sm, mem, power limit, temp)", env.get("clocks") or "–"),
        ("CPU", env.get("cpu", "")),
        ("threads", env.get("threads", "")),
        ("load average (1 min) at start", env.get("load_average_1m", "–")),
        (
            "versions",
            ", ".join(
                f"{k} {env[k]}"
                for k in ("torch", "torchvision", "cuda", "cudnn", "onnxruntime", "tensorrt", "python")
                if env.get(k)
            ),
        ),
    ]
    lines += [f"- {k}: {v}" for k, v in facts]
    for cmd in commands:
        lines.append(f"- command: `{cmd}`")
    lines.append("")
    return lines


_COST_HEADER = [
    "model",
    "variant",
    "backend",
    "precision",
    "params (deploy)",
    "params (paper-comp.)",
    "GMACs",
    "GFLOPs",
    "mean",
    "median",
    "p90",
    "p99",
    "trials",
    "TFLOP/s",
]


def _cost_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The batch-1 network table in the layout of the paper's Table 3, with the paper's own row last."""
    measured = [r for r in rows if r.get("status") == "ok"]
    sizes = sorted({(int(r["height"]), int(r["width"])) for r in measured})
    size_txt = ", ".join(f"{w}x{h}" for h, w in sizes) or "–"
    lines = [
        f"## Cost table (layout of the paper's Table 3): batch 1, {size_txt}",
        "",
        "Network only (normalised float input -> logits). Times in ms over the trials shown after warm-up; "
        "TFLOP/s = FLOPs (FlopCounterMode, 2 per MAC) / median time. MACs follow the thop convention the paper "
        "used where `blindnet.export.cost` is available.",
        "",
    ]
    body = [_cost_cells(r) for r in _ok(rows, scope="network", batch=1)]
    paper = [r for r in rows if r.get("status") == "reported"]
    body += [_paper_cost_cells(r) for r in paper]
    lines += _table(_COST_HEADER, body) + [""]
    for r in paper:
        lines += [f"Paper row: {r.get('note', '')}", ""]
    return lines


def _cost_cells(r: dict[str, Any]) -> list[Any]:
    """One measured row of the cost table."""
    return [
        r["model"],
        r["variant"],
        r["backend"],
        r["precision"] + (" CL" if r.get("memory_format") == "channels_last" else ""),
        _millions(r.get("params_deployable")),
        _millions(r.get("params_paper")),
        _fmt(r.get("macs_g"), 1),
        _fmt(r.get("flops_g"), 1),
        _fmt(r["mean_ms"]),
        _fmt(r["median_ms"]),
        _fmt(r["p90_ms"]),
        _fmt(r["p99_ms"]),
        r.get("trials", ""),
        _sig(r.get("achieved_tflops")),
    ]


def _paper_cost_cells(r: dict[str, Any]) -> list[Any]:
    """The paper's published row of the cost table (what it reports, dashes for what it does not)."""
    return [
        "BlindNet R50 (paper, V100)",
        "as published",
        "?",
        "unstated",
        "–",
        _millions(r.get("params_paper")),
        _fmt(r.get("macs_g"), 2) + " ('GFLOPs')",
        "–",
        _fmt(r.get("mean_ms")),
        "–",
        "–",
        "–",
        r.get("trials", ""),
        f"would need {_fmt(r.get('achieved_tflops'), 1)}",
    ]


def _end_to_end_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    """End-to-end (Predictor) medians beside the same variant's network-only median; empty without such rows."""
    e2e = _ok(rows, scope="end-to-end")
    if not e2e:
        return []
    lines = [
        "## End-to-end (Predictor: uint8 images in, label maps on the host out) vs network only, batch 1",
        "",
    ]
    body = []
    for r in e2e:
        net = _ok(rows, scope="network", model=r["model"], variant=r["variant"], batch=1)
        net_ms = float(net[0]["median_ms"]) if net else None
        overhead = "–" if net_ms is None else f"{float(r['median_ms']) - net_ms:+.2f}"
        body.append(
            [
                r["model"],
                r["variant"],
                _fmt(net_ms),
                _fmt(r["median_ms"]),
                overhead,
                _fmt(r["p99_ms"]),
                _sig(r.get("achieved_tflops")),
                r.get("note", ""),
            ]
        )
    header = ["model", "variant", "network median", "end-to-end median", "difference", "end-to-end p99"]
    lines += _table(header + ["end-to-end TFLOP/s", "path"], body)
    lines.append("")
    return lines


def _throughput_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Images/s by batch size of the headline model; empty when only one batch size was measured."""
    net_rows = _ok(rows, scope="network")
    batches = sorted({int(r["batch"]) for r in net_rows})
    if len(batches) <= 1:
        return []
    headline = str(net_rows[0]["model"])
    lines = [f"## Throughput: {headline}, images/s (achieved TFLOP/s) by batch size", ""]
    body = []
    for variant in dict.fromkeys(r["variant"] for r in net_rows if r["model"] == headline):
        cells = [variant]
        for b in batches:
            hit = _ok(rows, scope="network", model=headline, variant=variant, batch=b)
            cells.append(f"{float(hit[0]['images_per_s']):.1f} ({_sig(hit[0]['achieved_tflops'])})" if hit else "–")
        body.append(cells)
    lines += _table(["variant"] + [f"batch {b}" for b in batches], body) + [""]
    return lines


def _profile_section(rows: Sequence[dict[str, Any]], profiles: dict[str, dict[str, Any]] | None) -> list[str]:
    """Where the time of the best profiled batch-1 path goes, by layer type and by op; empty without a profile."""
    best = best_row(rows)
    if best is not None and profiles and best["variant"] not in profiles:
        # e.g. a TensorRT row wins but has no profile: show the fastest path that has one.
        profiled = [r for r in _ok(rows, scope="network", batch=1, model=best["model"]) if r["variant"] in profiles]
        best = min(profiled, key=lambda r: float(r["median_ms"])) if profiled else None
    if best is None or not profiles or best["variant"] not in profiles:
        return []
    prof = profiles[best["variant"]]
    lines = [
        f"## Where the time goes: {best['model']} / {best['variant']} (best batch-1 path, median "
        f"{_fmt(best['median_ms'])} ms)",
        "",
        f"Profiler clock: {prof.get('clock', '')}; {prof.get('iterations', '?')} calls, grouped by layer type "
        f"(profiled total {_fmt(prof.get('total_ms'))} ms per call; profiling adds overhead).",
        "",
    ]
    lines += _table(
        ["layer type", "ms per call", "share"],
        [[e["type"], _fmt(e["ms"], 3), f"{100 * e['share']:.1f}%"] for e in prof.get("by_type", [])],
    )
    lines += ["", "Top ops / kernels:", ""]
    lines += _table(
        ["op or kernel", "type", "calls per call", "ms per call", "share"],
        [
            [f"`{e['name']}`", e["type"], e["calls"], _fmt(e["ms"], 3), f"{100 * e['share']:.1f}%"]
            for e in prof.get("top_ops", [])
        ],
    )
    lines.append("")
    return lines


def _not_measured_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Skipped and failed variants with their reason, each (model, variant, reason) once; empty when none."""
    missing = [r for r in rows if r.get("status") in ("skipped", "error")]
    if not missing:
        return []
    lines = ["## Not measured", ""]
    seen: set[tuple[str, str, str]] = set()
    for r in missing:
        key = (str(r["model"]), str(r["variant"]), str(r["note"]))
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"- {r['model']} / {r['variant']} ({r['scope']}): {r['status']}: {str(r['note'])[:300]}")
    lines.append("")
    return lines


def _method_section() -> list[str]:
    """How the numbers were taken, in five lines."""
    return [
        "## Method",
        "",
        "- Inputs: a pool of pre-generated random tensors on the device (never zeros), a different one each trial.",
        "- CUDA: synchronize, CUDA event before and after each call (one isolated batch latency, launch gaps "
        "included); ONNX Runtime and end-to-end rows: host clock around a call that synchronises. CPU: "
        "`time.perf_counter`.",
        "- Warm-up calls first (compilation, algorithm search), then the trials; mean/median/p90/p99/min/std; "
        "images/s and TFLOP/s from the median.",
        "- Low-precision torch rows cast weights and activations (no autocast inside the timed region); "
        "`torch-fp32` switches TF32 off, `torch-tf32` on.",
        "- Random weights unless a checkpoint is named (timing does not depend on weight values).",
        "",
    ]


# --------------------------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------------------------


def legend_entries(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The backends and precisions of the rows that ran (in order of appearance): all the latency legend lists."""
    return list(dict.fromkeys(str(r["backend"]) for r in rows)), list(dict.fromkeys(str(r["precision"]) for r in rows))


def plot_results(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Two panels: batch-1 median latency per (model, variant) coloured by precision; images/s by batch size."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or in tests
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - used as matplotlib.ticker below

    path = Path(path)
    b1 = _ok(rows, scope="network", batch=1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, max(4.0, 0.32 * len(b1) + 1.5)))
    # Colour = backend, hatch = precision: both dimensions readable at a glance.
    colours = {"torch": "tab:blue", "onnxruntime": "tab:green", "tensorrt": "tab:purple"}
    hatches = {"float32": "", "tf32": "..", "float16": "//", "bfloat16": "\\\\", "int8": "xx"}
    if b1:
        labels = [f"{r['model']} / {r['variant']}" for r in b1]
        medians = [float(r["median_ms"]) for r in b1]
        errs = [[0.0] * len(b1), [float(r["p90_ms"]) - float(r["median_ms"]) for r in b1]]
        bars = ax1.barh(
            range(len(b1)),
            medians,
            xerr=errs,
            color=[colours.get(r["backend"], "tab:gray") for r in b1],
            capsize=2,
        )
        for bar, r in zip(bars, b1):
            bar.set_hatch(hatches.get(r["precision"], ""))
        for i, m in enumerate(medians):
            ax1.text(m, i, f" {m:.3g}", va="center", fontsize=6)
        ax1.set_yticks(range(len(b1)), labels, fontsize=7)
        ax1.invert_yaxis()
        ax1.set_xscale("log")
        ax1.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax1.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax1.set_xlabel("median latency, ms (bar to p90), log scale")
        backends, precisions = legend_entries(b1)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours.get(b, "tab:gray")) for b in backends]
        handles += [
            plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch=hatches.get(p, ""))
            for p in precisions
        ]
        ax1.legend(handles, backends + precisions, fontsize=6, loc="best", framealpha=0.6)
    ax1.set_title("Latency by backend and precision, batch 1", fontsize=9)
    net = _ok(rows, scope="network")
    if net:
        headline = str(net[0]["model"])
        for variant in dict.fromkeys(r["variant"] for r in net if r["model"] == headline):
            pts = sorted(
                (int(r["batch"]), float(r["images_per_s"]))
                for r in _ok(rows, scope="network", model=headline, variant=variant)
            )
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
        ax2.set_xscale("log", base=2)
        ax2.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%d"))
        ax2.set_xlabel("batch size")
        ax2.set_ylabel("images / s")
        ax2.legend(fontsize=7)
        ax2.set_title(f"Throughput by batch size: {headline}", fontsize=9)
        ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
