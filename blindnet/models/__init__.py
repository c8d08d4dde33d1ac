"""Deployable networks: DeepLabV3+ with ResNet-50, MobileNetV2 or ShuffleNetV2 encoders."""

from blindnet.models.backbones import ENCODERS, EncoderFeatures, StyleNorm
from blindnet.models.deeplabv3plus import (
    ASPP,
    DeepLabV3Plus,
    ModelConfig,
    SegFeatures,
    build_model,
    count_parameters,
)

__all__ = [
    "ASPP",
    "ENCODERS",
    "DeepLabV3Plus",
    "EncoderFeatures",
    "ModelConfig",
    "SegFeatures",
    "StyleNorm",
    "build_model",
    "count_parameters",
]
