"""Checkpoint contract: round trip, clear errors, and official-checkpoint conversion with identical logits."""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from blindnet.checkpoint import (
    CheckpointError,
    convert_official_checkpoint,
    convert_official_state,
    convert_official_state_dict,
    detect_variant,
    load_model,
    load_official_snapshot,
    read_metadata,
    save_model,
)
from blindnet.models import ModelConfig, build_model
from tests.original_reference import original_forward, strip
from tests.original_snapshot import as_numpy1_legacy_file, write_original_snapshot

KEYS_FILE = Path(__file__).parent / "data" / "official_state_dict_keys.json"
ARCH = {"resnet50": "DeepR50V3PlusD", "mobilenetv2": "DeepMobileNetV3PlusD", "shufflenetv2": "DeepShuffleNetV3PlusD"}


def fabricate_official_state(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with exactly the official key names and shapes (``module.`` prefix, as saved from DDP), filled
    with random values of a sensible scale so that activations stay finite through 50 layers."""
    spec = json.loads(KEYS_FILE.read_text())[arch]["keys"]
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in spec.items():
        if key.endswith("num_batches_tracked"):
            t = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            t = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("running_mean") or key.endswith(".bias"):
            t = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1:  # BN weight
            t = torch.rand(shape, generator=g) * 0.5 + 0.75
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
        state["module." + key] = t
    return state


def reference_r50_blindnet(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The original DeepR50V3PlusD eval forward, written out functionally from the official keys (an independent
    implementation of network/deepv3.py + network/Resnet.py with --wt_layer 0 0 1 1 1 0 0)."""
    s = {k.removeprefix("module."): v for k, v in sd.items()}

    def bn(t, p):
        return F.batch_norm(
            t, s[p + ".running_mean"], s[p + ".running_var"], s[p + ".weight"], s[p + ".bias"], False, 0.0, 1e-5
        )

    def inorm(t):
        return F.instance_norm(t, eps=1e-5)

    h = F.conv2d(x, s["layer0.0.weight"], stride=2, padding=3)
    h = F.max_pool2d(F.relu(inorm(h)), 3, 2, 1)
    feats = {}
    for li, (nblocks, stride) in enumerate([(3, 1), (4, 2), (6, 2), (3, 1)], start=1):
        for b in range(nblocks):
            p = f"layer{li}.{b}"
            st = stride if b == 0 else 1
            dil = 2 if li == 4 else 1  # D16: every layer4 conv2 dilated 2, stride 1
            out = F.relu(bn(F.conv2d(h, s[p + ".conv1.weight"]), p + ".bn1"))
            out = F.relu(bn(F.conv2d(out, s[p + ".conv2.weight"], stride=st, padding=dil, dilation=dil), p + ".bn2"))
            out = bn(F.conv2d(out, s[p + ".conv3.weight"]), p + ".bn3")
            if p + ".downsample.0.weight" in s:
                identity = bn(F.conv2d(h, s[p + ".downsample.0.weight"], stride=st), p + ".downsample.1")
            else:
                identity = h
            out = out + identity
            if li in (1, 2) and b == nblocks - 1:
                out = inorm(out)
            h = F.relu(out)
        feats[li] = h

    def cbr(t, p, pad=0, dil=1):
        return F.relu(bn(F.conv2d(t, s[p + ".0.weight"], padding=pad, dilation=dil), p + ".1"))

    l4 = feats[4]
    pooled = cbr(F.adaptive_avg_pool2d(l4, 1), "aspp.img_conv")
    branches = [F.interpolate(pooled, size=l4.shape[2:], mode="bilinear", align_corners=True)]
    branches.append(cbr(l4, "aspp.features.0"))
    for i, r in enumerate((6, 12, 18), start=1):
        branches.append(cbr(l4, f"aspp.features.{i}", pad=r, dil=r))
    aspp = cbr(torch.cat(branches, 1), "bot_aspp")
    fine = cbr(feats[1], "bot_fine")
    aspp = F.interpolate(aspp, size=fine.shape[2:], mode="bilinear", align_corners=True)
    dec = torch.cat([fine, aspp], 1)
    dec = F.relu(bn(F.conv2d(dec, s["final1.0.weight"], padding=1), "final1.1"))
    dec = F.relu(bn(F.conv2d(dec, s["final1.3.weight"], padding=1), "final1.4"))
    logits = F.conv2d(dec, s["final2.0.weight"], s["final2.0.bias"])
    return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=True)


def fabricate_variant_state(backbone: str, blindnet: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official-format state of one variant whose BatchNorm running statistics are the ones that variant's own
    forward produces (batch statistics of random images through the independent reference), like a trained one."""
    official = fabricate_official_state(ARCH[backbone], seed)
    if backbone == "resnet50" and not blindnet:  # the baseline keeps the stem BatchNorm the IN replaces
        official.update(
            {
                "module.layer0.1.weight": torch.ones(64),
                "module.layer0.1.bias": torch.zeros(64),
                "module.layer0.1.running_mean": torch.zeros(64),
                "module.layer0.1.running_var": torch.ones(64),
                "module.layer0.1.num_batches_tracked": torch.tensor(1000),
            }
        )
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(seed + 100))
    with torch.no_grad():  # writes the batch statistics into the (shared) running buffers
        original_forward(strip(official), x, backbone=backbone, blindnet=blindnet, train_bn=True)
    return official


VARIANT_CASES = [
    ("resnet50", True, 16),
    ("resnet50", False, 16),
    ("resnet50", True, 8),
    ("resnet50", False, 8),
    ("mobilenetv2", True, 16),
    ("mobilenetv2", False, 16),
    ("shufflenetv2", True, 16),
    ("shufflenetv2", False, 16),
]


@pytest.mark.numerics
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize(("backbone", "blindnet", "output_stride"), VARIANT_CASES)
def test_conversion_matches_independent_reference(
    tmp_path: Path, backbone: str, blindnet: bool, output_stride: int, zip_format: bool
) -> None:
    """Snapshots as the original writes them (optimizer, scheduler, NumPy mean_iu; zip and pre-zip format)."""
    torch.set_num_threads(1)
    official = fabricate_variant_state(backbone, blindnet)
    src = write_original_snapshot(tmp_path / "best_cityscapes_epoch_26.pth", official, zip_format=zip_format)
    with pytest.raises(Exception, match="numpy"):  # what plain weights_only loading does with these files
        torch.load(src, weights_only=True)
    dst = tmp_path / "converted.safetensors"
    convert_official_checkpoint(src, dst, backbone=backbone, instance_norm=blindnet, output_stride=output_stride)
    model = load_model(dst)
    assert model.config.instance_norm is blindnet and model.config.output_stride == output_stride
    meta = read_metadata(dst)
    assert meta["variant"] == ("blindnet" if blindnet else "baseline")
    assert meta["variant_check"].startswith("blindnet" if blindnet else "baseline")
    x = torch.randn(1, 3, 49, 67, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, _ = original_forward(official, x, backbone=backbone, blindnet=blindnet, output_stride=output_stride)
        ours = model(x)
    assert ours.shape == ref.shape == (1, 19, 49, 67)
    # Exact: the reference calls the same torch functional ops (conv2d, batch_norm, instance_norm, interpolate) in the
    # same order on the same tensors, so kernels and summation orders match on any CPU; measured bitwise equal with
    # AVX-512 and with ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 (whose logits differ from each other).
    assert torch.equal(ours, ref), (ours - ref).abs().max().item()


@pytest.mark.numerics
@pytest.mark.parametrize("backbone", ["mobilenetv2", "shufflenetv2"])
def test_wrong_variant_is_caught_for_backbones_with_identical_keys(tmp_path: Path, backbone: str) -> None:
    torch.set_num_threads(1)
    for blindnet in (True, False):
        official = fabricate_variant_state(backbone, blindnet)
        check = detect_variant(convert_official_state_dict(official), backbone)
        assert check.detected == ("blindnet" if blindnet else "baseline"), check
        with pytest.raises(CheckpointError, match="looks like"):
            convert_official_state(official, backbone=backbone, instance_norm=not blindnet)
        with pytest.raises(CheckpointError, match="--variant"):
            convert_official_state(official, backbone=backbone)  # no silent default for these backbones
    # Forcing the wrong variant past the check loads (same keys) but gives different logits: what the check prevents.
    official = fabricate_variant_state(backbone, True)
    wrong = convert_official_state(official, backbone=backbone, instance_norm=False, check_variant=False)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, _ = original_forward(official, x, backbone=backbone, blindnet=True)
        rel = ((wrong(x) - ref).norm() / ref.norm()).item()
    # The wrong variant moves the logits by 38% (MobileNetV2) and 1370% (ShuffleNetV2) of their norm, measured on both
    # paths; 5% is far below that and far above float32 rounding.
    assert rel > 0.05


@pytest.mark.numerics
def test_original_snapshot_forms_all_convert_to_the_same_network(tmp_path: Path) -> None:
    """``module.`` prefix or not, a ``state_dict`` entry or a bare state dict, NumPy 1.x or 2 scalar names."""
    torch.set_num_threads(1)
    official = fabricate_variant_state("mobilenetv2", True)
    bare = tmp_path / "bare.pth"
    torch.save(strip(official), bare)  # no "module." prefix, no wrapping dict
    numpy1 = as_numpy1_legacy_file(write_original_snapshot(tmp_path / "np1.pth", official, zip_format=False))
    unprefixed = write_original_snapshot(tmp_path / "unprefixed.pth", strip(official))
    x = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, _ = original_forward(official, x, backbone="mobilenetv2", blindnet=True)
        for src in (bare, numpy1, unprefixed):
            model = convert_official_checkpoint(src, backbone="mobilenetv2", instance_norm=True)
            # Exact, as in the test above: the same ops in the same order (measured bitwise equal on both paths).
            assert torch.equal(model(x), ref), src.name
    snapshot = load_official_snapshot(numpy1)
    assert set(snapshot) == {"state_dict", "optimizer", "scheduler", "epoch", "mean_iu", "command"}
    # The snapshot stores np.nanmean of these very numbers: the same float64 operation (measured exactly equal).
    assert snapshot["mean_iu"] == pytest.approx(np.nanmean([0.61, 0.25, np.nan, 0.47]))
    assert snapshot["optimizer"]["state"][0]["momentum_buffer"].shape  # the real SGD state came through


class _RunsCode:
    """Unpickling this calls ``os.makedirs(marker)``: what a malicious checkpoint would do with a worse call."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_code_running_pickle_is_refused_and_never_runs(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "the-pickle-ran"
    state = strip(fabricate_variant_state("mobilenetv2", True))
    src = tmp_path / "evil.pth"
    torch.save(
        {"state_dict": state, "mean_iu": np.float64(0.5), "payload": _RunsCode(marker)},
        src,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(CheckpointError, match="cannot read the official checkpoint.*makedirs"):
        convert_official_checkpoint(src, backbone="mobilenetv2", instance_norm=True)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(src)
    assert not marker.exists()


def test_a_web_page_or_an_original_snapshot_given_to_load_model_gets_a_clear_reason(tmp_path: Path) -> None:
    page = tmp_path / "model.pth"
    page.write_text("<!DOCTYPE html><html><title>Google Drive - Quota exceeded</title></html>")
    with pytest.raises(CheckpointError, match="web page"):
        convert_official_checkpoint(page)
    src = write_original_snapshot(tmp_path / "best.pth", fabricate_variant_state("mobilenetv2", True))
    with pytest.raises(CheckpointError, match="official BlindNet/RobustNet checkpoint; convert it first"):
        load_model(src)


def test_resnet50_variant_is_read_from_the_keys() -> None:
    for blindnet in (True, False):
        model = convert_official_state(fabricate_variant_state("resnet50", blindnet), backbone="resnet50")
        assert model.config.instance_norm is blindnet
    with pytest.raises(CheckpointError, match="looks like baseline"):
        convert_official_state(fabricate_variant_state("resnet50", False), backbone="resnet50", instance_norm=True)


@pytest.mark.numerics
def test_official_resnet50_conversion_gives_identical_logits(tmp_path: Path) -> None:
    official = fabricate_official_state(ARCH["resnet50"])
    src = tmp_path / "best_cityscapes.pth"
    torch.save({"state_dict": official, "epoch": 26}, src)
    model = convert_official_checkpoint(src, tmp_path / "converted.safetensors", backbone="resnet50")
    reloaded = load_model(tmp_path / "converted.safetensors")
    x = torch.randn(1, 3, 97, 131, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference_r50_blindnet(official, x)
        ours = model(x)
        ours_reloaded = reloaded(x)
    assert ours.shape == ref.shape == (1, 19, 97, 131)
    # Exact: the reference calls the same torch functional ops (conv2d, batch_norm, instance_norm, interpolate) in the
    # same order on the same tensors, so kernels and summation orders match on any CPU; measured bitwise equal with
    # AVX-512 and with ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 (whose logits differ from each other).
    assert torch.equal(ours, ref), (ours - ref).abs().max().item()
    assert torch.equal(ours, ours_reloaded)


@pytest.mark.parametrize("backbone", sorted(ARCH))
def test_conversion_consumes_every_deployable_key(backbone: str) -> None:
    official = fabricate_official_state(ARCH[backbone])
    converted = convert_official_state_dict(official)
    dropped = {k for k in official if k.startswith(("module.dsn.", "module.ProjectionHead_cls_"))}
    assert dropped and len(converted) == len(official) - len(dropped)
    model = build_model(ModelConfig(backbone=backbone))
    assert set(model.state_dict()) == set(converted)  # every key maps, nothing is left over
    for k, v in model.state_dict().items():
        assert tuple(v.shape) == tuple(converted[k].shape), k


def test_deployable_state_dict_has_no_training_keys(tiny_checkpoint: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint), framework="pt") as fh:
        keys = list(fh.keys())
    assert keys and not [k for k in keys if any(t in k for t in ("dsn", "proj", "Projection", "aux"))]
    meta = read_metadata(tiny_checkpoint)
    assert json.loads(meta["model_config"])["backbone"] == "mobilenetv2"


def test_round_trip_and_half_precision(tmp_path: Path) -> None:
    model = build_model(ModelConfig(backbone="shufflenetv2", num_classes=5)).eval()
    save_model(model, tmp_path / "m.safetensors")
    save_model(model, tmp_path / "h.safetensors", half=True)
    x = torch.randn(1, 3, 48, 64)
    full, half = load_model(tmp_path / "m.safetensors"), load_model(tmp_path / "h.safetensors")
    assert half.config.num_classes == 5 and next(half.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(x), full(x))
        assert (model(x) - half(x)).abs().max() < 0.05 * model(x).abs().max()
    assert (tmp_path / "h.safetensors").stat().st_size < 0.6 * (tmp_path / "m.safetensors").stat().st_size


def test_training_checkpoint_loads_only_model_part(tmp_path: Path) -> None:
    model = build_model(ModelConfig(backbone="mobilenetv2", num_classes=3))
    ckpt = {
        "model": model.state_dict(),
        "model_config": model.config.to_dict(),
        "task": {"dsn.0.weight": torch.zeros(1)},
        "optimizer": {"state": {}, "param_groups": []},
        "step": 10,
    }
    torch.save(ckpt, tmp_path / "last.pt")
    loaded = load_model(tmp_path / "last.pt")
    assert not loaded.training and loaded.config.num_classes == 3


def test_clear_errors(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated|corrupt|readable"):
        load_model(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(garbage)
    official = tmp_path / "official.pth"
    torch.save({"state_dict": {"module.final2.0.weight": torch.zeros(19, 256, 1, 1)}}, official)
    with pytest.raises(CheckpointError, match="convert"):
        load_model(official)
    # Weights that do not fit the stored config: the message names the mismatch.
    model = build_model(ModelConfig(backbone="mobilenetv2", num_classes=19))
    wrong_cfg = dict(model.config.to_dict(), num_classes=7)
    torch.save({"model": model.state_dict(), "model_config": wrong_cfg}, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="shape mismatch.*final2"):
        load_model(tmp_path / "mismatch.pt")


def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path) -> None:
    from blindnet.io import atomic_write

    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"old")

    def boom(tmp: str) -> None:
        Path(tmp).write_bytes(b"half-writ")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]


def test_a_forged_header_is_refused_before_any_allocation(tmp_path: Path, tiny_checkpoint: Path) -> None:
    claim = json.dumps({**ModelConfig(backbone="mobilenetv2").to_dict(), "num_classes": 2_000_000})
    meta = {"format": "blindnet-deployable", "format_version": "1", "model_config": claim}
    forged = tmp_path / "forged.safetensors"
    save_file({"final2.0.bias": torch.zeros(1)}, str(forged), metadata=meta)
    assert forged.stat().st_size < 400  # a header and four bytes of weights
    # The real 19-class weights under a header that claims 2 M classes: the shapes say otherwise.
    relabelled = tmp_path / "relabelled.safetensors"
    save_file(load_file(str(tiny_checkpoint)), str(relabelled), metadata=meta)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=r"num_classes=2000000 is outside 1\.\.4096"):
        load_model(forged)
    claim_4k = json.dumps({**ModelConfig(backbone="mobilenetv2").to_dict(), "num_classes": 4000})
    save_file(load_file(str(tiny_checkpoint)), str(relabelled), metadata={**meta, "model_config": claim_4k})
    with pytest.raises(CheckpointError, match=r"final2\.0\.weight: checkpoint \(19, 256, 1, 1\) vs config \(4000,"):
        load_model(relabelled)
    # Neither built the network (4000 classes at 256 channels would be small; 2 M would be 2 GB): no new peak memory
    # beyond what reading a 14 MB checkpoint costs.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200 * 1024  # KiB
