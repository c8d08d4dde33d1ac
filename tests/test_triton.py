"""Triton model repository: config.pbtxt parses as Triton's ModelConfig and matches the ONNX model's I/O."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from google.protobuf import text_format

from blindnet.classes import CLASS_NAMES
from blindnet.export.onnx import export_onnx
from blindnet.export.triton import write_triton_repository
from blindnet.models import ModelConfig, build_model

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32,
    onnx.TensorProto.UINT8: model_config_pb2.TYPE_UINT8,
    onnx.TensorProto.INT32: model_config_pb2.TYPE_INT32,
}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="mobilenetv2")).eval()


def _io(path: Path) -> dict[str, tuple[int, list]]:
    g = onnx.load(str(path)).graph
    return {
        v.name: (
            v.type.tensor_type.elem_type,
            [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim],
        )
        for v in list(g.input) + list(g.output)
    }


@pytest.mark.parametrize("variant", ["float_logits", "uint8_labels"])
def test_repository_matches_onnx(variant: str, model: torch.nn.Module, tmp_path: Path) -> None:
    kw = {"normalize_input": True, "argmax": True} if variant == "uint8_labels" else {}
    res = export_onnx(model, tmp_path / "m.onnx", exporter="torchscript", **kw)
    model_dir = write_triton_repository(
        res.path, tmp_path / "repo", model_name="seg", max_batch_size=4, max_queue_delay_us=500
    )
    assert model_dir == tmp_path / "repo" / "seg"
    assert (model_dir / "1" / "model.onnx").read_bytes() == res.path.read_bytes()
    labels = (model_dir / "labels.txt").read_text().splitlines()
    assert labels == list(CLASS_NAMES) and len(labels) == 19

    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "seg" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 4
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert len(cfg.instance_group) == 1 and cfg.instance_group[0].count == 1

    io = _io(res.path)
    assert {t.name for t in cfg.input} | {t.name for t in cfg.output} == set(io)
    for t in list(cfg.input) + list(cfg.output):
        elem, shape = io[t.name]
        assert t.data_type == ONNX_TO_TRITON[elem], t.name
        assert shape[0] == -1  # dynamic batch in the ONNX model ...
        assert list(t.dims) == shape[1:]  # ... and Triton lists the per-image shape only
    (inp,), (out,) = cfg.input, cfg.output
    if variant == "uint8_labels":
        assert list(inp.dims) == [-1, -1, 3] and inp.data_type == model_config_pb2.TYPE_UINT8
        assert list(out.dims) == [-1, -1] and out.data_type == model_config_pb2.TYPE_UINT8
    else:
        assert list(inp.dims) == [3, -1, -1] and list(out.dims) == [19, -1, -1]
        assert out.label_filename == "labels.txt"


def test_fixed_batch_model_is_rejected(model: torch.nn.Module, tmp_path: Path) -> None:
    res = export_onnx(model, tmp_path / "fixed.onnx", dynamic=False, batch=1, exporter="torchscript")
    with pytest.raises(ValueError, match="fixed batch"):
        write_triton_repository(res.path, tmp_path / "repo", max_batch_size=8)
    with pytest.raises(ValueError, match=r"\.onnx or \.plan"):
        bogus = tmp_path / "model.bin"
        bogus.write_bytes(b"x")
        write_triton_repository(bogus, tmp_path / "repo")
