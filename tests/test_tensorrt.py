"""TensorRT: engine build + parity where TensorRT and a GPU exist (marked ``tensorrt``; skipped otherwise with the
reason), and everywhere: the missing-TensorRT message, the engine compatibility rules, and the profiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blindnet.backends.tensorrt_backend import (
    EngineMismatchError,
    Profile,
    TensorRTUnavailable,
    check_engine_compatibility,
    default_profiles,
    metadata_path,
    tensorrt_available,
)

needs_trt = pytest.mark.skipif(
    not (tensorrt_available() and torch.cuda.is_available()),
    reason="TensorRT is not installed or no NVIDIA GPU: pip install 'blindnet[tensorrt]' on a GPU machine",
)


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_missing_tensorrt_message_says_how_to_install(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    from blindnet.backends.select import make_backend
    from blindnet.backends.tensorrt_backend import import_tensorrt
    from blindnet.export.__main__ import main

    with pytest.raises(TensorRTUnavailable) as info:
        import_tensorrt()
    msg = str(info.value)
    assert "pip install 'blindnet[tensorrt]'" in msg and "pip install tensorrt" in msg and "NVIDIA GPU" in msg
    with pytest.raises(TensorRTUnavailable, match="blindnet\\[tensorrt\\]"):
        make_backend("tensorrt", tiny_checkpoint)
    # The CLI fails fast (before any ONNX export) with the same hint and exit code 2.
    assert main(["--checkpoint", str(tiny_checkpoint), "--format", "tensorrt", "--out", str(tmp_path)]) == 2
    assert "pip install 'blindnet[tensorrt]'" in capsys.readouterr().err
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_format_all_without_tensorrt_exports_the_rest(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from blindnet.export.pipeline import run_export

    summary = run_export(tiny_checkpoint, tmp_path, formats=["all"], exporter="torchscript", uint8_input=True)
    assert "pip install 'blindnet[tensorrt]'" in summary["skipped"]["tensorrt"]
    assert set(summary["artifacts"]) == {"onnx", "triton"}
    assert (tmp_path / "triton" / "blindnet" / "1" / "model.onnx").exists()


META = {
    "engine": "model.plan",
    "tensorrt_version": "10.16.1",
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "compute_capability": "9.0",
}


def test_engine_compatibility_rules() -> None:
    check_engine_compatibility(
        META, tensorrt_version="10.16.1", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0"
    )
    with pytest.raises(EngineMismatchError, match=r"TensorRT 10\.16\.1 \(this machine: 11\.4\.0\.106\)"):
        check_engine_compatibility(
            META, tensorrt_version="11.4.0.106", gpu_name=META["gpu_name"], compute_capability="9.0"
        )
    with pytest.raises(EngineMismatchError, match=r"sm_90 \(this machine: sm_80\).*rebuild"):
        check_engine_compatibility(
            META, tensorrt_version="10.16.1", gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0"
        )
    with pytest.raises(EngineMismatchError, match="GPU 'NVIDIA H100 80GB HBM3'"):
        check_engine_compatibility(
            META, tensorrt_version="10.16.1", gpu_name="NVIDIA H100 PCIe", compute_capability="9.0"
        )
    check_engine_compatibility(
        META, tensorrt_version="10.16.1", gpu_name="NVIDIA H100 PCIe", compute_capability="9.0", strict_gpu=False
    )


def test_profiles() -> None:
    (p,) = default_profiles((1024, 2048), max_batch=4)
    assert p.min == (1, 256, 256) and p.opt == (1, 1024, 2048) and p.max == (4, 1024, 2048)
    assert p.shapes("NHWC")[2] == (4, 1024, 2048, 3) and p.shapes("NCHW")[0] == (1, 3, 256, 256)
    assert p.contains(2, 512, 1000) and not p.contains(5, 512, 1000) and not p.contains(1, 2048, 2048)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Profile(min=(1, 64, 64), opt=(1, 32, 64), max=(1, 64, 64))
    assert metadata_path("x/model.plan") == Path("x/model.plan.json")


@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize("fp16", [False, True])
def test_build_engine_and_parity(fp16: bool, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from blindnet.backends.tensorrt_backend import TensorRTBackend
    from blindnet.checkpoint import load_model
    from blindnet.export.pipeline import run_export
    from blindnet.inference import Predictor

    summary = run_export(
        tiny_checkpoint,
        tmp_path,
        formats=["tensorrt", "triton"],
        fp16=fp16,
        uint8_input=True,
        size=(128, 192),
        max_batch=2,
        min_size=(64, 64),
    )
    check = summary["artifacts"]["tensorrt"]["check"]
    assert check["passed"], check
    meta = json.loads(metadata_path(tmp_path / "model.plan").read_text())
    assert meta["precision"] == ("float16" if fp16 else "float32")
    assert meta["gpu_name"] == torch.cuda.get_device_name() and meta["profiles"][0]["max"] == [2, 128, 192]
    backend = TensorRTBackend(tmp_path / "model.plan")
    preds = Predictor(backend, input_size=(128, 192)).predict(
        [torch.randint(0, 256, (100, 150, 3), dtype=torch.uint8).numpy()]
    )
    assert preds[0].labels.shape == (100, 150)
    assert (tmp_path / "triton" / "blindnet" / "1" / "model.plan").exists()
    # An engine whose metadata names another TensorRT version is refused with a clear message.
    meta["tensorrt_version"] = "0.0.0"
    metadata_path(tmp_path / "model.plan").write_text(json.dumps(meta))
    with pytest.raises(EngineMismatchError, match="TensorRT 0.0.0"):
        TensorRTBackend(tmp_path / "model.plan")
    assert load_model(tiny_checkpoint) is not None
