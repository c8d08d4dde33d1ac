"""Scale-out on Ray Serve (optional extra ``pip install 'blindnet[ray]'``): the same HTTP API, many replicas/machines.

``blindnet serve --ray`` (or ``python -m blindnet.serve.ray_serve``) runs the application that
``python -m blindnet.serve`` runs under uvicorn, unchanged, as the ingress of a Ray Serve deployment: every replica
builds its own app (KServe v2 / Triton protocol, ``/v1/segment``, health, ``/metrics``, the same limits and error
codes) with its own model and dynamic batcher, and Ray's HTTP proxy spreads requests over the replicas, on one
machine or across a cluster.

==================================  ==================================================================================
``python -m blindnet.serve``        Ray Serve
==================================  ==================================================================================
``--max-batch-size``, queue delay   the same, inside each replica (each replica batches its own requests)
``--max-queue-size`` -> 503         the same, per replica; plus ``max_queued_requests`` -> 503 at Ray's proxy
one process                         ``num_replicas`` (or ``"auto"`` + ``autoscaling``), CPUs/GPUs per replica
==================================  ==================================================================================

A replica only fills batches if Ray lets it hold that many requests at once, so ``max_ongoing_requests`` must be at
least ``max_batch_size`` (Ray counts a request as ongoing while it waits in our queue); the default is twice the batch
size and smaller values are refused.

This module holds only the settings and the command line; it imports neither Ray nor PyTorch, so ``--help`` answers
at once and the module imports where Ray is not installed. The Ray side lives in :mod:`blindnet.serve.ray_replica`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blindnet.backends import BACKEND_NAMES
from blindnet.config import from_dict
from blindnet.extras import require_extra
from blindnet.serve.config import ServeConfig, add_serve_flags, serve_values

#: ServeConfig keys a YAML file may also give at its top level (as files written before they were nested did).
_SERVE_KEYS = frozenset(f.name for f in dataclasses.fields(ServeConfig))


@dataclass
class RayServeConfig:
    """Settings of the Ray Serve application (YAML keys = these names; unknown keys are an error).

    ``serve`` holds the server settings every replica runs with: the very :class:`ServeConfig` of ``blindnet serve``
    (batching, queue, every request limit, timeouts, API key, drain time), so a replica enforces exactly what
    ``blindnet serve`` enforces. In a YAML file they go under ``serve:`` or, for short, at the top level.

    Attributes:
        checkpoint: model file; None: the shipped default checkpoint. A relative path is taken from the folder the
            command runs in; on a cluster the file must exist at that path on every node.
        backend, device, precision: as ``python -m blindnet.serve`` (device/precision None: the backend's defaults).
        serve: the server settings of each replica (see above).
        num_replicas: replica count, or ``"auto"`` (then ``autoscaling`` applies).
        autoscaling: Ray's ``autoscaling_config`` (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``...).
        num_cpus_per_replica, num_gpus_per_replica: resources Ray reserves per replica (fractions allowed).
        threads_per_replica: PyTorch CPU threads in each replica; None: ``num_cpus_per_replica`` rounded, at least 1.
        max_ongoing_requests: requests a replica holds at once; None: ``2 * serve.max_batch_size``.
        max_queued_requests: requests waiting for a replica at Ray's proxy before callers get 503 (-1: unbounded).
        host, port: where Ray's HTTP proxy listens (on every node that runs one).
        proxy_location: ``EveryNode`` (a proxy on each node with replicas: point a load balancer at all of them),
            ``HeadOnly`` (one entry point; also what several nodes sharing one IP address need), or ``Disabled``.
        address: Ray cluster to join (``auto``, ``HOST:PORT``); None: start a private local Ray for this command.
        node_ip_address: this machine's address in that cluster; None: Ray's guess, which is wrong when several nodes
            share one host on different loopback addresses.
        name: the Ray Serve application and deployment name.
    """

    checkpoint: str | None = None
    backend: str = "torch"
    device: str | None = None
    precision: str | None = None
    serve: ServeConfig = field(default_factory=ServeConfig)
    num_replicas: int | str = 1
    autoscaling: dict[str, Any] = field(default_factory=dict)
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    threads_per_replica: int | None = None
    max_ongoing_requests: int | None = None
    max_queued_requests: int = 256
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None
    node_ip_address: str | None = None
    proxy_location: str = "EveryNode"
    name: str = "blindnet"

    def __getattr__(self, name: str) -> Any:
        # ``cfg.max_batch_size`` reads ``cfg.serve.max_batch_size``: one set of names for both runners.
        if name in _SERVE_KEYS:
            return getattr(self.serve, name)
        raise AttributeError(name)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RayServeConfig:
        """Build and validate from a mapping (a parsed YAML file); unknown keys raise ``ValueError``.

        ServeConfig keys at the top level are moved under ``serve`` (a key given in both places is an error).
        """
        data = dict(data)
        flat = {k: data.pop(k) for k in list(data) if k in _SERVE_KEYS}
        nested = dict(data.get("serve") or {})
        both = sorted(set(flat) & set(nested))
        if both:
            raise ValueError(f"{both} given both at the top level and under 'serve'")
        if flat:
            data["serve"] = {**nested, **flat}
        cfg = from_dict(cls, data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ``ValueError`` for settings Ray would accept but that cannot work."""
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) < max_batch_size ({self.max_batch_size}): "
                "a replica could never hold enough requests to fill a batch"
            )
        if not (self.num_replicas == "auto" or (isinstance(self.num_replicas, int) and self.num_replicas >= 1)):
            raise ValueError(f"num_replicas must be a positive int or 'auto', got {self.num_replicas!r}")
        if self.proxy_location not in ("EveryNode", "HeadOnly", "Disabled"):
            raise ValueError(f"proxy_location must be EveryNode, HeadOnly or Disabled, got {self.proxy_location!r}")
        if self.threads_per_replica is not None and self.threads_per_replica < 1:
            raise ValueError(f"threads_per_replica must be >= 1, got {self.threads_per_replica}")

    def threads(self) -> int:
        """PyTorch threads per replica: as many as the CPUs Ray reserves for it, so replicas do not oversubscribe."""
        return self.threads_per_replica or max(1, round(self.num_cpus_per_replica))

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        opts: dict[str, Any] = {
            "name": self.name,
            "ray_actor_options": {"num_gpus": self.num_gpus_per_replica, "num_cpus": self.num_cpus_per_replica},
            "max_ongoing_requests": self.max_ongoing_requests or 2 * self.max_batch_size,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.serve.drain_timeout_s,
            # How often a stopping replica checks whether its requests are done: short, so shutdown is prompt.
            "graceful_shutdown_wait_loop_s": 0.5,
        }
        if self.num_replicas == "auto":
            opts["num_replicas"] = "auto"
            if self.autoscaling:
                opts["autoscaling_config"] = dict(self.autoscaling)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts

    def to_dict(self) -> dict[str, Any]:
        """Plain data, what the driver sends to every replica (which rebuilds the config with :meth:`from_dict`)."""
        return asdict(self)


def build_parser(prog: str = "python -m blindnet.serve.ray_serve") -> argparse.ArgumentParser:
    """Flags override the keys of ``--config``; every flag left out keeps the file's (or the default) value."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run the blindnet HTTP server as Ray Serve replicas, on a local Ray or an existing cluster.",
        argument_default=argparse.SUPPRESS,  # absent flags must not override the YAML file
    )
    p.add_argument("--config", help="YAML file with RayServeConfig keys (unknown keys are an error)")
    p.add_argument("--checkpoint", help="checkpoint or exported model (default: the shipped one)")
    p.add_argument("--backend", choices=BACKEND_NAMES, help="inference backend (default: auto, as blindnet serve)")
    p.add_argument("--device", help="cpu or cuda (default: the backend's)")
    p.add_argument("--precision", help="float32, float16 or bfloat16 (default: the backend's)")
    p.add_argument("--replicas", dest="num_replicas", help="replica count or 'auto' (default 1)")
    p.add_argument("--cpus-per-replica", dest="num_cpus_per_replica", type=float, help="default 1")
    p.add_argument("--gpus-per-replica", dest="num_gpus_per_replica", type=float, help="default 0")
    p.add_argument("--threads-per-replica", type=int, help="PyTorch threads (default: CPUs per replica)")
    p.add_argument("--max-ongoing-requests", type=int, help="requests a replica holds (default 2x batch size)")
    p.add_argument("--max-queued-requests", type=int, help="requests Ray's proxy queues before 503 (default 256)")
    p.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--address", help="Ray cluster to join ('auto' or HOST:PORT); default: a private local Ray")
    p.add_argument("--node-ip-address", help="this machine's address in the cluster (default: Ray's guess)")
    p.add_argument(
        "--proxy-location", choices=["EveryNode", "HeadOnly", "Disabled"], help="where HTTP proxies run (EveryNode)"
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        default=False,
        help="allow a non-loopback --host without --api-key (a proxy in front must authenticate)",
    )
    p.add_argument("--verbose", action="store_true", default=False, help="show Ray's own logs in this terminal")
    add_serve_flags(p, with_defaults=False)  # each replica's server settings: the flags of blindnet serve
    return p


def config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> RayServeConfig:
    """The YAML file (if any) overlaid with the flags given, validated."""
    import yaml  # only when a file is read: keeps ``--help`` free of it

    values = dict(vars(args))
    data: dict[str, Any] = {}
    path = values.pop("config", None)
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of RayServeConfig keys")
    for flag_only in ("allow_unauthenticated", "verbose"):
        values.pop(flag_only, None)
    serve_flags = serve_values(argparse.Namespace(**values))
    for k in serve_flags:
        values.pop(k)
    if "num_replicas" in values:
        r = values["num_replicas"]
        values["num_replicas"] = r if r == "auto" else int(r)
    data.update(values)
    serve = {**{k: data.pop(k) for k in list(data) if k in _SERVE_KEYS}, **dict(data.pop("serve", None) or {})}
    serve.update(serve_flags)
    key = (environ or {}).get("BLINDNET_API_KEY")
    if "api_key" not in serve and key:
        serve["api_key"] = key
    data["serve"] = serve
    cfg = RayServeConfig.from_dict(data)
    # imported lazily because the zoo loads PyTorch, which `--help` must not wait for
    from blindnet.zoo import checkpoint_path, is_model_name

    if cfg.checkpoint is not None and is_model_name(cfg.checkpoint):
        # A model name: fetched (once) here, so every replica gets the cached file, not a download of its own.
        cfg.checkpoint = str(checkpoint_path(cfg.checkpoint))
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_absolute():
        # Replicas run in Ray's own working folders: hand them the path as the user meant it.
        cfg.checkpoint = str(Path(cfg.checkpoint).expanduser().resolve())
    if cfg.address is None and cfg.checkpoint is not None and not Path(cfg.checkpoint).exists():
        # Fail here, not after Ray has started and retried every replica (on a cluster only the nodes can tell).
        raise FileNotFoundError(f"checkpoint {cfg.checkpoint} does not exist")
    return cfg


def main(argv: list[str] | None = None, prog: str = "python -m blindnet.serve.ray_serve") -> int:
    """Start the service and block until SIGTERM / Ctrl-C, then drain and stop. Exit status 0 on a clean stop."""
    args = build_parser(prog).parse_args(argv)
    require_extra("serve --ray", "ray")
    try:
        config = config_from_args(args, dict(os.environ))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Lazy CLI dispatch: Ray, PyTorch and FastAPI are imported only once the arguments are known to be good.
    from blindnet.serve.ray_replica import run_service

    return run_service(config, verbose=args.verbose, allow_unauthenticated=args.allow_unauthenticated)


if __name__ == "__main__":
    # Run the copy of this module imported under its real name, not ``__main__``: Ray pickles classes defined in
    # ``__main__`` by value, and replicas then cannot resolve their postponed annotations.
    from blindnet.serve.ray_serve import main as _main

    sys.exit(_main())
