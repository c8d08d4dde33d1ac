"""Training-step benchmark: full BlindNet step vs the cross-entropy-only two-view step.

Default setting, the paper's: ResNet-50 BlindNet, batch 8 image pairs at 768x768, all four losses, one SGD step,
bfloat16 autocast and channels_last (``--compile model`` adds ``torch.compile`` on the network). Prints the median
step time and peak GPU memory of both steps and appends one JSON row to ``benchmarks/results/train_step_<device>.jsonl``.

    python -m blindnet.benchmarks.train_step                       # on a CUDA GPU
    python -m blindnet.benchmarks.train_step --device cpu --size 64 --batch 2 --steps 2   # CPU smoke run

Reference (the original implementation on an H100): 790 ms/step TF32, 76.8 GiB peak; CE-only two-view step 118 ms in
bf16 + channels_last, 87 ms compiled (15.8 GiB). Targets: full step <= 120 ms, <= 1.3x our CE-only step, <= 20 GiB.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from blindnet.architectures import BACKBONE_NAMES
from blindnet.models import ModelConfig, build_model
from blindnet.task import BlindNetTask, ablation
from blindnet.train.config import cpu_has_native_bf16

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--backbone", default="resnet50", choices=BACKBONE_NAMES)
    p.add_argument("--size", type=int, default=768, help="square crop size")
    p.add_argument("--batch", type=int, default=8, help="image pairs per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, cuDNN autotuning)")
    p.add_argument("--precision", default="bfloat16", choices=["bfloat16", "tf32", "float32"])
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument(
        "--compile",
        default="none",
        choices=["none", "model", "task"],
        help="torch.compile the network's forward_features, or the whole task forward",
    )
    p.add_argument("--only", default=None, choices=["blindnet", "baseline"], help="time one of the two steps")
    p.add_argument(
        "--sync-debug",
        default="off",
        choices=["off", "warn", "error"],
        help="CUDA only: torch.cuda.set_sync_debug_mode during the timed steps (report or refuse host syncs)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON row (created if needed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compare-eager",
        action="store_true",
        help="CPU: time the eager float32 step against the best CPU step (channels_last unless --no-channels-last, "
        "bf16 where native, torch.compile of the network with --compile model|task), interleaved in one process, at "
        "--batch pairs of --hw H W; prints and appends one JSON row",
    )
    p.add_argument("--hw", type=int, nargs=2, default=(256, 512), metavar=("H", "W"), help="--compare-eager size")
    return p.parse_args(argv)


def _synthetic_batch(n: int, size: int, num_classes: int, device: torch.device, channels_last: bool):
    """Two views and a blocky label map (class regions large enough for CWCL/SDCL to sample), 10% ignore."""
    x = torch.randn(n, 3, size, size, device=device)
    x_a = x * 1.3 + 0.2 * torch.randn_like(x)
    if channels_last:
        x, x_a = x.to(memory_format=torch.channels_last), x_a.to(memory_format=torch.channels_last)
    block = max(size // 16, 1)
    coarse = torch.randint(0, num_classes, (n, -(-size // block), -(-size // block)), device=device)
    target = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :size, :size].contiguous()
    target[torch.rand(target.shape, device=device) < 0.1] = 255
    return x, x_a, target


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(args: argparse.Namespace, config_name: str, device: torch.device) -> dict[str, Any]:
    """Build a fresh model + task for ``config_name`` and time ``steps`` SGD steps after ``warmup``."""
    torch.manual_seed(args.seed)
    model = build_model(ModelConfig(backbone=args.backbone))
    task = BlindNetTask(model, ablation(config_name)).to(device).train()
    if args.channels_last:
        task = task.to(memory_format=torch.channels_last)
    # The original recipe: SGD lr 0.01, momentum 0.9, weight decay 5e-4 on every parameter.
    opt = torch.optim.SGD(task.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    forward: Callable[..., Any]
    if args.compile == "model":
        # compiled in place: the task calls the model's forward_features
        model.forward_features = torch.compile(model.forward_features)  # type: ignore[method-assign]
        forward = task
    elif args.compile == "task":
        forward = torch.compile(task)
    else:
        forward = task
    x, x_a, target = _synthetic_batch(args.batch, args.size, model.config.num_classes, device, args.channels_last)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if args.precision == "bfloat16" else nullcontext()
    )

    def step() -> dict[str, torch.Tensor]:
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = forward(x, x_a, target)
        out["loss"].backward()
        opt.step()
        return out

    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    out: dict[str, torch.Tensor] = {}
    for _ in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        if device.type == "cuda" and args.sync_debug != "off":
            torch.cuda.set_sync_debug_mode(args.sync_debug)
        try:
            out = step()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    losses = {k: round(float(v.detach()), 4) for k, v in out.items()}
    if not all(v == v and abs(v) != float("inf") for v in losses.values()):
        raise RuntimeError(f"non-finite loss in the {config_name} step: {losses}")
    return {"median_ms": statistics.median(times), "min_ms": min(times), "peak_gib": peak, "losses": losses}


def _cpu_setup(
    backbone: str,
    config_name: str,
    best: bool,
    pairs: int,
    size: tuple[int, int],
    seed: int,
    channels_last: bool = True,
    compile: bool = False,
):
    """A fresh task + SGD + one fixed batch (``pairs x 3 x H x W`` twice, labels ``pairs x H x W``), eager or best
    (``channels_last`` layout, bf16 autocast where the CPU has it natively, and ``torch.compile`` of the network's
    ``forward_features`` when ``compile``)."""
    torch.manual_seed(seed)
    task = BlindNetTask(build_model({"backbone": backbone}), ablation(config_name)).train()
    if best and compile:
        # compiled in place (the task calls the model's forward_features); the losses stay eager
        task.model.forward_features = torch.compile(task.model.forward_features)  # type: ignore[method-assign]
    fmt = torch.channels_last if best and channels_last else torch.contiguous_format
    task = task.to(memory_format=fmt)
    # Each setup samples its loss pixels from its own generator: the interleaved steps do not shift each other's draws,
    # so the two loss trajectories differ only by what the best path changes in the maths.
    task.generator = torch.Generator().manual_seed(seed + 2)
    opt = torch.optim.SGD(task.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(seed + 1)
    x, x_a, target = _synthetic_batch(pairs, max(size), 19, torch.device("cpu"), False)
    h, w = size
    x, x_a = (t[:, :, :h, :w].contiguous(memory_format=fmt) for t in (x, x_a))
    use_bf16 = best and cpu_has_native_bf16()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    torch.manual_seed(seed + 3)
    rng = [torch.get_rng_state()]  # this setup's own global RNG stream (dropout), restored around each step

    def step() -> float:
        torch.set_rng_state(rng[0])
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = task(x, x_a, target[:, :h, :w].contiguous())
        out["loss"].backward()
        opt.step()
        rng[0] = torch.get_rng_state()
        return float(out["loss"].detach())

    return step, use_bf16


def compare_cpu_step(
    backbone: str,
    *,
    steps: int = 5,
    warmup: int = 1,
    pairs: int = 2,
    size: tuple[int, int] = (256, 512),
    config_name: str = "blindnet",
    seed: int = 0,
    channels_last: bool = True,
    compile: bool = False,
) -> dict[str, Any]:
    """The package's eager CPU step (float32, contiguous) vs its best (``channels_last`` layout, bfloat16 autocast where
    the CPU has native bfloat16, ``torch.compile`` of the network when ``compile``), same weights and batch, steps
    interleaved in one process so that a shared machine's load hits both alike (compilation happens in ``warmup``).

    Returns medians (ms), ``speedup`` (eager / best), images per second (2 images per pair) and both loss
    trajectories (the same batch each step, so they track each other unless the best path changes the maths).
    """
    runs = {
        name: _cpu_setup(backbone, config_name, name == "best", pairs, size, seed, channels_last, compile)
        for name in ("eager", "best")
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    losses: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, (step, _) in runs.items():
            t0 = time.perf_counter()
            loss = step()
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1000.0)
                losses[name].append(round(loss, 5))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "backbone": backbone,
        "config": config_name,
        "pairs": pairs,
        "size": list(size),
        "steps": steps,
        "best": {"channels_last": channels_last, "bf16_autocast": runs["best"][1], "compile": compile},
        "eager_median_ms": round(med["eager"], 1),
        "best_median_ms": round(med["best"], 1),
        "speedup": round(med["eager"] / med["best"], 3),
        "eager_images_per_s": round(2 * pairs * 1000.0 / med["eager"], 3),
        "best_images_per_s": round(2 * pairs * 1000.0 / med["best"], 3),
        "eager_losses": losses["eager"],
        "best_losses": losses["best"],
        "max_loss_diff": max(abs(a - b) for a, b in zip(losses["eager"], losses["best"])),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the JSON row it wrote."""
    args = _parse(argv)
    row: dict[str, Any]
    if args.compare_eager:
        row = compare_cpu_step(
            args.backbone,
            steps=args.steps,
            warmup=args.warmup,
            pairs=args.batch,
            size=tuple(args.hw),
            seed=args.seed,
            channels_last=args.channels_last,
            compile=args.compile != "none",
        )
        row.update(
            benchmark="train_step_cpu_compare",
            device=f"cpu-{platform.machine()}",
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        print(json.dumps(row))
        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / "train_step_cpu_compare.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        return row
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks.train_step: --device cuda was asked but CUDA is not available on this machine "
            "(use --device cpu --size 64 --batch 2 --steps 2 for a smoke run)"
        )
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    tf32 = args.precision in ("bfloat16", "tf32")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"

    names = [args.only] if args.only else ["blindnet", "baseline"]
    results = {name: time_step(args, name, device) for name in names}
    row = {
        "benchmark": "train_step",
        "device": device_name,
        "torch": torch.__version__,
        "backbone": args.backbone,
        "batch": args.batch,
        "size": args.size,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "steps": args.steps,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for name, res in results.items():
        key = "full" if name == "blindnet" else "ce_only"
        row[f"{key}_median_ms"] = round(res["median_ms"], 2)
        row[f"{key}_min_ms"] = round(res["min_ms"], 2)
        row[f"{key}_peak_gib"] = None if res["peak_gib"] is None else round(res["peak_gib"], 3)
        row[f"{key}_losses"] = res["losses"]
    if "full_median_ms" in row and "ce_only_median_ms" in row:
        row["full_over_ce_only"] = round(row["full_median_ms"] / row["ce_only_median_ms"], 3)

    for name, res in results.items():
        peak = "n/a (cpu)" if res["peak_gib"] is None else f"{res['peak_gib']:.2f} GiB"
        print(f"{name:9s} step: median {res['median_ms']:.1f} ms (min {res['min_ms']:.1f}), peak memory {peak}")
    if "full_over_ce_only" in row:
        print(f"full / CE-only: {row['full_over_ce_only']:.2f}x")

    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    path = args.out / f"train_step_{slug}.jsonl"
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(f"wrote {path}")
    row["path"] = str(path)
    return row


if __name__ == "__main__":
    main(sys.argv[1:])
