"""DeepLabV3+ as BlindNet deploys it: ``forward(x)`` returns logits and nothing else.

Layer facts (ASPP, decoder widths, ``align_corners=True`` upsampling, init) follow the original ``network/deepv3.py``;
module names follow its checkpoints (``aspp``, ``bot_aspp``, ``bot_fine``, ``final1``, ``final2``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from blindnet.config import from_dict
from blindnet.models.backbones import ENCODERS

#: The backbone names as a type (blindnet.architectures.BACKBONES holds their facts; a test keeps the two equal).
#: A name from the command line or a file is a ``str``: :meth:`ModelConfig.validate` checks it.
BackboneName = Literal["resnet50", "mobilenetv2", "shufflenetv2"]


@dataclass
class ModelConfig:
    """Configuration of the deployable network.

    Attributes:
        backbone: ``resnet50``, ``mobilenetv2`` or ``shufflenetv2`` (x1.0).
        num_classes: output classes (19 Cityscapes train ids by default).
        output_stride: 16 (all backbones) or 8 (ResNet-50 only).
        instance_norm: True for BlindNet (three parameter-free InstanceNorm layers stay in the network), False for
            the plain DeepLabV3+ baseline.
        pretrained_backbone: initialise the encoder from torchvision's ImageNet weights (needs the weight file).
        in_train_stats: ``instance`` (true InstanceNorm, default) or ``batch`` (what the original's PyTorch 1.2 SyncBN
            conversion made of those layers during training). Eval is per-instance either way.
    """

    backbone: BackboneName = "resnet50"
    num_classes: int = 19
    output_stride: int = 16
    instance_norm: bool = True
    pretrained_backbone: bool = False
    in_train_stats: Literal["instance", "batch"] = "instance"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict; unknown keys are an error (a typo must not silently change the network)."""
        cfg = from_dict(cls, data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.backbone not in ENCODERS:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {sorted(ENCODERS)}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.output_stride not in (8, 16) or (self.output_stride == 8 and self.backbone != "resnet50"):
            raise ValueError(f"output_stride {self.output_stride} is not supported for {self.backbone}")
        if self.in_train_stats not in ("instance", "batch"):
            raise ValueError(f"in_train_stats must be 'instance' or 'batch', got {self.in_train_stats!r}")


class SegFeatures(NamedTuple):
    """Named intermediates of :meth:`DeepLabV3Plus.forward_features` (N = batch).

    Attributes:
        style: InstanceNorm outputs, shallow to deep (BlindNet only; ``()`` for the baseline). ResNet-50:
            ``N x 64 x H/2 x W/2``, ``N x 256 x H/4``, ``N x 512 x H/8``.
        layer3: encoder stage 3 (aux-head input), ``N x 1024 x H/16 x W/16`` for ResNet-50.
        layer4: encoder output (ASPP input, contrastive level 0), ``N x 2048 x H/16 x W/16`` for ResNet-50.
        dec0: decoder concat ``[bot_fine(low), up(bot_aspp)]``, ``N x 304 x h x w`` (h = H/4 for ResNet-50, H/8 else).
        dec1: decoder feature after ``final1``, ``N x 256 x h x w``.
        logits_low: class scores at decoder resolution, ``N x C x h x w``.
        logits: class scores at input resolution, ``N x C x H x W``.
    """

    style: tuple[torch.Tensor, ...]
    layer3: torch.Tensor
    layer4: torch.Tensor
    dec0: torch.Tensor
    dec1: torch.Tensor
    logits_low: torch.Tensor
    logits: torch.Tensor


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: image pooling, 1x1 and three 3x3 dilated branches, concatenated (1280 ch).

    Concatenation order is the original's: ``[pool, 1x1, r1, r2, r3]``.
    """

    def __init__(self, in_channels: int, channels: int = 256, rates: tuple[int, int, int] = (6, 12, 18)) -> None:
        super().__init__()
        self.features = nn.ModuleList(
            [_conv_bn_relu(in_channels, channels, 1)] + [_conv_bn_relu(in_channels, channels, 3, r) for r in rates]
        )
        self.img_pooling = nn.AdaptiveAvgPool2d(1)
        self.img_conv = _conv_bn_relu(in_channels, channels, 1)
        self.out_channels = channels * (len(rates) + 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``N x C_in x h x w`` -> ``N x 1280 x h x w``."""
        pooled = self.img_conv(self.img_pooling(x))
        # Expand instead of interpolating a 1x1 map: identical to bilinear align_corners=True upsampling of a single
        # pixel, and it keeps the exported graph free of a shape-dependent Resize.
        out = [pooled.expand(-1, -1, x.shape[2], x.shape[3])]
        out.extend(branch(x) for branch in self.features)
        return torch.cat(out, dim=1)


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ (BlindNet variant with InstanceNorm layers, or the plain baseline).

    ``forward`` maps ``N x 3 x H x W`` ImageNet-normalised images (any H, W) to ``N x C x H x W`` logits.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        config = config or ModelConfig()
        config.validate()
        self.config = config
        self.encoder = ENCODERS[config.backbone](
            instance_norm=config.instance_norm,
            output_stride=config.output_stride,
            pretrained=config.pretrained_backbone,
            train_stats=config.in_train_stats,
        )
        rates = (6, 12, 18) if config.output_stride == 16 else (12, 24, 36)
        self.aspp = ASPP(self.encoder.out_channels, 256, rates)
        self.bot_aspp = _conv_bn_relu(self.aspp.out_channels, 256, 1)
        self.bot_fine = _conv_bn_relu(self.encoder.low_level_channels, 48, 1)
        self.final1 = nn.Sequential(*_conv_bn_relu(304, 256, 3), *_conv_bn_relu(256, 256, 3))
        self.final2 = nn.Sequential(nn.Conv2d(256, config.num_classes, kernel_size=1, bias=True))
        init_weights(self.aspp, self.bot_aspp, self.bot_fine, self.final1, self.final2)

    # Decoder feature widths, used by training-only heads.
    dec0_channels = 304
    dec1_channels = 256

    def forward_features(self, x: torch.Tensor) -> SegFeatures:
        """Run the network and return the named intermediates training needs (see :class:`SegFeatures`)."""
        enc = self.encoder(x)
        aspp = self.bot_aspp(self.aspp(enc.layer4))
        fine = self.bot_fine(enc.low_level)
        aspp = F.interpolate(aspp, size=fine.shape[2:], mode="bilinear", align_corners=True)
        dec0 = torch.cat([fine, aspp], dim=1)
        dec1 = self.final1(dec0)
        logits_low = self.final2(dec1)
        logits = F.interpolate(logits_low, size=x.shape[2:], mode="bilinear", align_corners=True)
        return SegFeatures(enc.style, enc.layer3, enc.layer4, dec0, dec1, logits_low, logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``N x 3 x H x W`` normalised images -> ``N x num_classes x H x W`` logits."""
        return self.forward_features(x).logits

    # ---- checkpoint key compatibility -----------------------------------------------------------------------------
    # Our encoder lives under ``encoder.``; the original's trunk sits at the top level (``layer0.`` ... ``layer4.``).
    # Keys are otherwise identical, so conversion is a prefix change.
    _ENCODER_PREFIXES = ("layer0.", "layer1.", "layer2.", "layer3.", "layer4.")


def init_weights(*modules: nn.Module) -> None:
    """The original's ``initialize_weights``: Kaiming-normal convs (fan_in, relu), zero bias, BN gamma 1 / beta 0."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def build_model(config: ModelConfig | dict[str, Any] | None = None) -> DeepLabV3Plus:
    """Build the deployable network from a :class:`ModelConfig` (or a dict of its fields)."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return DeepLabV3Plus(config)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (frozen ones included, as the paper's counts do)."""
    return sum(p.numel() for p in module.parameters())
