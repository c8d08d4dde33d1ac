"""Shared fixtures: tiny real models and checkpoints, CPU only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# The auto backend caches ONNX exports: tests (and the servers they start) keep theirs out of the user's cache.
os.environ.setdefault("BLINDNET_CACHE", tempfile.mkdtemp(prefix="blindnet-test-cache-"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deployable MobileNetV2 BlindNet checkpoint with random weights (19 classes)."""
    from blindnet.checkpoint import save_model
    from blindnet.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="mobilenetv2"))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_model(model, path)
    return path
