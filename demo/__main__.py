"""Load one or two models and launch the Gradio app (on this machine only unless asked).

Examples:

    blindnet demo                                        # the shipped default checkpoint
    blindnet demo --checkpoint blindnet=runs/bn.safetensors --compare baseline=runs/base.safetensors
    blindnet demo --backend onnx --checkpoint model.onnx --host 0.0.0.0 --port 8080
    blindnet demo --share                                # also a public gradio.live link
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blindnet.backends import BACKEND_NAMES
from blindnet.cliparse import JobParser, cuda_device_count
from blindnet.extras import require_extra


def _named(spec: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` or ``PATH`` -> (name or None, path). A path that exists is never split on '='."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        if name and path:
            return name, Path(path)
    return None, Path(spec)


def model_specs(checkpoints: list[str] | None, compare: str | None) -> list[tuple[str, Path]]:
    """Resolve the ``--checkpoint``/``--compare`` arguments to unique ``(name, path)`` pairs, in display order.

    Names default to the file stem (``default``, ``blindnet_r50`` ...); duplicates get ``-2``, ``-3`` suffixes.
    """
    # Lazy CLI dispatch: blindnet.resolve loads the exporter and PyTorch, which `blindnet demo --help` must not wait for.
    from blindnet.resolve import resolve_checkpoint

    specs = [_named(s) for s in (checkpoints or [])] or [(None, resolve_checkpoint(None))]
    if compare:
        specs.append(_named(compare))
    # A model name (blindnet-r50-gtav) becomes its cached file, fetched once; a path stays a path.
    specs = [(name, resolve_checkpoint(path)) for name, path in specs]
    out: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for name, path in specs:
        base = name or path.stem
        unique, i = base, 2
        while unique in seen:
            unique, i = f"{base}-{i}", i + 1
        seen.add(unique)
        out.append((unique, path))
    return out


def build_parser(prog: str = "python -m blindnet.demo") -> argparse.ArgumentParser:
    head, rest = __doc__.split("\n\n", 1)
    p = JobParser(prog=prog, description=head, epilog=rest)
    p.add_argument(
        "--checkpoint",
        action="append",
        metavar="[NAME=]PATH",
        help="model to load (repeatable); default: the checkpoint shipped with blindnet",
    )
    p.add_argument("--compare", metavar="[NAME=]PATH", help="a second model to compare against (e.g. the baseline)")
    p.add_argument(
        "--backend",
        choices=sorted(BACKEND_NAMES),
        default="auto",
        help="inference backend (default: auto, the fastest correct path on this machine)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: the backend's default)")
    p.add_argument("--precision", default=None, help="float32, float16 or bfloat16 (default: the backend's)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="resize every image to H x W first")
    p.add_argument("--batch-size", type=int, default=8, help="video frames per inference call (default: 8)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument(
        "--max-video-frames", type=int, default=300, help="most frames per video; longer ones are subsampled"
    )
    p.add_argument("--max-video-side", type=int, default=1024, help="downscale video frames to this longer side")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m blindnet.demo") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.max_video_frames < 1 or args.batch_size < 1:
        print("error: --max-video-frames and --batch-size must be >= 1", file=sys.stderr)
        return 2
    if args.device and args.device.startswith("cuda") and cuda_device_count() == 0:  # before PyTorch and the models
        print(f"error: --device {args.device}: no CUDA device is available here (use --device cpu)", file=sys.stderr)
        return 2
    require_extra("demo")
    # Lazy CLI dispatch: --help answers before PyTorch and Gradio are imported.
    from blindnet.demo.app import build_demo, launch
    from blindnet.inference import Predictor

    backend_kwargs = {k: v for k, v in (("device", args.device), ("precision", args.precision)) if v is not None}
    predictors = {}
    try:
        for name, path in model_specs(args.checkpoint, args.compare):
            if not path.exists():
                raise FileNotFoundError(f"checkpoint {path} not found")
            predictors[name] = Predictor.from_checkpoint(
                path,
                backend=args.backend,
                input_size=tuple(args.input_size) if args.input_size else None,
                batch_size=args.batch_size,
                **backend_kwargs,
            )
            print(f"loaded {name}: {path} ({predictors[name].backend.name})", file=sys.stderr)
    except ImportError as exc:  # an optional backend (onnxruntime, tensorrt) that is not installed here
        print(f"error: backend {args.backend!r} is not available here ({exc})", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # CheckpointError is a RuntimeError
        print(f"error: {exc}", file=sys.stderr)
        return 2

    print("building the Gradio app", file=sys.stderr)
    demo = build_demo(
        predictors,
        max_video_frames=args.max_video_frames,
        max_video_side=args.max_video_side,
        video_batch_size=args.batch_size,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") or args.share:
        print("warning: the demo is reachable from other machines; it has no authentication", file=sys.stderr)
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
