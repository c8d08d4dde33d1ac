"""The Ray side of :mod:`blindnet.serve.ray_serve`: the replica class, the application, and the service's start/stop.

Each replica builds the very application ``python -m blindnet.serve`` runs (:func:`blindnet.serve.app.create_app`)
and hands it to Ray Serve as the deployment's ingress; Ray runs the app's lifespan, so the replica's dynamic batcher
starts with it and drains when the replica stops.

This module imports Ray at the top: import it only where ``ray[serve]`` is installed (the command line does so only
after parsing its arguments).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO

import ray
import torch
from fastapi import FastAPI
from ray import serve

from blindnet.backends.select import make_backend
from blindnet.serve.app import InsecureBindError, check_bind, create_app
from blindnet.serve.config import ServeConfig
from blindnet.serve.ray_serve import RayServeConfig

log = logging.getLogger("blindnet.serve.ray")


def serve_config(config: RayServeConfig) -> ServeConfig:
    """The settings each replica's server runs with: the very ServeConfig ``blindnet serve`` would run with."""
    return config.serve


class BlindNetReplica:
    """One replica: the HTTP application of ``python -m blindnet.serve`` with its own model and dynamic batcher."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = RayServeConfig.from_dict(config)
        # As many PyTorch threads as CPUs Ray reserved for this replica: more would fight the other replicas.
        torch.set_num_threads(self.config.threads())

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The app, built inside the replica (Ray calls this after ``__init__``, then runs the app's lifespan)."""
        cfg = self.config
        kwargs = {k: v for k, v in (("device", cfg.device), ("precision", cfg.precision)) if v is not None}
        return create_app(make_backend(cfg.backend, cfg.checkpoint, **kwargs), serve_config(cfg))


# Rebinding the name makes Ray's wrapper class importable as ``blindnet.serve.ray_replica.BlindNetReplica``, so Ray
# pickles it by reference: replicas import this module rather than unpickling a copy of the class, whose postponed
# annotations they could not resolve.
BlindNetReplica = serve.ingress()(BlindNetReplica)  # type: ignore[misc]  # the rebinding above, on purpose


def build_application(config: RayServeConfig):
    """The Ray Serve application for ``config`` (``serve.run(build_application(cfg))``)."""
    config.validate()
    deployment = serve.deployment(BlindNetReplica).options(**config.deployment_options())
    return deployment.bind(config.to_dict())


def _ray_init_options(verbose: bool) -> dict[str, Any]:
    """Keyword arguments (and ``RAY_*`` variables) for starting Ray: replicas at normal priority, and Ray's own log
    lines kept out of the user's terminal unless ``verbose`` (they still go to ``/tmp/ray/session_latest/logs``).
    """
    # Ray runs its workers at niceness 15 by default; here they are the service, and on a shared host every other
    # process would pre-empt them. The user's own setting wins.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if verbose:
        return {}
    # Warnings that a user of this command cannot act on (usage statistics prompt, log deduplication notes).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    for name in ("ray", "ray.serve"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return {"log_to_driver": False, "logging_level": logging.ERROR, "configure_logging": True}


# A line Ray's driver prints on behalf of another process: ``(raylet) ...``, ``(ServeReplica:... pid=1) ...``, possibly
# wrapped in terminal colour codes.
_RAY_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)*\([^)]{1,120}\)")


class _WithoutRayLines(io.TextIOBase):
    """A text stream that forwards everything except the lines Ray prints for its own processes.

    Whole lines are judged (``print`` writes a line and its newline separately), so a dropped line leaves no blank.
    """

    def __init__(self, target: TextIO) -> None:
        self.target = target
        self.partial = ""

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        kept = "".join(line + "\n" for line in lines if not _RAY_LINE.match(line))
        if kept:
            self.target.write(kept)
            self.target.flush()
        return len(text)

    def flush(self) -> None:
        if self.partial and not _RAY_LINE.match(self.partial):
            self.target.write(self.partial)
        self.partial = ""
        self.target.flush()


@contextlib.contextmanager
def _ray_lines_hidden(hidden: bool) -> Iterator[None]:
    """Hide Ray's relayed lines on stdout/stderr while the block runs.

    Even with ``log_to_driver=False`` the driver prints errors the raylet publishes, e.g. the retry notice Serve's
    controller causes when it stops itself during ``serve.shutdown()``; nothing a user of this command can act on.
    They stay in Ray's log folder.
    """
    if not hidden:
        yield
        return
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _WithoutRayLines(saved[0]), _WithoutRayLines(saved[1])
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def start(config: RayServeConfig, *, verbose: bool = False):
    """Connect to (or start) Ray, start Serve's HTTP proxy on ``config.host:port`` and deploy; returns the handle.

    ``config.address`` None starts a private local Ray instance (never an unrelated one already running here).
    """
    if not ray.is_initialized():
        options = _ray_init_options(verbose)
        if config.node_ip_address:
            options["_node_ip_address"] = config.node_ip_address
        ray.init(address=config.address or "local", include_dashboard=False, **options)
    logging_config = None if verbose else {"log_level": "WARNING", "enable_access_log": False}
    serve.start(
        proxy_location=config.proxy_location,
        http_options={"host": config.host, "port": config.port},
        logging_config=logging_config,
    )
    return serve.run(build_application(config), name=config.name, route_prefix="/", logging_config=logging_config)


def stop(config: RayServeConfig) -> None:
    """Drain and remove the application, then stop Serve (when nothing else runs on it) and disconnect from Ray.

    Deleting the application first lets Ray's proxy keep answering: each replica stops taking requests, finishes the
    ones it holds (up to ``drain_timeout_s``), and its app's lifespan drains the batch queue.
    """
    serve.delete(config.name)
    if not serve.status().applications:
        serve.shutdown()
    ray.shutdown()


def run_service(config: RayServeConfig, *, verbose: bool = False, allow_unauthenticated: bool = False) -> int:
    """Start, serve until SIGTERM / SIGINT, then :func:`stop`. Returns the exit status (0: clean stop)."""
    try:
        check_bind(config.host, config.api_key, allow_unauthenticated=allow_unauthenticated)
    except InsecureBindError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with _ray_lines_hidden(not verbose):
        try:
            start(config, verbose=verbose)
        except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; the user needs the message and a status
            hint = "" if verbose else " (--verbose shows Ray's logs; all are in /tmp/ray/session_latest/logs)"
            print(f"error: cannot start the Ray Serve application: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
            if ray.is_initialized():
                ray.shutdown()
            return 1
        _wait_for_stop_signal(config)
        print("stopping: finishing in-flight requests", flush=True)
        stop(config)
    print("stopped", flush=True)
    return 0


def _wait_for_stop_signal(config: RayServeConfig) -> None:
    """Block until SIGTERM or SIGINT. Installed after Ray starts, replacing its handlers: a stop is a drain."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    where = config.address or "a local Ray instance"
    print(
        f"serving {config.model_name!r} on http://{config.host}:{config.port} "
        f"({config.num_replicas} replica(s) on {where}); SIGTERM or Ctrl-C stops",
        flush=True,
    )
    # A timed wait, so the main thread returns to the interpreter and runs the signal handler promptly.
    while not stopping.wait(0.5):
        pass
