"""What the latency benchmark measures: the row schema, the variants (how the network is run) and the config.

Plain data, no PyTorch import, so ``blindnet bench --help`` and ``--list-variants`` answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blindnet.architectures import BACKBONE_NAMES


def _cuda_available() -> bool:
    import torch  # only when a CUDA run is asked for

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------------------------
# Row schema
# --------------------------------------------------------------------------------------------------------------------

#: Columns of every benchmark row, in CSV order. ``benchmarks/results/README.md`` explains each one.
ROW_FIELDS: tuple[str, ...] = (
    "run_id",
    "timestamp",
    "device_type",
    "device_name",
    "driver",
    "torch",
    "torchvision",
    "cuda",
    "cudnn",
    "onnxruntime",
    "tensorrt",
    "threads",
    "model",
    "network",
    "backbone",
    "weights",
    "variant",
    "backend",
    "precision",
    "memory_format",
    "compile",
    "scope",
    "batch",
    "height",
    "width",
    "warmup",
    "trials",
    "mean_ms",
    "median_ms",
    "p90_ms",
    "p99_ms",
    "min_ms",
    "std_ms",
    "images_per_s",
    "params_deployable",
    "params_paper",
    "macs_g",
    "flops_g",
    "flop_counter",
    "achieved_tflops",
    "status",
    "note",
)

TIME_FIELDS = ("mean_ms", "median_ms", "p90_ms", "p99_ms", "min_ms", "std_ms")

#: The paper's Table 3 row for BlindNet ResNet-50, as published (V100, "2048x1024").
PAPER_ROW: dict[str, Any] = {
    "device_name": "NVIDIA V100 (as reported)",
    "model": "blindnet-resnet50",
    "network": "blindnet",
    "backbone": "resnet50",
    "variant": "paper-reported",
    "backend": "paper",
    "precision": "unstated",
    "scope": "paper-reported",
    "batch": 1,
    "height": 1024,
    "width": 2048,
    "trials": 400,
    "mean_ms": 10.03,
    "params_paper": 45_080_000,
    "macs_g": 277.78,
    "status": "reported",
}
#: FLOPs of the network at 2048x1024 (FlopCounterMode, 2 per MAC) and V100 peaks, for the paper row's footnote.
R50_FLOPS_2048 = 1107.43e9
V100_FP32_TFLOPS = 15.7
V100_FP16_TENSOR_TFLOPS = 125.0
PAPER_NOTE = (
    "as published: 45.08M params (includes the training-only aux head), 277.78 'GFLOPs' (= thop MACs of a "
    "1024x1024 crop, not of 2048x1024), 10.03 ms. One 2048x1024 image is 1.107 TFLOP: at V100 peak that is "
    ">= 70 ms in float32 (15.7 TFLOP/s) and >= 8.9 ms in float16 tensor cores (125 TFLOP/s), so 10.03 ms is below "
    "what a V100 can do for this network at that size (likely unsynchronised timing or a smaller input)."
)


# --------------------------------------------------------------------------------------------------------------------
# Variants: how the network is run
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One way of running the network.

    Attributes:
        name: short id used on the command line and in rows.
        backend: ``torch``, ``onnxruntime`` or ``tensorrt``.
        precision: ``float32``, ``tf32``, ``float16``, ``bfloat16`` or ``int8``.
        channels_last: NHWC activations (what tensor-core convolutions want).
        compile: ``torch.compile`` mode (``default``, ``reduce-overhead``, ``max-autotune``) or None for eager.
        provider: ONNX Runtime execution provider (``cpu`` or ``cuda``) for onnxruntime variants.
        devices: device types the variant can run on.
        default: part of the default set for those devices (others only when named with ``--variants``).
        end_to_end: also time the :class:`Predictor` path (uint8 in, labels out) with the equivalent TorchBackend.
    """

    name: str
    backend: str
    precision: str
    channels_last: bool = False
    compile: str | None = None
    provider: str | None = None
    devices: tuple[str, ...] = ("cuda",)
    default: bool = True
    end_to_end: bool = False


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("torch-fp32", "torch", "float32", devices=("cpu", "cuda"), end_to_end=True),
        Variant("torch-tf32", "torch", "tf32"),
        Variant("torch-fp16-cl", "torch", "float16", channels_last=True, end_to_end=True),
        Variant("torch-bf16-cl", "torch", "bfloat16", channels_last=True),
        Variant("torch-compile-fp16-cl", "torch", "float16", channels_last=True, compile="default"),
        Variant(
            "torch-compile-ro-fp16-cl",
            "torch",
            "float16",
            channels_last=True,
            compile="reduce-overhead",
            end_to_end=True,
        ),
        # max-autotune compiles for many minutes per shape: only when asked for.
        Variant(
            "torch-compile-ma-fp16-cl", "torch", "float16", channels_last=True, compile="max-autotune", default=False
        ),
        Variant("torch-compile-fp32", "torch", "float32", compile="default", devices=("cpu", "cuda"), default=False),
        Variant("torch-bf16-cpu", "torch", "bfloat16", devices=("cpu",), default=False),
        # The best torch path on CPU: channels_last under inference_mode (same maths, faster convolutions).
        Variant("torch-cl-cpu", "torch", "float32", channels_last=True, devices=("cpu",), end_to_end=True),
        Variant("ort-cpu-fp32", "onnxruntime", "float32", provider="cpu", devices=("cpu", "cuda"), end_to_end=True),
        Variant("ort-cpu-int8", "onnxruntime", "int8", provider="cpu", devices=("cpu",)),
        Variant("ort-cuda-fp32", "onnxruntime", "float32", provider="cuda"),
        Variant("ort-cuda-fp16", "onnxruntime", "float16", provider="cuda", end_to_end=True),
        Variant("trt-fp16", "tensorrt", "float16"),
        Variant("trt-int8", "tensorrt", "int8"),
    )
}

#: Model ids: ``<network>-<backbone>`` for ours, plus the torchvision peer.
PEER_MODEL = "peer-torchvision-deeplabv3_resnet50"
BACKBONES = BACKBONE_NAMES
NETWORKS = ("blindnet", "baseline")


def default_variants(device_type: str) -> tuple[str, ...]:
    """The variants run when none are named: every default variant that supports ``device_type``."""
    return tuple(name for name, v in VARIANTS.items() if v.default and device_type in v.devices)


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """What to measure.

    Attributes:
        device: ``cpu`` or ``cuda``.
        backbones: encoders to measure; the first is the headline model (batch sweep, end-to-end, profile).
        networks: ``blindnet`` (InstanceNorm layers) and/or ``baseline`` (plain DeepLabV3+).
        peer: also time torchvision's ``deeplabv3_resnet50`` (random init, no downloads) at batch 1.
        size: ``(H, W)`` of the network input (2048x1024 images are ``(1024, 2048)``).
        trials: timed calls per batch-1 measurement.
        batch_trials: timed calls per batch > 1 measurement (None: ``trials``).
        warmup: untimed calls before timing.
        batches: batch sizes of the throughput sweep (headline model only; every other model runs batch 1).
        variants: variant names (see :data:`VARIANTS`); None for :func:`default_variants`.
        end_to_end: also time the Predictor path for variants that have one (headline model, batch 1).
        profile: record a per-op-type profile of each headline batch-1 variant (the report keeps the best).
        checkpoint: a deployable checkpoint to load for the matching model; otherwise random init (timing does not
            depend on weight values; batch-norm statistics are settled on random data so activations have sane
            magnitudes in float16).
        threads: CPU threads for PyTorch and ONNX Runtime (None: leave PyTorch's setting).
        max_seconds: time cap per measurement; fewer trials are run (and recorded) when one trial is slow.
        pool_bytes: memory budget of the random input pool.
        seed: seed of the random inputs and random weights.
        workdir: where exported ONNX files / TensorRT engines go (None: a temporary directory).
        onnx_exporter: ``auto`` (dynamo, TorchScript fallback), ``dynamo`` or ``torchscript`` (seconds instead of
            tens of seconds per export: what ``--quick`` uses).
        run_id: label copied into every row (None: a UTC timestamp).
    """

    device: str = "cpu"
    backbones: tuple[str, ...] = BACKBONES
    networks: tuple[str, ...] = NETWORKS
    peer: bool = True
    size: tuple[int, int] = (1024, 2048)
    trials: int = 400
    batch_trials: int | None = None
    warmup: int = 50
    batches: tuple[int, ...] = (1, 4, 8, 16)
    variants: tuple[str, ...] | None = None
    end_to_end: bool = True
    profile: bool = True
    checkpoint: str | None = None
    threads: int | None = None
    max_seconds: float = 120.0
    pool_bytes: int = 1 << 30
    seed: int = 0
    workdir: str | None = None
    onnx_exporter: str = "auto"
    run_id: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not _cuda_available():
            raise ValueError("device 'cuda' requested but CUDA is not available on this machine")
        for bb in self.backbones:
            if bb not in BACKBONES:
                raise ValueError(f"unknown backbone {bb!r}; choose from {list(BACKBONES)}")
        for net in self.networks:
            if net not in NETWORKS:
                raise ValueError(f"unknown network {net!r}; choose from {list(NETWORKS)}")
        if not self.backbones and not self.peer:
            raise ValueError("nothing to measure: no backbones and no peer")
        if len(self.size) != 2 or min(self.size) < 32:
            raise ValueError(f"size must be (H, W) with sides >= 32, got {self.size}")
        if self.trials < 1 or self.warmup < 0 or (self.batch_trials is not None and self.batch_trials < 1):
            raise ValueError("trials and batch_trials must be >= 1 and warmup >= 0")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batches must be positive, got {self.batches}")
        for name in self.variants or ():
            if name not in VARIANTS:
                raise ValueError(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")

    def variant_list(self) -> list[Variant]:
        names = self.variants if self.variants is not None else default_variants(self.device)
        return [VARIANTS[n] for n in names]
