"""Shared fixtures: tiny real models and checkpoints, CPU only."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from blindnet.backends.base import BackendOutput
from blindnet.backends.torch_backend import TorchBackend
from blindnet.inference import Predictor
from blindnet.serve.client import free_port as free_port_number

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


@pytest.fixture
def free_port() -> int:
    """A free loopback TCP port."""
    return free_port_number()


class ServeProcess:
    """``python -m blindnet.serve`` in a subprocess on loopback (stdout and stderr together in :attr:`log_path`)."""

    def __init__(
        self, checkpoint: Path, *flags: str, log_dir: Path, backend: str = "torch", max_open_files: int | None = None
    ) -> None:
        self.port = free_port_number()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "blindnet.serve", "--checkpoint", str(checkpoint), "--port", str(self.port)]
        # One thread: several servers and the test share two cores.
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
        self._log = self.log_path.open("wb")

        def limit_files() -> None:  # in the child, before it starts: its soft and hard open-file limits
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))

        self.proc = subprocess.Popen(
            [*cmd, "--backend", backend, *flags],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=limit_files if max_open_files else None,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> ServeProcess:
        """Block until ``/v2/health/ready`` answers 200 (AssertionError with the log if the process dies first)."""
        import httpx  # only the HTTP tests need it

        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not become ready:\n{self.log()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait (kill after ``timeout``); returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def serve_process(tmp_path: Path):
    """Start ``python -m blindnet.serve`` subprocesses (``serve_process(checkpoint, *flags)``); all stopped after."""
    started: list[ServeProcess] = []

    def start(checkpoint: Path, *flags: str, ready: bool = True, backend: str = "torch") -> ServeProcess:
        proc = ServeProcess(checkpoint, *flags, log_dir=tmp_path, backend=backend)
        started.append(proc)
        return proc.wait_ready() if ready else proc

    yield start
    for proc in started:
        proc.stop()


def count_video_frames(path: str | Path) -> int:
    """Frames OpenCV decodes from a video: a second decoder besides the package's own (PyAV) to check what it wrote."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


@pytest.fixture(scope="module")
def one_torch_thread():
    """PyTorch on one thread for a module of tiny tensors: on two shared cores OpenMP with 2 threads thrashes (about 10x
    slower, measured); one thread is stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class GatedBackend(TorchBackend):
    """A real TorchBackend whose ``infer`` waits until the test opens ``gate``: makes 'the worker is busy'
    deterministic. ``entered`` is set once a batch has reached the backend."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def infer(self, images: np.ndarray, *, return_logits: bool = False) -> BackendOutput:
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return super().infer(images, return_logits=return_logits)


class FailFirstBackend(TorchBackend):
    """A real TorchBackend whose first batch raises (a device error, a broken engine, ...); later ones run."""

    calls = 0

    def infer(self, images: np.ndarray, *, return_logits: bool = False) -> BackendOutput:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("simulated device fault")
        return super().infer(images, return_logits=return_logits)


# The server tests' shared fixtures: the tiny checkpoint, a TorchBackend on it, and the Predictor every served answer
# must agree with (its own batching, independent of the server's). Module-scoped: each server module builds its own.
@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def backend(checkpoint: Path) -> TorchBackend:
    return TorchBackend.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def reference(backend: TorchBackend) -> Predictor:
    return Predictor(backend, batch_size=8)
