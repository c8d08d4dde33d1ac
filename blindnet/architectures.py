"""The backbones the package builds, one entry each with its facts, with the standard library only.

Command lines list these names before PyTorch loads; the model (:data:`blindnet.models.backbones.ENCODERS`, the
class per name), the backends (stride of the deepest InstanceNorm), checkpoint conversion (variant probes) and the
benchmarks all read them from here. Adding a backbone is one entry here plus its encoder class.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backbone:
    """What the rest of the package needs to know about one encoder.

    Attributes:
        norm_stride: stride of the deepest InstanceNorm layer in the BlindNet variant (an input whose sides are
            multiples of it is normalised over exactly the pixels the network sees; padding is to this multiple).
        style_channels: channels of the three InstanceNorm'd style features (CML/CCL act on them).
        variant_probes: BatchNorms that, in the BlindNet variant, normalise a bias-free 1x1 conv of an InstanceNorm
            output, so their running means are ~0 there and not in the baseline (tells the variants apart in a
            converted checkpoint); empty where the stem tells them apart instead.
    """

    norm_stride: int
    style_channels: tuple[int, int, int]
    variant_probes: tuple[str, ...] = ()


BACKBONES: dict[str, Backbone] = {
    "resnet50": Backbone(norm_stride=8, style_channels=(64, 256, 512)),
    "mobilenetv2": Backbone(
        norm_stride=16,
        style_channels=(16, 32, 64),
        variant_probes=("encoder.layer1.0.conv.0.1", "encoder.layer2.0.conv.0.1", "encoder.layer3.0.conv.0.1"),
    ),
    "shufflenetv2": Backbone(
        norm_stride=16,
        style_channels=(24, 116, 232),
        variant_probes=("encoder.layer2.0.branch2.1", "encoder.layer3.0.branch2.1"),
    ),
}

BACKBONE_NAMES: tuple[str, ...] = tuple(BACKBONES)
