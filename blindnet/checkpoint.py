"""The checkpoint contract.

Two kinds of file:

* **Deployable** (``*.safetensors``): the bare network's weights plus its :class:`ModelConfig` in the header
  metadata. Nothing is unpickled when it is read. This is what export, serve, demo and benchmarks load.
* **Training** (``*.pt``): a dict ``{"model", "model_config", "task", "optimizer", "scheduler", "scaler", "step",
  "config", "version", ...}`` written by ``train/``. ``load_model`` reads only ``model`` and ``model_config`` with
  ``torch.load(weights_only=True)``, so the training state never leaks into deployment.

Official BlindNet/RobustNet checkpoints (``{"state_dict": {"module.layer0.0.weight": ...}}``) are converted by
:func:`convert_official_checkpoint`, which drops the training-only keys (``dsn.*``, ``ProjectionHead_cls_*``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from blindnet.io import atomic_write
from blindnet.models import DeepLabV3Plus, ModelConfig, build_model

FORMAT_VERSION = 1

# Keys of the original model that exist only for training.
OFFICIAL_TRAINING_ONLY_PREFIXES = ("dsn.", "ProjectionHead_cls_")
_ENCODER_PREFIXES = ("layer0.", "layer1.", "layer2.", "layer3.", "layer4.")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not match the network it claims to hold."""


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
    """Read ``(model_config, state_dict, metadata)`` from a deployable or training checkpoint, without building."""
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
            state = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({exc})") from exc
        cfg = _config_from(json.loads(meta["model_config"]), path)
        return cfg, state, meta
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot read as a blindnet checkpoint ({type(exc).__name__}: {exc}). "
            "The file may be truncated, not a checkpoint, or contain pickled objects we refuse to load."
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    if "model" not in obj or "model_config" not in obj:
        if "state_dict" in obj:
            raise CheckpointError(
                f"{path}: this looks like an official BlindNet/RobustNet checkpoint; convert it first: "
                f"`blindnet convert {path} OUT.safetensors --backbone resnet50`"
            )
        raise CheckpointError(f"{path}: no 'model' and 'model_config' entries (keys: {sorted(obj)[:10]})")
    return _config_from(obj["model_config"], path), obj["model"], {}


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


def load_state_into(model: DeepLabV3Plus, state: Mapping[str, torch.Tensor], *, source: str = "state dict") -> None:
    """Strictly load ``state`` into ``model``, casting dtypes, with an error that names what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"{source} does not match the network built from its config ({model.config})"]
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es), e.g. {mismatched[:3]}")
        raise CheckpointError("; ".join(parts))
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


def convert_official_checkpoint(
    src: str | Path,
    dst: str | Path | None = None,
    *,
    backbone: str = "resnet50",
    num_classes: int | None = None,
    instance_norm: bool = True,
    output_stride: int = 16,
) -> DeepLabV3Plus:
    """Convert an official checkpoint file into our deployable format.

    The original stores no model config, so the backbone and variant are given here (``DeepR50V3PlusD`` = resnet50,
    OS16, with InstanceNorm for BlindNet). ``num_classes`` defaults to the size of ``final2``.

    Returns:
        The converted network in eval mode; also saved to ``dst`` when given.
    """
    src = _existing(src)
    try:
        # Official files hold only tensors and plain containers (plus optimizer state): weights_only is enough.
        obj = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{src}: cannot read the official checkpoint ({type(exc).__name__}: {exc})") from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{src}: no 'state_dict' mapping found")
    model = convert_official_state(
        state, backbone=backbone, num_classes=num_classes, instance_norm=instance_norm, output_stride=output_stride
    )
    if dst is not None:
        save_model(model, dst, extra_metadata={"converted_from": str(Path(src).name)})
    return model


def convert_official_state(
    state: Mapping[str, torch.Tensor],
    *,
    backbone: str = "resnet50",
    num_classes: int | None = None,
    instance_norm: bool = True,
    output_stride: int = 16,
) -> DeepLabV3Plus:
    """In-memory form of :func:`convert_official_checkpoint`."""
    converted = convert_official_state_dict(state)
    if num_classes is None:
        if "final2.0.weight" not in converted:
            raise CheckpointError("official state dict has no 'final2.0.weight'; is it a DeepV3Plus checkpoint?")
        num_classes = int(converted["final2.0.weight"].shape[0])
    cfg = ModelConfig(
        backbone=backbone, num_classes=num_classes, output_stride=output_stride, instance_norm=instance_norm
    )
    model = build_model(cfg)
    load_state_into(model, converted, source="official state dict")
    return model.eval()


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
