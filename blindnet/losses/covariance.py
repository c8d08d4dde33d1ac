"""Covariance matching (CML) and cross-covariance (CCL) losses on the encoder's InstanceNorm outputs.

Original: ``criterion_CA`` (an ``nn.MSELoss``) and ``instance_whitening_loss`` / ``get_covariance_matrix`` /
``get_cross_covariance_matrix`` in ``network/instance_whitening.py`` and ``network/deepv3.py``.

Both losses take the style features of the two views, shallow to deep (``SegFeatures.style``), with the
original view ``x`` first (its features are detached here, so only the augmented branch learns from these terms).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: Added to the diagonal of every (cross-)covariance matrix, as the original does.
COV_EPS = 1e-5


def _flat32(f: torch.Tensor) -> torch.Tensor:
    """``N x C x H x W`` -> ``N x C x HW`` in float32.

    Under bf16 autocast a matmul would round the covariance to 8 mantissa bits; CML values are ~1e-4, so the
    statistics are always computed in float32.
    """
    if f.dim() != 4:
        raise ValueError(f"expected an N x C x H x W feature map, got shape {tuple(f.shape)}")
    return f.float().flatten(2)


def covariance(f: torch.Tensor) -> torch.Tensor:
    """Per-image channel covariance ``F F^T / (HW - 1) + 1e-5 I`` (no mean removal: the IN already centred F).

    Args:
        f: ``N x C x H x W`` features (any float dtype).

    Returns:
        ``N x C x C`` float32 covariance matrices.
    """
    flat = _flat32(f)
    hw = flat.shape[-1]
    with torch.autocast(device_type=flat.device.type, enabled=False):
        cov = torch.bmm(flat, flat.transpose(1, 2)) / max(hw - 1, 1)
    eye = torch.eye(cov.shape[-1], device=cov.device, dtype=cov.dtype)
    return cov + COV_EPS * eye


def cross_covariance_diagonal(f_k: torch.Tensor, f_q: torch.Tensor) -> torch.Tensor:
    """Diagonal of the per-image cross-covariance ``F_k F_q^T / (HW - 1) + 1e-5 I``.

    Only the diagonal is used by CCL, so the ``C x C`` matrix is never formed (``O(C HW)`` instead of ``O(C^2 HW)``).

    Args:
        f_k, f_q: ``N x C x H x W`` features of the two views.

    Returns:
        ``N x C`` float32.
    """
    if f_k.shape != f_q.shape:
        raise ValueError(f"view features differ in shape: {tuple(f_k.shape)} vs {tuple(f_q.shape)}")
    fk, fq = _flat32(f_k), _flat32(f_q)
    hw = fk.shape[-1]
    return (fk * fq).sum(-1) / max(hw - 1, 1) + COV_EPS


def _check_pairs(k_feats: Sequence[torch.Tensor], q_feats: Sequence[torch.Tensor]) -> None:
    if len(k_feats) != len(q_feats):
        raise ValueError(f"got {len(k_feats)} original-view and {len(q_feats)} augmented-view feature maps")
    if len(k_feats) == 0:
        raise ValueError(
            "no style features: CML/CCL need the InstanceNorm layers (ModelConfig(instance_norm=True)); "
            "set their weights to 0 for the plain DeepLabV3+ baseline"
        )


def covariance_matching_loss(k_feats: Sequence[torch.Tensor], q_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """CML: mean squared error between the two views' covariance matrices, averaged over layers.

    Original: ``criterion_CA(cov(k.detach()), cov(q))`` summed over the IN layers and divided by their number. The
    reduction is a plain mean over all ``N * C * C`` entries (not a Frobenius norm).

    Args:
        k_feats: original-view IN outputs, each ``N x C_l x H_l x W_l`` (detached here).
        q_feats: augmented-view IN outputs, same shapes.

    Returns:
        scalar float32 loss.
    """
    _check_pairs(k_feats, q_feats)
    total = q_feats[0].new_zeros((), dtype=torch.float32)
    for f_k, f_q in zip(k_feats, q_feats):
        total = total + F.mse_loss(covariance(f_q), covariance(f_k.detach()))
    return total / len(k_feats)


def cross_covariance_loss(k_feats: Sequence[torch.Tensor], q_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """CCL: squared error of the cross-covariance diagonal against 1, averaged over channels, images and layers.

    Original: ``instance_whitening_loss``; for each image ``mean_c (diag(Sigma_kq)_c - 1)^2``, summed over images and
    divided by N. Off-diagonal entries are deliberately left free (the original authors report that forcing the full
    identity hurt accuracy).

    Args:
        k_feats: original-view IN outputs, each ``N x C_l x H_l x W_l`` (detached here).
        q_feats: augmented-view IN outputs, same shapes.

    Returns:
        scalar float32 loss.
    """
    _check_pairs(k_feats, q_feats)
    total = q_feats[0].new_zeros((), dtype=torch.float32)
    for f_k, f_q in zip(k_feats, q_feats):
        diag = cross_covariance_diagonal(f_k.detach(), f_q)
        total = total + (diag - 1.0).pow(2).mean()
    return total / len(k_feats)
