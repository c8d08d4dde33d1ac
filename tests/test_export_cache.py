"""The export cache checks what it hands out: an entry whose bytes changed since they passed their parity check
(truncated, or another model's file put in its place) is made again, with one line saying so."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from blindnet.backends.onnxruntime_backend import OnnxBackend
from blindnet.checkpoint import save_model
from blindnet.inference import Predictor
from blindnet.io import file_sha256
from blindnet.models import ModelConfig, build_model
from blindnet.resolve import cached_onnx_for_checkpoint

pytest.importorskip("onnxruntime")


def _labels(onnx_path: Path, image: np.ndarray) -> np.ndarray:
    return Predictor(OnnxBackend(onnx_path)).predict_one(image).labels


@pytest.mark.slow  # four exports and parity checks: about a minute on two cores
def test_a_swapped_or_truncated_cache_entry_is_exported_again(tiny_checkpoint: Path, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="blindnet")
    cache = tmp_path / "cache"
    # The TorchScript exporter: the faster of the two on CPU; the cache logic is the same for both.
    entry = cached_onnx_for_checkpoint(tiny_checkpoint, cache_dir=cache, exporter="torchscript")
    digest = Path(str(entry) + ".sha256").read_text().split()[0]
    assert digest == file_sha256(entry)
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    reference = _labels(entry, image)

    # Another model's export, put in place of this one (same name, different weights).
    torch.manual_seed(1)
    other_ckpt = save_model(build_model(ModelConfig(backbone="mobilenetv2")), tmp_path / "other.safetensors")
    other = cached_onnx_for_checkpoint(other_ckpt, cache_dir=tmp_path / "other-cache", exporter="torchscript")
    assert not np.array_equal(_labels(other, image), reference)  # they do differ on this image
    entry.write_bytes(other.read_bytes())
    caplog.clear()
    again = cached_onnx_for_checkpoint(tiny_checkpoint, cache_dir=cache, exporter="torchscript")
    assert again == entry
    np.testing.assert_array_equal(_labels(again, image), reference)
    notes = [r.getMessage() for r in caplog.records if "not the file that passed its check" in r.getMessage()]
    assert len(notes) == 1 and entry.name in notes[0]

    # Truncated (a full disk, a killed copy): made again, not a silent fallback.
    entry.write_bytes(entry.read_bytes()[:1000])
    again = cached_onnx_for_checkpoint(tiny_checkpoint, cache_dir=cache, exporter="torchscript")
    np.testing.assert_array_equal(_labels(again, image), reference)
    assert file_sha256(again) == Path(str(again) + ".sha256").read_text().split()[0]
