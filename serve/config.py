"""Server settings: the one mapping ``blindnet serve`` flags, Ray Serve replicas and the app all read.

:class:`ServeConfig` is the single source of the server's limits. The ``blindnet serve`` command line is generated
from its fields (:func:`add_serve_flags`: flag name, type, default and help all come from here), and
:class:`~blindnet.serve.ray_serve.RayServeConfig` nests it, so a Ray replica enforces exactly what ``blindnet serve``
enforces.

The worst-case memory of the server is a formula of these settings (:meth:`ServeConfig.memory_bound`); serve/README.md
states it with the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

#: Most bytes one decoded pixel occupies while it is decoded and converted (Pillow's 4-byte pixels, a mode
#: conversion, the numpy copy, the RGB result): what the decode pixel budget is multiplied by in the memory bound.
DECODE_BYTES_PER_PIXEL = 16
#: Most bytes one JSON value costs while a JSON text is parsed and turned into an array: the list slot (8), the
#: Python object (a float is 24, an empty list 56 shared over its own separator), the int64 copy numpy makes (8).
#: Measured on CPython 3.11: 4 M floats 170 MB, 2 M one-item lists 131 MB, 2 M empty objects 150 MB.
JSON_BYTES_PER_VALUE = 48
#: Bytes one queued pixel holds (``H x W x 3`` uint8).
QUEUED_BYTES_PER_PIXEL = 3

MIB = 1024 * 1024


def _setting(default: Any, help: str, *, flag: str | None = None, scale: float | None = None, **kw: Any) -> Any:
    """A dataclass field carrying its command-line help (and, for sizes given in MiB, the flag name and scale)."""
    meta = {"help": help, "flag": flag, "scale": scale}
    if callable(default) and not isinstance(default, type):
        return field(default_factory=default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ServeConfig:
    """Server settings; every field is a ``blindnet serve`` flag (``--max-batch-size`` for ``max_batch_size``;
    sizes in bytes are given in MiB on the command line, e.g. ``--max-request-mb``). The help text of each flag is
    the ``help`` of its field below."""

    model_name: str = _setting("blindnet", "the name under /v2/models/")
    model_version: str = _setting("1", "the only version served")
    max_batch_size: int = _setting(8, "most images per network call (and per v2 request)")
    max_queue_delay_ms: float = _setting(5.0, "how long the first queued image waits for others to fill its batch")
    max_queue_size: int = _setting(64, "images waiting in the queue before 503 + Retry-After")
    input_size: tuple[int, int] | None = _setting(
        None,
        "serving resolution H W: resize every image to it (all requests batch together); "
        "default: run each image at its own size and batch equal sizes only",
    )
    api_key: str | None = _setting(
        None, "required key for every endpoint but the health probes (default: env BLINDNET_API_KEY)"
    )
    max_request_bytes: int = _setting(
        64 * MIB, "largest request body, also after decompression (413 beyond)", flag="--max-request-mb", scale=MIB
    )
    max_image_pixels: int = _setting(8 * MIB, "largest H*W of one image (413 beyond; 4K UHD fits)")
    max_decode_pixels: int | None = _setting(
        None, "most pixels all concurrent image decodes hold together (default: twice --max-image-pixels)"
    )
    max_batch_pixels: int = _setting(
        8 * MIB,
        "most pixels in one network batch; larger images queue and run alone (never fewer than one image)",
    )
    max_queue_pixels: int = _setting(
        32 * MIB, "most pixels waiting in the queue before 503 + Retry-After (never fewer than one image)"
    )
    max_json_bytes: int = _setting(
        8 * MIB, "largest JSON text (a JSON body, or the JSON header of a binary one)", flag="--max-json-mb", scale=MIB
    )
    max_json_values: int = _setting(
        4 * MIB,
        "most values in one JSON text, and in the JSON outputs of one answer (413 beyond; binary data has no such "
        "limit)",
    )
    max_response_bytes: int = _setting(
        64 * MIB, "largest output tensor data of one answer (413 before the work)", flag="--max-response-mb", scale=MIB
    )
    memory_budget_bytes: int = _setting(
        1024 * MIB,
        "bytes all request bodies and JSON parses hold together; requests beyond wait for room",
        flag="--memory-budget-mb",
        scale=MIB,
    )
    parse_timeout_s: float = _setting(10.0, "longest reading JSON and building the input tensor may take (413 beyond)")
    body_timeout_s: float = _setting(30.0, "longest a request body may take to arrive (408 beyond)")
    header_timeout_s: float = _setting(10.0, "longest a connection may take to send a request's headers (closed)")
    max_connections: int = _setting(64, "open connections; more are answered 503 and closed at once")
    overlay_alpha: float = _setting(0.5, "label opacity of /v1/segment?format=overlay when the request gives none")
    drain_timeout_s: float = _setting(30.0, "longest SIGTERM shutdown takes (in-flight requests, then the queue)")

    def __post_init__(self) -> None:
        if self.input_size is not None:
            self.input_size = (int(self.input_size[0]), int(self.input_size[1]))
        for name in ("max_batch_size", "max_queue_size", "max_image_pixels", "max_batch_pixels", "max_queue_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_request_bytes", "max_json_bytes", "max_json_values", "max_response_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.memory_budget_bytes < self.max_request_bytes:
            raise ValueError(
                f"memory_budget_bytes ({self.memory_budget_bytes}) < max_request_bytes ({self.max_request_bytes}): "
                "a request of the largest allowed size could never be read"
            )

    @property
    def decode_pixel_budget(self) -> int:
        """Pixels concurrent decodes may hold together (never below one image of the largest size)."""
        budget = self.max_decode_pixels if self.max_decode_pixels is not None else 2 * self.max_image_pixels
        return max(budget, self.max_image_pixels)

    @property
    def batch_pixel_budget(self) -> int:
        """Pixels one batch may hold (never below one image of the largest size, which then runs alone)."""
        return max(self.max_batch_pixels, self.max_image_pixels)

    @property
    def queue_pixel_budget(self) -> int:
        """Pixels the queue may hold (never below one image of the largest size)."""
        return max(self.max_queue_pixels, self.max_image_pixels)

    def memory_bound(self, network_bytes_per_pixel: float, num_classes: int = 19) -> dict[str, int]:
        """The server's worst-case memory above its idle footprint, by part, in bytes (serve/README.md explains it).

        ``network_bytes_per_pixel``: peak memory of the backend per input pixel of a batch (model-dependent; the
        README gives the measured value of the shipped model). ``total`` is the sum of the parts.
        """
        batch = self.batch_pixel_budget
        outputs = min(batch * (1 + 4 * num_classes), self.max_batch_size * self.max_response_bytes)
        parts = {
            "bodies_and_json": self.memory_budget_bytes,
            "decoding": self.decode_pixel_budget * DECODE_BYTES_PER_PIXEL,
            "queue": self.queue_pixel_budget * QUEUED_BYTES_PER_PIXEL,
            "batch": int(batch * network_bytes_per_pixel),
            "answers": 2 * outputs,  # one batch's predictions and their encoded copies
        }
        parts["total"] = sum(parts.values())
        return parts


# ----------------------------------------------------------------------------------------------------------------------
# The command line, generated from the fields
# ----------------------------------------------------------------------------------------------------------------------


def flag_name(f: dataclasses.Field) -> str:
    """``--max-batch-size`` for ``max_batch_size`` (or the field's own flag, for sizes given in MiB)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _flag_kwargs(f: dataclasses.Field, default: Any) -> dict[str, Any]:
    """argparse keyword arguments of one ServeConfig field: type from its annotation, help from its metadata."""
    scale = f.metadata.get("scale")
    shown = default / scale if (scale and default is not None) else default
    suffix = "" if default is None else f" (default: {shown:g})" if isinstance(shown, float) else f" (default: {shown})"
    kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"] + suffix}
    ann = str(f.type)
    if ann.startswith("tuple[int, int]"):
        kw.update(type=int, nargs=2, metavar=("H", "W"))
    elif scale:
        kw.update(type=lambda text, s=scale: int(float(text) * s), metavar="MB")
    elif ann.startswith("int"):
        kw["type"] = int
    elif ann.startswith("float"):
        kw["type"] = float
    else:
        kw["type"] = str
    return kw


def add_serve_flags(parser: argparse.ArgumentParser, *, with_defaults: bool = True) -> None:
    """Add one flag per :class:`ServeConfig` field. ``with_defaults=False`` leaves absent flags out of the namespace
    (for commands whose flags override a file)."""
    group = parser.add_argument_group("server settings (ServeConfig)")
    defaults = ServeConfig()
    for f in dataclasses.fields(ServeConfig):
        default = getattr(defaults, f.name)
        kw = _flag_kwargs(f, default)
        if with_defaults:
            kw["default"] = os.environ.get("BLINDNET_API_KEY") if f.name == "api_key" else default
        else:
            kw["default"] = argparse.SUPPRESS
        group.add_argument(flag_name(f), **kw)


def serve_values(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`ServeConfig` keys present in ``args`` (those :func:`add_serve_flags` added)."""
    names = {f.name for f in dataclasses.fields(ServeConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if values.get("input_size") is not None:
        values["input_size"] = tuple(values["input_size"])
    return values
