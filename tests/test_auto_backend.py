"""``auto``: the fastest correct backend by default; on CPU, ONNX Runtime on a cached, parity-checked export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from blindnet import resolve
from blindnet.backends import select
from blindnet.backends.onnxruntime_backend import OnnxBackend
from blindnet.backends.select import choose_backend, make_backend
from blindnet.backends.torch_backend import TorchBackend
from blindnet.checkpoint import load_model, save_model
from blindnet.inference import Predictor
from blindnet.models import ModelConfig, build_model
from blindnet.resolve import cached_onnx_path


@pytest.fixture()
def export_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every real export the cache performs (the exporter still runs; only the call is recorded)."""
    calls: list[Path] = []
    real = resolve.export_onnx

    def spy(model, path, **kw):
        calls.append(Path(path))
        return real(model, path, **{**kw, "exporter": "torchscript"})  # seconds instead of ~20 s per export

    monkeypatch.setattr(resolve, "export_onnx", spy)
    return calls


@pytest.mark.numerics
def test_auto_on_cpu_is_onnxruntime_on_a_cached_export(
    tiny_checkpoint: Path,
    tmp_path: Path,
    export_calls: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setenv("BLINDNET_CACHE", str(tmp_path / "cache"))
    first = make_backend("auto", tiny_checkpoint, device="cpu")
    assert isinstance(first, OnnxBackend) and first.session.get_providers() == ["CPUExecutionProvider"]
    line = capsys.readouterr().err
    assert line.startswith("backend: onnxruntime on CPU (cached export ") and str(first.path) in line
    assert first.path == cached_onnx_path(tiny_checkpoint) and len(export_calls) == 1
    report = json.loads(first.path.with_name(first.path.name + ".check.json").read_text())
    # Parity-checked like every export; 99.9% is the library's float32 label threshold (blindnet.export.onnx). Measured
    # 100% of labels and 1.8e-5 relative logit error with AVX-512 and with ATEN_CPU_CAPABILITY=default
    # ONEDNN_MAX_CPU_ISA=SSE41.
    assert report["passed"] is True and report["min_label_agreement"] >= 0.999
    mtime = first.path.stat().st_mtime_ns

    second = make_backend("auto", tiny_checkpoint, device="cpu")
    assert second.path == first.path and first.path.stat().st_mtime_ns == mtime and len(export_calls) == 1

    # Labels equal the torch backend's on the same images (measured 100% on both paths; 99.9% allows a near-tie or two).
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    ref = TorchBackend(load_model(tiny_checkpoint)).infer(images).labels
    assert (second.infer(images).labels == ref).mean() >= 0.999
    predictor = Predictor.from_checkpoint(tiny_checkpoint, backend="auto", device="cpu")
    assert predictor.backend.path == first.path and len(export_calls) == 1


def test_a_changed_checkpoint_gets_a_new_cache_entry(
    tiny_checkpoint: Path, tmp_path: Path, export_calls: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLINDNET_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(tiny_checkpoint.read_bytes())
    a = make_backend("auto", ckpt, device="cpu").path
    torch.manual_seed(1)
    save_model(build_model(ModelConfig(backbone="mobilenetv2")), ckpt)  # same name, new weights
    b = make_backend("auto", ckpt, device="cpu").path
    assert a != b and a.exists() and b.exists() and len(export_calls) == 2


def test_auto_falls_back_to_torch_without_onnxruntime(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real = select.missing_modules
    monkeypatch.setattr(select, "missing_modules", lambda mods: [m for m in mods if m == "onnxruntime"] + real(mods))
    backend = make_backend("auto", tiny_checkpoint, device="cpu")
    assert isinstance(backend, TorchBackend) and backend.channels_last
    assert "torch on cpu (onnxruntime not installed" in capsys.readouterr().err


def test_choice_rules(tmp_path: Path) -> None:
    assert choose_backend("m.safetensors", device="cuda").name == "torch"
    assert choose_backend("m.safetensors", device="cpu").name == "onnx"
    assert choose_backend(None, device="cpu").name == "onnx"
    assert choose_backend("m.safetensors", device="cpu", precision="bfloat16").name == "torch"
    assert choose_backend("m.onnx", device="cpu").name == "onnx"
    assert choose_backend("m.plan", device="cuda").name == "tensorrt"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert choose_backend("m.safetensors").device == expected


def test_the_clis_offer_exactly_the_backends_select_builds() -> None:
    from blindnet.backends import BACKEND_NAMES

    assert set(BACKEND_NAMES) == set(select.BACKENDS)


def test_the_shipped_model_is_announced_with_its_recipe_and_card(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The notice names the recipe in the file's header (the default need not be a BlindNet model) and the card; a
    file without training facts names its backbone, and an unreadable one still gives a notice."""
    shipped = resolve.shipped_model_notice()
    config_name = resolve.read_metadata(resolve.DEFAULT_CHECKPOINT)["config_name"]
    assert f"recipe `{config_name}`" in shipped and str(resolve.WEIGHTS_DIR / "MODEL_CARD.md") in shipped
    assert "(mobilenetv2, synthetic scenes only" in resolve.shipped_model_notice(tiny_checkpoint)
    broken = tmp_path / "default.safetensors"
    broken.write_bytes(b"not a checkpoint")
    assert resolve.shipped_model_notice(broken).startswith("using the shipped demo model (ShuffleNetV2, synthetic")
    # One short line that says what to call, on the command line and in Python.
    assert "\n" not in shipped and len(shipped) - len(str(resolve.MODEL_CARD)) <= 220
    assert "--checkpoint blindnet-r50-gtav" in shipped and "Predictor.from_checkpoint('blindnet-r50-gtav')" in shipped
