"""Encoders for DeepLabV3+: ResNet-50, MobileNetV2 and ShuffleNetV2 x1.0, as BlindNet/RobustNet build them.

Every backbone is built from torchvision's definitions (so torchvision's ImageNet weights load as they are) and
then changed exactly where the original code changes it:

* output stride 16 (or 8 for ResNet-50) by dilating the last stage(s), with the original's dilation pattern
  (ResNet-50: *every* ``conv2`` of layer4 gets dilation 2, unlike torchvision's ``replace_stride_with_dilation``
  which leaves block 0 at dilation 1);
* for the BlindNet variant, three parameter-free InstanceNorm layers at the positions of ``--wt_layer 0 0 1 1 1 0 0``.

Module names follow the original checkpoints (``layer0`` ... ``layer4``, ``instance_norm_layer``) so that official
weights map onto ours key for key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, cast, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from blindnet.architectures import BACKBONES


class StyleNorm(nn.Module):
    """Parameter-free per-instance normalisation (BlindNet's ``InstanceWhitening``; eps 1e-5, biased variance).

    ``train_stats="batch"`` reproduces what PyTorch < 1.4 silently did to the original during training: its SyncBN
    conversion turned these layers into batch-statistics normalisation (no running stats). In eval mode both
    settings are per-instance normalisation, so released checkpoints behave the same either way.
    """

    def __init__(self, num_features: int, train_stats: str = "instance") -> None:
        super().__init__()
        if train_stats not in ("instance", "batch"):
            raise ValueError(f"train_stats must be 'instance' or 'batch', got {train_stats!r}")
        self.num_features = num_features
        self.train_stats = train_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.train_stats == "batch":
            return F.batch_norm(x, None, None, training=True, eps=1e-5)
        return F.instance_norm(x, eps=1e-5)

    def extra_repr(self) -> str:
        return f"{self.num_features}, train_stats={self.train_stats}"


class EncoderFeatures(NamedTuple):
    """What an encoder hands to the decoder and to the training losses.

    Attributes:
        style: the InstanceNorm outputs before any activation, shallow to deep; empty for the baseline network.
            (Which of them the original's losses saw after a ReLU is the encoder's ``style_after_relu_in_original``.)
        low_level: feature for the decoder's 48-channel projection (ResNet: layer1 @ /4; others @ /8).
        layer3: input of the training-only auxiliary head.
        layer4: input of ASPP (also the first contrastive level).
    """

    style: tuple[torch.Tensor, ...]
    low_level: torch.Tensor
    layer3: torch.Tensor
    layer4: torch.Tensor


class _Encoder(nn.Module):
    """Common attributes: channel counts of the features in :class:`EncoderFeatures`."""

    low_level_channels: int
    layer3_channels: int
    out_channels: int
    style_channels: tuple[int, ...]
    #: Per style feature: True where the original's CML/CCL read it *after* the following ReLU. The original's
    #: InstanceNorm layer returns its output tensor itself as the style feature; where the next op is an in-place
    #: ReLU, that ReLU overwrites the feature before the losses read it.
    style_after_relu_in_original: tuple[bool, ...] = ()

    def forward(self, x: torch.Tensor) -> EncoderFeatures:  # pragma: no cover - abstract
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------------------------
# ResNet-50
# --------------------------------------------------------------------------------------------------------------------


class _BottleneckIN(nn.Module):
    """A torchvision Bottleneck with an InstanceNorm after ``bn3(conv3) + identity`` and before the final ReLU.

    Keeps the wrapped block's parameter names so original checkpoints load unchanged.
    """

    # taken over from the wrapped block (setattr below)
    conv1: nn.Conv2d
    bn1: nn.BatchNorm2d
    conv2: nn.Conv2d
    bn2: nn.BatchNorm2d
    conv3: nn.Conv2d
    bn3: nn.BatchNorm2d
    downsample: nn.Module | None

    def __init__(self, block: nn.Module, train_stats: str) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample"):
            setattr(self, name, getattr(block, name))
        self.relu = nn.ReLU(inplace=True)
        self.instance_norm_layer = StyleNorm(self.bn3.num_features, train_stats)

    def forward_pre_act(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + identity
        return self.instance_norm_layer(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in place: the pre-activation tensor is also a training feature.
        return F.relu(self.forward_pre_act(x))


@runtime_checkable
class _PreActBlock(Protocol):
    """A block that carries an InstanceNorm: ``forward_pre_act`` returns its output before the block's activation
    (``activate`` where the block has one, else a ReLU)."""

    def forward_pre_act(self, x: torch.Tensor) -> torch.Tensor: ...


def _run_stage(stage: nn.Sequential, x: torch.Tensor, style: list[torch.Tensor]) -> torch.Tensor:
    """Run a stage whose last block may carry an InstanceNorm; collect that block's IN output in ``style``."""
    last = stage[-1]
    for block in list(stage)[:-1]:
        x = block(x)
    if isinstance(last, _PreActBlock):  # has forward_pre_act
        pre = last.forward_pre_act(x)
        style.append(pre)
        return getattr(last, "activate", F.relu)(pre)
    return last(x)


class ResNet50Encoder(_Encoder):
    """Torchvision-layout ResNet-50 (7x7 stem, v1.5 bottlenecks), dilated to output stride 16 or 8."""

    def __init__(
        self, *, instance_norm: bool, output_stride: int = 16, pretrained: bool = False, train_stats: str = "instance"
    ) -> None:
        super().__init__()
        from torchvision.models import ResNet50_Weights, resnet50

        # The original used torchvision's V1 ImageNet weights (resnet50-19c8e357.pth, top-1 76.1).
        net = _with_weights(resnet50, ResNet50_Weights.IMAGENET1K_V1 if pretrained else None, "resnet50")
        self.instance_norm = instance_norm
        # The stem InstanceNorm *replaces* bn1 (so the ImageNet bn1 weights are dropped, as in the original).
        stem_norm = StyleNorm(64, train_stats) if instance_norm else net.bn1
        self.layer0 = nn.Sequential(net.conv1, stem_norm, nn.ReLU(inplace=True), net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if instance_norm:
            self.layer1[-1] = _BottleneckIN(self.layer1[-1], train_stats)
            self.layer2[-1] = _BottleneckIN(self.layer2[-1], train_stats)
        if output_stride == 16:
            _dilate_resnet_stage(self.layer4, 2)
        elif output_stride == 8:
            _dilate_resnet_stage(self.layer3, 2)
            _dilate_resnet_stage(self.layer4, 4)
        else:
            raise ValueError(f"ResNet-50 supports output_stride 16 or 8, got {output_stride}")
        self.low_level_channels, self.layer3_channels, self.out_channels = 256, 1024, 2048
        self.style_channels = BACKBONES["resnet50"].style_channels if instance_norm else ()

    def forward(self, x: torch.Tensor) -> EncoderFeatures:
        style: list[torch.Tensor] = []
        conv1, norm, relu, maxpool = self.layer0
        x = norm(conv1(x))
        if self.instance_norm:
            style.append(x)
        x = maxpool(F.relu(x))
        low = _run_stage(self.layer1, x, style)
        x = _run_stage(self.layer2, low, style)
        l3 = self.layer3(x)
        l4 = self.layer4(l3)
        return EncoderFeatures(tuple(style), low, l3, l4)


def _dilate_resnet_stage(stage: nn.Module, dilation: int) -> None:
    """The original's rule: every ``conv2`` gets ``dilation``, stride 1; ``downsample.0`` gets stride 1."""
    for name, m in stage.named_modules():
        if name.endswith("conv2"):
            m.dilation, m.padding, m.stride = (dilation, dilation), (dilation, dilation), (1, 1)
        elif name.endswith("downsample.0"):
            m.stride = (1, 1)


# --------------------------------------------------------------------------------------------------------------------
# MobileNetV2 and ShuffleNetV2: InstanceNorm after a block's output
# --------------------------------------------------------------------------------------------------------------------


class _MobileBlockIN(nn.Module):
    """A torchvision MobileNetV2 InvertedResidual followed by an InstanceNorm (names kept: ``conv``)."""

    def __init__(self, block: nn.Module, channels: int, train_stats: str) -> None:
        super().__init__()
        self.conv = cast(nn.Module, block.conv)
        self.use_res_connect = block.use_res_connect
        self.instance_norm_layer = StyleNorm(channels, train_stats)

    def forward_pre_act(self, x: torch.Tensor) -> torch.Tensor:
        out = x + self.conv(x) if self.use_res_connect else self.conv(x)
        return self.instance_norm_layer(out)

    @staticmethod
    def activate(x: torch.Tensor) -> torch.Tensor:
        return x  # MobileNetV2 blocks end linearly: the IN output is the block output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pre_act(x)


class _ShuffleBlockIN(nn.Module):
    """A torchvision ShuffleNetV2 InvertedResidual followed by an InstanceNorm (names kept: ``branch1/2``)."""

    def __init__(self, block: nn.Module, channels: int, train_stats: str) -> None:
        super().__init__()
        self.block_stride = block.stride
        self.branch1 = cast(nn.Module, block.branch1)
        self.branch2 = cast(nn.Module, block.branch2)
        self.instance_norm_layer = StyleNorm(channels, train_stats)

    def forward_pre_act(self, x: torch.Tensor) -> torch.Tensor:
        if self.block_stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        out = _channel_shuffle(out, 2, self.instance_norm_layer.num_features)
        return self.instance_norm_layer(out)

    @staticmethod
    def activate(x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pre_act(x)


def _channel_shuffle(x: torch.Tensor, groups: int, channels: int) -> torch.Tensor:
    """Torchvision's channel shuffle with the channel count given as a Python int: traced with dynamic axes, the
    channel size then stays a constant, which the ONNX exporter needs for the InstanceNorm layer that follows."""
    n, _, h, w = x.shape
    return x.view(n, groups, channels // groups, h, w).transpose(1, 2).reshape(n, channels, h, w)


def _dilate_strided_convs(stage: nn.Module, dilation: int) -> None:
    """The original's rule for MobileNetV2/ShuffleNetV2: every stride-2 conv becomes stride 1 with ``dilation``."""
    for m in stage.modules():
        if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
            m.dilation, m.padding, m.stride = (dilation, dilation), (dilation, dilation), (1, 1)


class MobileNetV2Encoder(_Encoder):
    """Torchvision MobileNetV2 split as the original: layer0 = features[0:2], layer1 = [2:7] (/8, 32 ch),
    layer2 = [7:11], layer3 = [11:18] (stride-2 conv dilated, /16), layer4 = features[18] (1280 ch).

    InstanceNorm (BlindNet) after features[1] (16 ch, /2), features[6] (32 ch, /8) and features[10] (64 ch, /16).
    """

    def __init__(
        self, *, instance_norm: bool, output_stride: int = 16, pretrained: bool = False, train_stats: str = "instance"
    ) -> None:
        super().__init__()
        if output_stride != 16:
            raise ValueError(f"MobileNetV2 supports output_stride 16 only, got {output_stride}")
        from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

        net = _with_weights(mobilenet_v2, MobileNet_V2_Weights.IMAGENET1K_V1 if pretrained else None, "mobilenetv2")
        f = list(net.features)
        if instance_norm:
            f[1] = _MobileBlockIN(f[1], 16, train_stats)
            f[6] = _MobileBlockIN(f[6], 32, train_stats)
            f[10] = _MobileBlockIN(f[10], 64, train_stats)
        self.instance_norm = instance_norm
        self.layer0 = nn.Sequential(*f[0:2])
        self.layer1 = nn.Sequential(*f[2:7])
        self.layer2 = nn.Sequential(*f[7:11])
        self.layer3 = nn.Sequential(*f[11:18])
        self.layer4 = nn.Sequential(f[18])
        _dilate_strided_convs(self.layer3, 2)
        self.low_level_channels, self.layer3_channels, self.out_channels = 32, 320, 1280
        self.style_channels = BACKBONES["mobilenetv2"].style_channels if instance_norm else ()

    def forward(self, x: torch.Tensor) -> EncoderFeatures:
        style: list[torch.Tensor] = []
        x = _run_stage(self.layer0, x, style)
        low = _run_stage(self.layer1, x, style)
        x = _run_stage(self.layer2, low, style)
        l3 = self.layer3(x)
        l4 = self.layer4(l3)
        return EncoderFeatures(tuple(style), low, l3, l4)


class _ShuffleStem(nn.Module):
    """``layer0`` of the original ShuffleNetV2 trunk: ``layer = Sequential(conv1, maxpool)`` plus the stem IN.

    With the IN on, the original computes conv -> IN -> ReLU and *skips* conv1's BatchNorm, yet keeps that
    BatchNorm's parameters in the model and its checkpoints (48 parameters, counted in the published totals). We keep
    them too, frozen, so official checkpoints load key for key and the parameter counts match; they are not used.
    """

    def __init__(self, conv1: nn.Sequential, maxpool: nn.Module, instance_norm: bool, train_stats: str) -> None:
        super().__init__()
        self.layer = nn.Sequential(conv1, maxpool)
        self.instance_norm = instance_norm
        if instance_norm:
            self.instance_norm_layer = StyleNorm(cast(nn.Conv2d, conv1[0]).out_channels, train_stats)
            conv1[1].requires_grad_(False)

    def forward_pre_act(self, x: torch.Tensor) -> torch.Tensor:
        conv1 = cast(nn.Sequential, self.layer[0])
        return self.instance_norm_layer(conv1[0](x)) if self.instance_norm else conv1[1](conv1[0](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer[1](F.relu(self.forward_pre_act(x)))


class _ShuffleHead(nn.Module):
    """``layer4`` of the original ShuffleNetV2 trunk: ``layer = conv5`` (1x1 conv, BN, ReLU)."""

    def __init__(self, conv5: nn.Sequential) -> None:
        super().__init__()
        self.layer = conv5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class ShuffleNetV2Encoder(_Encoder):
    """Torchvision ShuffleNetV2 x1.0: layer0 = conv1 + maxpool (/4), layer1 = stage2 (116 ch, /8),
    layer2 = stage3 (232 ch, /16), layer3 = stage4 (464 ch, stride-2 convs dilated, /16), layer4 = conv5 (1024 ch).

    InstanceNorm (BlindNet) on the stem conv (24 ch, /2, instead of its BN), and after the last block of stage2 and
    stage3.
    """

    def __init__(
        self, *, instance_norm: bool, output_stride: int = 16, pretrained: bool = False, train_stats: str = "instance"
    ) -> None:
        super().__init__()
        if output_stride != 16:
            raise ValueError(f"ShuffleNetV2 supports output_stride 16 only, got {output_stride}")
        from torchvision.models import ShuffleNet_V2_X1_0_Weights, shufflenet_v2_x1_0

        weights = ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1 if pretrained else None
        net = _with_weights(shufflenet_v2_x1_0, weights, "shufflenetv2")
        self.instance_norm = instance_norm
        self.layer0 = _ShuffleStem(net.conv1, net.maxpool, instance_norm, train_stats)
        self.layer1, self.layer2, self.layer3 = net.stage2, net.stage3, net.stage4
        if instance_norm:
            self.layer1[-1] = _ShuffleBlockIN(self.layer1[-1], 116, train_stats)
            self.layer2[-1] = _ShuffleBlockIN(self.layer2[-1], 232, train_stats)
        self.layer4 = _ShuffleHead(net.conv5)
        _dilate_strided_convs(self.layer3, 2)
        self.low_level_channels, self.layer3_channels, self.out_channels = 116, 464, 1024
        self.style_channels = BACKBONES["shufflenetv2"].style_channels if instance_norm else ()
        # Only the stem: its IN is followed by the trunk's in-place ReLU in the original. The stage outputs are not
        # followed by a ReLU (and ResNet-50's post-IN ReLUs are not in place), so those features are unaffected.
        self.style_after_relu_in_original = (True, False, False) if instance_norm else ()

    def forward(self, x: torch.Tensor) -> EncoderFeatures:
        style: list[torch.Tensor] = []
        pre = self.layer0.forward_pre_act(x)
        if self.instance_norm:
            style.append(pre)
        x = self.layer0.layer[1](F.relu(pre))
        low = _run_stage(self.layer1, x, style)
        x = _run_stage(self.layer2, low, style)
        l3 = self.layer3(x)
        l4 = self.layer4(l3)
        return EncoderFeatures(tuple(style), low, l3, l4)


def _with_weights(builder: Callable[..., Any], weights: Any, name: str) -> Any:
    """Build a torchvision network, downloading ImageNet weights if asked; offline, fail loudly instead of silently
    training from scratch.

    Returns ``Any``: torchvision's networks carry no type information for a checker, and each encoder reads the
    submodules of its own network (``net.layer1``, ``net.features``, ...)."""
    if weights is None:
        return builder(weights=None)
    try:
        return builder(weights=weights)
    except Exception as exc:  # URLError, HTTPError, socket errors, hash mismatch...
        from torch.hub import get_dir

        raise RuntimeError(
            f"Could not load the ImageNet weights for {name} ({weights.url}): {exc}. "
            f"This machine may be offline: put the file in {get_dir()}/checkpoints/ (on a machine with network, "
            f"`blindnet models --fetch imagenet-{name}` puts it there), or set "
            f"model.pretrained_backbone=false to train from random initialisation on purpose."
        ) from exc


# The encoder class per name of blindnet.architectures.BACKBONES (a test keeps the two key sets equal).
ENCODERS: dict[str, type[_Encoder]] = {
    "resnet50": ResNet50Encoder,
    "mobilenetv2": MobileNetV2Encoder,
    "shufflenetv2": ShuffleNetV2Encoder,
}
