"""INT8: static Q/DQ quantisation of an exported model, calibrated and checked on generated scenes (tiny model).

A random tiny network is not a meaningful accuracy test, so these tests check that the quantised graph is real
(Q/DQ nodes, per-channel weight scales, symmetric activations), runs in ONNX Runtime, and that every field of the
parity report is computed from the two graphs' outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from blindnet import resolve
from blindnet.backends.onnxruntime_backend import OnnxBackend, io_spec_from_session, prepare_input, read_onnx_metadata
from blindnet.backends.select import make_backend
from blindnet.checkpoint import load_model
from blindnet.export.int8 import HELD_OUT_SEED, check_int8, generated_scenes, quantize_int8
from blindnet.export.onnx import export_onnx

SIZE = (64, 128)


@pytest.fixture(scope="module")
def float_onnx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny.onnx"
    return export_onnx(load_model(tiny_checkpoint), out, normalize_input=True, exporter="torchscript").path


def test_quantized_graph_is_qdq_per_channel_symmetric(float_onnx: Path, tmp_path: Path) -> None:
    qdq = quantize_int8(float_onnx, tmp_path / "tiny.int8.onnx", calibration=3, size=SIZE)
    proto = onnx.load(str(qdq))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    quant = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    dequant = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert quant and dequant
    zero_points = [inits[n.input[2]] for n in quant if len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # symmetric int8 activations
    per_channel = [n for n in dequant if n.input[1] in inits and inits[n.input[1]].size > 1]
    assert per_channel, "weights must carry one scale per output channel"
    assert read_onnx_metadata(qdq)["precision"] == "int8"

    backend = OnnxBackend(qdq, precision="int8")
    images, _ = generated_scenes(2, SIZE, seed=5)
    labels = backend.infer(images).labels
    assert labels.shape == (2, *SIZE) and labels.max() < 19

    report = check_int8(qdq, float_onnx, scenes=2, size=SIZE)
    assert json.loads(qdq.with_name(qdq.name + ".check.json").read_text()) == report
    # Recompute the agreement from the two graphs directly: the report holds the real number.
    held_out, masks = generated_scenes(2, SIZE, seed=HELD_OUT_SEED)
    outs = []
    for path in (float_onnx, qdq):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        spec = io_spec_from_session(sess)
        outs.append(sess.run(None, {spec["input_name"]: prepare_input(held_out, spec)})[0].argmax(1))
    assert report["label_agreement"] == pytest.approx(float((outs[0] == outs[1]).mean()), abs=1e-6)
    assert 0.0 <= report["miou_float32"] <= 100.0 and 0.0 <= report["miou_int8"] <= 100.0
    assert report["miou_change"] == pytest.approx(report["miou_int8"] - report["miou_float32"])
    assert report["passed"] == (report["label_agreement"] >= 0.98 and report["miou_change"] >= -1.0)
    assert masks.shape == (2, *SIZE)


def test_int8_precision_for_a_checkpoint_is_cached(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resolve, "SCENE_SIZE", SIZE)
    monkeypatch.setattr(resolve, "CALIBRATION_SCENES", 2)
    monkeypatch.setattr(resolve, "HELD_OUT_SCENES", 2)
    monkeypatch.setenv("BLINDNET_CACHE", str(tmp_path / "cache"))
    real = resolve.export_onnx
    # The TorchScript exporter: seconds instead of ~20 s for the float32 export the INT8 file starts from.
    monkeypatch.setattr(resolve, "export_onnx", lambda m, p, **kw: real(m, p, **{**kw, "exporter": "torchscript"}))
    # A random tiny network may miss the INT8 thresholds; the warning saying so is expected then.
    backend = make_backend("onnx", tiny_checkpoint, precision="int8")
    assert backend.precision == "int8" and "int8qdq" in backend.path.name
    assert backend.path.with_name(backend.path.name + ".check.json").exists()
    mtime = backend.path.stat().st_mtime_ns
    again = make_backend("auto", tiny_checkpoint, device="cpu", precision="int8")
    assert again.path == backend.path and backend.path.stat().st_mtime_ns == mtime
