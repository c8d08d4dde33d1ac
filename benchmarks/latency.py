"""Latency and throughput of the deployable network, measured the way careful GPU benchmarking asks.

One call, :func:`run_benchmarks`, measures every (model, variant, batch) combination a :class:`BenchConfig` names and
returns flat row dicts (schema: :data:`ROW_FIELDS`, documented in ``benchmarks/results/README.md``).

How a time is taken (and why):

* Inputs are a pool of pre-generated *random* tensors on the device (never zeros: zeros can run faster than real data
  and hide unwritten outputs); each trial takes the next tensor of the pool, so no trial re-reads the same buffer
  straight out of cache.
* Warm-up first (CUDA context, cuDNN algorithm search, ``torch.compile``, ONNX Runtime's per-shape conv search), then
  ``trials`` timed calls. On CUDA each trial is bracketed by CUDA events after a synchronize, so one trial is one
  isolated batch latency, launch gaps included; on CPU ``time.perf_counter`` around a synchronous call.
* We report mean, median, p90, p99, min and std; images/s and achieved TFLOP/s come from the median.
* "network" rows time the bare network (normalised float input -> logits) as the paper's table does; "end-to-end" rows
  time :class:`blindnet.inference.Predictor` (uint8 images in, label maps on the host out), which is what a caller of
  the package experiences.

The parts live beside this orchestration: :mod:`~blindnet.benchmarks.environment` (device and library facts),
:mod:`~blindnet.benchmarks.models` (networks, weights, cost), :mod:`~blindnet.benchmarks.timing` (input pools, the
timer, precision flags), :mod:`~blindnet.benchmarks.runners` (one runner per backend) and
:mod:`~blindnet.benchmarks.profiling` (time by layer type).

Nothing here imports ``blindnet.task`` or ``blindnet.losses``: benchmarks measure the deployable network only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blindnet.benchmarks.config import PAPER_NOTE, PAPER_ROW, R50_FLOPS_2048, ROW_FIELDS, BenchConfig, Variant
from blindnet.benchmarks.environment import environment_info
from blindnet.benchmarks.models import Cost, ModelSpec, load_models, model_cost, model_specs
from blindnet.benchmarks.profiling import profile_runner
from blindnet.benchmarks.runners import Skip, make_e2e_runner, make_runner
from blindnet.benchmarks.timing import Runner, float32_matmul_mode, time_calls


@dataclass
class BenchResult:
    """Everything a run produced: rows, the environment, and per-variant profiles of the headline model."""

    rows: list[dict[str, Any]]
    environment: dict[str, Any]
    config: dict[str, Any]
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)


def _base_row(env: dict[str, Any], run_id: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS, "")
    row.update({k: env.get(k, "") for k in ROW_FIELDS if k in env})
    row["run_id"] = run_id
    row["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


@dataclass
class _Run:
    """What every measurement of one run shares, and what it collects."""

    cfg: BenchConfig
    env: dict[str, Any]
    run_id: str
    device: torch.device
    workdir: Path
    say: Callable[[str], None]
    rows: list[dict[str, Any]] = field(default_factory=list)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_benchmarks(cfg: BenchConfig, *, log: Callable[[str], None] | None = print) -> BenchResult:
    """Measure every configured (model, variant, batch) and return the rows (see :data:`ROW_FIELDS`).

    Failures of one variant (a missing library, a compile error) become rows with ``status`` ``skipped`` or
    ``error`` and a ``note``; they never abort the run, so a long GPU run always produces its table.
    """
    cfg.validate()
    say = log or (lambda _msg: None)
    saved_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = environment_info(cfg.device)
    run_id = cfg.run_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    variants = cfg.variant_list()
    with _workdir(cfg) as workdir:
        run = _Run(cfg, env, run_id, torch.device(cfg.device), workdir, say)
        try:
            for mi, spec in enumerate(model_specs(cfg)):
                _measure_model(run, spec, variants, headline=mi == 0)
        finally:
            torch.set_num_threads(saved_threads)  # callers (a test session) keep their own setting
    if cfg.backbones and cfg.backbones[0] == "resnet50" and "blindnet" in cfg.networks:
        run.rows.append(_paper_row(env, run_id))
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}
    return BenchResult(rows=run.rows, environment=env, config=config, profiles=run.profiles)


@contextlib.contextmanager
def _workdir(cfg: BenchConfig) -> Iterator[Path]:
    """``cfg.workdir`` (kept, so exports can be reused) or a temporary folder removed afterwards."""
    if cfg.workdir:
        workdir = Path(cfg.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="blindnet-bench-") as tmp:
        yield Path(tmp)


def _measure_model(run: _Run, spec: ModelSpec, variants: list[Variant], *, headline: bool) -> None:
    """Every variant of one model: the batch sweep for the headline model, batch 1 for the others."""
    h, w = run.cfg.size
    cost = model_cost(spec, run.cfg.size)
    run.say(f"[bench] {spec.name}: {cost.params_deployable / 1e6:.2f} M params, {cost.flops_g:.1f} GFLOP at {w}x{h}")
    batches = tuple(run.cfg.batches) if headline else (1,)
    for variant in variants:
        _measure_variant(run, spec, variant, cost, batches, headline=headline)


def _measure_variant(
    run: _Run, spec: ModelSpec, variant: Variant, cost: Cost, batches: tuple[int, ...], *, headline: bool
) -> None:
    """One variant of one model: a network row per batch, then its end-to-end row where it has one."""
    cfg = run.cfg
    h, w = cfg.size
    model, weights = load_models(spec, cfg, run.device)
    # nn.Module types its attributes as tensors or modules; a str attribute is fine at runtime (runners read it)
    model._bench_name = f"{spec.name}-{h}x{w}"  # type: ignore[assignment]
    for batch in batches:
        shape = (batch, 3, h, w)
        trials = cfg.trials if batch == 1 else (cfg.batch_trials or cfg.trials)
        row = _base_row(run.env, run.run_id)
        row.update(_describe(spec, variant, cost, weights, batch, cfg.size, scope="network"))
        want_profile = cfg.profile and headline and batch == 1
        make = functools.partial(make_runner, model, variant, shape, cfg, run.workdir)
        _measure(row, make, cfg, trials, run.say, run.profiles if want_profile else None)
        run.rows.append(row)
    if cfg.end_to_end and headline and variant.end_to_end:
        row = _base_row(run.env, run.run_id)
        row.update(_describe(spec, variant, cost, weights, 1, cfg.size, scope="end-to-end"))
        model_e2e, _ = load_models(spec, cfg, run.device)
        make = functools.partial(make_e2e_runner, model_e2e, variant, cfg, run.workdir)
        _measure(row, make, cfg, cfg.trials, run.say, None)
        run.rows.append(row)
        del model_e2e
    del model
    _free(cfg.device)


def _paper_row(env: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The paper's published ResNet-50 BlindNet latency as a row beside ours (library columns blank: not our run)."""
    paper = _base_row(env, run_id)
    paper.update(PAPER_ROW)
    paper.update(
        device_type="cuda",
        driver="",
        torch="",
        torchvision="",
        cuda="",
        cudnn="",
        onnxruntime="",
        tensorrt="",
        threads="",
        median_ms="",
        flops_g="",
        achieved_tflops=round(R50_FLOPS_2048 / (PAPER_ROW["mean_ms"] * 1e-3) / 1e12, 1),
        images_per_s=round(1000.0 / PAPER_ROW["mean_ms"], 2),
        note=PAPER_NOTE,
    )
    return paper


def _describe(
    spec: ModelSpec,
    variant: Variant,
    cost: Cost,
    weights: str,
    batch: int,
    size: tuple[int, int],
    *,
    scope: str,
) -> dict[str, Any]:
    return {
        "model": spec.name,
        "network": spec.network,
        "backbone": spec.backbone,
        "weights": weights,
        "variant": variant.name,
        "backend": variant.backend,
        "precision": variant.precision,
        "memory_format": "channels_last" if variant.channels_last else "contiguous",
        "compile": variant.compile or "",
        "scope": scope,
        "batch": batch,
        "height": size[0],
        "width": size[1],
        "params_deployable": cost.params_deployable,
        "params_paper": "" if cost.params_paper is None else cost.params_paper,
        "macs_g": round(cost.macs_g, 3),
        "flops_g": round(cost.flops_g, 3),
        "flop_counter": cost.flop_counter,
    }


def _measure(
    row: dict[str, Any],
    make: Callable[[], Runner],
    cfg: BenchConfig,
    trials: int,
    say: Callable[[str], None],
    profiles: dict[str, dict[str, Any]] | None,
) -> None:
    """Build the runner, time it, fill ``row`` in place; a Skip or an exception becomes the row's status."""
    label = f"{row['model']} {row['variant']} {row['scope']} b{row['batch']}"
    variant_is_tf32 = row["precision"] == "tf32"
    try:
        with float32_matmul_mode(tf32=variant_is_tf32), torch.inference_mode():
            runner = make()
            timing = time_calls(
                runner.fn,
                runner.inputs,
                device=cfg.device,
                warmup=cfg.warmup,
                trials=trials,
                max_seconds=cfg.max_seconds,
                sync=runner.sync,
            )
            if runner.check is not None:
                runner.check()
            if profiles is not None and row["scope"] == "network":
                # A few calls suffice to attribute time; fewer when one call takes seconds (CPU at full size).
                iterations = int(max(1, min(5, 10_000 / max(float(np.median(timing.ms)), 1e-3))))
                if runner.profile is not None:
                    profiles[row["variant"]] = runner.profile(iterations)
                else:
                    profiles[row["variant"]] = profile_runner(runner, cfg.device, iterations)
    except Skip as exc:
        row.update(status="skipped", note=str(exc))
        say(f"[bench] {label}: skipped ({exc})")
        return
    except Exception as exc:  # noqa: BLE001 - one broken variant must not lose the rest of a long GPU run
        # Exporter messages carry terminal colour codes; keep the note plain text.
        message = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(exc).__name__}: {exc}")
        row.update(status="error", note=message[:500])
        say(f"[bench] {label}: ERROR {row['note'][:300]}")
        if os.environ.get("BLINDNET_BENCH_DEBUG"):
            traceback.print_exc()
        return
    finally:
        _free(cfg.device)
    stats = timing.stats()
    row.update({k: round(v, 4) for k, v in stats.items()})
    row.update(warmup=timing.warmup, trials=timing.trials, status="ok", note=runner.note)
    batch = int(row["batch"])
    row["images_per_s"] = round(batch * 1e3 / stats["median_ms"], 3)
    # Significant digits, not decimals: a CPU achieves ~0.01 TFLOP/s, an H100 hundreds.
    # GFLOP per ms is TFLOP per s.
    row["achieved_tflops"] = float(f"{float(row['flops_g']) * batch / stats['median_ms']:.5g}")
    say(
        f"[bench] {label}: median {stats['median_ms']:.3f} ms (p90 {stats['p90_ms']:.3f}), "
        f"{row['images_per_s']:.1f} img/s, {row['achieved_tflops']:.4g} TFLOP/s over {timing.trials} trials"
    )


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
