"""What the network takes in: RGB scaled by ImageNet's per-channel mean and standard deviation.

Training (:mod:`blindnet.data.transforms`), every backend and every exported graph apply this one rule, so it lives
with the model, below all of them.
"""

from __future__ import annotations

from typing import overload

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@overload
def normalize(images: np.ndarray, *, channels_last: bool = True) -> np.ndarray: ...
@overload
def normalize(images: torch.Tensor, *, channels_last: bool = True) -> torch.Tensor: ...


def normalize(images: np.ndarray | torch.Tensor, *, channels_last: bool = True) -> np.ndarray | torch.Tensor:
    """ImageNet normalisation of 0-255 pixel values: ``(x - 255 * mean) / (255 * std)`` per channel, as float32.

    ``images`` is ``N x H x W x 3`` (``channels_last``) or ``N x 3 x H x W``, a numpy array or a torch tensor (kept
    on its device; traced into an exported graph as constants). The one place this rule is written.
    """
    shape = (1, 1, 1, 3) if channels_last else (1, 3, 1, 1)
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(shape) * 255.0
    std = np.asarray(IMAGENET_STD, np.float32).reshape(shape) * 255.0
    if isinstance(images, torch.Tensor):
        x = images.float()
        return (x - torch.as_tensor(mean, device=x.device)) / torch.as_tensor(std, device=x.device)
    return (images.astype(np.float32) - mean) / std
