"""``blindnet segment / convert / info`` end to end on real files."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from blindnet.backends.torch_backend import TorchBackend
from blindnet.checkpoint import load_model
from blindnet.cli import main
from blindnet.inference import Predictor
from blindnet.segment import segment_paths
from tests.conftest import count_video_frames


def _write_video(path: Path, frames: int, h: int = 48, w: int = 64) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (w, h))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    writer.release()


def test_segment_images_folder_video_and_skip_bad(tmp_path: Path, tiny_checkpoint: Path) -> None:
    data = tmp_path / "in"
    (data / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(data / "a.png")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(data / "sub" / "gray.jpg")
    (data / "broken.png").write_bytes(b"not really a png")
    _write_video(data / "clip.mp4", frames=7)
    predictor = Predictor(TorchBackend(load_model(tiny_checkpoint)), batch_size=3)
    report = segment_paths(predictor, [data, tmp_path / "missing.png"], tmp_path / "out")
    assert report.images == 2 and report.frames == 7
    assert set(report.skipped) == {str(data / "broken.png"), str(tmp_path / "missing.png")}
    labels = np.array(Image.open(tmp_path / "out" / "a_labels.png"))
    assert labels.shape == (40, 56) and labels.max() < 19
    assert np.array_equal(labels, predictor.predict(data / "a.png")[0].labels)
    assert np.array(Image.open(tmp_path / "out" / "sub" / "gray_overlay.png")).shape == (30, 30, 3)  # tree mirrored
    assert count_video_frames(next((tmp_path / "out").glob("clip_overlay.*"))) == 7
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_cli_segment_convert_info(tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "x.png")
    rc = main(["segment", str(tmp_path / "x.png"), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o")])
    assert rc == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["inputs"]["images"] == 1
    # A path that does not exist is an argument error, reported before the model loads (and nothing is written).
    assert (
        main(
            ["segment", str(tmp_path / "nope.png"), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o2")]
        )
        == 2
    )
    assert not (tmp_path / "o2").exists()
    assert main(["info", str(tiny_checkpoint)]) == 0
    assert '"backbone": "mobilenetv2"' in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 2

    from tests.test_checkpoint import fabricate_variant_state

    torch.save({"state_dict": fabricate_variant_state("shufflenetv2", True)}, tmp_path / "official.pth")
    src, dst = str(tmp_path / "official.pth"), str(tmp_path / "conv.safetensors")
    capsys.readouterr()
    # Same keys for both variants: no silent default, and the wrong choice is refused by the statistics check.
    assert main(["convert", src, dst, "--backbone", "shufflenetv2"]) == 2
    assert "--variant" in capsys.readouterr().err
    assert main(["convert", src, dst, "--backbone", "shufflenetv2", "--baseline"]) == 2
    assert "looks like blindnet" in capsys.readouterr().err
    assert main(["convert", src, dst, "--backbone", "shufflenetv2", "--variant", "blindnet"]) == 0
    out = capsys.readouterr().out
    assert "BlindNet (3 InstanceNorm layers)" in out and "variant check: blindnet" in out
    assert load_model(dst).config.backbone == "shufflenetv2" and load_model(dst).config.instance_norm
    assert main(["convert", src, dst, "--backbone", "shufflenetv2", "--baseline", "--no-variant-check"]) == 0
    assert "baseline DeepLabV3+" in capsys.readouterr().out and not load_model(dst).config.instance_norm


def test_synthetic_showcase_scores_against_generated_masks(tmp_path: Path, tiny_checkpoint: Path) -> None:
    rc = main(
        [
            "segment",
            "--synthetic",
            "fog,night",
            "--frames",
            "3",
            "--clip-size",
            "64",
            "128",
            "--checkpoint",
            str(tiny_checkpoint),
            "--out",
            str(tmp_path / "show"),
        ]
    )
    assert rc == 0
    summary = json.loads((tmp_path / "show" / "summary.json").read_text())["synthetic"]
    for app in ("fog", "night"):
        assert 0.0 <= summary[app]["miou"] <= 100.0 and summary[app]["frames"] == 3
        assert count_video_frames(Path(summary[app]["overlay"])) == 3
        assert summary[app]["codec"] == "H.264/MP4" and summary[app]["overlay"].endswith(".mp4")
        # the contact sheet: 3 frames (first, middle, last) x (input | prediction | truth), 4-pixel gutters, with a
        # title band above and a legend below
        sheet = np.array(Image.open(summary[app]["sheet"]))
        assert sheet.shape[1:] == (3 * 128 + 2 * 4, 3) and sheet.shape[0] > 3 * 64 + 2 * 4
    assert (
        main(["segment", "--synthetic", "snow", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "bad")])
        == 2
    )


@pytest.mark.parametrize("size", [(1, 1), (16, 16)])
def test_cli_segments_tiny_images(tmp_path: Path, tiny_checkpoint: Path, size: tuple[int, int]) -> None:
    image = np.random.default_rng(2).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "tiny.png")
    rc = main(
        ["segment", str(tmp_path / "tiny.png"), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o")]
    )
    assert rc == 0
    labels = np.array(Image.open(tmp_path / "o" / "tiny_labels.png"))
    expected = Predictor(TorchBackend(load_model(tiny_checkpoint))).predict_one(image).labels
    np.testing.assert_array_equal(labels, expected)


class _Captured(Exception):
    pass


@pytest.mark.parametrize("job", ["segment", "convert", "info", "train", "evaluate", "export", "serve", "demo", "bench"])
def test_every_option_of_every_job_has_help_text(job: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    seen: list[argparse.ArgumentParser] = []

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        seen.append(self)
        raise _Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Captured):
        main([job])
    missing = [a.dest for a in seen[0]._actions if a.dest != "help" and not (a.help or "").strip()]
    assert not missing, f"blindnet {job}: options without help: {missing}"
    assert not any(word in seen[0].format_help() for word in ("shared" + "/reference", "issue " + "#"))


def test_help_of_every_job_answers_without_importing_heavy_dependencies() -> None:
    """``--help`` needs no job's runtime: not PyTorch, OpenCV, PyAV, ONNX, ONNX Runtime, Gradio, FastAPI, uvicorn."""
    import subprocess
    import sys

    heavy = ("torch", "cv2", "av", "onnx", "onnxruntime", "gradio", "fastapi", "uvicorn", "matplotlib")
    code = (
        "import contextlib, io, json, sys\n"
        "from blindnet.cli import JOBS, main\n"
        "seen = {}\n"
        "for job in JOBS:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main([job, '--help'])\n"
        f"    seen[job] = sorted(m for m in {heavy!r} if m in sys.modules)\n"
        "print(json.dumps(seen))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # Modules stay imported, so the first job listing a module is the one that imported it.
    seen = json.loads(out.stdout)
    assert not any(seen.values()), seen
