"""Media in and out on real files: every codec and container of the test corpus (made with the FFmpeg tool), a phone
clip with a display rotation, a variable-frame-rate clip, cut-off and empty files, EXIF-rotated photos wherever an
image enters, animated GIFs, and the H.264 / VP9 writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blindnet.backends.torch_backend import TorchBackend
from blindnet.checkpoint import load_model
from blindnet.inference import Predictor
from blindnet.io import MediaError, decode_image, load_image
from blindnet.media import FrameSource, VideoWriter
from blindnet.segment import segment_video
from tests import media_corpus as mc

# Lossy codecs at the corpus settings keep its flat 16+ pixel blocks within a mean absolute error of 1.8 grey levels
# (measured for every codec here; the worst pixels sit on the block edges, where 4:2:0 chroma is shared); 4 leaves
# room for other encoder versions while a wrong frame (20 levels apart) or a colour swap (>100) still fails.
MEAN_ERR = 4.0
# Timestamps come back in the container's clock: milliseconds in Matroska/WebM, finer elsewhere.
TIME_TOL = 1e-3


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint: Path) -> Predictor:
    return Predictor(TorchBackend(load_model(tiny_checkpoint)), batch_size=4)


@pytest.mark.parametrize("name", list(mc.CODECS))
def test_every_codec_and_container_decodes_every_frame(name: str, tmp_path: Path) -> None:
    encoder, _, extra = mc.CODECS[name]
    if not mc.pyav_has_decoder(mc.DECODER[encoder]):
        pytest.skip(f"this PyAV build has no {mc.DECODER[encoder]} decoder")
    if not mc.ffmpeg_has_encoder(encoder):
        pytest.skip(f"imageio-ffmpeg's FFmpeg has no {encoder} encoder to make the file with")
    ref = mc.frames()
    path = mc.ffmpeg_encode(tmp_path / name, encoder, extra, ref)
    source = FrameSource(path)
    got = list(source)
    assert len(got) == mc.N and source.problem is None
    for i, (frame, want) in enumerate(zip(got, ref)):
        assert frame.rgb.shape == (mc.H, mc.W, 3)
        assert np.abs(frame.rgb.astype(int) - want).mean() < MEAN_ERR
        assert frame.time == pytest.approx(i / mc.FPS, abs=TIME_TOL)


@pytest.mark.parametrize("rotation", [-90, 90, 180])
def test_a_phone_clip_comes_out_as_players_show_it(rotation: int, tmp_path: Path) -> None:
    source = FrameSource(mc.phone_clip(tmp_path / "phone.mp4", rotation))
    first = next(iter(source)).rgb
    # The red block sits in the stored top-left quarter; a display rotation moves it with the picture.
    corner = {-90: (slice(0, 16), slice(-16, None)), 90: (slice(-16, None), slice(0, 16))}
    corner[180] = (slice(-16, None), slice(-16, None))
    assert first.shape == ((mc.W, mc.H, 3) if rotation % 180 else (mc.H, mc.W, 3))
    red = first[corner[rotation]].reshape(-1, 3).mean(0)
    assert red[0] > 180 and red[1] < 80  # red: the picture is turned the way the player turns it
    assert source.info.rotation == rotation % 360


def test_variable_frame_rate_timing_survives_segmentation(predictor: Predictor, tmp_path: Path) -> None:
    clip = mc.vfr_clip(tmp_path / "vfr.mp4")
    assert [f.time for f in FrameSource(clip)] == pytest.approx(mc.VFR_TIMES, abs=TIME_TOL)
    for fmt in ("mp4", "webm"):
        res = segment_video(predictor, clip, overlay_path=tmp_path / f"out_{fmt}", video_format=fmt, progress=False)
        assert res.frames == len(mc.VFR_TIMES) and res.problem is None
        written = FrameSource(res.overlay)
        assert written.info.codec == {"mp4": "h264", "webm": "vp9"}[fmt]
        assert [f.time for f in written] == pytest.approx(mc.VFR_TIMES, abs=TIME_TOL)


@pytest.mark.parametrize("name", ["h264.mkv", "vp9.webm", "h264_faststart.mp4", "mjpeg.avi"])
def test_a_cut_off_file_keeps_the_frames_before_the_damage(name: str, tmp_path: Path) -> None:
    encoder = {"h264": "libx264", "vp9": "libvpx-vp9", "mjpeg": "mjpeg"}[name.split("_")[0].split(".")[0]]
    extra = ["-pix_fmt", "yuvj420p" if encoder == "mjpeg" else "yuv420p"]
    extra += ["-movflags", "+faststart"] if "faststart" in name else []
    # 30 frames of noise: every frame costs about the same number of bytes, so cutting at 60% keeps about half
    noise = np.random.default_rng(0).integers(0, 256, (30, mc.H, mc.W, 3), dtype=np.uint8)
    whole = mc.ffmpeg_encode(tmp_path / name, encoder, extra, noise)
    source = FrameSource(mc.cut(whole, tmp_path / f"cut_{name}"))
    got = list(source)
    assert 5 <= len(got) < 30 and source.read == len(got)
    assert source.problem is not None and source.problem.startswith("cut off")


def test_unusable_files_say_why(tmp_path: Path) -> None:
    whole = mc.ffmpeg_encode(tmp_path / "whole.mp4", "libx264", ["-pix_fmt", "yuv420p"], mc.frames())
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mov").write_text("not a video")
    expected = {
        mc.cut(whole, tmp_path / "cut.mp4"): "cut off",  # a recorder writes the MP4 index last: none is left
        tmp_path / "empty.mp4": "empty",
        tmp_path / "notes.mov": "unreadable",
    }
    for path, kind in expected.items():
        with pytest.raises(MediaError) as err:
            list(FrameSource(path))
        assert err.value.kind == kind and str(path) in str(err.value)


def test_animated_gif_is_a_clip_with_its_frame_durations(tmp_path: Path) -> None:
    source = FrameSource(mc.animated_gif(tmp_path / "a.gif"))
    got = list(source)
    assert source.info.kind == "animation" and len(got) == 5
    assert [f.time for f in got] == pytest.approx([0.0, 0.1, 0.3, 0.4, 0.7])
    assert got[0].rgb.shape == (24, 32, 3) and tuple(got[0].rgb[0, 0]) == (220, 30, 30)


def test_video_writer_is_atomic_and_pads_odd_sizes(tmp_path: Path) -> None:
    writer = VideoWriter(tmp_path / "v.anything", 10.0)
    assert writer.path.suffix == ".mp4" and writer.codec == "H.264/MP4"
    for f in mc.frames(3, 47, 63):
        writer.write(f)
    assert not writer.path.exists()  # nothing under the final name until closed
    writer.close()
    frames = list(FrameSource(writer.path))
    assert len(frames) == 3 and frames[0].rgb.shape == (48, 64, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]
    aborted = VideoWriter(tmp_path / "gone", 10.0, fmt="webm")
    aborted.write(mc.frames(1)[0])
    aborted.close(keep=False)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]
    with pytest.raises(ValueError, match="unknown video format 'avi'"):
        VideoWriter(tmp_path / "x", 10.0, fmt="avi")


# ---- EXIF orientation wherever an image enters -------------------------------------------------------------------


def _assert_upright(rgb: np.ndarray) -> None:
    """Stored 24 x 40 with the red block top-left; EXIF 6 shows it turned clockwise: 40 x 24, red top-right."""
    assert rgb.shape == (40, 24, 3)
    corner = rgb[:12, -8:].reshape(-1, 3).mean(0)
    assert corner[0] > 180 and corner[1] < 80


def test_exif_orientation_is_applied_by_the_decoders(tmp_path: Path) -> None:
    from blindnet.demo.views import read_image_upload
    from blindnet.serve.parsing import decode_upload

    path = tmp_path / "phone.jpg"
    stored = mc.exif_jpeg(path, orientation=6)
    assert np.asarray(Image.open(path)).shape == stored.shape  # Pillow alone gives the stored pixels
    _assert_upright(load_image(path))  # segment, robustness, TensorRT calibration
    _assert_upright(decode_image(path.read_bytes()))
    _assert_upright(decode_upload(path.read_bytes(), name="phone.jpg", max_pixels=10_000))  # serve /v1/segment
    _assert_upright(read_image_upload({"path": str(path), "orig_name": "phone.jpg"}))  # the demo


def test_exif_orientation_is_applied_when_evaluating_a_folder(tmp_path: Path) -> None:
    from blindnet.data.datasets import BDD100K

    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "labels" / "val").mkdir(parents=True)
    mc.exif_jpeg(tmp_path / "images" / "val" / "a.jpg", orientation=6)
    Image.fromarray(np.zeros((40, 24), np.uint8)).save(tmp_path / "labels" / "val" / "a.png")  # drawn upright
    image, label, _ = BDD100K(tmp_path, "val").load(0)
    assert label.shape == (40, 24)
    _assert_upright(image)


def test_the_demo_video_tab_turns_a_phone_clip_upright(predictor: Predictor, tmp_path: Path) -> None:
    from blindnet.demo.video import process_video

    res = process_video(predictor, mc.phone_clip(tmp_path / "phone.mp4"), out_dir=tmp_path / "out", batch_size=4)
    frames = list(FrameSource(res.path))
    assert res.path.suffix == ".mp4" and len(frames) == res.frames == mc.N
    assert frames[0].rgb.shape == (mc.W, mc.H, 3)  # portrait, as the phone showed it
    assert any("turned by 270 degrees" in n for n in res.notices)


def test_iphone_heic_photos_are_read_upright(tmp_path: Path) -> None:
    pytest.importorskip("pillow_heif", reason="the heic extra (pillow-heif) is not installed")
    stored = np.full((24, 40, 3), 90, np.uint8)
    stored[:12, :20] = (220, 30, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # as an iPhone held upright stores it
    Image.fromarray(stored).save(tmp_path / "IMG_0001.HEIC", exif=exif.tobytes(), quality=95)
    _assert_upright(load_image(tmp_path / "IMG_0001.HEIC"))
