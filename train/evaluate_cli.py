"""``blindnet evaluate`` / ``python -m blindnet.train.evaluate``: score checkpoints on evaluation datasets.

Examples::

    blindnet evaluate --checkpoint runs/x/model.safetensors --dataset cityscapes --root data/cityscapes
    blindnet evaluate --checkpoint a.safetensors b.pt --config synthetic_full   # the preset's eval targets
    blindnet evaluate --checkpoint a.safetensors --dataset mapillary --root data/mapillary --protocol original

Only the argument parser lives here, so ``--help`` answers before PyTorch loads; the work is
:func:`blindnet.train.evaluate.evaluate_checkpoints`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from blindnet.cliparse import JobParser, cuda_device_count
from blindnet.config import ConfigError, key_value_pairs
from blindnet.extras import require_extra
from blindnet.modelnames import is_model_name

# The evaluation protocols of blindnet.data.transforms.EVAL_PROTOCOLS (kept as names here: no PyTorch for --help).
PROTOCOLS = ("clean", "original", "unnormalised")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = JobParser(
        prog=prog,
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog=__doc__.split("\n\n")[1] + "\n" + __doc__.split("\n\n")[2],
    )
    p.add_argument("--checkpoint", nargs="+", required=True, help="deployable .safetensors or training .pt file(s)")
    p.add_argument("--label", nargs="*", default=None, help="row labels (default: run folder or file name)")
    p.add_argument("--dataset", nargs="*", default=[], help="dataset name(s), keys of blindnet.data.DATASETS")
    p.add_argument("--root", nargs="*", default=[], help="dataset root(s), one per --dataset")
    p.add_argument("--split", default="val", help="dataset split (default val)")
    p.add_argument("--option", nargs="*", default=[], help="dataset keyword arguments key=value (e.g. appearance=fog)")
    p.add_argument("--config", default=None, help="take the targets from this preset's eval.targets")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override for --config (a.b=v)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda when present")
    p.add_argument("--max-images", type=int, default=0, help="score only the first N images per target (0: all)")
    p.add_argument("--num-workers", type=int, default=2, help="data loader worker processes")
    p.add_argument(
        "--protocol",
        default="clean",
        choices=list(PROTOCOLS),
        help="clean: full resolution, ImageNet-normalised everywhere (default); original: the original evaluation "
        "(Cityscapes un-normalised, Mapillary resized to height 1024 and centre-cropped 1024x1024); unnormalised: "
        "every dataset on [0, 1] inputs without ImageNet normalisation (what the original's Cityscapes input does)",
    )
    p.add_argument("--out", default=None, help="folder for the Markdown/CSV tables (and consistency heatmaps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _parse_options(items: Sequence[str]) -> dict:
    import yaml  # light, but only needed here

    try:
        pairs = key_value_pairs(items, "--option")
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from exc
    return {k: yaml.safe_load(v) for k, v in pairs.items()}


def _row_label(path: Path) -> str:
    # runs/<name>/model.safetensors -> <name>; anything else -> file stem.
    return path.parent.name if path.stem in ("model", "final") else path.stem


def main(argv: Sequence[str] | None = None, prog: str = "python -m blindnet.train.evaluate") -> int:
    p = build_parser(prog)
    args = p.parse_args(argv)
    # Every named file and folder is checked before PyTorch and the datasets load.
    for flag, paths in (("--checkpoint", args.checkpoint), ("--root", args.root)):
        for path in paths:
            if not Path(path).exists() and not (flag == "--checkpoint" and is_model_name(path)):
                p.error(f"{flag}: no such file or folder: {path}")
    if args.device == "cuda" and cuda_device_count() == 0:
        p.error("--device cuda: no CUDA device is available here (use --device cpu)")
    require_extra("evaluate")
    # Lazy CLI dispatch: PyTorch and the datasets load only once the job runs.
    import torch

    from blindnet.checkpoint import CheckpointError
    from blindnet.data import build_eval_dataset
    from blindnet.train import evaluate as ev
    from blindnet.train.config import DatasetSpec, load_config
    from blindnet.zoo import checkpoint_path

    specs: list[DatasetSpec] = []
    if args.config:
        specs += list(load_config(args.config, args.overrides).eval.targets)
    if len(args.dataset) != len(args.root):
        p.error(f"give one --root per --dataset ({len(args.dataset)} datasets, {len(args.root)} roots)")
    options = _parse_options(args.option)
    specs += [DatasetSpec(d, r, args.split, options=dict(options)) for d, r in zip(args.dataset, args.root)]
    if not specs:
        p.error("nothing to evaluate: give --dataset/--root or --config")
    labels = args.label or [_row_label(Path(c)) for c in args.checkpoint]
    if len(labels) != len(args.checkpoint):
        p.error("give one --label per --checkpoint")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    consistency: dict = {}
    try:
        datasets = {
            s.label: build_eval_dataset(s.dataset, s.root, s.split, protocol=args.protocol, **s.options) for s in specs
        }
        results = ev.evaluate_checkpoints(
            # A model name (blindnet-r50-gtav) becomes its cached file, fetched once; ZooError is a CheckpointError.
            dict(zip(labels, [checkpoint_path(c) for c in args.checkpoint])),
            datasets,
            device=torch.device("cuda" if cuda else "cpu"),
            num_workers=args.num_workers,
            max_images=args.max_images,
            progress=not args.no_progress,
            consistency=consistency,
        )
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(ev.miou_table(results)[0])
    print(ev.class_table(results)[0])
    if consistency:
        print(ev.consistency_table(consistency)[0])
    if args.out:
        for path in ev.write_tables(results, args.out, consistency).values():
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
