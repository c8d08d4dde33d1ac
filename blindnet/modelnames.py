"""The model names that ``--checkpoint`` accepts, with the standard library only.

A CLI checks its arguments before PyTorch loads; with this it tells a model name (``blindnet-r50-gtav``) from a file
that does not exist. The entries themselves (source, terms, download) are in :mod:`blindnet.zoo`, whose
``MODELS`` keys a test keeps equal to :data:`MODEL_NAMES`.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAMES: tuple[str, ...] = (
    "blindnet-r50-gtav",
    "demo-synthetic",
    "imagenet-resnet50",
    "imagenet-mobilenetv2",
    "imagenet-shufflenetv2",
)


def is_model_name(ref: str | Path | None) -> bool:
    """Whether ``ref`` names a model (an existing file of the same name wins: it is what the user pointed at)."""
    return ref is not None and str(ref) in MODEL_NAMES and not Path(str(ref)).exists()
