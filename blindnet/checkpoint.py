"""The checkpoint contract.

Two kinds of file:

* **Deployable** (``*.safetensors``): the bare network's weights plus its :class:`ModelConfig` in the header
  metadata. Nothing is unpickled when it is read. This is what export, serve, demo and benchmarks load.
* **Training** (``*.pt``): a dict ``{"model", "model_config", "task", "optimizer", "scheduler", "scaler", "step",
  "config", "version", ...}`` written by ``train/``. ``load_model`` reads only ``model`` and ``model_config`` with
  ``torch.load(weights_only=True)``, so the training state never leaks into deployment.

Official BlindNet/RobustNet checkpoints (``{"state_dict": {"module.layer0.0.weight": ...}}``) are converted by
:func:`convert_official_checkpoint`, which drops the training-only keys (``dsn.*``, ``ProjectionHead_cls_*``). The
original's snapshots also hold ``optimizer``, ``scheduler``, ``epoch``, ``command`` and a NumPy float64 ``mean_iu``;
:func:`load_official_snapshot` reads them with ``weights_only=True`` plus exactly the NumPy scalar and dtype globals
that such a value pickles to (:data:`OFFICIAL_SAFE_GLOBALS`), so a pickle that would run code is still refused.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from blindnet.architectures import BACKBONES
from blindnet.io import atomic_write
from blindnet.models import DeepLabV3Plus, ModelConfig, build_model

FORMAT_VERSION = 1

# Keys of the original model that exist only for training.
OFFICIAL_TRAINING_ONLY_PREFIXES = ("dsn.", "ProjectionHead_cls_")
_ENCODER_PREFIXES = ("layer0.", "layer1.", "layer2.", "layer3.", "layer4.")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not match the network it claims to hold."""


def _official_safe_globals() -> list[Any]:
    """The globals a NumPy scalar (the original's ``mean_iu = np.nanmean(iu)``) pickles to, and nothing else.

    ``scalar`` rebuilds the number from its dtype and raw bytes; ``np.dtype`` and the dtype's class rebuild the dtype
    (its ``__setstate__`` only sets byte order and flags). NumPy 1.x wrote the constructor as
    ``numpy.core.multiarray.scalar``, NumPy 2 as ``numpy._core.multiarray.scalar``: both names map to the same
    function. No ``ndarray``/``_reconstruct``: the original stores no array outside its tensors.
    """
    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar constructor, wherever this NumPy version keeps it
    dtype_classes = sorted({type(np.dtype(code)) for code in "?bhilqBHILQefd"}, key=str)
    return [
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dtype_classes,
    ]


#: Globals allowed on top of PyTorch's ``weights_only`` set when reading the original's snapshots.
OFFICIAL_SAFE_GLOBALS: list[Any] = _official_safe_globals()


def _numpy_scalars_allowed() -> contextlib.AbstractContextManager:
    """``torch.serialization.safe_globals(OFFICIAL_SAFE_GLOBALS)`` where this PyTorch has it (2.5 and later); no
    change otherwise, so older versions still read every file without NumPy scalars and refuse the rest themselves."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    return safe_globals(OFFICIAL_SAFE_GLOBALS) if safe_globals else contextlib.nullcontext()


def load_official_snapshot(path: str | Path) -> dict[str, Any]:
    """Read a file written by the original's ``torch.save`` (zip or pre-zip format) without running any pickled code.

    Returns:
        The saved dict (``state_dict``, ``optimizer``, ``scheduler``, ``epoch``, ``mean_iu``, ``command`` in the
        original's snapshots), or ``{"state_dict": obj}`` when the file holds a bare state dict.

    Raises:
        CheckpointError: missing file, a web page or other non-checkpoint, a truncated file, or a pickle that needs
            globals beyond tensors, containers and NumPy scalars (the reason names them).
    """
    path = _existing(path)
    with open(path, "rb") as fh:
        head = fh.read(64).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        raise CheckpointError(
            f"{path}: is a web page, not a checkpoint (a download that returned an error or confirmation page)"
        )
    try:
        with _numpy_scalars_allowed():
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot read the official checkpoint ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" not in obj and obj and all(torch.is_tensor(v) for v in obj.values()):
        obj = {"state_dict": obj}
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping) or not obj["state_dict"]:
        raise CheckpointError(f"{path}: no 'state_dict' mapping found")
    return dict(obj)


def _first_line(exc: BaseException) -> str:
    """The informative line of an exception (torch's refusals are paragraphs; the culprit is named in one line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln or "allowlisted" in ln]
    return (named or lines or [type(exc).__name__])[0][:300]


def deployable_state_dict(model: DeepLabV3Plus) -> dict[str, torch.Tensor]:
    """The network's state dict as saved: contiguous CPU tensors, nothing training-only."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_model(
    model: DeepLabV3Plus,
    path: str | Path,
    *,
    half: bool = False,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save a deployable checkpoint (safetensors) holding the weights and the model config.

    Args:
        model: the bare network (``task.get_eval_model()`` when training).
        path: destination, normally ``*.safetensors``; written atomically.
        half: store floating-point weights as float16 (half the size; :func:`load_model` restores float32).
        extra_metadata: more string metadata for the header (e.g. training command, data seed).
    """
    from safetensors.torch import save_file

    state = deployable_state_dict(model)
    if half:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    metadata = {
        "format": "blindnet-deployable",
        "format_version": str(FORMAT_VERSION),
        "model_config": json.dumps(model.config.to_dict()),
    }
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def read_metadata(path: str | Path) -> dict[str, str]:
    """Header metadata of a deployable checkpoint (no tensor is read)."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from exc


def load_checkpoint_state(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str]]:
    """Read ``(model_config, state_dict, metadata)`` from a deployable or training checkpoint, without building.

    The tensors' names and shapes are checked against the config first (:func:`check_shapes`; for safetensors from
    the header, before any weight is read), so a file whose header claims a network it does not hold is refused at
    once, whatever it claims.
    """
    path = _existing(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        meta = read_metadata(path)
        if "model_config" not in meta:
            raise CheckpointError(
                f"{path}: safetensors file has no 'model_config' metadata; it was not written by blindnet "
                "(convert foreign weights with `blindnet convert`)"
            )
        try:
            cfg = _config_from(json.loads(meta["model_config"]), path)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: model_config metadata is not JSON ({exc})") from exc
        # The header alone must fit the config before a byte of weights is read or a layer allocated.
        check_shapes(cfg, header_shapes(path), source=str(path))
        try:
            state = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({exc})") from exc
        return cfg, state, meta
    try:
        # The NumPy scalar globals too: an original snapshot (NumPy ``mean_iu``) then gets the "convert it" advice.
        with _numpy_scalars_allowed():
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot read as a blindnet checkpoint ({type(exc).__name__}: {_first_line(exc)}). "
            "The file may be truncated, not a checkpoint, or contain pickled objects we refuse to load."
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    if "model" not in obj or "model_config" not in obj:
        if "state_dict" in obj:
            raise CheckpointError(
                f"{path}: this looks like an official BlindNet/RobustNet checkpoint; convert it first: "
                f"`blindnet convert {path} OUT.safetensors --backbone resnet50` (or, for the published ResNet-50 "
                f"GTAV model, `blindnet convert {path} --name blindnet-r50-gtav`)"
            )
        raise CheckpointError(f"{path}: no 'model' and 'model_config' entries (keys: {sorted(obj)[:10]})")
    cfg, state = _config_from(obj["model_config"], path), obj["model"]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: 'model' is not a mapping of tensors")
    check_shapes(cfg, {k: tuple(v.shape) for k, v in state.items()}, source=str(path))  # before any layer is built
    return cfg, state, {}


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DeepLabV3Plus:
    """Load the deployable network from ``path`` (``.safetensors`` or a training ``.pt``) in eval mode.

    Raises:
        CheckpointError: missing, truncated or foreign file, or weights that do not fit the stored config.
    """
    cfg, state, _ = load_checkpoint_state(path)
    cfg.pretrained_backbone = False  # the checkpoint already holds every weight
    model = build_model(cfg)
    load_state_into(model, state, source=str(path))
    return model.to(device=device, dtype=dtype).eval()


#: Most classes a checkpoint may declare: far beyond any segmentation label set (Cityscapes 19, ADE20K 150, COCO-Stuff
#: 171), and small enough that a hostile header cannot make the network's last layer huge.
MAX_CLASSES = 4096


def header_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from exc


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the network for ``cfg`` holds, from a build on PyTorch's ``meta`` device (no
    memory allocated, no weights initialised)."""
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "pretrained_backbone": False})
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_shapes(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], *, source: str) -> None:
    """Raise :class:`CheckpointError` unless ``shapes`` (from a checkpoint) are exactly those the config's network
    holds: same names, same shapes. Costs no allocation, so a forged header is refused before any work."""
    if not 1 <= cfg.num_classes <= MAX_CLASSES:
        raise CheckpointError(f"{source}: num_classes={cfg.num_classes} is outside 1..{MAX_CLASSES}")
    own = expected_shapes(cfg)
    headline = f"{source} does not hold the network its config describes ({cfg.backbone}, {cfg.num_classes} classes)"
    report = _fit_report(own, {k: tuple(v) for k, v in shapes.items()}, headline, against="config")
    if report:
        raise CheckpointError(report)


def _fit_report(
    own: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]], headline: str, *, against: str
) -> str | None:
    """None when ``given`` (a checkpoint's tensor shapes) has exactly ``own``'s names and shapes, else one message:
    ``headline``, then the shape mismatches, missing and unexpected tensors, each with a few examples."""
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    mismatched = [
        f"{k}: checkpoint {given[k]} vs {against} {own[k]}" for k in sorted(set(own) & set(given)) if given[k] != own[k]
    ]
    if not (missing or unexpected or mismatched):
        return None
    parts = [headline]
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es), e.g. {mismatched[:3]}")
    if missing:
        parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[:5]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}")
    return "; ".join(parts)


def load_state_into(model: DeepLabV3Plus, state: Mapping[str, torch.Tensor], *, source: str = "state dict") -> None:
    """Strictly load ``state`` into ``model``, casting dtypes, with an error that names what does not fit."""
    own = model.state_dict()
    headline = f"{source} does not match the network built from its config ({model.config})"
    report = _fit_report(
        {k: tuple(v.shape) for k, v in own.items()},
        {k: tuple(v.shape) for k, v in state.items()},
        headline,
        against="model",
    )
    if report:
        raise CheckpointError(report)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def convert_official_state_dict(official: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an official BlindNet/RobustNet state dict onto our key names.

    Strips the DDP ``module.`` prefix, drops the training-only ``dsn.*`` and ``ProjectionHead_cls_*`` entries, and moves
    the trunk (``layer0.`` ... ``layer4.``) under ``encoder.``. Everything else keeps its name.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in official.items():
        k = key[len("module.") :] if key.startswith("module.") else key
        if k.startswith(OFFICIAL_TRAINING_ONLY_PREFIXES):
            continue
        if k.startswith(_ENCODER_PREFIXES):
            k = "encoder." + k
        out[k] = value
    return out


#: Per backbone, the BatchNorms that (in the BlindNet variant) normalise a bias-free 1x1 conv of an InstanceNorm
#: output. Such a conv output has exactly zero mean in every image, so a BlindNet checkpoint's running means there
#: are ~0 (exponential averages of zeros); in the baseline the same layers see un-normalised, biased features.
VARIANT_PROBES: dict[str, tuple[str, ...]] = {
    name: b.variant_probes for name, b in BACKBONES.items() if b.variant_probes
}
#: Probe scores (mean |running_mean| / running_std) below the first bound look like BlindNet (exact zeros up to
#: float rounding and the decayed initial statistics), above the second like the baseline; in between: unknown.
VARIANT_PROBE_BOUNDS = (1e-3, 1e-2)


class VariantCheck(NamedTuple):
    """What a converted state dict says about its variant.

    Attributes:
        detected: ``"blindnet"``, ``"baseline"`` or ``"unknown"`` (the statistics point both ways).
        scores: per probe BatchNorm (see :data:`VARIANT_PROBES`), mean over channels of
            ``|running_mean| / sqrt(running_var + 1e-5)``; empty where keys decide (ResNet-50).
        reason: one line for the user.
    """

    detected: str
    scores: dict[str, float]
    reason: str


def detect_variant(converted: Mapping[str, torch.Tensor], backbone: str) -> VariantCheck:
    """Tell BlindNet from baseline weights (keys after :func:`convert_official_state_dict`).

    ResNet-50: by keys (the baseline keeps its stem BatchNorm ``layer0.1``; BlindNet replaces it by a parameter-free
    InstanceNorm). MobileNetV2/ShuffleNetV2 store the same keys for both variants, so the running statistics decide.
    """
    if backbone == "resnet50":
        if "encoder.layer0.1.running_mean" in converted:
            return VariantCheck("baseline", {}, "the stem BatchNorm layer0.1 is present")
        return VariantCheck("blindnet", {}, "no stem BatchNorm layer0.1 (replaced by the InstanceNorm)")
    scores: dict[str, float] = {}
    for probe in VARIANT_PROBES.get(backbone, ()):
        mean, var = converted.get(probe + ".running_mean"), converted.get(probe + ".running_var")
        if mean is None or var is None:
            return VariantCheck("unknown", {}, f"{probe} has no running statistics")
        ratio = mean.double().abs() / (var.double().clamp(min=0) + 1e-5).sqrt()
        scores[probe.removeprefix("encoder.")] = float(ratio.mean())
    if not scores:
        return VariantCheck("unknown", {}, f"no variant probe for backbone {backbone!r}")
    shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    if max(scores.values()) < VARIANT_PROBE_BOUNDS[0]:
        return VariantCheck("blindnet", scores, f"BN running means after the InstanceNorm positions are ~0 ({shown})")
    if min(scores.values()) > VARIANT_PROBE_BOUNDS[1]:
        return VariantCheck(
            "baseline", scores, f"BN running means after the InstanceNorm positions are not 0 ({shown})"
        )
    return VariantCheck("unknown", scores, f"BN running statistics are inconclusive ({shown})")


def convert_official_checkpoint(
    src: str | Path,
    dst: str | Path | None = None,
    *,
    backbone: str = "resnet50",
    num_classes: int | None = None,
    instance_norm: bool | None = None,
    output_stride: int = 16,
    check_variant: bool = True,
    extra_metadata: Mapping[str, str] | None = None,
) -> DeepLabV3Plus:
    """Convert an official checkpoint file (read by :func:`load_official_snapshot`) into our deployable format.

    The original stores no model config, so the backbone and variant are given here (``DeepR50V3PlusD`` = resnet50,
    OS16, with InstanceNorm for BlindNet). ``num_classes`` defaults to the size of ``final2``. See
    :func:`convert_official_state` for ``instance_norm`` and ``check_variant``. The chosen variant and the check's
    verdict are stored in the output's metadata (``variant``, ``variant_check``), with ``extra_metadata``.

    Returns:
        The converted network in eval mode; also saved to ``dst`` when given.
    """
    src = _existing(src)
    state = load_official_snapshot(src)["state_dict"]
    model = convert_official_state(
        state,
        backbone=backbone,
        num_classes=num_classes,
        instance_norm=instance_norm,
        output_stride=output_stride,
        check_variant=check_variant,
    )
    if dst is not None:
        check = detect_variant(convert_official_state_dict(state), backbone)
        meta = {
            "converted_from": str(Path(src).name),
            "variant": "blindnet" if model.config.instance_norm else "baseline",
            "variant_check": f"{check.detected}: {check.reason}" if check_variant else "skipped",
            **(extra_metadata or {}),
        }
        save_model(model, dst, extra_metadata=meta)
    return model


def convert_official_state(
    state: Mapping[str, torch.Tensor],
    *,
    backbone: str = "resnet50",
    num_classes: int | None = None,
    instance_norm: bool | None = None,
    output_stride: int = 16,
    check_variant: bool = True,
) -> DeepLabV3Plus:
    """In-memory form of :func:`convert_official_checkpoint`.

    Args:
        instance_norm: True = BlindNet variant (InstanceNorm layers), False = plain DeepLabV3+ baseline. None is
            allowed for ResNet-50 only (its keys tell the variants apart); MobileNetV2/ShuffleNetV2 checkpoints hold
            the same keys for both, and the wrong choice still loads and gives wrong logits, so it must be stated.
        check_variant: compare the choice with :func:`detect_variant` and refuse a contradiction.

    Raises:
        CheckpointError: keys that do not fit, a missing variant choice, or a choice the statistics contradict.
    """
    converted = convert_official_state_dict(state)
    instance_norm = _choose_variant(converted, backbone, instance_norm, check_variant)
    if num_classes is None:
        if "final2.0.weight" not in converted:
            raise CheckpointError("official state dict has no 'final2.0.weight'; is it a DeepV3Plus checkpoint?")
        num_classes = int(converted["final2.0.weight"].shape[0])
    cfg = ModelConfig.from_dict(  # checks the backbone name (a str here)
        {
            "backbone": backbone,
            "num_classes": num_classes,
            "output_stride": output_stride,
            "instance_norm": instance_norm,
        }
    )
    model = build_model(cfg)
    load_state_into(model, converted, source="official state dict")
    return model.eval()


def _choose_variant(
    converted: Mapping[str, torch.Tensor], backbone: str, instance_norm: bool | None, check_variant: bool
) -> bool:
    check = detect_variant(converted, backbone)
    if instance_norm is None:
        if backbone != "resnet50":
            raise CheckpointError(
                f"{backbone} BlindNet and baseline checkpoints have the same keys: state the variant (CLI: --variant "
                f"blindnet or --variant baseline). The running statistics suggest {check.detected!r} ({check.reason})"
            )
        return check.detected == "blindnet"
    chosen = "blindnet" if instance_norm else "baseline"
    if check_variant and check.detected not in ("unknown", chosen):
        raise CheckpointError(
            f"you chose the {chosen} variant, but the checkpoint looks like {check.detected}: {check.reason}. The "
            f"wrong variant gives wrong logits. Convert with the other variant, or skip this check (CLI: "
            f"--no-variant-check) if you are sure"
        )
    return instance_norm


def _config_from(data: Any, path: Path) -> ModelConfig:
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: model_config is not a mapping")
    try:
        return ModelConfig.from_dict(dict(data))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model_config ({exc})") from exc


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}")
    return path
