"""CPU inference paths side by side, interleaved in one process, and the CPU training step eager vs best.

Paths (each network-only and end to end through the :class:`~blindnet.inference.Predictor`, uint8 in, labels out):

* ``torch-eager``: the network as built, float32, ``torch.no_grad``;
* ``torch-best``: channels_last under ``torch.inference_mode`` (same maths);
* ``ort-fp32``: ONNX Runtime on the deployment export the ``auto`` backend uses (uint8 NHWC in, normalisation
  in-graph, logits out);
* ``ort-int8``: the Q/DQ INT8 version of that file (:mod:`blindnet.export.int8`).

Every trial runs every path once, in turn, so that a shared machine's changing load hits all paths alike: the ratios
are the result, the absolute times only describe this run. Writes ``<out>/<name>.json``, ``.md`` and ``.png``.

    python -m blindnet.benchmarks.cpu_paths --backbones shufflenetv2,resnet50 --size 512 1024 --trials 5
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from blindnet.backends.onnxruntime_backend import OnnxBackend, prepare_input
from blindnet.backends.torch_backend import TorchBackend
from blindnet.benchmarks.train_step import compare_cpu_step
from blindnet.checkpoint import load_model
from blindnet.export.int8 import check_int8, quantize_int8
from blindnet.export.onnx import export_onnx
from blindnet.inference import Predictor
from blindnet.models import build_model
from blindnet.resolve import DEFAULT_CHECKPOINT

PATHS = ("torch-eager", "torch-best", "ort-fp32", "ort-int8")


def _model(backbone: str, seed: int) -> tuple[torch.nn.Module, str]:
    """The shipped checkpoint for its backbone (real weights: the INT8 check means something), else random init."""
    if backbone == "shufflenetv2" and DEFAULT_CHECKPOINT.exists():
        return load_model(DEFAULT_CHECKPOINT).eval(), "shipped checkpoint"
    torch.manual_seed(seed)
    return build_model({"backbone": backbone}).eval(), "random init"


def build_paths(
    backbone: str, size: tuple[int, int], workdir: Path, threads: int, exporter: str, seed: int = 0
) -> tuple[dict[str, Callable[[np.ndarray], Any]], dict[str, Any]]:
    """``{"<path>/<scope>": fn(images uint8 1 x H x W x 3)}`` for every path and scope, and facts about the run."""
    model, weights = _model(backbone, seed)
    fp32 = export_onnx(model, workdir / f"{backbone}-fp32.onnx", normalize_input=True, exporter=exporter).path
    calib = (min(256, size[0]), min(512, size[1]))
    int8 = quantize_int8(fp32, workdir / f"{backbone}-int8qdq.onnx", calibration=8, size=calib)
    check = check_int8(int8, fp32, scenes=4, size=calib)
    eager, best = TorchBackend(model, channels_last=False), TorchBackend(_copy(model), channels_last=True)
    ort_fp32, ort_int8 = OnnxBackend(fp32, threads=threads), OnnxBackend(int8, precision="int8", threads=threads)
    backends: dict[str, TorchBackend | OnnxBackend] = {
        "torch-eager": eager,
        "torch-best": best,
        "ort-fp32": ort_fp32,
        "ort-int8": ort_int8,
    }

    def torch_net(backend: TorchBackend, mode: Callable[[], Any]) -> Callable[[np.ndarray], Any]:
        def fn(images: np.ndarray) -> Any:
            x = backend.preprocess(images)  # normalised, channels_last as the backend is set up
            with mode():
                return backend.model(x)

        return fn

    def ort_net(backend: OnnxBackend) -> Callable[[np.ndarray], Any]:
        def fn(images: np.ndarray) -> Any:
            return backend.session.run(None, {backend.spec["input_name"]: prepare_input(images, backend.spec)})

        return fn

    fns: dict[str, Callable[[np.ndarray], Any]] = {
        "torch-eager/network": torch_net(eager, torch.no_grad),
        "torch-best/network": torch_net(best, torch.inference_mode),
        "ort-fp32/network": ort_net(ort_fp32),
        "ort-int8/network": ort_net(ort_int8),
    }

    def end_to_end(p: Predictor) -> Callable[[np.ndarray], Any]:
        return lambda images: p.predict_arrays(list(images))

    for name, backend in backends.items():
        fns[f"{name}/end_to_end"] = end_to_end(Predictor(backend, batch_size=1))
    return fns, {"weights": weights, "int8_check": check}


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


def time_interleaved(
    fns: dict[str, Callable[[np.ndarray], Any]], images: np.ndarray, *, trials: int, warmup: int
) -> dict[str, list[float]]:
    """Milliseconds per call of every fn, round-robin: trial t runs each fn once before trial t+1 starts."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for t in range(warmup + trials):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(images)
            if t >= warmup:
                times[name].append((time.perf_counter() - t0) * 1000.0)
    return times


def summarize(backbone: str, times: dict[str, list[float]]) -> dict[str, Any]:
    """Medians, speedups over torch eager (per scope) and the Predictor's overhead over the network (per path)."""
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for path in PATHS:
        net, e2e = med[f"{path}/network"], med[f"{path}/end_to_end"]
        rows.append(
            {
                "backbone": backbone,
                "path": path,
                "network_ms": round(net, 1),
                "end_to_end_ms": round(e2e, 1),
                "network_speedup": round(med["torch-eager/network"] / net, 3),
                "end_to_end_speedup": round(med["torch-eager/end_to_end"] / e2e, 3),
                "end_to_end_overhead": round(e2e / net - 1.0, 3),
                "images_per_s": round(1000.0 / e2e, 3),
                "trials": len(times[f"{path}/network"]),
            }
        )
    int8_over_fp32 = med["ort-fp32/network"] / med["ort-int8/network"]
    return {"rows": rows, "int8_over_fp32_network": round(int8_over_fp32, 3)}


def write_report(result: dict[str, Any], out: Path, name: str) -> list[Path]:
    """``<name>.json`` (everything), ``<name>.md`` (the tables and the command) and ``<name>.png`` (the bars)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    paths[0].write_text(json.dumps(result, indent=2))
    lines = [
        f"# CPU paths, {result['machine']}",
        "",
        f"`{result['command']}`",
        "",
        f"{result['date']}, torch {result['torch']}, onnxruntime {result['onnxruntime']}, {result['threads']} threads, "
        f"{result['size'][0]}x{result['size'][1]}, batch 1. {result['note']}",
        "",
        "| backbone | path | network ms | x eager | end-to-end ms | x eager | Predictor overhead | images/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for bb in result["inference"]:
        for r in bb["rows"]:
            lines.append(
                f"| {r['backbone']} | {r['path']} | {r['network_ms']} | {r['network_speedup']:.2f} | "
                f"{r['end_to_end_ms']} | {r['end_to_end_speedup']:.2f} | {100 * r['end_to_end_overhead']:+.1f}% | "
                f"{r['images_per_s']:.2f} |"
            )
    lines += ["", "INT8 parity on held-out generated scenes (label agreement with fp32, mIoU change in points):", ""]
    for bb in result["inference"]:
        c = bb["int8_check"]
        lines.append(
            f"- {bb['backbone']} ({bb['weights']}): agreement {c['label_agreement']:.4f}, mIoU "
            f"{c['miou_float32']:.2f} -> {c['miou_int8']:.2f} ({c['miou_change']:+.2f}); INT8 / fp32 "
            f"network speedup {bb['int8_over_fp32_network']:.2f}x"
        )
    if result["train_step"]:
        lines += [
            "",
            "| training step | pairs, size | eager ms | best ms | speedup | best images/s | max loss diff |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for t in result["train_step"]:
            lines.append(
                f"| {t['backbone']} (channels_last, bf16 {t['best']['bf16_autocast']}) | {t['pairs']}, "
                f"{t['size'][0]}x{t['size'][1]} | {t['eager_median_ms']} | {t['best_median_ms']} | "
                f"{t['speedup']:.2f} | {t['best_images_per_s']:.2f} | {t['max_loss_diff']:.2e} |"
            )
    paths[1].write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, len(result["inference"]), figsize=(5 * len(result["inference"]), 4), squeeze=False)
    for ax, bb in zip(axes[0], result["inference"]):
        xs = np.arange(len(PATHS))
        ax.bar(xs - 0.2, [r["network_ms"] for r in bb["rows"]], 0.4, label="network")
        ax.bar(xs + 0.2, [r["end_to_end_ms"] for r in bb["rows"]], 0.4, label="end to end")
        ax.set_xticks(xs, PATHS, rotation=20)
        ax.set_ylabel(f"ms per 1x3x{result['size'][0]}x{result['size'][1]} image (median)")
        ax.set_title(bb["backbone"])
        ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)
    return paths


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Measure every backbone's paths (interleaved), then the training steps; returns the result dict."""
    torch.set_num_threads(args.threads)
    size = tuple(args.size)
    images = np.random.default_rng(args.seed).integers(0, 256, (1, *size, 3), dtype=np.uint8)
    inference = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones:
            fns, facts = build_paths(backbone, size, Path(tmp), args.threads, args.onnx_exporter, args.seed)
            times = time_interleaved(fns, images, trials=args.trials, warmup=args.warmup)
            inference.append({"backbone": backbone, **facts, **summarize(backbone, times), "times_ms": times})
            del fns
    train_size = tuple(args.train_size)
    train = [compare_cpu_step(bb, steps=args.train_steps, pairs=2, size=train_size) for bb in args.train_backbones]
    return {
        "command": command,
        "machine": f"{platform.processor() or platform.machine()} ({_cpu_name()})",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "size": list(size),
        "note": args.note,
        "inference": inference,
        "train_step": train,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main(argv: list[str] | None = None, prog: str = "python -m blindnet.benchmarks.cpu_paths") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default="shufflenetv2,resnet50", type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    p.add_argument("--trials", type=int, default=5, help="timed rounds (every path once per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=2, help="threads for PyTorch and ONNX Runtime")
    p.add_argument("--onnx-exporter", default="auto", choices=("auto", "dynamo", "torchscript"))
    p.add_argument(
        "--train-backbones",
        default="shufflenetv2,resnet50",
        type=lambda s: [x for x in s.split(",") if x],
        help="training step eager vs best (2 pairs at 256x512, all losses); empty to skip",
    )
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--train-size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    p.add_argument("--note", default="", help="a sentence about the machine (e.g. shared with other jobs)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="cpu-paths")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    command = " ".join([prog, *(argv if argv is not None else [])])
    result = run(args, command)
    for path in write_report(result, Path(args.out), args.name):
        print(f"wrote {path}")
    print(Path(args.out, f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
