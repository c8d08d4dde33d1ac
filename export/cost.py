"""Cost report: parameters, multiply-accumulates and FLOPs, ONNX graph size -- and what the paper's numbers mean.

Counting conventions (always stated next to a number; "GFLOPs" alone is ambiguous):

* ``flop_counter``: :class:`torch.utils.flop_counter.FlopCounterMode`, which reports **FLOPs = 2 x MACs** for
  convolutions and counts nothing else (norms, activations, pooling, interpolation are 0). We also give its MACs
  (FLOPs / 2).
* ``thop``: the convention of ``thop.profile`` (what RobustNet/BlindNet's READMEs install), re-implemented with module
  forward hooks: convolution MACs (``out_elements x C_in/groups x k_h x k_w``), plus 2 ops per element for
  BatchNorm/InstanceNorm, ``kernel`` ops per output element for pooling, and (beyond thop, which misses functional
  calls) 4 ops per output element for bilinear ``F.interpolate``. Reported as MACs, as thop does.

Everything runs on the ``meta`` device: no weights and no activations are allocated, so the full 2048 x 1024 ResNet-50
costs about a second and no memory.

Parameter counts:

* ``deployable``: every parameter of the network ``forward`` runs (what export/serve ship);
* ``paper_comparable``: deployable + the training-only auxiliary DSN head on layer3 (3x3 conv L3->512 with bias,
  BatchNorm(512), 1x1 conv 512->C with bias). This is the paper's "45.08M" for ResNet-50 (40,351,539 + 4,729,875);
* ``with_projection_heads``: + the three training-only contrastive projection heads (not in the paper's figure).

The aux-head and projection-head sizes are computed from the encoder's channel counts, without importing the
training code (:mod:`blindnet.task` / :mod:`blindnet.losses`), which deployment code must never import.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from blindnet.export.onnx import export_onnx
from blindnet.models import DeepLabV3Plus, ModelConfig, build_model, count_parameters
from blindnet.models.backbones import StyleNorm

#: The paper's Table (BlindNet, ResNet-50): params and "GFLOPs" at 2048 x 1024, 10.03 ms on a V100.
PAPER_PARAMS_M = 45.08
PAPER_GFLOPS = 277.78
PAPER_RESOLUTION = (1024, 2048)  # (H, W) the paper states
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((1024, 2048), (1024, 1024))

AUX_HIDDEN = 512
PROJ_DIM = 256


# --------------------------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------------------------


def aux_head_params(layer3_channels: int, num_classes: int, hidden: int = AUX_HIDDEN) -> int:
    """Parameters of the original's training-only ``dsn`` head: 3x3 conv (bias) + BN + 1x1 conv (bias).

    ResNet-50 (1024 -> 512 -> 19): 4,718,592 + 512 + 1,024 + 9,728 + 19 = 4,729,875.
    """
    conv3 = 9 * layer3_channels * hidden + hidden
    bn = 2 * hidden
    conv1 = hidden * num_classes + num_classes
    return conv3 + bn + conv1


def projection_head_params(channels: Sequence[int], dim: int = PROJ_DIM) -> int:
    """Parameters of the three training-only projection heads ``1x1 conv C->C (bias), ReLU, 1x1 conv C->dim (bias)``."""
    return sum(c * c + c + c * dim + dim for c in channels)


def _as_model(model_or_config: nn.Module | ModelConfig | dict[str, Any] | str) -> tuple[DeepLabV3Plus, ModelConfig]:
    """A network on the meta device (no memory) and its config; an existing module is rebuilt on meta too."""
    if isinstance(model_or_config, nn.Module):
        cfg = getattr(model_or_config, "config", None)
        if cfg is None:
            raise TypeError("cost_report needs a blindnet DeepLabV3Plus (with .config), a ModelConfig, or a dict")
    elif isinstance(model_or_config, ModelConfig):
        cfg = model_or_config
    elif isinstance(model_or_config, dict):
        cfg = ModelConfig.from_dict(model_or_config)
    elif isinstance(model_or_config, str):
        cfg = ModelConfig.from_dict({"backbone": model_or_config})
    else:
        raise TypeError(f"expected a model, ModelConfig, dict or backbone name, got {type(model_or_config).__name__}")
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "pretrained_backbone": False})
    with torch.device("meta"):
        net = build_model(cfg).eval()
    return net, cfg


def parameter_counts(model_or_config: nn.Module | ModelConfig | dict[str, Any] | str) -> dict[str, int]:
    """``deployable``, ``aux_head``, ``paper_comparable``, ``projection_heads``, ``with_projection_heads``, and
    ``executed`` (parameters of modules that run in ``forward``, i.e. what thop reports)."""
    net, cfg = _as_model(model_or_config)
    enc = net.encoder
    deployable = count_parameters(net)
    aux = aux_head_params(enc.layer3_channels, cfg.num_classes)
    proj = projection_head_params((enc.out_channels, net.dec0_channels, net.dec1_channels))
    return {
        "deployable": deployable,
        "aux_head": aux,
        "paper_comparable": deployable + aux,
        "projection_heads": proj,
        "with_projection_heads": deployable + aux + proj,
        "executed": _executed_params(net),
    }


def _executed_params(net: nn.Module, size: tuple[int, int] = (64, 64)) -> int:
    """Parameters of leaf modules that actually run in ``forward`` (ShuffleNetV2-IN keeps an unused stem BN)."""
    seen: set[nn.Module] = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.add(mod)) for m in net.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            net(torch.empty(1, 3, *size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    # Parameters owned directly by a non-leaf module would be missed; our networks have none.
    return sum(p.numel() for m in seen for p in m.parameters(recurse=False))


# --------------------------------------------------------------------------------------------------------------------
# MACs / FLOPs
# --------------------------------------------------------------------------------------------------------------------


def flop_counter_macs(net: nn.Module, size: tuple[int, int], batch: int = 1) -> dict[str, Any]:
    """FlopCounterMode on the meta device: total FLOPs (2 x conv MACs) and per top-level module."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.empty(batch, 3, *size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    flops = int(counter.get_total_flops())
    root = type(net).__name__
    per_module = {}
    for name, ops in counter.get_flop_counts().items():
        if name.startswith(root + ".") and name.count(".") == 1:
            per_module[name.split(".", 1)[1]] = int(sum(ops.values()))
    return {"flops": flops, "macs": flops // 2, "per_module_flops": per_module}


class _ThopCounter:
    """thop-style counting with forward hooks on leaf modules, plus functional bilinear interpolation."""

    def __init__(self) -> None:
        self.by_kind: Counter[str] = Counter()
        self.per_top: Counter[str] = Counter()

    def add(self, kind: str, top: str, ops: int) -> None:
        self.by_kind[kind] += ops
        self.per_top[top] += ops

    def hook(self, top: str):
        def fn(m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = inputs[0]
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1]
                # thop 0.1.x: out_elements x (C_in / groups) x k_h x k_w; the bias add is not counted.
                self.add("conv", top, out.numel() * (m.in_channels // m.groups) * k)
            elif isinstance(m, nn.Linear):
                self.add("linear", top, out.numel() * m.in_features)
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, StyleNorm)):
                # normalise = subtract + multiply per element (the affine folds into it at inference)
                self.add("norm", top, 2 * x.numel())
            elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                ks = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
                self.add("pool", top, out.numel() * ks[0] * ks[1])
            elif isinstance(m, nn.AdaptiveAvgPool2d):
                kernel = (x.shape[-2] // out.shape[-2]) * (x.shape[-1] // out.shape[-1])
                self.add("pool", top, out.numel() * (kernel + 1))
            elif isinstance(m, nn.Upsample):
                self.add("upsample", top, out.numel() * (4 if m.mode == "bilinear" else 1))
            # ReLU/ReLU6/Dropout/Identity: 0, as in thop

        return fn


class _InterpolateCounter(torch.overrides.TorchFunctionMode):
    """Counts functional ``F.interpolate`` (thop cannot see it; fvcore counts 4 ops per bilinear output element)."""

    def __init__(self, counter: _ThopCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.nn.functional.interpolate:
            mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
            self.counter.add("upsample", "interpolate", out.numel() * (4 if "linear" in mode else 1))
        return out


def thop_style_macs(net: nn.Module, size: tuple[int, int], batch: int = 1) -> dict[str, Any]:
    """thop-convention MACs on the meta device (see module docstring): total, by op kind, by top-level module."""
    counter = _ThopCounter()
    hooks = []
    for top_name, top in net.named_children():
        for m in top.modules():
            if not list(m.children()) or isinstance(m, StyleNorm):
                hooks.append(m.register_forward_hook(counter.hook(top_name)))
    try:
        with torch.no_grad(), _InterpolateCounter(counter):
            net(torch.empty(batch, 3, *size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return {
        "macs": int(sum(counter.by_kind.values())),
        "by_kind": {k: int(v) for k, v in counter.by_kind.items()},
        "per_module": {k: int(v) for k, v in counter.per_top.items()},
    }


def compute_costs(net: nn.Module, size: tuple[int, int]) -> dict[str, Any]:
    """Both conventions at one ``(H, W)`` for batch 1."""
    fc = flop_counter_macs(net, size)
    th = thop_style_macs(net, size)
    return {
        "height": size[0],
        "width": size[1],
        "flop_counter": {"flops": fc["flops"], "macs": fc["macs"], "per_module_flops": fc["per_module_flops"]},
        "thop": th,
        "conv_macs": th["by_kind"].get("conv", 0),
    }


def paper_flops_explanation(net: nn.Module, costs: dict[tuple[int, int], dict[str, Any]]) -> dict[str, Any]:
    """Which convention and resolution reproduce the paper's 277.78 "GFLOPs" (stated for 2048 x 1024)."""
    candidates: list[dict[str, Any]] = []
    sizes = set(costs) | {(1024, 1024), (512, 1024), PAPER_RESOLUTION}
    for size in sorted(sizes):
        c = costs.get(size) or compute_costs(net, size)
        for label, value in (
            ("thop MACs", c["thop"]["macs"]),
            ("conv MACs (FlopCounterMode / 2)", c["flop_counter"]["macs"]),
            ("FLOPs = 2 x MACs (FlopCounterMode)", c["flop_counter"]["flops"]),
        ):
            g = value / 1e9
            candidates.append(
                {
                    "convention": label,
                    "height": size[0],
                    "width": size[1],
                    "giga": round(g, 2),
                    "off_by_pct": round(100.0 * (g - PAPER_GFLOPS) / PAPER_GFLOPS, 2),
                }
            )
    best = min(candidates, key=lambda c: abs(c["off_by_pct"]))
    stated = [c for c in candidates if (c["height"], c["width"]) == PAPER_RESOLUTION]
    return {
        "paper_value": PAPER_GFLOPS,
        "paper_unit": "GFLOPs",
        "paper_resolution": f"{PAPER_RESOLUTION[1]}x{PAPER_RESOLUTION[0]}",
        "best_match": best,
        "at_stated_resolution": stated,
        "candidates": candidates,
        "conclusion": (
            f"The paper's {PAPER_GFLOPS} 'GFLOPs' is reproduced by {best['convention']} at "
            f"{best['width']}x{best['height']} ({best['giga']} G, {best['off_by_pct']:+.2f}%), not by any count at "
            f"the stated {PAPER_RESOLUTION[1]}x{PAPER_RESOLUTION[0]}, where MACs are "
            + ", ".join(f"{c['giga']} G ({c['convention']})" for c in stated)
            + ". I.e. it is a MAC count of a 1024x1024 crop labelled as FLOPs of the full frame."
        ),
    }


# --------------------------------------------------------------------------------------------------------------------
# ONNX graph size, BlindNet vs baseline
# --------------------------------------------------------------------------------------------------------------------

#: Op types whose count a BlindNet network may legitimately change relative to its baseline, and why.
_KNOWN_OP_DIFFERENCES = {
    "InstanceNormalization": "the three parameter-free InstanceNorm layers BlindNet keeps at inference",
    "BatchNormalization": "the stem InstanceNorm replaces the stem BatchNorm (when the exporter does not fold BN)",
    "Relu": "the IN sits before the stage's final ReLU; exporters may split or merge that ReLU differently",
    "Identity": "TorchScript exporter bookkeeping nodes (no computation)",
    "Constant": "constants (e.g. InstanceNormalization's unit scale / zero bias) emitted as nodes",
}


def onnx_graph_stats(path: str | Path) -> dict[str, Any]:
    """Node count, per-op-type node counts, and initializer (weight) element count of an ONNX file."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    ops = Counter(n.op_type for n in proto.graph.node)
    init_elems = sum(int(math.prod(t.dims)) for t in proto.graph.initializer)
    const_elems = 0
    for n in proto.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    const_elems += int(numpy_helper.to_array(a.t).size)
    return {
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "initializer_elements": init_elems,
        "constant_elements": const_elems,
        "file_bytes": Path(path).stat().st_size,
    }


def export_for_count(model: nn.Module, path: Path, *, exporter: str = "auto", size: tuple[int, int] = (64, 96)) -> str:
    """Export the bare network (float32 logits, dynamic batch/H/W) for graph counting; returns the exporter used."""

    return export_onnx(model, path, exporter=exporter, size=size).exporter


def _op_differences(bl_stats: dict, ba_stats: dict, n_style: int) -> tuple[list[dict], list[dict]]:
    """Op-type count differences between the two graphs, each with its known explanation (None when unknown), and
    the unexplained ones (including a wrong number of InstanceNormalization nodes)."""
    differences, unexplained = [], []
    for op in sorted(set(bl_stats["ops"]) | set(ba_stats["ops"])):
        a, b = bl_stats["ops"].get(op, 0), ba_stats["ops"].get(op, 0)
        if a == b:
            continue
        why = _KNOWN_OP_DIFFERENCES.get(op)
        row = {"op": op, "blindnet": a, "baseline": b, "delta": a - b, "explanation": why}
        differences.append(row)
        if why is None:
            unexplained.append(row)
    n_in = bl_stats["ops"].get("InstanceNormalization", 0)
    if n_in != n_style:
        unexplained.append(
            {
                "op": "InstanceNormalization",
                "blindnet": n_in,
                "expected": n_style,
                "explanation": None,
            }
        )

    return differences, unexplained


def _parameter_differences(
    bl_net: nn.Module, base_net: nn.Module, only_base: dict[str, int], unused: int
) -> list[dict]:
    """The parameter difference to the baseline, explained row by row (``unused``: parameters kept, never run)."""
    param_rows = []
    removed_params = sum(p.numel() for n, p in base_net.named_parameters() if n not in dict(bl_net.named_parameters()))
    if removed_params:
        param_rows.append(
            {
                "delta": -removed_params,
                "keys": sorted(
                    k for k in only_base if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                ),
                "explanation": f"the stem InstanceNorm replaces the stem BatchNorm: its weight and bias "
                f"({removed_params} parameters) are gone; its running statistics (buffers) too",
            }
        )
    if unused:
        param_rows.append(
            {
                "delta": 0,
                "keys": [],
                "explanation": f"{unused} parameters are kept but never executed (ShuffleNetV2's stem BatchNorm, kept "
                "frozen so official checkpoints load key for key); they are absent from the ONNX graph",
            }
        )
    return param_rows


def compare_with_baseline(cfg: ModelConfig, *, exporter: str = "auto", workdir: str | Path | None = None) -> dict:
    """Export the network and its baseline (same backbone, no InstanceNorm) and explain every difference.

    The weights are irrelevant to the graph, so both are random. Returns op-type differences, each with an
    explanation, the parameter difference broken down by state-dict key, and ``same_size`` (True when every
    difference is explained: BlindNet adds only parameter-free normalisation and needs no extra weights).
    """
    bl_cfg = ModelConfig.from_dict({**cfg.to_dict(), "instance_norm": True, "pretrained_backbone": False})
    base_cfg = ModelConfig.from_dict({**cfg.to_dict(), "instance_norm": False, "pretrained_backbone": False})
    bl_net, base_net = build_model(bl_cfg).eval(), build_model(base_cfg).eval()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        bl_exporter = export_for_count(bl_net, Path(tmp) / "blindnet.onnx", exporter=exporter)
        ba_exporter = export_for_count(base_net, Path(tmp) / "baseline.onnx", exporter=exporter)
        bl_stats = onnx_graph_stats(Path(tmp) / "blindnet.onnx")
        ba_stats = onnx_graph_stats(Path(tmp) / "baseline.onnx")

    differences, unexplained = _op_differences(bl_stats, ba_stats, len(bl_net.encoder.style_channels))
    bl_state, ba_state = bl_net.state_dict(), base_net.state_dict()
    only_base = {k: int(v.numel()) for k, v in ba_state.items() if k not in bl_state}
    only_bl = {k: int(v.numel()) for k, v in bl_state.items() if k not in ba_state}
    bl_params, ba_params = count_parameters(bl_net), count_parameters(base_net)
    param_rows = _parameter_differences(bl_net, base_net, only_base, bl_params - parameter_counts(bl_cfg)["executed"])
    explained_delta = sum(r["delta"] for r in param_rows)
    if bl_params - ba_params != explained_delta:
        unexplained.append({"op": "parameters", "delta": bl_params - ba_params, "explained": explained_delta})
    weights_delta = (bl_stats["initializer_elements"] + bl_stats["constant_elements"]) - (
        ba_stats["initializer_elements"] + ba_stats["constant_elements"]
    )
    return {
        "exporter": {"blindnet": bl_exporter, "baseline": ba_exporter},
        "blindnet": bl_stats,
        "baseline": ba_stats,
        "node_delta": bl_stats["nodes"] - ba_stats["nodes"],
        "op_differences": differences,
        "parameters": {
            "blindnet": bl_params,
            "baseline": ba_params,
            "delta": bl_params - ba_params,
            "breakdown": param_rows,
            "state_keys_only_in_baseline": only_base,
            "state_keys_only_in_blindnet": only_bl,
        },
        "graph_weight_elements_delta": weights_delta,
        "graph_weight_elements_note": (
            "ONNX InstanceNormalization requires scale and bias inputs: the exporter materialises unit scales and "
            f"zero biases ({2 * sum(bl_net.encoder.style_channels)} constants for C = "
            f"{list(bl_net.encoder.style_channels)}); the rest of the delta is the baseline's stem BatchNorm where "
            "the baseline has one (folded into conv1 as a bias by TorchScript, or a BatchNormalization node with "
            "4 x C values by dynamo)"
        ),
        "unexplained": unexplained,
        "same_size": not unexplained,
    }


# --------------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------------


def cost_report(
    model_or_config: nn.Module | ModelConfig | dict[str, Any] | str,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    *,
    onnx: bool = False,
    onnx_exporter: str = "auto",
    baseline: bool = True,
) -> dict[str, Any]:
    """The cost report of a network (a model, its :class:`ModelConfig`, a config dict, or a backbone name).

    Args:
        model_or_config: what to measure; a model is re-created on the meta device from its config.
        sizes: ``(H, W)`` input sizes (batch 1). The paper's resolution 2048 x 1024 is ``(1024, 2048)``.
        onnx: also export the network and its baseline to ONNX and compare their graphs (node counts per op type,
            every difference explained); takes seconds (TorchScript exporter) to about a minute (dynamo, ResNet-50).
        onnx_exporter: ``"auto"``, ``"dynamo"`` or ``"torchscript"`` for that comparison.
        baseline: also count the baseline DeepLabV3+ (same backbone, no InstanceNorm).

    Returns:
        A JSON-serialisable dict: ``config``, ``parameters``, ``costs`` (one entry per size with both
        conventions), ``paper`` (which convention reproduces 277.78), and optionally ``baseline`` and ``onnx``.
    """
    net, cfg = _as_model(model_or_config)
    sizes = [cast("tuple[int, int]", tuple(int(v) for v in s)) for s in sizes]  # the length is checked below
    for s in sizes:
        if len(s) != 2 or min(s) < 32:
            raise ValueError(f"sizes must be (H, W) pairs with sides >= 32, got {s}")
    costs = {s: compute_costs(net, s) for s in sizes}
    report: dict[str, Any] = {
        "config": cfg.to_dict(),
        "parameters": parameter_counts(cfg),
        "costs": [costs[s] for s in sizes],
        "conventions": {
            "flop_counter": "torch.utils.flop_counter.FlopCounterMode: FLOPs = 2 x conv MACs; nothing else counted",
            "thop": "thop-style MACs: conv out_elements x C_in/groups x k_h x k_w, + 2/element for BN/IN, "
            "+ kernel/element for pooling, + 4/element for bilinear interpolation",
        },
    }
    report["paper"] = paper_flops_explanation(net, costs) if cfg.backbone == "resnet50" else None
    if baseline:
        base_cfg = ModelConfig.from_dict({**cfg.to_dict(), "instance_norm": not cfg.instance_norm})
        if cfg.instance_norm:
            base_net, _ = _as_model(base_cfg)
            report["baseline"] = {
                "config": base_cfg.to_dict(),
                "parameters": parameter_counts(base_cfg),
                "costs": [compute_costs(base_net, s) for s in sizes],
            }
        else:
            report["baseline"] = None  # the network *is* the baseline
    if onnx:
        report["onnx"] = compare_with_baseline(cfg, exporter=onnx_exporter)
    return report


def _g(v: float) -> str:
    return f"{v / 1e9:,.2f} G"


def _paper_section(paper: dict[str, Any] | None) -> list[str]:
    """Markdown lines: which counting convention reproduces the paper's number (none without ``paper``)."""
    lines: list[str] = []
    if paper:
        lines += [
            "",
            "## The paper's number",
            "",
            paper["conclusion"],
            "",
            "| convention | input (W x H) | value | vs 277.78 |",
            "|---|---|---:|---:|",
        ]
        for c in sorted(paper["candidates"], key=lambda c: abs(c["off_by_pct"]))[:6]:
            lines.append(
                f"| {c['convention']} | {c['width']} x {c['height']} | {c['giga']} G | {c['off_by_pct']:+.2f}% |"
            )
    return lines


def _onnx_section(onnx_part: dict[str, Any] | None) -> list[str]:
    """Markdown lines: the BlindNet-vs-baseline ONNX graph comparison (none without ``onnx_part``)."""
    lines: list[str] = []
    if onnx_part:
        lines += [
            "",
            "## ONNX graph: BlindNet vs baseline",
            "",
            f"Exporter: {onnx_part['exporter']['blindnet']}. Nodes: BlindNet {onnx_part['blindnet']['nodes']}, "
            f"baseline {onnx_part['baseline']['nodes']} (delta {onnx_part['node_delta']:+d}). "
            f"Same size (every difference explained): **{onnx_part['same_size']}**.",
            "",
            "| op type | BlindNet | baseline | explanation |",
            "|---|---:|---:|---|",
        ]
        for d in onnx_part["op_differences"]:
            lines.append(f"| {d['op']} | {d['blindnet']} | {d['baseline']} | {d['explanation'] or 'UNEXPLAINED'} |")
        for r in onnx_part["parameters"]["breakdown"]:
            lines.append(f"| parameters | | | {r['delta']:+d}: {r['explanation']} |")
        lines += [
            "",
            f"Graph weight elements delta: {onnx_part['graph_weight_elements_delta']:+d} "
            f"({onnx_part['graph_weight_elements_note']}).",
            "",
            "Nodes per op type (BlindNet): " + ", ".join(f"{k} {v}" for k, v in onnx_part["blindnet"]["ops"].items()),
        ]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable Markdown rendering of :func:`cost_report`'s dict."""
    cfg, p = report["config"], report["parameters"]
    lines = [
        f"# Cost report: DeepLabV3+ {cfg['backbone']} (OS{cfg['output_stride']}, {cfg['num_classes']} classes, "
        f"{'BlindNet: InstanceNorm' if cfg['instance_norm'] else 'baseline'})",
        "",
        "## Parameters",
        "",
        "| count | parameters | note |",
        "|---|---:|---|",
        f"| deployable network | {p['deployable']:,} ({p['deployable'] / 1e6:.2f}M) | what export/serve ship |",
        f"| + auxiliary DSN head | {p['paper_comparable']:,} ({p['paper_comparable'] / 1e6:.2f}M) | "
        f"paper-comparable (aux head {p['aux_head']:,}, training-only) |",
        f"| + projection heads | {p['with_projection_heads']:,} ({p['with_projection_heads'] / 1e6:.2f}M) | "
        f"all training modules (heads {p['projection_heads']:,}) |",
        f"| executed in forward | {p['executed']:,} | what thop would report |",
    ]
    base = report.get("baseline")
    if base:
        bp = base["parameters"]
        lines.append(
            f"| baseline DeepLabV3+ deployable | {bp['deployable']:,} | "
            f"difference {p['deployable'] - bp['deployable']:+,} |"
        )
        lines.append(
            f"| baseline paper-comparable | {bp['paper_comparable']:,} ({bp['paper_comparable'] / 1e6:.2f}M) | |"
        )
    lines += [
        "",
        "## Compute (batch 1)",
        "",
        "| input (W x H) | conv MACs | thop-style MACs | FLOPs (FlopCounterMode, 2 x MACs) |"
        + (" baseline thop MACs |" if base else ""),
        "|---|---:|---:|---:|" + ("---:|" if base else ""),
    ]
    for i, c in enumerate(report["costs"]):
        row = (
            f"| {c['width']} x {c['height']} | {_g(c['flop_counter']['macs'])} | {_g(c['thop']['macs'])} | "
            f"{_g(c['flop_counter']['flops'])} |"
        )
        if base:
            row += f" {_g(base['costs'][i]['thop']['macs'])} |"
        lines.append(row)
    lines += ["", "Conventions:", ""] + [f"* `{k}`: {v}" for k, v in report["conventions"].items()]
    lines += _paper_section(report.get("paper")) + _onnx_section(report.get("onnx"))
    return "\n".join(lines) + "\n"
