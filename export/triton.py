"""Triton Inference Server model repository: ``<repo>/<model>/config.pbtxt``, ``1/model.onnx|model.plan``, labels.

Layout (what ``tritonserver --model-repository=<repo>`` loads as is)::

    <repo>/<model>/config.pbtxt
    <repo>/<model>/labels.txt          one class name per line (train id order)
    <repo>/<model>/1/model.onnx        (platform onnxruntime_onnx)  or  1/model.plan (platform tensorrt_plan)

``max_batch_size > 0`` makes the first dimension the batch dimension, so ``dims`` list the per-image shape only, with
-1 for the dynamic height and width. Dynamic batching only groups requests of identical shape: clients should send
one canonical resolution (the server in ``serve/`` resizes), which is also what a TensorRT profile is tuned for.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blindnet.classes import class_names
from blindnet.export.engine import metadata_path, read_engine_metadata
from blindnet.export.ort import read_onnx_metadata
from blindnet.io import write_text

#: ONNX TensorProto element type -> Triton data type.
ONNX_TO_TRITON = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    10: "TYPE_FP16",
    9: "TYPE_BOOL",
    16: "TYPE_BF16",
}
#: numpy-style dtype names (TensorRT metadata) -> Triton data type.
NAME_TO_TRITON = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
    "bfloat16": "TYPE_BF16",
}
INSTANCE_KINDS = ("KIND_AUTO", "KIND_GPU", "KIND_CPU")


@dataclass
class TensorSpec:
    """One model input/output: name, Triton data type, shape *including* the batch dimension (-1 = dynamic)."""

    name: str
    data_type: str
    shape: list[int]


def onnx_io(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX file (initializers excluded), symbolic dimensions as -1."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}

    def spec(v: Any) -> TensorSpec:
        t = v.type.tensor_type
        if t.elem_type not in ONNX_TO_TRITON:
            raise ValueError(f"{path}: tensor {v.name} has an element type ({t.elem_type}) Triton cannot serve")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return TensorSpec(v.name, ONNX_TO_TRITON[t.elem_type], dims)

    return [spec(v) for v in proto.graph.input if v.name not in inits], [spec(v) for v in proto.graph.output]


def plan_io(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of a TensorRT engine, from the metadata JSON :mod:`export.tensorrt` writes beside it
    (so a repository can be written on a machine without TensorRT)."""

    meta_file = metadata_path(path)
    if not meta_file.exists():
        raise FileNotFoundError(
            f"{meta_file}: build metadata missing; build the engine with `python -m blindnet.export`"
        )
    meta = json.loads(meta_file.read_text())
    ins: list[TensorSpec] = []
    outs: list[TensorSpec] = []
    for t in meta["io"]:
        spec = TensorSpec(t["name"], NAME_TO_TRITON[t["dtype"]], [int(d) for d in t["shape"]])
        (ins if t["mode"] == "input" else outs).append(spec)
    return ins, outs


def _dims_pbtxt(dims: list[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def render_config(
    *,
    model_name: str,
    platform: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch_size: int,
    max_queue_delay_us: int = 100,
    preferred_batch_sizes: list[int] | None = None,
    instance_count: int = 1,
    instance_kind: str = "KIND_AUTO",
    labels_file: str | None = "labels.txt",
) -> str:
    """The ``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``)."""
    if instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"instance_kind must be one of {INSTANCE_KINDS}, got {instance_kind!r}")
    lines = [f'name: "{model_name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch_size}"]

    def block(kind: str, specs: list[TensorSpec], labels: bool) -> None:
        lines.append(f"{kind} [")
        for i, s in enumerate(specs):
            dims = s.shape[1:] if max_batch_size > 0 else s.shape
            entry = [f'    name: "{s.name}"', f"    data_type: {s.data_type}", f"    dims: {_dims_pbtxt(dims)}"]
            if labels and labels_file and s.data_type in ("TYPE_FP32", "TYPE_FP16"):
                # Triton's classification extension maps class indices of this output to these names.
                entry.append(f'    label_filename: "{labels_file}"')
            lines.append("  {\n" + "\n".join(entry) + "\n  }" + ("," if i < len(specs) - 1 else ""))
        lines.append("]")

    block("input", inputs, labels=False)
    block("output", outputs, labels=True)
    lines.append("dynamic_batching {")
    if preferred_batch_sizes:
        lines.append(f"  preferred_batch_size: {_dims_pbtxt(preferred_batch_sizes)}")
    lines.append(f"  max_queue_delay_microseconds: {max_queue_delay_us}")
    lines.append("}")
    lines.append(f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {instance_kind}\n  }}\n]")
    return "\n".join(lines) + "\n"


def write_triton_repository(
    model_path: str | Path,
    repo_dir: str | Path,
    *,
    model_name: str = "blindnet",
    version: int = 1,
    max_batch_size: int | None = None,
    max_queue_delay_us: int = 100,
    preferred_batch_sizes: list[int] | None = None,
    instance_count: int = 1,
    instance_kind: str | None = None,
    num_classes: int | None = None,
    copy: bool = True,
) -> Path:
    """Write a Triton model repository entry for an exported ``.onnx`` file or TensorRT ``.plan``.

    Args:
        model_path: the ``.onnx`` file (from :func:`export.onnx.export_onnx`) or a ``.plan`` engine with its metadata
            JSON (from :func:`export.tensorrt.build_engine`).
        repo_dir: repository root; ``<repo_dir>/<model_name>/`` is (re)written.
        model_name: Triton model name (also the folder name).
        version: version folder.
        max_batch_size: Triton's batch limit (default 8 for ONNX; the engine profile's max batch for a plan).
        max_queue_delay_us: how long the dynamic batcher may hold the oldest request for a fuller batch.
        preferred_batch_sizes: only for engines tuned for specific batch sizes (NVIDIA advises leaving it unset).
        instance_count: model instances per device.
        instance_kind: ``KIND_AUTO`` (ONNX default: GPU if present), ``KIND_GPU`` (plan default) or ``KIND_CPU``.
        num_classes: classes for labels.txt (default: from the file's metadata, else the output's channel count).
        copy: copy the model file (False: move it).

    Returns:
        The model folder ``<repo_dir>/<model_name>``.
    """
    model_path = Path(model_path)
    if not model_path.exists():
        raise FileNotFoundError(f"model file not found: {model_path}")
    suffix = model_path.suffix.lower()
    if suffix == ".onnx":
        platform, target_name, kind = "onnxruntime_onnx", "model.onnx", instance_kind or "KIND_AUTO"
        inputs, outputs = onnx_io(model_path)

        meta: dict[str, Any] = read_onnx_metadata(model_path)
        classes = num_classes or int(meta.get("num_classes", 0)) or _channels(outputs)
        batch = max_batch_size if max_batch_size is not None else 8
    elif suffix in (".plan", ".engine"):
        platform, target_name, kind = "tensorrt_plan", "model.plan", instance_kind or "KIND_GPU"
        inputs, outputs = plan_io(model_path)

        meta = read_engine_metadata(model_path)
        classes = num_classes or int(meta.get("num_classes", 0)) or _channels(outputs)
        profile_max = max(int(p["max"][0]) for p in meta["profiles"])
        batch = max_batch_size if max_batch_size is not None else profile_max
        if batch > profile_max:
            raise ValueError(f"max_batch_size {batch} exceeds the engine's largest profile batch {profile_max}")
    else:
        raise ValueError(f"{model_path}: expected a .onnx or .plan file")
    _check_batching(inputs + outputs, batch)

    model_dir = Path(repo_dir) / model_name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / target_name
    if target.resolve() != model_path.resolve():
        (shutil.copy2 if copy else shutil.move)(str(model_path), str(target))
    config = render_config(
        model_name=model_name,
        platform=platform,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=batch,
        max_queue_delay_us=max_queue_delay_us,
        preferred_batch_sizes=preferred_batch_sizes,
        instance_count=instance_count,
        instance_kind=kind,
    )
    write_text(model_dir / "config.pbtxt", config)
    write_text(model_dir / "labels.txt", "\n".join(class_names(classes)) + "\n")
    return model_dir


def _check_batching(specs: list[TensorSpec], batch: int) -> None:
    """Triton batches along the first axis only when every tensor's first dimension is dynamic."""
    if batch < 0:
        raise ValueError(f"max_batch_size must be >= 0, got {batch}")
    for spec in specs if batch > 0 else []:
        if not spec.shape or spec.shape[0] != -1:
            raise ValueError(
                f"tensor {spec.name} has a fixed batch dimension ({spec.shape[:1]}), so Triton cannot batch it with "
                f"max_batch_size={batch}; export with dynamic shapes or pass max_batch_size=0"
            )


def _channels(outputs: list[TensorSpec]) -> int:
    """Class count from a logits output ``N x C x H x W``; 19 when it cannot be read (label-map outputs)."""
    for s in outputs:
        if len(s.shape) == 4 and s.shape[1] > 0:
            return s.shape[1]
    return 19
