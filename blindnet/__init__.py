"""blindnet: BlindNet (CVPR 2024) domain-generalised semantic segmentation, from training to deployment.

The deployable pieces are importable from here; training-only code lives in ``blindnet.losses`` and ``blindnet.task``
and is never imported by this module. The names below are resolved on first use, so that importing a light part of
the package (the ``blindnet`` command, its ``--help``) does not import PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "CheckpointError": "blindnet.checkpoint",
    "convert_official_checkpoint": "blindnet.checkpoint",
    "load_model": "blindnet.checkpoint",
    "save_model": "blindnet.checkpoint",
    "Backend": "blindnet.inference",
    "BackendOutput": "blindnet.inference",
    "Prediction": "blindnet.inference",
    "Predictor": "blindnet.inference",
    "TorchBackend": "blindnet.inference",
    "DeepLabV3Plus": "blindnet.models",
    "ModelConfig": "blindnet.models",
    "build_model": "blindnet.models",
    "count_parameters": "blindnet.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'blindnet' has no attribute {name!r}")
