"""``blindnet segment`` on folders as users have them: same stems in subfolders and formats, EXIF-rotated photos, an
animated GIF, text files, damaged and empty files, videos; every input accounted for once, nothing overwritten, and
a second run that says what it skipped or replaced."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blindnet.backends.torch_backend import TorchBackend
from blindnet.checkpoint import load_model
from blindnet.cli import main
from blindnet.inference import Predictor
from blindnet.media import FrameSource
from blindnet.segment import SegmentOptions, collect_jobs, segment_paths
from tests import media_corpus as mc


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint: Path) -> Predictor:
    return Predictor(TorchBackend(load_model(tiny_checkpoint)), batch_size=4)


def _picture(path: Path, seed: int, h: int = 20, w: int = 28) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _user_folder(root: Path) -> dict[str, str]:
    """A small folder of what users have; returns input (relative) -> the status it must end with."""
    (root / "cam1").mkdir(parents=True)
    (root / "cam2").mkdir()
    _picture(root / "cam1" / "0001.jpg", 1)
    _picture(root / "cam2" / "0001.png", 2)
    for i, fmt in enumerate(("webp", "bmp", "tiff")):
        _picture(root / f"x.{fmt}", 10 + i)
    mc.exif_jpeg(root / "phone.jpg", orientation=6)
    mc.animated_gif(root / "wave.gif")
    mc.ffmpeg_encode(root / "clip.mkv", "libx264", ["-pix_fmt", "yuv420p"], mc.frames())
    noise = np.random.default_rng(0).integers(0, 256, (20, mc.H, mc.W, 3), dtype=np.uint8)
    whole = mc.ffmpeg_encode(root / "whole.webm", "libvpx-vp9", ["-pix_fmt", "yuv420p"], noise)
    mc.cut(whole, root / "pulled.webm")
    whole.unlink()
    (root / "notes.txt").write_text("shot list")
    (root / "empty.png").write_bytes(b"")
    data = (root / "cam1" / "0001.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    segmented = ["cam1/0001.jpg", "cam2/0001.png", "x.webp", "x.bmp", "x.tiff", "phone.jpg", "wave.gif", "clip.mkv"]
    segmented.append("pulled.webm")  # up to the damage
    return {**dict.fromkeys(segmented, "segmented"), "notes.txt": "unsupported type", "empty.png": "empty"} | {
        "cut.jpg": "cut off"
    }


def _status(item: dict) -> str:
    return item["status"] if item["status"] != "skipped" else item["reason"].split(":")[0]


def test_every_input_once_and_no_output_shared(predictor: Predictor, tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    expected = _user_folder(src)
    report = segment_paths(predictor, [src], out, SegmentOptions(progress=False))
    items = {Path(i["input"]).relative_to(src).as_posix(): i for i in report.items}
    assert len(report.items) == len(items) == len(expected)
    assert {k: _status(v) for k, v in items.items()} == expected
    outputs = [o for i in report.items for o in i.get("outputs", [])]
    assert len(outputs) == len(set(outputs)) == 6 * 2 + 3  # 6 still images x 2 PNGs, an MP4 per GIF and video
    assert all((out / o).is_file() for o in outputs)
    # the tree is mirrored, and the stem that three formats share takes the extension into the name
    assert items["cam1/0001.jpg"]["outputs"] == ["cam1/0001_labels.png", "cam1/0001_overlay.png"]
    assert items["cam2/0001.png"]["outputs"][0] == "cam2/0001_labels.png"
    assert {items[f"x.{f}"]["outputs"][0] for f in ("webp", "bmp", "tiff")} == {
        "x.webp_labels.png",
        "x.bmp_labels.png",
        "x.tiff_labels.png",
    }
    assert np.array(Image.open(out / "phone_labels.png")).shape == (40, 24)  # upright, as the photo is shown
    assert items["wave.gif"]["frames"] == 5 and len(list(FrameSource(out / "wave_overlay.mp4"))) == 5
    assert items["clip.mkv"]["frames"] == mc.N and items["clip.mkv"]["codec"] == "H.264/MP4"
    assert 0 < items["pulled.webm"]["frames"] < 20 and items["pulled.webm"]["problem"].startswith("cut off")
    assert len(list(FrameSource(out / "pulled_overlay.mp4"))) == items["pulled.webm"]["frames"]
    failed = {"empty.png", "cut.jpg", "pulled.webm"}  # the text file is no failure
    assert set(report.failed) == {str(src / f) for f in failed}
    assert not [p for p in out.rglob(".*")]  # no temporary leftovers


def test_a_second_run_skips_what_is_done_and_overwrite_replaces_it(predictor: Predictor, tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    _picture((src / "a").mkdir(parents=True) or src / "a" / "1.png", 1)
    _picture(src / "2.jpg", 2)
    segment_paths(predictor, [src], out, SegmentOptions(progress=False))
    (out / "2_overlay.png").unlink()  # an interrupted run: one output of 2.jpg is missing
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = segment_paths(predictor, [src], out, SegmentOptions(progress=False))
    assert again.counts() == {"done before": 1, "segmented": 1} and again.replaced == 1
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.name != "2_labels.png")
    forced = segment_paths(predictor, [src], out, SegmentOptions(overwrite=True, progress=False))
    assert forced.counts() == {"segmented": 2} and forced.replaced == 4


def test_two_folders_with_the_same_layout_keep_apart(tmp_path: Path) -> None:
    for cam in ("cam1", "cam2"):
        (tmp_path / cam).mkdir()
        _picture(tmp_path / cam / "0001.jpg", 0)
    (tmp_path / "out").mkdir()
    _picture(tmp_path / "out" / "old_result.png", 0)
    jobs = collect_jobs([tmp_path / "cam1", tmp_path / "cam2", tmp_path / "cam1" / "0001.jpg"], tmp_path / "out")
    # the file named again is listed once; each folder keeps its own name under the output folder
    assert [j.base.relative_to(tmp_path / "out").as_posix() for j in jobs] == ["cam1/0001", "cam2/0001"]
    # a folder that holds the output folder does not read its outputs back
    assert {j.path.name for j in collect_jobs([tmp_path], tmp_path / "out")} == {"0001.jpg"}


def test_cli_default_out_is_a_new_numbered_folder(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    _picture(tmp_path / "a.png", 0)
    (tmp_path / "outputs" / "segment" / "7").mkdir(parents=True)  # someone's earlier run
    args = ["segment", "a.png", "--checkpoint", str(tiny_checkpoint), "--backend", "torch", "--no-progress"]
    for n in (8, 9):
        assert main(args) == 0
        printed = capsys.readouterr()
        assert f"outputs in outputs/segment/{n}" in printed.out
        assert "outputs that exist in" in printed.err and "are kept" in printed.err
        assert (tmp_path / "outputs" / "segment" / str(n) / "a_labels.png").is_file()
    bad = ["segment", "a.png", "--checkpoint", str(tmp_path / "missing.safetensors"), "--backend", "torch"]
    assert main(bad) == 2
    assert sorted(p.name for p in (tmp_path / "outputs" / "segment").iterdir()) == ["7", "8", "9"]  # none left empty
    assert main([*args, "--out", "outputs/segment/9"]) == 0
    assert "1 input(s) done before (skipped)" in capsys.readouterr().out
    assert main([*args, "--out", "outputs/segment/9", "--overwrite", "--legend"]) == 0
    printed = capsys.readouterr()
    assert "2 existing output(s) replaced" in printed.out and "--overwrite: outputs that exist" in printed.err
    overlay = np.array(Image.open(tmp_path / "outputs" / "segment" / "9" / "a_overlay.png"))
    assert overlay.shape[0] > 20 and overlay.shape[1] == 28  # the legend band sits under the 20-row overlay
    summary = json.loads((tmp_path / "outputs" / "segment" / "9" / "summary.json").read_text())["inputs"]
    assert summary["counts"] == {"segmented": 1} and summary["items"][0]["outputs"] == ["a_labels.png", "a_overlay.png"]


def _mixed_folder(root: Path, n_images: int, videos: dict[str, tuple[str, list[str]]]) -> int:
    """``n_images`` mixed images (same stems in subfolders and formats, EXIF-rotated JPEGs, a GIF), a text file and
    the given videos; returns the number of files."""
    formats = ("png", "jpg", "webp", "bmp", "tiff")
    for i in range(n_images - 1):
        sub = root / f"day{i % 4}" / f"cam{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        stem = f"{i // 10:04d}"  # ten files per stem: the same stems across formats and folders
        rotated = i % 17 == 0
        order = ["jpg"] if rotated else [formats[(i + k) % len(formats)] for k in range(len(formats))]
        path = next((sub / f"{stem}.{f}" for f in order if not (sub / f"{stem}.{f}").exists()), sub / f"{stem}_{i}.jpg")
        if rotated:
            mc.exif_jpeg(path, orientation=6)
        else:
            _picture(path, i, 12, 16)
    mc.animated_gif(root / "day0" / "loop.gif")
    (root / "day0" / "README.txt").write_text("notes")
    for name, (encoder, extra) in videos.items():
        mc.ffmpeg_encode(root / name, encoder, extra, mc.frames(4, 32, 48))
    return len([p for p in root.rglob("*") if p.is_file()])


def _check_mixed_run(predictor: Predictor, src: Path, out: Path, files: int) -> None:
    report = segment_paths(predictor, [src], out, SegmentOptions(progress=False))
    inputs = [i["input"] for i in report.items]
    assert len(inputs) == len(set(inputs)) == files
    outputs = [o for i in report.items for o in i.get("outputs", [])]
    assert len(outputs) == len(set(outputs)) == sum(1 for p in out.rglob("*") if p.is_file())
    assert Counter(_status(i) for i in report.items) == {"segmented": files - 1, "unsupported type": 1}
    again = segment_paths(predictor, [src], out, SegmentOptions(progress=False))
    assert again.counts() == {"done before": files - 1, "unsupported type": 1} and again.replaced == 0


VIDEOS_SMALL = {"a.mp4": ("libx264", ["-pix_fmt", "yuv420p"]), "b.avi": ("mjpeg", ["-pix_fmt", "yuvj420p"])}


def test_a_mixed_folder_is_accounted_for_small(predictor: Predictor, tmp_path: Path) -> None:
    files = _mixed_folder(tmp_path / "in", 12, VIDEOS_SMALL)
    _check_mixed_run(predictor, tmp_path / "in", tmp_path / "out", files)


@pytest.mark.slow
def test_a_mixed_folder_of_200_images_and_5_videos_is_accounted_for(predictor: Predictor, tmp_path: Path) -> None:
    videos = {
        **VIDEOS_SMALL,
        "c.mkv": ("libx265", ["-pix_fmt", "yuv420p", "-x265-params", "log-level=error"]),
        "d.webm": ("libvpx-vp9", ["-pix_fmt", "yuv420p", "-deadline", "realtime"]),
        "e.mov": ("mpeg4", []),
    }
    files = _mixed_folder(tmp_path / "in", 200, videos)
    assert files == 200 + 5 + 1  # 200 images (one of them the GIF), 5 videos, the text file
    _check_mixed_run(predictor, tmp_path / "in", tmp_path / "out", files)
    assert os.path.isdir(tmp_path / "out" / "day3" / "cam2")  # the tree is mirrored


def test_video_overlays_with_a_legend_keep_one_frame_size(predictor: Predictor, tmp_path: Path) -> None:
    clip = mc.ffmpeg_encode(tmp_path / "clip.mp4", "libx264", ["-pix_fmt", "yuv420p"], mc.frames())
    report = segment_paths(predictor, [clip], tmp_path / "out", SegmentOptions(legend=True, progress=False))
    frames = list(FrameSource(tmp_path / "out" / report.items[0]["outputs"][0]))
    assert len(frames) == mc.N and {f.rgb.shape for f in frames} == {frames[0].rgb.shape}
    assert frames[0].rgb.shape[0] > mc.H and frames[0].rgb.shape[1] == mc.W  # the legend band under the picture


def _run_on_a_terminal(script: str, cwd: Path) -> str:
    """Run a Python ``script`` with its output on a pseudo-terminal (what a user's shell gives a command); returns
    what it wrote."""
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios

    leader, follower = pty.openpty()
    # a new pseudo-terminal has 0 columns, and tqdm draws nothing that narrow; a user's terminal has 80 or more
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=follower, stderr=follower, cwd=cwd)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=120) == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_show_on_a_terminal_unless_turned_off(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for i in range(3):
        _picture(tmp_path / "in" / f"{i}.png", i)
    args = ["segment", "in", "--checkpoint", str(tiny_checkpoint), "--backend", "torch"]
    # one interpreter for both runs: the command's own entry point, twice
    script = (
        "from blindnet.cli import main\n"
        f"assert main({[*args, '--out', 'o1']!r}) == 0\n"
        "print('=' * 20, flush=True)\n"
        f"assert main({[*args, '--out', 'o2', '--no-progress']!r}) == 0\n"
    )
    shown, quiet = _run_on_a_terminal(script, tmp_path).split("=" * 20)
    assert "segment: 100%" in shown and "3/3" in shown
    assert "segmented 3 image(s)" in quiet and "%|" not in quiet
