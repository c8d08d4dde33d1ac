"""The ONNX file contract and ONNX Runtime sessions: the names, layouts and metadata an exported file carries, and the
one place sessions are configured.

Part of the export library because exports are checked by running them; the ONNX Runtime backend
(:mod:`blindnet.backends.onnxruntime_backend`) runs files through the same functions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blindnet.models.inputs import normalize

#: Key prefix of the facts written into the ONNX ``metadata_props``.
META_PREFIX = "blindnet."


INPUT_NAME = "images"


LOGITS_NAME = "logits"


LABELS_NAME = "labels"


LABEL_DTYPES: dict[str, torch.dtype] = {"uint8": torch.uint8, "int32": torch.int32}


LAYOUTS = ("NHWC", "NCHW")


def read_onnx_metadata(path_or_proto: str | Path | Any) -> dict[str, str]:
    """The ``blindnet.*`` facts of an exported file, prefix stripped (empty for a foreign ONNX file)."""
    import onnx

    proto = (
        onnx.load(str(path_or_proto), load_external_data=False)
        if isinstance(path_or_proto, (str, Path))
        else path_or_proto
    )
    return {p.key[len(META_PREFIX) :]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}


def _json_or_empty(text: str | None) -> dict[str, Any]:
    """A metadata value holding a JSON object, or ``{}`` when it is absent or not one."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def normalize_nhwc(images: np.ndarray) -> np.ndarray:
    """uint8 ``N x H x W x 3`` -> float32 ``N x 3 x H x W`` ImageNet-normalised."""
    return np.ascontiguousarray(normalize(images).transpose(0, 3, 1, 2), dtype=np.float32)


def io_spec_from_session(sess: Any, meta: dict[str, str] | None = None) -> dict[str, Any]:
    """How to feed and read an ONNX Runtime session: from our metadata when present, else from the graph's I/O types.

    Returns a dict with ``input_name``, ``input_dtype`` (``uint8``/``float32``/``float16``), ``input_layout``,
    ``normalize_input``, ``output_name``, ``output_kind`` (``logits``/``labels``), ``precision``, ``num_classes``.
    """
    meta = meta if meta is not None else dict(sess.get_modelmeta().custom_metadata_map or {})
    meta = {k[len(META_PREFIX) :] if k.startswith(META_PREFIX) else k: v for k, v in meta.items()}
    inp = sess.get_inputs()[0]
    out = sess.get_outputs()[0]
    in_dtype = _ort_type(inp.type)
    out_dtype = _ort_type(out.type)
    normalize_input = in_dtype == "uint8"
    layout = meta.get("input_layout")
    if layout is None:
        # A foreign graph: uint8 with 3 in the last axis is NHWC; everything else NCHW.
        layout = "NHWC" if normalize_input and inp.shape and inp.shape[-1] == 3 else "NCHW"
    output_kind = "labels" if out_dtype in ("uint8", "int32", "int64") else "logits"
    num_classes: str | int | None = meta.get("num_classes")
    if num_classes is None and output_kind == "logits" and isinstance(out.shape[1], int):
        num_classes = out.shape[1]
    return {
        "input_name": inp.name,
        "input_dtype": in_dtype,
        "input_layout": layout,
        "normalize_input": normalize_input,
        "output_name": out.name,
        "output_kind": output_kind,
        "output_dtype": out_dtype,
        "precision": meta.get("precision", "float16" if in_dtype == "float16" else "float32"),
        "num_classes": int(num_classes) if num_classes is not None else 19,
    }


_ORT_TYPES = {
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
}


def _ort_type(t: str) -> str:
    try:
        return _ORT_TYPES[t]
    except KeyError:
        raise ValueError(f"unsupported ONNX I/O type {t}; expected one of {sorted(_ORT_TYPES)}") from None


def prepare_input(images: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """uint8 ``N x H x W x 3`` images -> the array the graph takes (see :func:`io_spec_from_session`)."""
    if spec["normalize_input"]:
        if spec["input_layout"] == "NCHW":
            return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        return np.ascontiguousarray(images)
    x = normalize_nhwc(images)
    return x.astype(np.float16) if spec["input_dtype"] == "float16" else x


ONNX_SUFFIXES = (".onnx",)


CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")


def ort_providers(device: str, *, conv_algo_search: str = "HEURISTIC") -> list[Any]:
    """Execution providers for ``device`` (``cpu``, ``cuda`` or ``cuda:N``), CPU last as ONNX Runtime's fallback."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    device_id = int(device.split(":")[1]) if ":" in device else 0
    cuda = {"device_id": device_id, "cudnn_conv_algo_search": conv_algo_search}
    return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]


def unsigned_activations(proto: Any) -> int:
    """Rewrite, in place, symmetric int8 activation Q/DQ pairs (zero point 0) as uint8 with zero point 128.

    The two forms hold the same numbers: ``QuantizeLinear`` to int8 with zero point 0 clamps ``round(x / s)`` to
    [-128, 127]; to uint8 with zero point 128 it clamps ``round(x / s) + 128`` to [0, 255], and dequantising
    subtracts the 128 again. The file keeps the signed form because TensorRT's explicit INT8 accepts only that;
    ONNX Runtime's x86 CPU kernels are built around uint8 activations x int8 weights and run the signed form
    markedly slower on CPUs without VNNI. Weights (int8 initialisers feeding ``DequantizeLinear``) and biases are
    left alone. Returns the number of nodes rewritten.
    """
    from onnx import numpy_helper  # the 'cpu'/'gpu' extras install onnx next to onnxruntime

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    quantized = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    added: dict[str, Any] = {}
    replaced: set[str] = set()
    rewritten = 0
    for node in graph.node:
        is_activation = node.op_type == "QuantizeLinear" or (
            node.op_type == "DequantizeLinear" and node.input[0] in quantized
        )
        if not is_activation or len(node.input) < 3 or node.input[2] not in inits:
            continue
        zero_point = numpy_helper.to_array(inits[node.input[2]])
        if zero_point.dtype != np.int8 or zero_point.any():
            continue
        name = node.input[2] + "_uint8"
        if name not in added:
            added[name] = numpy_helper.from_array(np.full(zero_point.shape, 128, np.uint8), name)
        replaced.add(node.input[2])
        node.input[2] = name
        rewritten += 1
    graph.initializer.extend(added.values())
    still_used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [i for i in graph.initializer if i.name in replaced and i.name not in still_used]
    for init in unused:  # the signed zero points nobody reads any more (ONNX Runtime warns about each otherwise)
        graph.initializer.remove(init)
    return rewritten


def _cpu_int8_bytes(path: Path, session: Any, providers: Sequence[Any]) -> bytes | None:
    """The serialised graph with unsigned activations when ``session`` runs an INT8 file on the CPU provider."""
    first = providers[0] if providers else "CPUExecutionProvider"
    if (first[0] if isinstance(first, tuple) else first) != "CPUExecutionProvider":
        return None
    meta = session.get_modelmeta().custom_metadata_map or {}
    if meta.get(META_PREFIX + "precision") != "int8":
        return None
    try:
        import onnx
    except ImportError:  # a runtime-only install still runs the file as it is, only slower
        return None
    proto = onnx.load(str(path))
    return proto.SerializeToString() if unsigned_activations(proto) else None


def ort_session(
    path: str | Path,
    *,
    providers: Sequence[Any] = ("CPUExecutionProvider",),
    threads: int | None = None,
    inter_op_threads: int | None = None,
    profile_prefix: str | None = None,
) -> Any:
    """An ONNX Runtime session with every graph optimisation on: the one place sessions are configured.

    ``threads`` sets the intra-op threads (None: ONNX Runtime's default); ``profile_prefix`` turns on its node
    profiler. An INT8 file on the CPU provider runs with unsigned activations (:func:`unsigned_activations`: the
    same numbers, faster kernels). A file ONNX Runtime cannot load raises ``RuntimeError`` naming it.
    """
    import onnxruntime as ort  # optional dependency (the 'cpu' or 'gpu' extra)

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    if inter_op_threads:
        opts.inter_op_num_threads = int(inter_op_threads)
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
        cpu_int8 = _cpu_int8_bytes(Path(path), session, providers)
        if cpu_int8 is not None:
            session = ort.InferenceSession(cpu_int8, sess_options=opts, providers=list(providers))
        return session
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise RuntimeError(f"{path}: ONNX Runtime cannot load this file ({type(exc).__name__}: {exc})") from exc


def cuda_available_for_ort() -> bool:
    """True when ONNX Runtime has a CUDA execution provider *and* a CUDA device is visible to torch."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
