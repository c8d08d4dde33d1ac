"""Feature-consistency losses for pixel-aligned appearances (two renderings of one scene sharing one label map).

Follows the idea of Montalvo et al., "Leveraging Contrastive Learning for Semantic Segmentation with Consistent Labels
Across Varying Appearances" (arXiv 2412.16592): features of the two appearances are pushed to agree at several
layers with an L2, MMD or cosine-similarity loss. That paper's code is not released and its exact formulas were not
available, so the forms below are *our* choices (``docs/original_implementation.md``, "Aligned appearances"):

* ``l2``: per-location Euclidean norm of the channel difference (not squared), averaged over locations -- the
  DAFormer feature-distance convention;
* ``cosine``: ``1 - cos(f_a, f_b)`` along channels at each location, averaged over locations;
* ``mmd``: biased multi-kernel Gaussian MMD between random pixel subsets of the two views of each image (5 RBF
  kernels, bandwidths ``base * 2^(i-2)``, ``base`` = mean pairwise squared distance), averaged over images.

These losses are only meaningful when ``x`` and ``x_a`` are pixel-aligned (the same geometry), which BlindNet's
photometric pairs are too.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn.functional as F

AlignKind = Literal["none", "l2", "mmd", "cosine"]


def _check(f_a: torch.Tensor, f_b: torch.Tensor) -> None:
    if f_a.shape != f_b.shape or f_a.dim() != 4:
        raise ValueError(
            f"alignment needs two N x C x H x W maps of one shape, got {tuple(f_a.shape)}, {tuple(f_b.shape)}"
        )


def l2_alignment(f_a: torch.Tensor, f_b: torch.Tensor) -> torch.Tensor:
    """Mean over ``N x H x W`` of ``||f_a - f_b||_2`` along channels. ``N x C x H x W`` twice -> scalar float32."""
    _check(f_a, f_b)
    diff = f_a.float() - f_b.float()
    # +1e-12 inside the sqrt: the gradient of a norm at exactly 0 (identical features) would be NaN.
    return (diff.pow(2).sum(1) + 1e-12).sqrt().mean()


def cosine_alignment(f_a: torch.Tensor, f_b: torch.Tensor) -> torch.Tensor:
    """Mean over ``N x H x W`` of ``1 - cos(f_a, f_b)`` along channels. ``N x C x H x W`` twice -> scalar float32."""
    _check(f_a, f_b)
    return (1.0 - F.cosine_similarity(f_a.float(), f_b.float(), dim=1, eps=1e-8)).mean()


def mmd_alignment(
    f_a: torch.Tensor,
    f_b: torch.Tensor,
    *,
    num_samples: int = 256,
    num_kernels: int = 5,
    kernel_mul: float = 2.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Multi-kernel Gaussian MMD^2 (biased) between the pixel features of the two views, per image, averaged.

    Args:
        f_a, f_b: ``N x C x H x W``.
        num_samples: pixels drawn per image and view (the same random locations in both views; all pixels when the
            map is smaller). Keeps the kernel matrices at ``N x 2S x 2S``.

    Returns:
        scalar float32 (>= 0 up to rounding; 0 for identical inputs).
    """
    _check(f_a, f_b)
    n, c, h, w = f_a.shape
    p = h * w
    s = min(num_samples, p)
    # Random subset with a fixed size and no host sync: top-k of uniform keys.
    idx = torch.rand((n, p), device=f_a.device, generator=generator).topk(s, dim=1).indices  # N x S
    xa = f_a.float().flatten(2).gather(2, idx[:, None].expand(n, c, s)).transpose(1, 2)  # N x S x C
    xb = f_b.float().flatten(2).gather(2, idx[:, None].expand(n, c, s)).transpose(1, 2)
    z = torch.cat([xa, xb], dim=1)  # N x 2S x C
    # Expanded squared distances: unlike cdist(...)**2 their gradient is finite where two samples coincide.
    sq = z.pow(2).sum(-1)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2 * torch.bmm(z, z.transpose(1, 2))).clamp(min=0)
    m = 2 * s
    # Bandwidth from the data, not learned through: detached so the loss cannot shrink by inflating distances.
    base = (d2.detach().sum((1, 2)) / max(m * m - m, 1)).clamp(min=1e-12)  # N
    base = base / (kernel_mul ** (num_kernels // 2))
    # a sum of num_kernels >= 1 tensors (the cast: sum() is typed to start from the int 0)
    kernel = cast(torch.Tensor, sum(torch.exp(-d2 / (base * kernel_mul**i)[:, None, None]) for i in range(num_kernels)))
    kxx, kyy = kernel[:, :s, :s], kernel[:, s:, s:]
    kxy = kernel[:, :s, s:]
    return (kxx.mean((1, 2)) + kyy.mean((1, 2)) - 2 * kxy.mean((1, 2))).mean()


ALIGNMENT_LOSSES = {
    "l2": l2_alignment,
    "cosine": cosine_alignment,
    "mmd": mmd_alignment,
}


def alignment_loss(kind: AlignKind, f_a: torch.Tensor, f_b: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """Dispatch by name (``l2``, ``cosine``, ``mmd``); ``N x C x H x W`` twice -> scalar float32."""
    try:
        fn = ALIGNMENT_LOSSES[kind]
    except KeyError:
        raise KeyError(f"unknown alignment loss {kind!r}; choose one of {sorted(ALIGNMENT_LOSSES)}") from None
    return fn(f_a, f_b, **kwargs)
