"""The Gradio demo: pure callbacks, style shifts, the CLI, and the running app driven through ``gradio_client``.

One app is launched per module on a free loopback port (launching per test would cost seconds each); it serves a tiny
real network (MobileNetV2 DeepLabV3+, random weights) loaded from a checkpoint written with ``save_model``.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from blindnet.backends.torch_backend import TorchBackend
from blindnet.checkpoint import load_model, save_model
from blindnet.classes import colorize
from blindnet.inference import Predictor
from blindnet.io import ImageError, write_png
from blindnet.legend import title_band
from blindnet.models import ModelConfig, build_model
from blindnet.serve.client import free_port
from tests.conftest import count_video_frames

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from blindnet.demo import styles  # noqa: E402
from blindnet.demo.__main__ import main, model_specs  # noqa: E402
from blindnet.demo.app import build_demo, launch, startup_message  # noqa: E402
from blindnet.demo.robustness import main as robustness_main  # noqa: E402
from blindnet.demo.robustness import markdown, robustness_table  # noqa: E402
from blindnet.demo.video import VideoError, process_video, sampling_stride  # noqa: E402
from blindnet.demo.views import (  # noqa: E402
    agreement,
    compare_style,
    label_confusion,
    labels_beside,
    read_image_upload,
    segment_image,
)

H, W = 64, 96

# Gradio's own queue code trips pandas 3 deprecations; they are not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


def _scene(seed: int = 0) -> np.ndarray:
    """A road-like ``H x W x 3`` image: sky, buildings, road, with some texture (deterministic)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((H, W, 3), np.uint8)
    img[: H // 3] = (120, 160, 220)
    img[H // 3 : 2 * H // 3] = (90, 85, 80)
    img[2 * H // 3 :] = (70, 70, 75)
    noise = rng.integers(-20, 20, size=img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def _scene_labels() -> np.ndarray:
    """The true train ids of :func:`_scene`: sky (10) above buildings (2) above road (0)."""
    labels = np.zeros((H, W), np.uint8)
    labels[: H // 3] = 10
    labels[H // 3 : 2 * H // 3] = 2
    return labels


def _write_video(path: Path, frames: int = 8, fourcc: str = "mp4v") -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 8.0, (W, H))
    assert writer.isOpened()
    base = _scene(1)
    for i in range(frames):
        writer.write(np.roll(base, 6 * i, axis=1)[:, :, ::-1].copy())
    writer.release()
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny checkpoints: a BlindNet (InstanceNorm) one and a plain baseline."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for i, (name, inorm) in enumerate((("blindnet", True), ("baseline", False))):
        torch.manual_seed(i)
        model = build_model(ModelConfig(backbone="mobilenetv2", instance_norm=inorm))
        out[name] = save_model(model, root / f"{name}.safetensors")
    return out


@pytest.fixture(scope="module")
def predictors(checkpoints: dict[str, Path]) -> dict[str, Predictor]:
    torch.set_num_threads(2)
    return {name: Predictor(TorchBackend(load_model(path)), batch_size=4) for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    image = root / "scene.png"
    cv2.imwrite(str(image), _scene()[:, :, ::-1])
    write_png(root / "labels" / "scene.png", _scene_labels())  # its true labels, as the demo's examples carry them
    bad = root / "notes.png"
    bad.write_text("this is a text file, not a PNG\n")
    empty = root / "empty.mp4"
    empty.write_bytes(b"")
    garbage = root / "garbage.mov"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return {
        "image": image,
        "bad": bad,
        "empty": empty,
        "garbage": garbage,
        "video": _write_video(root / "clip.mp4"),
        "avi": _write_video(root / "clip.avi", frames=12, fourcc="MJPG"),
    }


@pytest.fixture(scope="module")
def client(predictors, files, tmp_path_factory):
    """The app on a free loopback port, with analytics off and its own GRADIO_TEMP_DIR, and a connected client."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio_tmp")))
        demo = build_demo(
            predictors,
            examples=[files["image"]],
            video_examples=[],
            max_video_frames=50,
            output_dir=tmp_path_factory.mktemp("video_out"),
        )
        port = free_port()
        # The launcher `blindnet demo` uses (show_error, our startup lines), without blocking this thread.
        _, local_url, _ = launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
        assert local_url.startswith("http://127.0.0.1:")
        c = gradio_client.Client(local_url, verbose=False)
        try:
            yield c
        finally:
            c.close()
            demo.close()


# --------------------------------------------------------------------------------------------------------------------
# style shifts
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", list(styles.STYLES))
def test_style_shift_is_deterministic_and_keeps_shape(style: str) -> None:
    img = _scene()
    a = styles.apply_style(img, style, 1.0, seed=3)
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, styles.apply_style(img, style, 1.0, seed=3))
    assert np.abs(a.astype(int) - img).mean() > 5, "a full-strength shift must visibly change the image"
    assert np.array_equal(styles.apply_style(img, style, 0.0), img), "strength 0 means unchanged"


def test_style_errors_name_the_problem() -> None:
    with pytest.raises(KeyError, match="unknown style 'snow'"):
        styles.apply_style(_scene(), "snow")
    with pytest.raises(ValueError, match="strength"):
        styles.apply_style(_scene(), "fog", 1.5)
    with pytest.raises(ValueError, match="uint8"):
        styles.apply_style(_scene().astype(np.float32), "fog")


def test_night_is_darker_and_fog_is_brighter_far_away() -> None:
    img = _scene()
    assert styles.night(img).mean() < img.mean() * 0.6
    fogged = styles.fog(np.full_like(img, 40))
    assert fogged[: H // 4].mean() > fogged[-H // 4 :].mean() + 20, "upper (far) rows fade into the haze more"


# --------------------------------------------------------------------------------------------------------------------
# pure callbacks
# --------------------------------------------------------------------------------------------------------------------


def test_segment_image_matches_the_predictor(predictors) -> None:
    pred = predictors["blindnet"]
    img = _scene()
    res = segment_image(pred, img, alpha=0.3)
    ref = pred.predict_one(img)
    assert np.array_equal(res.prediction.labels, ref.labels)
    assert res.overlay.shape == res.colour_map.shape == (H, W, 3)
    assert np.array_equal(res.overlay, ref.overlay(0.3))
    assert list(res.legend["class"]) == list(ref.class_shares())
    assert res.legend["share (%)"].sum() == pytest.approx(100.0, abs=0.1)
    assert res.seconds > 0


def test_read_image_upload_turns_bad_files_into_image_errors(files) -> None:
    assert read_image_upload({"path": str(files["image"]), "orig_name": "x.png"}).shape == (H, W, 3)
    with pytest.raises(ImageError, match="notes.png: not a recognised image format"):
        read_image_upload({"path": str(files["bad"]), "orig_name": "notes.png"})
    with pytest.raises(ImageError, match="no image"):
        read_image_upload(None)
    with pytest.raises(ImageError, match="missing"):
        read_image_upload({"path": str(files["image"]) + ".gone", "orig_name": "gone.png"})


def test_sampling_stride() -> None:
    assert sampling_stride(100, 300) == 1
    assert sampling_stride(301, 300) == 2
    assert sampling_stride(0, 10) == 1  # unknown length: read until the cap
    with pytest.raises(ValueError):
        sampling_stride(10, 0)


def test_segment_video_keeps_every_frame_under_the_cap(predictors, files, tmp_path) -> None:
    res = process_video(predictors["blindnet"], files["video"], out_dir=tmp_path, batch_size=3)
    assert res.frames == 8 and res.stride == 1
    assert count_video_frames(res.path) == 8
    assert set(res.shares["frame"]) == set(range(8))
    per_frame = res.shares.groupby("frame")["share_pct"].sum()
    assert np.allclose(per_frame, 100.0, atol=0.1)


def test_long_video_is_subsampled_with_a_notice(predictors, files, tmp_path) -> None:
    seen = []
    res = process_video(
        predictors["blindnet"], files["avi"], max_frames=5, out_dir=tmp_path, progress=lambda f, m: seen.append(f)
    )
    assert res.stride == 3 and res.frames == 4  # frames 0, 3, 6, 9 of 12
    assert count_video_frames(res.path) == 4
    assert res.fps == pytest.approx(8.0 / 3)
    assert any("every 3rd frame" in n for n in res.notices)
    assert seen and seen[-1] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("key", "message"), [("empty", "empty file"), ("garbage", "not a video|no frame could be decoded")]
)
def test_bad_videos_raise_video_errors(predictors, files, tmp_path, key, message) -> None:
    with pytest.raises(VideoError, match=message):
        process_video(predictors["blindnet"], files[key], out_dir=tmp_path)


def test_compare_style_two_models(predictors) -> None:
    img = _scene()
    res = compare_style(predictors, img, "fog", 0.7)
    assert [m.name for m in res.models] == ["blindnet", "baseline"]
    assert res.shifted.shape == img.shape
    for m in res.models:
        assert m.agreement == pytest.approx(agreement(m.clean.labels, m.shifted.labels))
        assert 0.0 <= m.agreement <= 1.0
    assert res.cross_clean is not None and 0.0 <= res.cross_clean <= 1.0
    unchanged = compare_style({"blindnet": predictors["blindnet"]}, img, "blur", 0.0)
    assert unchanged.models[0].agreement == 1.0 and unchanged.cross_clean is None
    assert "blindnet" in res.summary() and len(res.table()) == 2


def test_robustness_table_holds_each_models_own_agreement(predictors) -> None:
    images = {"a.png": _scene(0), "b.png": _scene(1)}
    table = robustness_table(predictors, images, styles=["night", "blur"], strength=0.6)
    assert table["images"] == ["a.png", "b.png"] and table["styles"] == ["night", "blur"]
    for name, predictor in predictors.items():
        for style in ("night", "blur"):
            per_image = table["agreement"][name][style]
            for image_name, image in images.items():
                clean, shifted = predictor.predict_arrays([image, styles.apply_style(image, style, 0.6)])
                assert per_image[image_name] == pytest.approx(agreement(clean.labels, shifted.labels))
            assert table["mean"][name][style] == pytest.approx(np.mean(list(per_image.values())))
    # Known answer: a blur of strength 0 changes nothing, so every label agrees.
    unchanged = robustness_table(predictors, images, styles=["blur"], strength=0.0)
    assert all(unchanged["mean"][name]["blur"] == 1.0 for name in predictors)
    assert "| blindnet | 100.0 |" in markdown(unchanged)


def test_robustness_readout_exposes_a_model_that_predicts_one_class(predictors) -> None:
    # A real network whose classifier bias drowns its features: it paints every pixel "road", so its labels never
    # change under a shift. Agreement alone ranks it first; the classes and entropy columns show it is useless.
    torch.manual_seed(3)
    constant = build_model(ModelConfig(backbone="mobilenetv2")).eval()
    with torch.no_grad():
        constant.final2[0].bias.fill_(0.0)
        constant.final2[0].bias[0] = 1e4
    models = {"useful": predictors["blindnet"], "constant": Predictor(TorchBackend(constant), batch_size=4)}
    images = {"a.png": _scene(0), "b.png": _scene(1)}
    table = robustness_table(models, images, styles=["night", "fog"], strength=0.8)
    for style in ("night", "fog"):
        assert table["mean"]["constant"][style] == 1.0 >= table["mean"]["useful"][style]
        assert table["classes"]["constant"][style] == 1.0 < table["classes"]["useful"][style]
        assert table["entropy"]["constant"][style] == 0.0 < table["entropy"]["useful"][style]
    text = markdown(table)
    assert "| constant | 1.0 / 0.00 | 1.0 / 0.00 | 1.0 / 0.00 |" in text
    frame = compare_style(models, images["a.png"], "fog", 0.8).table()
    row = frame.set_index("model").loc["constant"]
    assert row["classes clean / shifted"] == "1 / 1" and row["entropy clean / shifted (bits)"] == "0.00 / 0.00"


def test_miou_against_known_labels(predictors) -> None:
    # Known answer: scored against its own clean prediction, a model's clean mIoU is exactly 1 and its shifted mIoU is
    # that of the shifted map against the clean one.
    model = {"blindnet": predictors["blindnet"]}
    images = {"a.png": _scene(0), "b.png": _scene(1)}
    own = {name: predictors["blindnet"].predict_one(img).labels for name, img in images.items()}
    table = robustness_table(model, images, styles=["fog"], strength=0.8, labels={"a.png": own["a.png"]})
    assert table["labelled_images"] == ["a.png"] and table["miou"]["blindnet"]["clean"] == 1.0
    shifted = compare_style(model, images["a.png"], "fog", 0.8).models[0].shifted.labels
    assert table["miou"]["blindnet"]["fog"] == pytest.approx(label_confusion(shifted, own["a.png"], 19).miou())
    assert "mIoU against the true labels" in markdown(table)
    assert "miou" not in robustness_table(model, images, styles=["fog"], strength=0.8)


def test_the_examples_carry_their_true_labels() -> None:
    from blindnet.data.synthetic import render_scene
    from blindnet.demo.make_examples import EXAMPLES_DIR, SCENES

    for name, seed, appearance in SCENES:
        image, mask = render_scene(seed, 256, 512, appearances=[appearance])
        np.testing.assert_array_equal(cv2.imread(str(EXAMPLES_DIR / name))[:, :, ::-1], image[appearance])
        np.testing.assert_array_equal(labels_beside(EXAMPLES_DIR / name), mask)


def test_robustness_cli_writes_json_and_markdown(checkpoints, files, tmp_path, capsys) -> None:
    image = tmp_path / "scene.png"
    cv2.imwrite(str(image), cv2.cvtColor(_scene(2), cv2.COLOR_RGB2BGR))
    args = ["--checkpoint", f"A={checkpoints['blindnet']}", "--images", str(image), "--strength", "0.5"]
    assert robustness_main([*args, "--out", str(tmp_path / "out"), "--figure", "night"]) == 0
    written = json.loads((tmp_path / "out" / "table.json").read_text())
    assert written["images"] == ["scene.png"] and set(written["mean"]) == {"A"}
    assert (tmp_path / "out" / "table.md").read_text() == capsys.readouterr().out
    # The figure: a captioned row with the clean and shifted image, one row of label maps per model, then a legend.
    picture = cv2.cvtColor(cv2.imread(str(tmp_path / "out" / "figure.png")), cv2.COLOR_BGR2RGB)
    band = title_band([(0, W, "clean")], W).shape[0]  # the caption band, drawn in the legend's font
    assert picture.shape[1:] == (2 * W, 3) and picture.shape[0] > 2 * (band + H)
    np.testing.assert_array_equal(picture[band : band + H, :W], _scene(2))
    np.testing.assert_array_equal(picture[band : band + H, W:], styles.apply_style(_scene(2), "night", 0.5))
    assert (picture[:band] < 128).any(), "the caption left no ink"
    legend = picture[2 * (band + H) :]
    assert (legend != 255).any(axis=2).sum() > 50, "the legend under the label maps is empty"
    with pytest.raises(SystemExit):
        robustness_main(["--images", str(tmp_path / "missing.png"), "--out", str(tmp_path / "out2")])
    assert "missing.png: file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        robustness_main(["--checkpoint", str(tmp_path / "gone.safetensors"), "--images", str(image)])
    assert "checkpoint not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# the running app, through gradio_client and explicit api_names
# --------------------------------------------------------------------------------------------------------------------


def test_api_lists_the_named_endpoints(client) -> None:
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/segment_image", "/segment_video", "/compare_styles"} <= set(api)
    # Every input and output has a name a client can read (Gradio calls unlabelled ones value_<id>).
    labels = {name: [x["label"] for x in ep["parameters"] + ep["returns"]] for name, ep in api.items()}
    assert not [(n, x) for n, xs in labels.items() for x in xs if not x or x.startswith("value_")], labels
    assert labels["/segment_image"][-1] == "Timing" and labels["/compare_styles"][-1] == "Summary"


def test_an_error_outside_the_callbacks_reaches_the_client_with_its_message(client) -> None:
    # Gradio itself refuses to fetch an upload from a loopback URL, before any callback of ours runs: with show_error
    # the client reads why, without it only that "the upstream Gradio app has raised an exception".
    upload = {"path": "http://127.0.0.1:9/x.png", "meta": {"_type": "gradio.FileData"}}
    with pytest.raises(gradio_client.exceptions.AppError) as info:
        client.predict(upload, 0.5, "blindnet", api_name="/segment_image")
    assert "failed validation" in str(info.value) and "verbose error reporting" not in str(info.value)


def test_startup_lines_name_the_share_flag() -> None:
    text = startup_message("http://127.0.0.1:7860/", None)
    assert text == "Running on http://127.0.0.1:7860/\nFor a public gradio.live link, run again with --share."
    assert "launch()" not in text
    assert startup_message("http://127.0.0.1:7860/", "https://x.gradio.live").endswith("https://x.gradio.live")


def test_image_endpoint_returns_overlay_label_map_and_legend(client, predictors, files) -> None:
    overlay, label_map, legend, timing, *_ = client.predict(
        gradio_client.handle_file(str(files["image"])), 0.5, "blindnet", api_name="/segment_image"
    )
    ref = predictors["blindnet"].predict_one(str(files["image"]))
    overlay_img = cv2.imread(overlay)[:, :, ::-1]
    label_img = cv2.imread(label_map)[:, :, ::-1]
    assert overlay_img.shape == label_img.shape == (H, W, 3)
    assert np.array_equal(label_img, colorize(ref.labels)), "PNG output must carry the exact label colours"
    assert np.array_equal(overlay_img, ref.overlay(0.5))
    assert [row[1] for row in legend["data"]] == list(ref.class_shares())
    assert legend["headers"] == ["colour", "class", "share (%)"]
    assert "ms" in timing


def test_video_endpoint_returns_a_video_with_the_same_frame_count(client, files) -> None:
    video, notice, shares, legend = client.predict(
        gradio_client.handle_file(str(files["video"])), 0.5, "blindnet", api_name="/segment_video"
    )
    path = video["video"] if isinstance(video, dict) else video
    assert Path(path).suffix in (".mp4", ".webm")
    assert count_video_frames(path) == 8
    assert "8 frames" in notice
    assert legend["headers"] == ["colour", "class", "share (%)"]


def test_compare_endpoint_with_two_models(client, files) -> None:
    shifted, a_clean, a_shift, b_clean, b_shift, table, summary = client.predict(
        gradio_client.handle_file(str(files["image"])), "night", 0.8, "blindnet", "baseline", api_name="/compare_styles"
    )
    for p in (shifted, a_clean, a_shift, b_clean, b_shift):
        assert cv2.imread(p).shape == (H, W, 3)
    assert [row[0] for row in table["data"]] == ["blindnet", "baseline"]
    assert "night" in summary and "agree" in summary
    # The image is an example whose labels are known: each model's mIoU against them, clean and shifted.
    miou_column = table["headers"].index("mIoU vs true labels, clean / shifted (%)")
    for row in table["data"]:
        clean, shifted = (float(x) for x in row[miou_column].split(" / "))
        assert 0.0 <= clean <= 100.0 and 0.0 <= shifted <= 100.0


@pytest.mark.parametrize(
    ("key", "api", "args", "message"),
    [
        ("bad", "/segment_image", (0.5, "blindnet"), "notes.png: not a recognised image format"),
        ("empty", "/segment_video", (0.5, "blindnet"), "empty.mp4: empty file"),
        ("garbage", "/segment_video", (0.5, "blindnet"), "garbage.mov"),
        ("bad", "/compare_styles", ("fog", 0.5, "blindnet", "baseline"), "not a recognised image format"),
    ],
)
def test_bad_uploads_give_a_message_not_a_trace(client, files, key, api, args, message) -> None:
    with pytest.raises(gradio_client.exceptions.AppError) as info:
        client.predict(gradio_client.handle_file(str(files[key])), *args, api_name=api)
    assert message in str(info.value)
    assert "Traceback" not in str(info.value)


# --------------------------------------------------------------------------------------------------------------------
# CLI and import hygiene
# --------------------------------------------------------------------------------------------------------------------


def test_model_specs_names(tmp_path, monkeypatch) -> None:
    # The names are resolved to files that must exist (a missing one is reported, see below).
    for path in (tmp_path / "a.safetensors", tmp_path / "x" / "a.safetensors"):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    specs = model_specs([str(tmp_path / "a.safetensors"), "bn=x/a.safetensors"], "a.safetensors")
    assert [n for n, _ in specs] == ["a", "bn", "a-2"]


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys) -> None:
    assert main(["--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "missing.safetensors" in err and "Traceback" not in err


@pytest.mark.slow
def test_screenshot_of_the_running_app(tmp_path) -> None:
    """Headless Chromium renders the app (layout + pre-segmented example); skipped where no browser is installed."""
    from blindnet.demo import screenshot

    try:
        screenshot.find_browser()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "shot.png"
    assert screenshot.main(["--out", str(out), "--size", "1000", "800"]) == 0
    img = cv2.imread(str(out))
    assert img.shape == (800, 1000, 3)
    assert img.std() > 10, "a blank page means the app did not render"
