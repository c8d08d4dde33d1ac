"""The original networks' forward, written out functionally from official state-dict keys.

An implementation independent of ``blindnet.models``: it reads only tensors by their official names and rebuilds
ResNet-50 (OS16/OS8), MobileNetV2 and ShuffleNetV2 x1.0 trunks, with or without the three InstanceNorm layers, and
the DeepLabV3+ head. It also mimics how the original hands the InstanceNorm outputs to CML/CCL: the layer returns
its output tensor itself, so an in-place ReLU that follows overwrites the feature the losses later read.

``train_bn=True`` runs every BatchNorm on batch statistics and writes them into the state's running buffers
(momentum 1): a fabricated checkpoint then carries the statistics its own variant's forward produces, the way a
trained checkpoint does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# MobileNetV2 feature index -> stride of its (first) depthwise conv, torchvision layout; index 14 is dilated (OS16).
_MBV2_STRIDE = {1: 1, 2: 2, 4: 2, 7: 2, 14: 2}
_MBV2_LAYER_START = {"layer0": 0, "layer1": 2, "layer2": 7, "layer3": 11, "layer4": 18}


class _Ops:
    def __init__(self, s: dict[str, Tensor], train_bn: bool) -> None:
        self.s, self.train_bn = s, train_bn

    def bn(self, t: Tensor, p: str) -> Tensor:
        s = self.s
        return F.batch_norm(
            t,
            s[p + ".running_mean"],
            s[p + ".running_var"],
            s[p + ".weight"],
            s[p + ".bias"],
            self.train_bn,
            1.0,
            1e-5,
        )

    def conv(self, t: Tensor, p: str, stride: int = 1, dil: int = 1, groups: int = 1) -> Tensor:
        w = self.s[p + ".weight"]
        pad = dil * (w.shape[-1] // 2)
        return F.conv2d(t, w, self.s.get(p + ".bias"), stride=stride, padding=pad, dilation=dil, groups=groups)


def _inorm(t: Tensor) -> Tensor:
    return F.instance_norm(t, eps=1e-5)


def r50_trunk(o: _Ops, x: Tensor, blindnet: bool, output_stride: int, style: list) -> tuple[Tensor, Tensor]:
    h = o.conv(x, "layer0.0", stride=2)
    if blindnet:
        h = _inorm(h)
        style.append(h)
        h = F.relu(h)  # not in place in the original's ResNet: the feature stays pre-activation
    else:
        h = F.relu(o.bn(h, "layer0.1"))
    h = F.max_pool2d(h, 3, 2, 1)
    dils = {3: 2, 4: 4} if output_stride == 8 else {4: 2}
    low = h
    for li, (nblocks, stride) in enumerate([(3, 1), (4, 2), (6, 2), (3, 2)], start=1):
        dil = dils.get(li, 1)
        for b in range(nblocks):
            p = f"layer{li}.{b}"
            st = 1 if dil > 1 else (stride if b == 0 else 1)
            out = F.relu(o.bn(o.conv(h, p + ".conv1"), p + ".bn1"))
            out = F.relu(o.bn(o.conv(out, p + ".conv2", stride=st, dil=dil), p + ".bn2"))
            out = o.bn(o.conv(out, p + ".conv3"), p + ".bn3")
            if p + ".downsample.0.weight" in o.s:
                identity = o.bn(o.conv(h, p + ".downsample.0", stride=st), p + ".downsample.1")
            else:
                identity = h
            out = out + identity
            if blindnet and li in (1, 2) and b == nblocks - 1:
                out = _inorm(out)
                style.append(out)
            h = F.relu(out)
        if li == 1:
            low = h
    return low, h


def _mbv2_block(o: _Ops, h: Tensor, p: str, index: int) -> Tensor:
    stride = _MBV2_STRIDE.get(index, 1)
    dil = 1
    if index == 14:  # the original dilates layer3's strided conv for output stride 16
        stride, dil = 1, 2
    if p + ".conv.3.weight" in o.s:  # expansion 1x1, depthwise 3x3, projection 1x1
        out = F.relu6(o.bn(o.conv(h, p + ".conv.0.0"), p + ".conv.0.1"))
        c = out.shape[1]
        out = F.relu6(o.bn(o.conv(out, p + ".conv.1.0", stride=stride, dil=dil, groups=c), p + ".conv.1.1"))
        out = o.bn(o.conv(out, p + ".conv.2"), p + ".conv.3")
    else:  # expansion 1: depthwise 3x3, projection 1x1
        c = h.shape[1]
        out = F.relu6(o.bn(o.conv(h, p + ".conv.0.0", stride=stride, dil=dil, groups=c), p + ".conv.0.1"))
        out = o.bn(o.conv(out, p + ".conv.1"), p + ".conv.2")
    if stride == 1 and out.shape == h.shape:
        out = h + out
    return out


def mobilenetv2_trunk(o: _Ops, x: Tensor, blindnet: bool, style: list) -> tuple[Tensor, Tensor]:
    h = F.relu6(o.bn(o.conv(x, "layer0.0.0", stride=2), "layer0.0.1"))
    low = h
    for index in range(1, 18):
        layer = max(name for name, start in _MBV2_LAYER_START.items() if start <= index)
        h = _mbv2_block(o, h, f"{layer}.{index - _MBV2_LAYER_START[layer]}", index)
        if blindnet and index in (1, 6, 10):
            h = _inorm(h)  # after the block output; MobileNetV2 blocks end linearly, no ReLU follows
            style.append(h)
        if index == 6:
            low = h
    h = F.relu6(o.bn(o.conv(h, "layer4.0.0"), "layer4.0.1"))
    return low, h


def _shuffle(t: Tensor) -> Tensor:
    n, c, hh, ww = t.shape
    return t.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)


def _shuffle_block(o: _Ops, h: Tensor, p: str, stride: int, dil: int) -> Tensor:
    def branch2(t: Tensor) -> Tensor:
        t = F.relu(o.bn(o.conv(t, p + ".branch2.0"), p + ".branch2.1"))
        t = o.bn(o.conv(t, p + ".branch2.3", stride=stride, dil=dil, groups=t.shape[1]), p + ".branch2.4")
        return F.relu(o.bn(o.conv(t, p + ".branch2.5"), p + ".branch2.6"))

    if p + ".branch1.0.weight" in o.s:
        b1 = o.bn(o.conv(h, p + ".branch1.0", stride=stride, dil=dil, groups=h.shape[1]), p + ".branch1.1")
        b1 = F.relu(o.bn(o.conv(b1, p + ".branch1.2"), p + ".branch1.3"))
        out = torch.cat([b1, branch2(h)], 1)
    else:
        x1, x2 = h.chunk(2, dim=1)
        out = torch.cat([x1, branch2(x2)], 1)
    return _shuffle(out)


def shufflenetv2_trunk(o: _Ops, x: Tensor, blindnet: bool, style: list) -> tuple[Tensor, Tensor]:
    h = o.conv(x, "layer0.layer.0.0", stride=2)
    if blindnet:
        # The InstanceNorm returns (x, w) with w the very same tensor; the trunk's nn.ReLU(inplace=True) then
        # rewrites that tensor, so the style feature the losses read is the post-ReLU one.
        h = _inorm(h)
        w = h
        style.append(w)
        F.relu(h, inplace=True)
    else:
        h = F.relu(o.bn(h, "layer0.layer.0.1"))
    h = F.max_pool2d(h, 3, 2, 1)
    low = h
    for li, nblocks in ((1, 4), (2, 8), (3, 4)):
        for b in range(nblocks):
            stride, dil = (2, 1) if b == 0 else (1, 1)
            if li == 3 and b == 0:
                stride, dil = 1, 2  # stage4 dilated for output stride 16
            h = _shuffle_block(o, h, f"layer{li}.{b}", stride, dil)
        if blindnet and li in (1, 2):
            h = _inorm(h)
            style.append(h)
        if li == 1:
            low = h
    h = F.relu(o.bn(o.conv(h, "layer4.layer.0"), "layer4.layer.1"))
    return low, h


def deeplab_head(o: _Ops, low: Tensor, l4: Tensor, size: tuple[int, int], output_stride: int) -> Tensor:
    def cbr(t: Tensor, p: str, dil: int = 1) -> Tensor:
        return F.relu(o.bn(o.conv(t, p + ".0", dil=dil), p + ".1"))

    rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)
    pooled = cbr(F.adaptive_avg_pool2d(l4, 1), "aspp.img_conv")
    branches = [F.interpolate(pooled, size=l4.shape[2:], mode="bilinear", align_corners=True)]
    branches.append(cbr(l4, "aspp.features.0"))
    for i, r in enumerate(rates, start=1):
        branches.append(cbr(l4, f"aspp.features.{i}", dil=r))
    aspp = cbr(torch.cat(branches, 1), "bot_aspp")
    fine = cbr(low, "bot_fine")
    aspp = F.interpolate(aspp, size=fine.shape[2:], mode="bilinear", align_corners=True)
    dec = torch.cat([fine, aspp], 1)
    dec = F.relu(o.bn(o.conv(dec, "final1.0"), "final1.1"))
    dec = F.relu(o.bn(o.conv(dec, "final1.3"), "final1.4"))
    logits = o.conv(dec, "final2.0")
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def original_forward(
    state: dict[str, Tensor],
    x: Tensor,
    *,
    backbone: str,
    blindnet: bool,
    output_stride: int = 16,
    train_bn: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """``(logits N x C x H x W, style features as the original's CML/CCL read them)``.

    ``state`` holds official keys, with or without the ``module.`` prefix (a stripped copy is used; with
    ``train_bn`` the running buffers of that copy are overwritten -- pass :func:`strip` output to keep them).
    """
    o = _Ops(strip(state), train_bn)
    style: list[Tensor] = []
    if backbone == "resnet50":
        low, l4 = r50_trunk(o, x, blindnet, output_stride, style)
    elif backbone == "mobilenetv2":
        low, l4 = mobilenetv2_trunk(o, x, blindnet, style)
    elif backbone == "shufflenetv2":
        low, l4 = shufflenetv2_trunk(o, x, blindnet, style)
    else:
        raise ValueError(backbone)
    return deeplab_head(o, low, l4, tuple(x.shape[2:]), output_stride), style


def strip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official keys without the DDP ``module.`` prefix (same tensor objects when already stripped)."""
    if not any(k.startswith("module.") for k in state):
        return state
    return {k.removeprefix("module."): v for k, v in state.items()}
