"""BlindNet training losses (training-only: never imported by export/serve/demo/benchmarks of the deployed model).

* :mod:`~blindnet.losses.covariance`: CML and CCL on the InstanceNorm outputs (original ``criterion_CA``,
  ``instance_whitening_loss``).
* :mod:`~blindnet.losses.contrastive`: CWCL and SDCL with vectorised samplers (original ``Class_PixelNCELoss`` in
  cwcl.py, ``Disentangle_Contrast`` in sdcl.py), the projection head and an InfoNCE helper.
* :mod:`~blindnet.losses.alignment`: L2 / MMD / cosine feature consistency for pixel-aligned appearances.
"""

from blindnet.losses.alignment import ALIGNMENT_LOSSES, alignment_loss, cosine_alignment, l2_alignment, mmd_alignment
from blindnet.losses.contrastive import (
    CWCLSample,
    ProjectionHead,
    SDCLSample,
    cwcl_from_embeddings,
    cwcl_negative_mask,
    gather_pixels,
    info_nce,
    masked_mean,
    resize_labels,
    sample_cwcl,
    sample_sdcl,
    sdcl_from_embeddings,
)
from blindnet.losses.covariance import (
    covariance,
    covariance_matching_loss,
    cross_covariance_diagonal,
    cross_covariance_loss,
)

__all__ = [
    "ALIGNMENT_LOSSES",
    "CWCLSample",
    "ProjectionHead",
    "SDCLSample",
    "alignment_loss",
    "cosine_alignment",
    "covariance",
    "covariance_matching_loss",
    "cross_covariance_diagonal",
    "cross_covariance_loss",
    "cwcl_from_embeddings",
    "cwcl_negative_mask",
    "gather_pixels",
    "info_nce",
    "l2_alignment",
    "masked_mean",
    "mmd_alignment",
    "resize_labels",
    "sample_cwcl",
    "sample_sdcl",
    "sdcl_from_embeddings",
]
