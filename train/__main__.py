"""``blindnet train`` / ``python -m blindnet.train``: train BlindNet from a preset.

Examples:

    blindnet train --config synthetic_smoke --out runs/smoke                 # a preset by name (see --list-presets)
    blindnet train --config my_recipe.yaml --set optim.max_iter=1000         # your own YAML (only what differs)
    blindnet train --resume runs/smoke                                       # continue exactly where it stopped
    blindnet train --resume runs/smoke --set optim.max_iter=20               # extend a finished run to 20 iterations
    blindnet train --config synthetic_smoke --init runs/smoke/model.safetensors --init-part encoder --out runs/ft
    torchrun --nproc-per-node 2 -m blindnet.train --config paper_r50_gtav    # DDP + SyncBN, global batch 8

A folder that already holds a run is never overwritten: continue it with --resume, or pass --overwrite to move it
aside to <out>.replaced-<time>. Ctrl-C saves a checkpoint of the last finished iteration, prints the command that
resumes it, and exits with status 130.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from blindnet.cliparse import JobParser
from blindnet.extras import require_extra
from blindnet.modelnames import is_model_name

if TYPE_CHECKING:  # for the checker only: --help must not import the training stack
    from blindnet.train.config import TrainConfig

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C


def _resume_run_dir(resume: Path) -> Path:
    # runs/x/checkpoints/ckpt_N.pt -> runs/x ; runs/x -> runs/x
    if resume.is_file():
        return resume.parent.parent if resume.parent.name == "checkpoints" else resume.parent
    return resume


def build_parser(prog: str) -> JobParser:
    p = JobParser(
        prog=prog, description="Train BlindNet (or a baseline) from a preset.", epilog=__doc__.split("\n\n", 1)[1]
    )
    p.add_argument("--config", default=None, help="preset name (see --list-presets) or a YAML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="A.B=V",
        help="override one config value (repeatable), e.g. --set optim.max_iter=100",
    )
    p.add_argument(
        "--resume",
        default=None,
        help="run folder or checkpoint to continue from; only runtime.*, eval.*, optim.max_iter and name may change",
    )
    p.add_argument("--out", default=None, help="run folder (default: runs/<name>, or the resumed run's folder)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="if --out holds a run, move it aside to <out>.replaced-<time> (never deleted) and start a new one",
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="CKPT",
        help="start a new run from these weights: a .safetensors/.pt file or a model name (blindnet models)",
    )
    p.add_argument(
        "--init-part",
        default=None,
        choices=("model", "encoder"),
        help="with --init: every tensor (model, the default) or the encoder only (a new decoder and classifier)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--list-presets", action="store_true", help="list the shipped presets and exit")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m blindnet.train") -> int:
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.init_part and not args.init:
        p.error("--init-part needs --init CKPT")
    if args.init and args.resume:
        p.error("--init starts a new run; --resume continues one: give one of them")
    if args.init and not Path(args.init).is_file() and not is_model_name(args.init):
        p.error(f"--init: no such file or model name: {args.init}")
    if args.resume and not Path(args.resume).exists():
        p.error(f"--resume: no such run folder or checkpoint: {args.resume}")
    if args.overwrite and args.resume:
        p.error("--overwrite starts a new run; --resume continues one: give one of them")
    if args.list_presets:
        from blindnet.train.config import CONFIG_DIR  # lazy CLI dispatch: light (no model code runs)

        print("\n".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))))
        return 0
    if args.config is None and args.resume is None:
        p.error("give --config PRESET (or --resume RUN_DIR)")
    overrides = list(args.overrides)

    require_extra("train")
    # Lazy CLI dispatch: --help answers before PyTorch is imported.
    from blindnet.checkpoint import CheckpointError
    from blindnet.config import ConfigError, dump_yaml
    from blindnet.resolve import resolve_checkpoint
    from blindnet.train.config import config_from_dict, load_config
    from blindnet.train.loop import load_training_checkpoint

    ckpt = None
    try:
        if args.init:  # a file, or a model name (blindnet models): its cached file, fetched on first use
            init = Path(args.init).resolve() if Path(args.init).is_file() else resolve_checkpoint(args.init)
            overrides += [f"init.checkpoint={init}", f"init.part={args.init_part or 'model'}"]
        if args.resume:
            ckpt = load_training_checkpoint(args.resume)  # read once; train() takes it as it is
        if ckpt is not None and args.config is None:
            # The run's own config; --set may change how it runs and evaluates, and its length.
            cfg = config_from_dict(ckpt["config"], overrides)
        else:
            cfg = load_config(args.config, overrides)
    except (ConfigError, CheckpointError, FileNotFoundError, RuntimeError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    out = (
        Path(args.out) if args.out else (_resume_run_dir(Path(args.resume)) if args.resume else Path("runs") / cfg.name)
    )
    return _run(cfg, out, ckpt, args.overwrite, prog)


def _run(cfg: TrainConfig, out: Path, ckpt: dict | None, overwrite: bool, prog: str) -> int:
    """Train and report; every expected failure is one line on stderr and an exit status, never a traceback."""
    # Lazy CLI dispatch, as in main.
    from blindnet.checkpoint import CheckpointError
    from blindnet.config import ConfigError
    from blindnet.train.loop import DiskFullError, NonFiniteLossError, TrainingInterrupted, train
    from blindnet.zoo import backbone_report

    if cfg.model.pretrained_backbone and ckpt is None and os.environ.get("RANK", "0") == "0":
        print(backbone_report(cfg.model.backbone), file=sys.stderr)  # before anything downloads, rank 0 only
    try:
        result = train(cfg, out, resume=ckpt, overwrite=overwrite)
    except TrainingInterrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        if exc.last_checkpoint is not None:
            print(f"resume with:\n  {prog} --resume {shlex.quote(str(exc.run_dir))}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except DiskFullError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result["rank"] != 0:  # under torchrun only rank 0 reports
        return 0
    if result["finished_before"]:
        print(
            f"{result['run_dir']} is already finished ({result['step']} of {result['step']} iterations); nothing to "
            f"do. To train further: {prog} --resume {shlex.quote(str(result['run_dir']))} --set "
            f"optim.max_iter={2 * result['step']}"
        )
        return 0
    table = Path(result["run_dir"]) / "miou.md"
    if result["eval"] and table.exists():
        print(table.read_text())
    print(f"done: {result['step']} iterations in {result['seconds']:.0f}s; model: {result['model_path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
