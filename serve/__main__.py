"""``python -m blindnet.serve``: run the batched inference server for a checkpoint or exported model.

Examples::

    python -m blindnet.serve --checkpoint runs/x/model.safetensors              # 127.0.0.1:8000, auto backend
    python -m blindnet.serve --backend onnx --checkpoint model.onnx --device cuda --input-size 512 1024
    python -m blindnet.serve --host 0.0.0.0 --api-key "$KEY"                   # non-loopback needs a key
    python -m blindnet.serve --ray --replicas 2                                # the same API on Ray Serve replicas

SIGTERM / Ctrl-C: stop accepting connections, finish in-flight requests, drain the queue, then exit (uvicorn
re-raises the signal after the graceful shutdown, so the exit status is the usual "terminated by SIGTERM").
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from blindnet.backends import BACKEND_NAMES
from blindnet.cliparse import JobParser
from blindnet.extras import require_extra
from blindnet.serve import ray_serve


def build_parser(prog: str = "python -m blindnet.serve") -> argparse.ArgumentParser:
    p = JobParser(
        prog=prog,
        description="Run the batched inference server (KServe v2 / Triton HTTP protocol) for a checkpoint or an "
        "exported model.",
    )
    p.add_argument("--checkpoint", help="checkpoint (.safetensors/.pt) or exported model; default: the shipped one")
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKEND_NAMES,
        help="inference backend (default: auto, the fastest correct path on this machine)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: the backend's own default)")
    p.add_argument("--precision", default=None, help="float32, float16 or bfloat16 (default: the backend's)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--model-name", default="blindnet", help="name under /v2/models/")
    p.add_argument("--max-batch-size", type=int, default=8, help="most images per network call")
    p.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=5.0,
        help="how long the first queued image waits for others to fill its batch",
    )
    p.add_argument("--max-queue-size", type=int, default=64, help="images waiting before 503 + Retry-After")
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="serving resolution: resize every image to it (all requests batch together); "
        "default: run each image at its own size and batch equal sizes only",
    )
    p.add_argument("--api-key", default=os.environ.get("BLINDNET_API_KEY"), help="required key (env BLINDNET_API_KEY)")
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="allow a non-loopback --host without --api-key (a proxy in front must authenticate)",
    )
    p.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body (413 beyond)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest H*W per image (413 beyond)")
    p.add_argument(
        "--max-decode-pixels",
        type=int,
        default=None,
        help="most pixels all concurrent image decodes hold together (default: twice --max-image-pixels)",
    )
    p.add_argument("--body-timeout-s", type=float, default=30.0, help="longest a request body may take (408 beyond)")
    p.add_argument(
        "--drain-timeout-s", type=float, default=30.0, help="longest SIGTERM shutdown takes (in-flight, then queue)"
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="server log verbosity (default info)",
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="run the same server as Ray Serve replicas on a local Ray or a cluster (see --ray --help for its flags)",
    )
    return p


def main(argv: list[str] | None = None, prog: str = "python -m blindnet.serve") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--ray" in argv:
        # The scaled-out runner has flags of its own (replicas, resources, cluster address): its parser decides.
        return ray_serve.main([a for a in argv if a != "--ray"], prog=f"{prog} --ray")
    args = build_parser(prog).parse_args(argv)
    require_extra("serve")
    # Lazy CLI dispatch: --help answers before PyTorch and FastAPI are imported.
    from blindnet.backends.select import make_backend
    from blindnet.serve.app import DrainingServer, InsecureBindError, check_bind, create_app, uvicorn_config
    from blindnet.serve.config import ServeConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_bind(args.host, args.api_key, allow_unauthenticated=args.allow_unauthenticated)
    except InsecureBindError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = ServeConfig(
        model_name=args.model_name,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        max_queue_size=args.max_queue_size,
        input_size=tuple(args.input_size) if args.input_size else None,
        api_key=args.api_key,
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels,
        max_decode_pixels=args.max_decode_pixels,
        body_timeout_s=args.body_timeout_s,
        drain_timeout_s=args.drain_timeout_s,
    )
    backend_kwargs = {k: v for k, v in (("device", args.device), ("precision", args.precision)) if v is not None}
    try:
        backend = make_backend(args.backend, args.checkpoint, **backend_kwargs)
        app = create_app(backend, config)
    except (FileNotFoundError, ImportError, ValueError, RuntimeError) as exc:
        # Missing default checkpoint, missing optional runtime (onnxruntime/TensorRT), bad settings: say which.
        print(f"error: cannot start the server: {exc}", file=sys.stderr)
        return 2
    server = DrainingServer(uvicorn_config(app, args.host, args.port, log_level=args.log_level))
    # uvicorn installs SIGTERM/SIGINT handlers: stop listening, finish in-flight requests, then the app's lifespan
    # shutdown drains the batch queue, all within --drain-timeout-s.
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
