"""The networks a benchmark times, their weights and their cost (parameters, MACs, FLOPs) at one resolution."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from blindnet.benchmarks.config import PEER_MODEL, BenchConfig
from blindnet.checkpoint import load_model
from blindnet.export.cost import cost_report
from blindnet.models import ModelConfig, build_model, count_parameters
from blindnet.zoo import checkpoint_path


@dataclass
class ModelSpec:
    """A network to time: our DeepLabV3+ (BlindNet or baseline) or the torchvision peer."""

    name: str
    network: str  # blindnet | baseline | peer
    backbone: str
    config: ModelConfig | None = None  # None for the peer

    def build(self, device: str = "cpu") -> nn.Module:
        """The module on ``device`` (``meta`` builds no storage: used for counting)."""
        with torch.device(device):
            if self.config is None:
                return _peer_model()
            return build_model(replace(self.config))


class _LogitsOnly(nn.Module):
    """torchvision segmentation models return ``{"out": ...}``; time the same ``x -> logits`` contract as ours."""

    def __init__(self, model: nn.Module, num_classes: int = 19) -> None:
        super().__init__()
        self.model = model
        self.config = ModelConfig(num_classes=num_classes)  # read by TorchBackend for num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _peer_model() -> nn.Module:
    from torchvision.models.segmentation import deeplabv3_resnet50

    # weights=None, weights_backbone=None: no downloads; same 19 classes as ours so the heads match.
    return _LogitsOnly(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=19, aux_loss=False))


def model_specs(cfg: BenchConfig) -> list[ModelSpec]:
    """Models in measuring order: the headline (first backbone, first network) first, the peer last."""
    specs = [
        ModelSpec(f"{net}-{bb}", net, bb, ModelConfig.from_dict({"backbone": bb, "instance_norm": net == "blindnet"}))
        for bb in cfg.backbones
        for net in cfg.networks
    ]
    if cfg.peer:
        specs.append(ModelSpec(PEER_MODEL, "peer", "resnet50"))
    return specs


@dataclass
class Cost:
    """Parameters and arithmetic of one model at one resolution (batch 1)."""

    params_deployable: int
    params_paper: int | None
    macs_g: float
    flops_g: float
    flop_counter: str


def model_cost(spec: ModelSpec, size: tuple[int, int]) -> Cost:
    """Count parameters and operations for a ``1 x 3 x H x W`` input.

    Uses :func:`blindnet.export.cost.cost_report` (thop-style MACs, paper-comparable params with the aux
    head); otherwise ``FlopCounterMode`` on the meta device (FLOPs = 2 x conv/matmul MACs, no storage, no time).
    """
    h, w = size
    if spec.config is not None:
        return _cost_from_blindnet(spec.config, size)
    model = spec.build("meta").eval()
    flops = _meta_flops(model, (1, 3, h, w))
    return Cost(
        params_deployable=count_parameters(model),
        params_paper=None,
        macs_g=flops / 2e9,
        flops_g=flops / 1e9,
        flop_counter=f"torch FlopCounterMode {torch.__version__} (meta device; FLOPs = 2 x conv/matmul MACs)",
    )


def _meta_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty(shape))
    return int(counter.get_total_flops())


def _cost_from_blindnet(config: ModelConfig, size: tuple[int, int]) -> Cost:
    """Counts from :mod:`blindnet.export.cost` (thop-style MACs as the paper counts, paper-comparable params with the
    aux head)."""
    report = cost_report(replace(config), sizes=[size], baseline=False)
    params = report["parameters"]
    costs = report["costs"][0]
    return Cost(
        params_deployable=int(params["deployable"]),
        params_paper=int(params["paper_comparable"]),
        macs_g=costs["thop"]["macs"] / 1e9,
        flops_g=costs["flop_counter"]["flops"] / 1e9,
        flop_counter="MACs: thop convention (blindnet.export.cost); FLOPs: FlopCounterMode (2 x conv MACs)",
    )


@torch.no_grad()
def settle_batchnorm(model: nn.Module, size: tuple[int, int], device: torch.device, seed: int = 0) -> None:
    """Give a randomly initialised model batch-norm statistics measured on random data.

    Default statistics (mean 0, var 1) let activations of deep random networks grow large; in float16 that can
    overflow to inf, which would make the finiteness check meaningless. Timing does not depend on these values.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    g = torch.Generator(device="cpu").manual_seed(seed)
    h, w = min(size[0], 256), min(size[1], 512)
    x = torch.randn(2, 3, h, w, generator=g).to(device)
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calls below
    model.train()
    for _ in range(2):
        model(x)
    model.eval()
    for m, mom in zip(bns, saved):
        m.momentum = mom


def load_models(spec: ModelSpec, cfg: BenchConfig, device: torch.device) -> tuple[nn.Module, str]:
    """The float32 eval-mode model on ``device`` and a word on its weights."""
    if spec.config is not None and cfg.checkpoint:
        loaded = load_model(checkpoint_path(cfg.checkpoint))  # a model name: its cached file
        # The checkpoint replaces the random network it matches (same backbone and variant); others stay random.
        if (loaded.config.backbone, loaded.config.instance_norm) == (spec.config.backbone, spec.config.instance_norm):
            return loaded.eval().to(device), f"checkpoint {Path(cfg.checkpoint).name}"
    torch.manual_seed(cfg.seed)
    model = spec.build("cpu").to(device)
    settle_batchnorm(model, cfg.size, device, cfg.seed)
    return model.eval(), "random init (BN settled on random data)"
