"""The training configuration: typed dataclasses whose defaults are the paper's recipe (``docs/original_implementation.md``, "Training recipe").

A YAML preset in ``train/configs/`` holds only what differs from these defaults; ``--set a.b=value`` overrides on
top. Resolution is strict (:mod:`blindnet.config`): an unknown key or a wrongly typed value is an error naming it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from blindnet.config import ConfigError, apply_overrides, from_dict, merge, resolve, to_dict
from blindnet.models import ModelConfig
from blindnet.task import LossConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class DatasetSpec:
    """One dataset split on disk.

    Attributes:
        dataset: a key of ``blindnet.data.DATASETS`` (``gtav``, ``cityscapes``, ``aligned`` ...).
        root: its folder. For ``aligned`` with ``synthetic.generate`` it is created when missing.
        split: ``train``/``val``/... as the dataset class names them.
        name: label in logs and tables (defaults to ``dataset``, or ``dataset:appearance``).
        options: extra keyword arguments for the dataset class (e.g. ``{appearance: night}``).
    """

    dataset: str = "gtav"
    root: str = "data/gtav"
    split: str = "train"
    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        app = self.options.get("appearance") or self.options.get("appearances")
        if isinstance(app, (list, tuple)):
            app = "+".join(map(str, app))
        return f"{self.dataset}:{app}" if app else self.dataset


@dataclass
class SyntheticConfig:
    """Procedural aligned-appearance scenes written to ``root`` on first use (``blindnet.data.synthetic``).

    ``train_scenes`` go to split ``train`` and ``val_scenes`` (held-out layouts) to split ``val``; all of
    ``appearances`` are rendered for both, training then picks a subset through ``data.train.options``.
    """

    generate: bool = False
    train_scenes: int = 64
    val_scenes: int = 16
    height: int = 256
    width: int = 512
    seed: int = 0
    appearances: list[str] = field(default_factory=lambda: ["noon", "sunset", "night", "fog", "rain"])


@dataclass
class DataConfig:
    """Training data: source dataset(s), the original's joint transforms, class-uniform sampling and the x_a pair.

    Attributes:
        train: source splits (concatenated when several).
        crop_size: ``[H, W]`` random crop (768x768 in the paper).
        scale_min, scale_max: random rescale range before the crop.
        flip: random horizontal flip.
        class_uniform_pct: fraction of each epoch drawn class-uniformly (0 disables).
        class_uniform_tile: tile size of the class-centroid index.
        pair: ``augment`` (x_a = strong colour jitter + blur of x, the paper) or ``aligned`` (x_a = another real
            appearance of the same scene; needs an aligned dataset).
        num_workers: DataLoader worker processes per rank.
        seed: seeds the per-epoch order and every item's augmentation, so resumed runs see the same data.
    """

    train: list[DatasetSpec] = field(default_factory=lambda: [DatasetSpec()])
    crop_size: list[int] = field(default_factory=lambda: [768, 768])
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    class_uniform_pct: float = 0.5
    class_uniform_tile: int = 1024
    pair: Literal["augment", "aligned"] = "augment"
    num_workers: int = 4
    seed: int = 304
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class OptimConfig:
    """SGD with poly decay stepped every iteration; ``batch_size`` is global (split evenly across ranks)."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    poly_power: float = 0.9
    max_iter: int = 40000
    batch_size: int = 8


@dataclass
class EvalConfig:
    """Target-domain evaluation: every ``interval`` iterations (0 = only at the end) and always after the last one.

    ``max_images`` > 0 caps images per target (quick periodic checks); the final evaluation always uses all.
    """

    targets: list[DatasetSpec] = field(
        default_factory=lambda: [
            DatasetSpec("cityscapes", "data/cityscapes", "val"),
            DatasetSpec("bdd100k", "data/bdd100k", "val"),
            DatasetSpec("mapillary", "data/mapillary", "val"),
        ]
    )
    interval: int = 0
    max_images: int = 0
    num_workers: int = 2


@dataclass
class RuntimeConfig:
    """How to run: device, precision, logging and checkpoint cadence.

    Attributes:
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        amp: bfloat16 autocast; ``auto`` = on for CUDA, and on CPUs with native bfloat16 (AVX512-BF16/AMX), off on
            other CPUs (where bfloat16 is emulated and slower than float32).
        channels_last: NHWC memory format; ``auto`` = on for CUDA, off on CPU (no reliable gain for the CPU training
            step; the measurements are in ``benchmarks/results/README.md``).
        compile: wrap the training module in ``torch.compile``.
        sync_bn: convert BatchNorm to SyncBatchNorm when running on several ranks (the original always did).
        log_interval: iterations between CSV/TensorBoard rows.
        ckpt_interval: iterations between checkpoints (the last iteration always gets one).
        keep_checkpoints: how many periodic checkpoints to keep (older ones are deleted; 0 keeps all).
        seed: model-initialisation and loss-sampling seed (rank r uses ``seed + r`` for loss sampling).
        deterministic: ``torch.use_deterministic_algorithms`` (slower on GPU).
        progress: show the tqdm bar (rank 0 only).
        threads: CPU threads for torch ops (0 = torch's default). 1 is much faster on a shared, oversubscribed CPU
            (OpenMP spin-waits otherwise) and is what the tests use.
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bfloat16", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    sync_bn: bool = True
    log_interval: int = 20
    ckpt_interval: int = 2000
    keep_checkpoints: int = 3
    seed: int = 304
    deterministic: bool = False
    progress: bool = True
    threads: int = 0

    def use_amp(self, device_type: str) -> bool:
        """Whether the step runs under bfloat16 autocast on ``device_type`` (``cuda``/``cpu``)."""
        if self.amp != "auto":
            return self.amp == "bfloat16"
        return device_type == "cuda" or (device_type == "cpu" and cpu_has_native_bf16())

    def use_channels_last(self, device_type: str) -> bool:
        """Whether the task and its inputs are NHWC on ``device_type``."""
        if self.channels_last != "auto":
            return self.channels_last == "on"
        return device_type == "cuda"


@dataclass
class InitConfig:
    """Start a new run from existing weights (fine-tuning a converted official model or a shipped one).

    Attributes:
        checkpoint: a deployable ``.safetensors`` or training ``.pt`` file; empty = the usual initialisation.
        part: ``model`` loads every tensor (same backbone and class count); ``encoder`` loads only ``encoder.*``
            (the backbone), the decoder and classifier start fresh.
    """

    checkpoint: str = ""
    part: Literal["model", "encoder"] = "model"


def cpu_has_native_bf16() -> bool:
    """True when oneDNN has native bfloat16 kernels on this CPU (AVX512-BF16 or AMX); emulated bf16 is slower."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``run_dir/config.yaml`` and inside every checkpoint."""

    name: str = "blindnet_r50_gtav"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def validate(self) -> None:
        """Cross-field checks that the per-field types cannot express."""
        self.model.validate()
        if self.optim.max_iter < 1:
            raise ConfigError(f"optim.max_iter must be >= 1, got {self.optim.max_iter}")
        if self.optim.batch_size < 1:
            raise ConfigError(f"optim.batch_size must be >= 1, got {self.optim.batch_size}")
        if len(self.data.crop_size) != 2 or min(self.data.crop_size) < 8:
            raise ConfigError(f"data.crop_size must be [H, W] with both >= 8, got {self.data.crop_size}")
        if not 0 < self.data.scale_min <= self.data.scale_max:
            raise ConfigError(
                f"need 0 < data.scale_min <= data.scale_max, got {self.data.scale_min}, {self.data.scale_max}"
            )
        if not 0.0 <= self.data.class_uniform_pct <= 1.0:
            raise ConfigError(f"data.class_uniform_pct must be in [0, 1], got {self.data.class_uniform_pct}")
        if not self.data.train:
            raise ConfigError("data.train lists no source dataset")
        if self.runtime.log_interval < 1 or self.runtime.ckpt_interval < 1:
            raise ConfigError("runtime.log_interval and runtime.ckpt_interval must be >= 1")


def preset_path(name_or_path: str | Path) -> Path:
    """``synthetic_smoke`` -> ``train/configs/synthetic_smoke.yaml``; an existing path is returned as is."""
    p = Path(name_or_path)
    if p.exists() or p.suffix in (".yaml", ".yml"):
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset {name_or_path!r}; known presets: {known}")
    return candidate


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults < preset YAML (a path or a preset name) < ``a.b=value`` overrides; validated."""
    cfg = resolve(TrainConfig, preset_path(path) if path is not None else None, list(overrides))
    cfg.validate()
    return cfg


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Rebuild a config stored in a checkpoint, then apply ``a.b=value`` overrides (strict: a renamed key is
    reported, not ignored)."""
    cfg = from_dict(TrainConfig, apply_overrides(merge_defaults(data), overrides))
    cfg.validate()
    return cfg


def merge_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``data`` with the current defaults under it (keys added since it was stored get defaults)."""
    return merge(to_dict(TrainConfig()), copy.deepcopy(data))


__all__ = [
    "CONFIG_DIR",
    "DataConfig",
    "DatasetSpec",
    "EvalConfig",
    "InitConfig",
    "OptimConfig",
    "RuntimeConfig",
    "SyntheticConfig",
    "TrainConfig",
    "config_from_dict",
    "load_config",
    "preset_path",
]
