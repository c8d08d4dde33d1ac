"""Numeric precisions, one spelling each, with the standard library only (command lines list them before PyTorch
loads). Every option, config value and results column that names a precision uses these keys; each runtime accepts a
subset (:data:`INFERENCE_PRECISIONS` for the Predictor's backends, TensorRT's in :mod:`blindnet.export.engine`,
bfloat16 autocast for training)."""

from __future__ import annotations

PRECISIONS: dict[str, str] = {
    "float32": "IEEE single precision",
    "tf32": "float32 storage, TensorFloat-32 matrix products and convolutions (NVIDIA Ampere and later)",
    "float16": "IEEE half precision",
    "bfloat16": "bfloat16: float32's exponent range with an 8-bit mantissa",
    "int8": "8-bit integers, quantised through Q/DQ nodes (ONNX Runtime, TensorRT)",
    "fp8": "8-bit floats (TensorRT on NVIDIA Hopper and later)",
}

#: What ``--precision`` of segment, serve, demo and bench takes (the backend picks the kernels).
INFERENCE_PRECISIONS: tuple[str, ...] = ("float32", "float16", "bfloat16", "int8")
