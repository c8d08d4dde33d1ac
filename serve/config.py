"""Server settings: what ``python -m blindnet.serve`` and the Ray Serve replicas configure."""

from __future__ import annotations

from dataclasses import dataclass

#: Most bytes one decoded pixel occupies while it is decoded and converted (Pillow's 4-byte pixels, a mode
#: conversion, the numpy copy, the RGB result): what the decode pixel budget is multiplied by in the memory bound.
DECODE_BYTES_PER_PIXEL = 16


@dataclass
class ServeConfig:
    """Server settings (the CLI flags of ``python -m blindnet.serve`` map 1:1 onto these).

    Attributes:
        model_name: the name under ``/v2/models/``.
        model_version: the only version served.
        max_batch_size: most images per backend call (and per v2 request).
        max_queue_delay_ms: longest the oldest request waits for a fuller batch.
        max_queue_size: most images waiting in the queue; beyond it requests get 503 + Retry-After.
        input_size: ``(H, W)`` serving resolution; every image is resized to it (labels come back at the
            image's own size) and all requests share batches. None: run each image at its own size and batch only
            images of identical size.
        api_key: when set, every endpoint except the two health probes needs ``Authorization: Bearer KEY`` or
            ``X-API-Key: KEY``.
        max_request_bytes: largest request body accepted (413 beyond).
        max_image_pixels: largest ``H*W`` of one image accepted (413 beyond).
        overlay_alpha: label opacity of ``/v1/segment?format=overlay`` when the request gives none.
        max_decode_pixels: most pixels all concurrent image decodes hold together (None: twice
            ``max_image_pixels``); decoding memory stays under ``max_decode_pixels * DECODE_BYTES_PER_PIXEL`` bytes.
        body_timeout_s: longest a request body may take to arrive (408 beyond).
        drain_timeout_s: longest SIGTERM shutdown takes: in-flight requests, then the queue, then exit.
    """

    model_name: str = "blindnet"
    model_version: str = "1"
    max_batch_size: int = 8
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 64
    input_size: tuple[int, int] | None = None
    api_key: str | None = None
    max_request_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    overlay_alpha: float = 0.5
    max_decode_pixels: int | None = None
    body_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0

    @property
    def decode_pixel_budget(self) -> int:
        """Pixels concurrent decodes may hold together (never below one image of the largest size)."""
        budget = self.max_decode_pixels if self.max_decode_pixels is not None else 2 * self.max_image_pixels
        return max(budget, self.max_image_pixels)
