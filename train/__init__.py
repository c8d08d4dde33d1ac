"""Training and evaluation of BlindNet (``python -m train``, ``python -m train.evaluate``).

Library entry points: :func:`train.loop.train`, :func:`train.evaluate.evaluate`, :func:`train.config.load_config`.
Imports are lazy so ``python -m train.evaluate`` does not pull in the training loop.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainConfig", "evaluate", "load_config", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from train.loop import train

        return train
    if name == "evaluate":
        from train.evaluate import evaluate

        return evaluate
    if name in ("TrainConfig", "load_config"):
        from train import config

        return getattr(config, name)
    raise AttributeError(f"module 'train' has no attribute {name!r}")
