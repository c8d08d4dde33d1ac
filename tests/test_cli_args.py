"""The command lines as a new user meets them: a mistyped flag is named (with a suggestion) by every job, abbreviations
are refused, bad arguments fail before any model or PyTorch loads, and --help reads as help (no RST usage lines,
defaults shown, examples that work outside a checkout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from blindnet.cli import JOBS, SYNTHETIC_APPEARANCES
from blindnet.cliparse import cuda_device_count


def blindnet(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """``blindnet ARGS`` in a fresh interpreter; with ``code``, that Python runs after it (``rc`` holds the status)."""
    script = (
        f"import sys\nfrom blindnet.cli import main\ntry:\n    rc = main({list(args)!r})\nexcept SystemExit as e:\n"
    )
    script += "    rc = e.code\n" + (code or "") + "\nsys.exit(rc)\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


NOT_TORCH = "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')"


@pytest.mark.parametrize("job", list(JOBS))
def test_every_job_names_a_mistyped_flag(job: str) -> None:
    res = blindnet(job, "--ouput", "x", code=NOT_TORCH)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "unrecognized argument --ouput" in last and "required" not in last
    if job in ("segment", "train", "evaluate", "export", "bench"):  # the jobs that have an --out
        assert last.endswith("did you mean --out?")
    assert res.stdout.strip() == "torch not loaded"


def test_abbreviations_are_refused() -> None:
    res = blindnet("train", "--conf", "synthetic_smoke", "--print-config")
    assert res.returncode == 2 and "unrecognized argument --conf; did you mean --config?" in res.stderr
    res = blindnet("export", "--fo", "onnx", "--out", "x")
    assert res.returncode == 2 and "unrecognized argument --fo" in res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["segment", "no/such/photo.png"], "no such file or folder: no/such/photo.png"),
        (["segment", "--synthetic", "night,snow"], "--synthetic: unknown appearance(s) snow; choose from"),
        (["evaluate", "--checkpoint", "gone.safetensors", "--dataset", "aligned", "--root", "."], "gone.safetensors"),
        (["export", "--checkpoint", "gone.safetensors", "--out", "x"], "--checkpoint: no such file: gone.safetensors"),
        (["train", "--config", "synthetic_smoke", "--init", "gone.safetensors"], "--init: no such file"),
    ],
)
def test_bad_arguments_fail_before_pytorch_loads(args: list[str], message: str, tmp_path: Path) -> None:
    res = blindnet(*args, code=NOT_TORCH)
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "torch not loaded"


@pytest.mark.skipif(cuda_device_count() > 0, reason="this machine has a CUDA device")
def test_device_cuda_without_a_gpu_fails_before_pytorch_loads() -> None:
    res = blindnet("segment", "--synthetic", "night", "--device", "cuda", code=NOT_TORCH)
    assert res.returncode == 2 and "--device cuda: no CUDA device is available here" in res.stderr
    assert res.stdout.strip() == "torch not loaded"
    res = blindnet("evaluate", "--checkpoint", __file__, "--dataset", "aligned", "--root", ".", "--device", "cuda")
    assert res.returncode == 2 and "no CUDA device" in res.stderr
    res = blindnet("demo", "--device", "cuda", code=NOT_TORCH)
    assert res.returncode == 2 and "--device cuda: no CUDA device is available here" in res.stderr
    assert res.stdout.strip() == "torch not loaded"


def test_the_synthetic_names_are_the_renderers() -> None:
    from blindnet.data.synthetic import APPEARANCES

    assert SYNTHETIC_APPEARANCES == APPEARANCES


def _help(job: str) -> str:
    res = blindnet(job, "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.mark.parametrize("job", list(JOBS))
def test_help_reads_as_help(job: str) -> None:
    text = _help(job)
    description = text.split("\n\n")[1]
    assert not description.startswith("``") and "python -m" not in description, description
    assert "train/configs/" not in text  # a path that exists only in a checkout


def test_help_shows_defaults() -> None:
    text = " ".join(_help("segment").split())
    assert "overlay opacity of the label colours (default: 0.5)" in text
    assert "frames per synthetic clip (default: 24)" in text
    assert "network call (default: 4)" in text and "(default: None)" not in text and "(default: False)" not in text


def test_info_shows_the_file_size_and_dir_lists_the_lazy_names(tiny_checkpoint: Path) -> None:
    import json

    import blindnet as package

    res = subprocess.run(
        [sys.executable, "-m", "blindnet", "info", str(tiny_checkpoint)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    described = json.loads(res.stdout)
    size = tiny_checkpoint.stat().st_size
    assert described["size_bytes"] == size and described["size"] == f"{size / 2**20:.1f} MiB"
    assert {"Predictor", "load_model", "ModelConfig", "__version__"} <= set(dir(package))
    assert set(package.__all__) <= set(dir(package))
