"""What a model file holds: a checkpoint's config, size and metadata, or an ONNX file's graph contract.

Used by ``blindnet info``. ONNX files are read with ``onnx`` (graph only, no weights loaded into a runtime); a
checkpoint is read without unpickling anything but tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blindnet.checkpoint import load_checkpoint_state, load_model
from blindnet.models import count_parameters
from blindnet.resolve import is_shipped_model

_ONNX_META_PREFIX = "blindnet."
_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 16: "bfloat16"}


def describe(path: str | Path) -> dict[str, Any]:
    """A JSON-able description of a checkpoint (``.safetensors``/``.pt``) or an exported ``.onnx`` file."""
    path = Path(path)
    if path.suffix == ".onnx":
        return describe_onnx(path)
    return describe_checkpoint(path)


def human_size(size_bytes: int) -> str:
    """``57_321_472`` -> ``"54.7 MiB"`` (binary units, as ``ls -lh`` and file managers show them)."""
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """Config, parameter count, file size and metadata of a checkpoint."""
    path = Path(path)
    cfg, _, meta = load_checkpoint_state(path)
    model = load_model(path)
    out = {
        "path": str(path),
        "kind": "checkpoint",
        "size_bytes": path.stat().st_size,
        "size": human_size(path.stat().st_size),
        "model_config": cfg.to_dict(),
        "parameters": count_parameters(model),
        "metadata": meta,
    }
    if is_shipped_model(path):
        out["note"] = "the shipped demo model: trained on procedural street scenes only"
    return out


def _tensor_info(value: Any) -> dict[str, Any]:
    t = value.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in t.shape.dim]
    return {"name": value.name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": dims}


def describe_onnx(path: str | Path) -> dict[str, Any]:
    """Inputs, outputs, precision, opset, the stored export facts and the stored parity result of an ONNX file."""
    import onnx  # optional dependency (the 'cpu'/'export' extras); the caller checks it is installed

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a file that is not ONNX
        raise ValueError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    meta = {
        p.key[len(_ONNX_META_PREFIX) :]: p.value for p in proto.metadata_props if p.key.startswith(_ONNX_META_PREFIX)
    }
    inits = {i.name for i in proto.graph.initializer}
    weights = proto.graph.initializer
    precisions = sorted({_ONNX_DTYPES.get(w.data_type, str(w.data_type)) for w in weights if len(w.dims) > 1})
    check = path.with_name(path.name + ".check.json")
    return {
        "path": str(path),
        "kind": "onnx",
        "size_bytes": path.stat().st_size,
        "size": human_size(path.stat().st_size),
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "inputs": [_tensor_info(v) for v in proto.graph.input if v.name not in inits],
        "outputs": [_tensor_info(v) for v in proto.graph.output],
        "precision": meta.get("precision") or ("/".join(precisions) if precisions else "unknown"),
        "nodes": len(proto.graph.node),
        "blindnet_metadata": {k: (json.loads(v) if k == "model_config" else v) for k, v in meta.items()},
        "parity_check": json.loads(check.read_text()) if check.is_file() else "none stored next to the file",
    }
