"""blindnet: BlindNet (CVPR 2024) domain-generalised semantic segmentation, from training to deployment.

One line to segment a photo with the published model (downloaded and converted once, then cached)::

    from blindnet import Predictor
    prediction = Predictor.from_checkpoint("blindnet-r50-gtav").predict("photo.jpg")[0]   # .labels, .overlay()

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
    "Backend": "blindnet.backends.base",
    "BackendOutput": "blindnet.backends.base",
    "Prediction": "blindnet.inference",
    "Predictor": "blindnet.inference",
    "TorchBackend": "blindnet.backends.torch_backend",
    "MODELS": "blindnet.zoo",
    "fetch_model": "blindnet.zoo",
    "DeepLabV3Plus": "blindnet.models",
    "ModelConfig": "blindnet.models",
    "build_model": "blindnet.models",
    "count_parameters": "blindnet.models",
}

__all__ = sorted(_EXPORTS)


# public name -> its name in the defining module, where the two differ
_RENAMED: dict[str, str] = {"fetch_model": "fetch"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    raise AttributeError(f"module 'blindnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazily resolved names are part of the module: dir(blindnet) and tab completion list them.
    return sorted(set(_EXPORTS) | {n for n in globals() if n.startswith("__")})
