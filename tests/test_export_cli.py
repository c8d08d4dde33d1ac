"""``blindnet export`` as a user runs it: ``--format triton --out DIR`` makes DIR a Triton model repository (checked
with Triton's own model-config protobuf) that takes and returns what ``blindnet serve`` does, and an INT8 file that
misses its thresholds is not shipped unless asked for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from blindnet.checkpoint import load_model
from blindnet.export.pipeline import run_export

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
ort = pytest.importorskip("onnxruntime")


def test_format_triton_writes_exactly_a_repository_with_the_serving_contract(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "model_repository"
    cmd = [sys.executable, "-m", "blindnet", "export", "--checkpoint", str(tiny_checkpoint), "--format", "triton"]
    cmd += ["--out", str(repo), "--exporter", "torchscript"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    assert files == [
        "blindnet",
        "blindnet/1",
        "blindnet/1/model.onnx",
        "blindnet/config.pbtxt",
        "blindnet/export.json",
        "blindnet/labels.txt",
    ]
    cfg = text_format.Parse((repo / "blindnet" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "blindnet" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size > 0
    (inp,), (out,) = cfg.input, cfg.output
    # What `blindnet serve` takes and returns: uint8 RGB images N x H x W x 3 in, uint8 labels N x H x W out.
    assert inp.data_type == model_config_pb2.TYPE_UINT8 and list(inp.dims) == [-1, -1, 3]
    assert out.data_type == model_config_pb2.TYPE_UINT8 and list(out.dims) == [-1, -1]
    assert json.loads((repo / "blindnet" / "export.json").read_text())["artifacts"]["onnx"]["check"]["passed"]

    # The model file answers a uint8 image with the labels PyTorch computes.
    session = ort.InferenceSession(str(repo / "blindnet" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).integers(0, 256, (1, 64, 96, 3), dtype=np.uint8)
    (labels,) = session.run(None, {inp.name: image})
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = ((torch.from_numpy(image).float() / 255 - mean) / std).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = load_model(tiny_checkpoint)(x).argmax(1).numpy()
    # Float reordering inside ONNX Runtime may flip a near-tied pixel; the export's own parity check allows 0.5%.
    assert labels.shape == (1, 64, 96) and (labels == ref).mean() > 0.995


def test_a_missing_checkpoint_fails_at_once_and_a_typo_is_named(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "blindnet", "export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and res.stderr.strip() == f"error: --checkpoint: no such file: {tmp_path / 'nope.pt'}"
    res = subprocess.run(
        [sys.executable, "-m", "blindnet", "export", "--ouput", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "unrecognized argument --ouput; did you mean --out?" in res.stderr


@pytest.mark.slow
def test_int8_below_its_thresholds_falls_back_to_float32(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    # A threshold above 1 cannot be met by any INT8 file: the fallback path runs on a real quantisation.
    kw = {"formats": ["onnx"], "precision": "int8", "exporter": "torchscript", "int8_min_agreement": 1.01}
    summary = run_export(tiny_checkpoint, tmp_path / "a", **kw)
    lines = [line for line in capsys.readouterr().out.splitlines() if "INT8" in line]
    assert len(lines) == 1 and lines[0].startswith("INT8 rejected (label agreement")
    assert "exporting float32 instead (--force-int8 keeps INT8 anyway)" in lines[0]
    assert summary["artifacts"]["onnx_int8"]["rejected"] is True
    assert not list((tmp_path / "a").glob("*int8*.onnx")) and (tmp_path / "a" / "model.onnx").is_file()

    kept = run_export(tiny_checkpoint, tmp_path / "b", force_int8=True, **kw)
    assert kept["artifacts"]["onnx_int8"]["forced"] is True
    assert (tmp_path / "b" / "model.int8.qdq.onnx").is_file()
