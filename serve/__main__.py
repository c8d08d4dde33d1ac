"""``python -m blindnet.serve``: run the batched inference server for a checkpoint or exported model.

Examples::

    python -m blindnet.serve --checkpoint runs/x/model.safetensors              # 127.0.0.1:8000, auto backend
    python -m blindnet.serve --backend onnx --checkpoint model.onnx --device cuda --input-size 512 1024
    python -m blindnet.serve --host 0.0.0.0 --api-key "$KEY"                   # non-loopback needs a key
    python -m blindnet.serve --ray --replicas 2                                # the same API on Ray Serve replicas

Every server setting is a flag generated from :class:`~blindnet.serve.config.ServeConfig` (name, type, default and
help), so ``blindnet serve`` and the Ray Serve replicas (which nest the same class) enforce the same limits.

SIGTERM / Ctrl-C: stop accepting connections, finish in-flight requests, drain the queue, then exit: status 0 when
every request was answered, 1 when the drain time cut some off. A port that is taken is reported in one line before
anything is loaded (status 2).
"""

from __future__ import annotations

import argparse
import logging
import sys

from blindnet.backends import BACKEND_NAMES
from blindnet.cliparse import JobParser
from blindnet.extras import require_extra
from blindnet.serve import ray_serve
from blindnet.serve.config import ServeConfig, add_serve_flags, serve_values


def build_parser(prog: str = "python -m blindnet.serve") -> argparse.ArgumentParser:
    p = JobParser(
        prog=prog,
        description="Run the batched inference server (KServe v2 / Triton HTTP protocol) for a checkpoint or an "
        "exported model.",
    )
    p.add_argument(
        "--checkpoint",
        help="checkpoint (.safetensors/.pt), exported model, or a model name (blindnet models); default: the shipped one",
    )
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
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="allow a non-loopback --host without --api-key (a proxy in front must authenticate)",
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
    add_serve_flags(p)
    return p


def main(argv: list[str] | None = None, prog: str = "python -m blindnet.serve") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--ray" in argv:
        # The scaled-out runner has flags of its own (replicas, resources, cluster address): its parser decides.
        return ray_serve.main([a for a in argv if a != "--ray"], prog=f"{prog} --ray")
    args = build_parser(prog).parse_args(argv)
    try:
        config = ServeConfig(**serve_values(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    require_extra("serve")
    # Lazy CLI dispatch: --help answers before PyTorch and FastAPI are imported.
    from blindnet.backends.select import make_backend
    from blindnet.serve.app import (
        DrainingServer,
        InsecureBindError,
        PortInUseError,
        bind_socket,
        check_bind,
        create_app,
        raise_open_file_limit,
        uvicorn_config,
    )

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_bind(args.host, config.api_key, allow_unauthenticated=args.allow_unauthenticated)
        sock = bind_socket(args.host, args.port)
    except (InsecureBindError, PortInUseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    raise_open_file_limit()
    # Worker threads (parsing, decoding, the batcher's pre/post-processing) hand the GIL back every millisecond
    # instead of every 5: the event loop answers probes and reads sockets sooner while they work.
    sys.setswitchinterval(0.001)
    backend_kwargs = {k: v for k, v in (("device", args.device), ("precision", args.precision)) if v is not None}
    try:
        backend = make_backend(args.backend, args.checkpoint, **backend_kwargs)
        app = create_app(backend, config)
    except (FileNotFoundError, ImportError, ValueError, RuntimeError) as exc:
        # Missing default checkpoint, missing optional runtime (onnxruntime/TensorRT), bad settings: say which.
        print(f"error: cannot start the server: {exc}", file=sys.stderr)
        sock.close()
        return 2
    server = DrainingServer(uvicorn_config(app, args.host, args.port, log_level=args.log_level))
    # SIGTERM/SIGINT: stop listening, finish in-flight requests, then the app's lifespan shutdown drains the batch
    # queue, all within --drain-timeout-s.
    server.run(sockets=[sock])
    if not server.started:
        return 1
    return 0 if server.clean else 1


if __name__ == "__main__":
    sys.exit(main())
