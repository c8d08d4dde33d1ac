"""``python -m blindnet.train``: train BlindNet from a preset.

Examples::

    python -m blindnet.train --config synthetic_smoke --out runs/smoke
    python -m blindnet.train --config train/configs/paper_r50_gtav.yaml --set optim.max_iter=1000
    torchrun --nproc-per-node 2 -m blindnet.train --config paper_r50_gtav          # DDP + SyncBN, global batch 8
    python -m blindnet.train --resume runs/smoke                                     # continue exactly where it stopped
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from blindnet.extras import require_extra


def _resume_run_dir(resume: Path) -> Path:
    # runs/x/checkpoints/ckpt_N.pt -> runs/x ; runs/x -> runs/x
    if resume.is_file():
        return resume.parent.parent if resume.parent.name == "checkpoints" else resume.parent
    return resume


def main(argv: Sequence[str] | None = None, prog: str = "python -m blindnet.train") -> int:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train BlindNet (or a baseline) from a preset.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--config", default=None, help="preset name (train/configs/<name>.yaml) or YAML path")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="A.B=V",
        help="override one config value (repeatable), e.g. --set optim.max_iter=100",
    )
    p.add_argument("--resume", default=None, help="run folder or checkpoint to continue from")
    p.add_argument("--out", default=None, help="run folder (default: runs/<name>, or the resumed run's folder)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)

    require_extra("train")
    # Lazy CLI dispatch: --help answers before PyTorch is imported.
    from blindnet.config import ConfigError, dump_yaml
    from blindnet.train.config import config_from_dict, load_config
    from blindnet.train.loop import NonFiniteLossError, load_training_checkpoint, train

    ckpt = None
    try:
        if args.resume:
            ckpt = load_training_checkpoint(args.resume)  # read once; train() takes it as it is
        if ckpt is not None and args.config is None:
            # The run's own config; --set may still change runtime/eval settings (e.g. the log interval).
            cfg = config_from_dict(ckpt["config"], args.overrides)
        else:
            if args.config is None:
                p.error("give --config PRESET (or --resume RUN_DIR)")
            cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError, RuntimeError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    out = (
        Path(args.out) if args.out else (_resume_run_dir(Path(args.resume)) if args.resume else Path("runs") / cfg.name)
    )
    try:
        result = train(cfg, out, resume=ckpt)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result["rank"] != 0:  # under torchrun only rank 0 reports
        return 0
    if result["eval"]:
        print(
            (Path(result["run_dir"]) / "miou.md").read_text() if (Path(result["run_dir"]) / "miou.md").exists() else ""
        )
    print(f"done: {result['step']} iterations in {result['seconds']:.0f}s; model: {result['model_path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
