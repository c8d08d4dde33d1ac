"""Latency and throughput tables of the deployable network (benchmarks/results/README.md explains the columns).

Examples:

    blindnet bench --quick                                  # CPU smoke run of the shipped model, tiny sizes, seconds
    blindnet bench --quick --checkpoint runs/x/model.safetensors          # ... of your model
    blindnet bench --device cuda                            # the full GPU table at 2048x1024 (random weights)
    blindnet bench --device cpu --size 512 1024 --threads 2 --batches 1 --no-peer
    blindnet bench cpu-paths --backbones shufflenetv2,resnet50 --size 512 1024   # the CPU paths side by side
                                                                                # (interleaved), + training step
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shlex
import sys
from collections.abc import Sequence

from blindnet.benchmarks.config import BACKBONES, NETWORKS, VARIANTS, BenchConfig, default_variants
from blindnet.cliparse import JobParser
from blindnet.extras import require_extra

#: What ``--quick`` changes (anything given explicitly wins): small enough for the test suite on 2 CPU cores.
QUICK = {
    "device": "cpu",
    "backbones": ("mobilenetv2",),
    "networks": ("blindnet",),
    "peer": False,  # the peer is OS8 ResNet-50: 10x our tiny model's work; --peer adds it back
    "size": (64, 128),
    "trials": 5,
    "warmup": 1,
    "batches": (1, 2),
    "variants": ("torch-fp32", "ort-cpu-fp32"),
    "max_seconds": 10.0,
    # One thread: on a loaded 2-core machine, two OpenMP threads spin against each other (seconds per call).
    "threads": 1,
    "onnx_exporter": "torchscript",  # seconds per export instead of tens of seconds with dynamo
}


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser(prog: str = "python -m blindnet.benchmarks") -> argparse.ArgumentParser:
    head, rest = __doc__.split("\n\n", 1)
    p = JobParser(prog=prog, description=head, epilog=rest)
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny CPU run (64x128, a few trials) of the shipped model, or of --checkpoint",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cpu")
    p.add_argument("--backbones", type=_csv, help=f"comma list from {','.join(BACKBONES)} (first = headline)")
    p.add_argument("--networks", type=_csv, help=f"comma list from {','.join(NETWORKS)}")
    p.add_argument(
        "--peer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time torchvision's deeplabv3_resnet50 (random init) too (default: yes, no with --quick)",
    )
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), help="input size (default 1024 2048)")
    p.add_argument("--trials", type=int, help="timed calls at batch 1 (default 400)")
    p.add_argument("--batch-trials", type=int, help="timed calls at batch > 1 (default: --trials)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 50)")
    p.add_argument("--batches", type=_ints, help="throughput sweep of the headline model (default 1,4,8,16)")
    p.add_argument("--variants", type=_csv, help="comma list (see --list-variants); default: all for the device")
    p.add_argument("--list-variants", action="store_true", help="print the variants and exit")
    p.add_argument("--no-end-to-end", action="store_true", help="skip the Predictor (uint8 in, labels out) rows")
    p.add_argument("--no-profile", action="store_true", help="skip the per-layer-type profile")
    p.add_argument(
        "--checkpoint",
        help="checkpoint to time; its backbone and variant become the headline model unless --backbones/--networks "
        "say otherwise (default: the shipped model with --quick, else random weights)",
    )
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch and ONNX Runtime")
    p.add_argument("--max-seconds", type=float, help="time cap per measurement; fewer trials when slow (default 120)")
    p.add_argument(
        "--out", default="outputs/bench", help="output folder (default: outputs/bench in the current folder)"
    )
    p.add_argument("--name", help="file stem (default: device slug, plus -TAG)")
    p.add_argument("--tag", help="suffix of the file stem (default 'quick' with --quick)")
    p.add_argument("--append", action="store_true", help="merge into existing <name>.json (split long GPU runs)")
    p.add_argument("--workdir", help="keep exported ONNX files here (default: a temporary folder)")
    p.add_argument(
        "--onnx-exporter",
        choices=("auto", "dynamo", "torchscript"),
        help="ONNX exporter for the ONNX Runtime rows (default auto)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and weights")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A :class:`BenchConfig` from parsed arguments: defaults < ``--quick`` presets < explicit options."""
    values: dict = dict(QUICK) if args.quick else {}
    explicit = {
        "device": args.device,
        "backbones": args.backbones,
        "networks": args.networks,
        "size": tuple(args.size) if args.size else None,
        "trials": args.trials,
        "batch_trials": args.batch_trials,
        "warmup": args.warmup,
        "batches": args.batches,
        "variants": args.variants,
        "checkpoint": args.checkpoint,
        "threads": args.threads,
        "max_seconds": args.max_seconds,
        "workdir": args.workdir,
        "onnx_exporter": args.onnx_exporter,
    }
    values.update({k: v for k, v in explicit.items() if v is not None})
    if args.peer is not None:
        values["peer"] = args.peer
    values["end_to_end"] = not args.no_end_to_end
    values["profile"] = not args.no_profile
    values["seed"] = args.seed
    return BenchConfig(**values)


def with_checkpoint_model(cfg: BenchConfig, *, explicit_models: bool) -> BenchConfig:
    """``cfg`` timing its checkpoint (the shipped model when none is named): unless ``explicit_models``, the headline
    model becomes the checkpoint's backbone and variant, so the table times the model the user runs."""
    # Lazy CLI dispatch: reading a checkpoint loads PyTorch, which --help must not wait for.
    from blindnet.checkpoint import load_checkpoint_state
    from blindnet.resolve import resolve_checkpoint

    path = resolve_checkpoint(cfg.checkpoint)
    model_cfg = load_checkpoint_state(path)[0]
    network = "blindnet" if model_cfg.instance_norm else "baseline"
    changes: dict = {"checkpoint": str(path)}
    if not explicit_models:
        changes.update(backbones=(model_cfg.backbone,), networks=(network,))
    print(f"[bench] weights: {path} ({model_cfg.backbone}, {network})")
    out = dataclasses.replace(cfg, **changes)
    out.validate()
    return out


def main(argv: Sequence[str] | None = None, prog: str = "python -m blindnet.benchmarks") -> int:
    """Run the benchmarks and write ``<out>/<name>.{csv,json,md,png}``; returns 0, or 2 on a bad option."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cpu-paths"]:
        require_extra("bench")
        # Lazy CLI dispatch: that module times the training step too, so it imports the training code.
        return int(importlib.import_module("blindnet.benchmarks.cpu_paths").main(argv[1:], prog=f"{prog} cpu-paths"))
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.list_variants:
        for name, v in VARIANTS.items():
            default = ", default" if v.default else ""
            print(f"{name:28s} {v.backend:12s} {v.precision:9s} on {'/'.join(v.devices)}{default}")
        return 0
    cfg = config_from_args(args)
    try:
        cfg.validate()
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2 and the usage line
    require_extra("bench")
    if args.quick or cfg.checkpoint:
        try:
            cfg = with_checkpoint_model(cfg, explicit_models=args.backbones is not None or args.networks is not None)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:  # CheckpointError, ZooError: one line each
            print(f"error: {exc}", file=sys.stderr)
            return 2
    # Lazy CLI dispatch: --help and --list-variants answer before PyTorch is imported.
    from blindnet.benchmarks.environment import device_slug, environment_info
    from blindnet.benchmarks.latency import run_benchmarks
    from blindnet.benchmarks.report import write_results

    print(f"[bench] device {cfg.device}, variants {', '.join(cfg.variants or default_variants(cfg.device))}")
    result = run_benchmarks(cfg)
    tag = args.tag if args.tag is not None else ("quick" if args.quick else "")
    name = args.name or device_slug(environment_info(cfg.device)) + (f"-{tag}" if tag else "")
    command = "python -m blindnet.benchmarks " + shlex.join(argv)
    paths = write_results(result, args.out, name, command=command.strip(), append=args.append)
    for kind, path in paths.items():
        print(f"[bench] wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
