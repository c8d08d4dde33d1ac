"""Scale-out on Ray Serve (optional extra ``pip install 'blindnet[ray]'``): the same Predictor, many replicas/machines.

Why Ray Serve (deployment_notes.md §1.7): the runner is Python, Ray hosts it unchanged, and it adds replicas across
nodes, autoscaling, fractional GPUs and backpressure. The mapping from the single-machine server:

=============================  ======================================================================
``python -m blindnet.serve``            Ray Serve
=============================  ======================================================================
``max_batch_size``             ``@serve.batch(max_batch_size)`` (set per replica from the config)
``max_queue_delay_ms``         ``batch_wait_timeout_s``
``max_queue_size`` -> 503      ``max_queued_requests`` -> 503 (Ray's proxy), per deployment
one process                    ``num_replicas`` (or ``"auto"`` + ``autoscaling``), ``num_gpus_per_replica``
=============================  ======================================================================

Guard from the notes (Ray #43288): ``max_ongoing_requests`` must be >= ``max_batch_size`` or batches never fill;
:class:`RayServeConfig` defaults it to twice the batch size and refuses smaller values.

HTTP: ``POST /`` (route prefix configurable) with the image bytes, ``?format=labels|color|overlay|json`` exactly as
``/v1/segment`` answers. Python: ``handle.segment.remote(image_uint8_hwc)`` returns the label map. The KServe v2
endpoints stay on ``python -m blindnet.serve`` (one per node, or Triton) when a v2 client is needed.

Ray is imported lazily, so this module imports (and the rest of ``serve`` works) without Ray installed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RayServeConfig:
    """Settings of the Ray Serve deployment (load from YAML with :meth:`from_dict`; unknown keys are an error).

    Attributes:
        checkpoint: model file; None: the shipped default checkpoint.
        backend, device, precision: as ``python -m blindnet.serve`` (device/precision None: the backend's defaults).
        input_size: serving resolution ``(H, W)``, or None to run each image at its own size.
        max_batch_size: images per backend call in one replica.
        batch_wait_timeout_s: longest a replica waits to fill a batch.
        num_replicas: replica count, or ``"auto"`` (then ``autoscaling`` applies).
        autoscaling: Ray's ``autoscaling_config`` (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``...).
        num_gpus_per_replica: GPUs reserved per replica (fractions allowed; 0 on CPU).
        num_cpus_per_replica: CPUs reserved per replica.
        max_ongoing_requests: requests a replica holds at once; None: ``2 * max_batch_size``.
        max_queued_requests: requests waiting for a replica before callers get 503 (-1: unbounded).
        name, route_prefix: deployment name and HTTP route.
    """

    checkpoint: str | None = None
    backend: str = "torch"
    device: str | None = None
    precision: str | None = None
    input_size: tuple[int, int] | None = None
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.005
    num_replicas: int | str = 1
    autoscaling: dict[str, Any] = field(default_factory=dict)
    num_gpus_per_replica: float = 0.0
    num_cpus_per_replica: float = 1.0
    max_ongoing_requests: int | None = None
    max_queued_requests: int = 64
    name: str = "blindnet"
    route_prefix: str = "/"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RayServeConfig:
        from blindnet.config import from_dict

        cfg = from_dict(cls, data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) < max_batch_size ({self.max_batch_size}): "
                "batches could never fill (Ray issue #43288)"
            )
        if not (self.num_replicas == "auto" or (isinstance(self.num_replicas, int) and self.num_replicas >= 1)):
            raise ValueError(f"num_replicas must be a positive int or 'auto', got {self.num_replicas!r}")

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        opts: dict[str, Any] = {
            "name": self.name,
            "ray_actor_options": {"num_gpus": self.num_gpus_per_replica, "num_cpus": self.num_cpus_per_replica},
            "max_ongoing_requests": self.max_ongoing_requests or 2 * self.max_batch_size,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.num_replicas == "auto":
            opts["num_replicas"] = "auto"
            if self.autoscaling:
                opts["autoscaling_config"] = dict(self.autoscaling)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ImportError(
            "Ray Serve is an optional extra and is not installed: pip install 'blindnet[ray]' (or 'ray[serve]')"
        ) from exc
    return ray, serve


def _deployment_class():
    """The deployment class, built after Ray is imported (so importing this module never needs Ray)."""
    _, serve = _import_ray()

    class BlindNetDeployment:
        """One replica: a Predictor behind ``@serve.batch``."""

        def __init__(self, config: dict[str, Any]) -> None:
            from blindnet.inference import Predictor

            cfg = RayServeConfig.from_dict(config)
            kwargs = {k: v for k, v in (("device", cfg.device), ("precision", cfg.precision)) if v is not None}
            self.config = cfg
            self.predictor = Predictor.from_checkpoint(
                cfg.checkpoint,
                backend=cfg.backend,
                input_size=tuple(cfg.input_size) if cfg.input_size else None,
                batch_size=cfg.max_batch_size,
                **kwargs,
            )
            # The decorator's arguments are fixed at class definition; the config decides them per deployment.
            self._batched.set_max_batch_size(cfg.max_batch_size)
            self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
        async def _batched(self, images: list[np.ndarray]) -> list:
            # Off the replica's event loop, so requests keep arriving (and the next batch forms) during compute.
            return await asyncio.to_thread(self.predictor.predict_arrays, images)

        async def segment(self, image: np.ndarray) -> np.ndarray:
            """``H x W x 3`` image (any dtype :func:`to_rgb_uint8` accepts) -> ``H x W`` label map."""
            from blindnet.inference import to_rgb_uint8

            return (await self._batched(to_rgb_uint8(image))).labels

        async def __call__(self, request):
            from starlette.responses import JSONResponse

            from blindnet.serve.app import SEGMENT_FORMATS, HTTPError, decode_upload, segment_response

            fmt = request.query_params.get("format", "labels")
            if fmt not in SEGMENT_FORMATS:
                return JSONResponse({"error": f"unknown format {fmt!r}; choose one of {list(SEGMENT_FORMATS)}"}, 400)
            try:
                image = decode_upload(await request.body(), name="upload", max_pixels=4096 * 4096)
            except HTTPError as exc:
                return JSONResponse({"error": exc.message}, exc.status)
            pred = await self._batched(image)
            alpha = float(request.query_params.get("alpha", 0.5))
            return segment_response(pred, fmt, alpha=alpha, model_name=self.config.name)

    return serve.deployment(BlindNetDeployment)


def build_app(config: RayServeConfig):
    """The Ray Serve application (``serve.run(build_app(cfg))``) for ``config``."""
    config.validate()
    deployment = _deployment_class().options(**config.deployment_options())
    return deployment.bind(asdict(config))


def start(config: RayServeConfig, *, host: str = "127.0.0.1", port: int = 8000, ray_address: str | None = None):
    """Connect to (or start) Ray, start Serve's HTTP proxy on ``host:port`` and deploy; returns the app handle.

    Workers must import ``serve`` (this repository): on a local Ray we put the repository on their ``PYTHONPATH``;
    on a cluster, install the repository on every node or pass ``runtime_env={"working_dir": ...}`` to ``ray.init``.
    """
    ray, serve = _import_ray()
    if not ray.is_initialized():
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address=ray_address, runtime_env={"env_vars": {"PYTHONPATH": path}}, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(config), name=config.name, route_prefix=config.route_prefix)


def main(argv: list[str] | None = None) -> int:
    """``python -m blindnet.serve.ray_serve [--config cfg.yaml] [--checkpoint ...] [--num-replicas N] ...``; Ctrl-C stops."""
    p = argparse.ArgumentParser(prog="python -m blindnet.serve.ray_serve", description="Deploy blindnet on Ray Serve")
    p.add_argument("--config", help="YAML file with RayServeConfig keys (flags below override it)")
    p.add_argument("--checkpoint")
    p.add_argument("--backend")
    p.add_argument("--device")
    p.add_argument("--num-replicas", help="an integer or 'auto'")
    p.add_argument("--gpus-per-replica", type=float)
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    args = p.parse_args(argv)
    data: dict[str, Any] = {}
    if args.config:
        import yaml

        data = yaml.safe_load(Path(args.config).read_text()) or {}
    overrides = {
        "checkpoint": args.checkpoint,
        "backend": args.backend,
        "device": args.device,
        "num_gpus_per_replica": args.gpus_per_replica,
        "max_batch_size": args.max_batch_size,
        "num_replicas": (
            None if args.num_replicas is None else ("auto" if args.num_replicas == "auto" else int(args.num_replicas))
        ),
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = RayServeConfig.from_dict(data)
        start(config, host=args.host, port=args.port, ray_address=args.address)
    except (ImportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"serving {config.name!r} on http://{args.host}:{args.port}{config.route_prefix} (Ctrl-C to stop)")
    import time

    _, serve = _import_ray()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
