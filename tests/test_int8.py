"""INT8: static Q/DQ quantisation of an exported model, calibrated and checked on generated scenes (tiny model).

A random tiny network is not a meaningful accuracy test, so these tests check that the quantised graph is real
(Q/DQ nodes, per-channel weight scales, symmetric activations), runs in ONNX Runtime, and that every field of the
parity report is computed from the two graphs' outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from blindnet import resolve
from blindnet.backends.onnxruntime_backend import (
    OnnxBackend,
    io_spec_from_session,
    ort_session,
    prepare_input,
    read_onnx_metadata,
    unsigned_activations,
)
from blindnet.backends.select import make_backend
from blindnet.checkpoint import load_model
from blindnet.export.int8 import HELD_OUT_SEED, check_int8, float_islands, generated_scenes, quantize_int8
from blindnet.export.onnx import export_onnx

SIZE = (64, 128)

# INT8 results come from kernels the CPU picks: CI reruns this file with a restricted ISA (which reaches PyTorch's
# side; ONNX Runtime chooses its kernels from the CPU itself).
pytestmark = pytest.mark.numerics


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
    # InstanceNorm and the node feeding it stay float: what an InstanceNorm reads is never quantised.
    islands = float_islands(onnx.load(str(float_onnx)))
    norms = [n for n in proto.graph.node if n.op_type == "InstanceNormalization"]
    assert norms and all(n.name in islands for n in norms)
    assert not {n.input[0] for n in norms} & {n.output[0] for n in dequant}

    backend = OnnxBackend(qdq, precision="int8")
    images, _ = generated_scenes(2, SIZE, seed=5)
    labels = backend.infer(images).labels
    assert labels.shape == (2, *SIZE) and labels.max() < 19

    report = check_int8(qdq, float_onnx, scenes=2, size=SIZE)
    assert json.loads(qdq.with_name(qdq.name + ".check.json").read_text()) == report
    # Recompute the agreement from the two graphs as the CPU runs them: the report holds the real number.
    held_out, masks = generated_scenes(2, SIZE, seed=HELD_OUT_SEED)
    outs = []
    for path in (float_onnx, qdq):
        sess = ort_session(path)
        spec = io_spec_from_session(sess)
        outs.append(sess.run(None, {spec["input_name"]: prepare_input(held_out, spec)})[0].argmax(1))
    # One pixel is 1 / 16384 = 6.1e-5 of these two scenes: abs 1e-6 demands the same pixel count, i.e. the same
    # integer kernels giving the same labels in both runs (measured equal with AVX-512 and with
    # ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41).
    assert report["label_agreement"] == pytest.approx(float((outs[0] == outs[1]).mean()), abs=1e-6)
    assert 0.0 <= report["miou_float32"] <= 100.0 and 0.0 <= report["miou_int8"] <= 100.0
    # The same float64 subtraction (measured equal); approx's default 1e-6 relative is only a formality here.
    assert report["miou_change"] == pytest.approx(report["miou_int8"] - report["miou_float32"])
    # The library's acceptance targets (export/int8.py), not rounding tolerances: `passed` must follow from them.
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


def _qdq_roundtrip(zero_point: np.ndarray, scale: float = 0.05) -> onnx.ModelProto:
    """x -> QuantizeLinear(scale, zero_point) -> DequantizeLinear -> y: one activation Q/DQ pair."""
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
            onnx.helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"]),
        ],
        "qdq",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None])],
        [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(zero_point, "zp")],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])


def test_unsigned_activations_hold_the_same_numbers() -> None:
    signed = _qdq_roundtrip(np.array(0, np.int8))
    shifted = onnx.ModelProto()
    shifted.CopyFrom(signed)
    assert unsigned_activations(shifted) == 2
    inits = {i.name: numpy_helper.to_array(i) for i in shifted.graph.initializer}
    assert [z.dtype for z in inits.values()].count(np.uint8) == 1 and "zp" not in inits  # the old zero point is gone
    x = np.concatenate([np.linspace(-9, 9, 2001, dtype=np.float32), [-100.0, 100.0, 0.025, -0.025]]).astype(np.float32)
    y = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        for m in (signed, shifted)
    ]
    # Known answer: round-half-to-even of x / 0.05, clamped to [-128, 127], times 0.05, in both forms.
    expected = np.clip(np.round(x / np.float32(0.05)), -128, 127) * np.float32(0.05)
    np.testing.assert_array_equal(y[0], y[1])
    # |y| <= 6.4, where one float32 ulp is 4.8e-7: atol 1e-6 lets ONNX Runtime divide (or multiply by 1 / scale) with
    # 1-2 ulp of other rounding than NumPy; measured identical.
    np.testing.assert_allclose(y[1], expected, rtol=0, atol=1e-6)
    # An asymmetric or already unsigned pair is not touched.
    assert unsigned_activations(_qdq_roundtrip(np.array(3, np.int8))) == 0
    assert unsigned_activations(_qdq_roundtrip(np.array(128, np.uint8))) == 0


def test_quantising_leaves_the_console_and_root_logger_alone(float_onnx: Path, tmp_path: Path) -> None:
    # A fresh interpreter: pytest itself installs handlers on the root logger, which would hide the problem.
    code = (
        "import logging, sys\n"
        "from blindnet.export.int8 import quantize_int8\n"
        f"quantize_int8({str(float_onnx)!r}, {str(tmp_path / 'q.onnx')!r}, calibration=2, size={SIZE!r})\n"
        "assert not logging.getLogger().handlers, logging.getLogger().handlers\n"
        "logging.getLogger('blindnet').warning('after quantising')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WARNING:root" not in proc.stderr
    # The package's own messages stay bare lines (no "WARNING:blindnet:" prefix from a configured root logger).
    assert proc.stderr.strip().splitlines()[-1] == "after quantising"
