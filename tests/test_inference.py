"""The Predictor: input handling, batching, resizing back, scores, overlays, backends' shared interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blindnet.backends.base import argmax_channels, labels_dtype
from blindnet.backends.torch_backend import TorchBackend
from blindnet.checkpoint import load_model
from blindnet.inference import Predictor
from blindnet.io import ImageError, decode_image, load_image, to_rgb_uint8


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint: Path) -> Predictor:
    return Predictor(TorchBackend(load_model(tiny_checkpoint)), batch_size=3)


def _rng_image(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.numerics
def test_labels_match_the_network(predictor: Predictor, tiny_checkpoint: Path) -> None:
    from blindnet.backends.base import IMAGENET_MEAN, IMAGENET_STD

    image = _rng_image(0)
    pred = predictor.predict_one(image, return_logits=True, return_probabilities=True)
    x = (
        torch.from_numpy(image).permute(2, 0, 1).float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]
    ) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        logits = load_model(tiny_checkpoint)(x[None])[0]
    # The Predictor normalises uint8 input its own way (1 ulp of other rounding in the input): measured 1.2e-6
    # (AVX-512) and 9.5e-7 (ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41) on logits of magnitude <= 1.5;
    # atol 1e-4 is ~80x that.
    assert np.allclose(pred.logits, logits.numpy(), atol=1e-4)
    # Exact labels: the closest top-1/top-2 logit gap in this image is 1.6e-4, 130x that logit difference.
    assert np.array_equal(pred.labels, logits.argmax(0).numpy())
    assert pred.probabilities.shape == (19, 48, 64)
    # A float32 softmax over 19 classes sums to 1 within ~19 ulp (2.3e-6); measured 4.2e-7.
    assert np.allclose(pred.probabilities.sum(0), 1.0, atol=1e-5)


def test_batching_groups_by_shape_and_keeps_order(predictor: Predictor) -> None:
    images = [_rng_image(i, 40 + 8 * (i % 2), 56) for i in range(7)]
    before = predictor.stats.batches
    batched = predictor.predict(images)
    # 4 images of one shape (2 batches of <=3) + 3 of the other (1 batch)
    assert predictor.stats.batches - before == 3
    for img, res in zip(images, batched):
        assert res.labels.shape == img.shape[:2]
        assert np.array_equal(res.labels, predictor.predict_one(img).labels)


def test_nhwc_batch_array_and_paths(predictor: Predictor, tmp_path: Path) -> None:
    batch = np.stack([_rng_image(1), _rng_image(2)])
    out = predictor.predict(batch)
    assert len(out) == 2
    Image.fromarray(batch[0]).save(tmp_path / "a.png")
    from_path = predictor.predict(str(tmp_path / "a.png"))[0]
    assert np.array_equal(from_path.labels, out[0].labels)
    assert from_path.source == str(tmp_path / "a.png")


def test_fixed_input_size_resizes_back(tiny_checkpoint: Path) -> None:
    p = Predictor(TorchBackend(load_model(tiny_checkpoint)), input_size=(32, 48))
    res = p.predict([_rng_image(3, 50, 70), _rng_image(4, 20, 30)], return_probabilities=True)
    assert [r.labels.shape for r in res] == [(50, 70), (20, 30)]
    assert res[0].probabilities.shape == (19, 50, 70)
    assert p.stats.batches == 1  # both resized to 32x48, so one batch


def test_overlay_and_shares(predictor: Predictor) -> None:
    res = predictor.predict_one(_rng_image(5))
    shares = res.class_shares()
    assert abs(sum(shares.values()) - 1.0) < 1e-6  # float64 pixel shares: a few ulp (measured 2.2e-16)
    assert set(shares) <= set(predictor.class_names)
    assert res.overlay(0.0).tolist() == res.image.tolist()
    assert np.array_equal(res.overlay(1.0), res.colorized())


@pytest.mark.parametrize(
    "array",
    [
        np.full((8, 9), 128, np.uint8),
        np.full((8, 9, 1), 128, np.uint8),
        np.full((8, 9, 4), 128, np.uint8),
        np.full((8, 9, 3), 128 * 257, np.uint16),
        np.full((8, 9, 3), 128 / 255, np.float32),
    ],
    ids=["gray", "gray1", "rgba", "uint16", "float"],
)
def test_image_kinds_become_rgb_uint8(array: np.ndarray) -> None:
    rgb = to_rgb_uint8(array)
    assert rgb.shape == (8, 9, 3) and rgb.dtype == np.uint8 and (rgb == 128).all()


def test_bad_inputs_are_rejected_clearly(tmp_path: Path, predictor: Predictor) -> None:
    with pytest.raises(ImageError, match="shape"):
        to_rgb_uint8(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        to_rgb_uint8(np.full((4, 4, 3), 7.0, np.float32))
    with pytest.raises(ImageError, match="not a recognised image"):
        decode_image(b"hello, not an image")
    png = tmp_path / "ok.png"
    Image.fromarray(_rng_image(6)).save(png)
    (tmp_path / "cut.png").write_bytes(png.read_bytes()[:200])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="not found"):
        predictor.predict(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="exceeds"):
        decode_image(png.read_bytes(), max_pixels=100)
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")


def test_16bit_png_file(tmp_path: Path) -> None:
    arr = (np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 30).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "depth.png")
    rgb = load_image(tmp_path / "depth.png")
    assert rgb.shape == (32, 64, 3) and rgb.dtype == np.uint8 and rgb.max() > 200


def test_bfloat16_channels_last_agree_with_float32(tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint)
    img = _rng_image(7, 64, 64)
    ref = Predictor(TorchBackend(model)).predict_one(img).labels
    fast = Predictor(TorchBackend(load_model(tiny_checkpoint), precision="bfloat16", channels_last=True))
    agree = (fast.predict_one(img).labels == ref).mean()
    assert agree > 0.8
    with pytest.raises(ValueError, match="float16"):
        TorchBackend(model, precision="float16")
    with pytest.raises(ValueError, match="unknown precision"):
        TorchBackend(model, precision="int4")


# ---- images smaller than the network's deepest InstanceNorm can see ---------------------------------------------------


def _network_labels(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """The bare network's label map for one uint8 image (no Predictor involved)."""
    from blindnet.backends.base import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    x = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std
    with torch.inference_mode():
        return model.eval()(x[None])[0].argmax(0).numpy()


@pytest.mark.parametrize("backbone", ["mobilenetv2", "shufflenetv2", "resnet50"])
def test_norm_stride_is_each_backbones_real_limit(backbone: str) -> None:
    from blindnet.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone))
    predictor = Predictor(TorchBackend(model))
    s = predictor.backend.norm_stride
    assert s == {"resnet50": 8}.get(backbone, 16)
    with pytest.raises((RuntimeError, ValueError)):  # both sides <= s: the bare network cannot run it
        _network_labels(model, _rng_image(1, s, s))
    for h, w in ((s + 1, 1), (1, s + 1), (s + 1, s)):  # the smallest inputs it runs: labels must be its own
        image = _rng_image(h * w, h, w)
        assert predictor.padded_size(h, w) == (h, w)
        np.testing.assert_array_equal(predictor.predict_one(image).labels, _network_labels(model, image))
    for h, w in ((1, 1), (s, s), (3, s)):
        assert predictor.predict_one(_rng_image(2, h, w)).labels.shape == (h, w)


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (16, 16), (5, 2)])
def test_tiny_images_are_padded_and_cropped_back(predictor: Predictor, tiny_checkpoint: Path, size) -> None:
    h, w = size
    image = _rng_image(h + 7 * w, h, w)
    pred = predictor.predict_one(image, return_logits=True, return_probabilities=True)
    assert pred.labels.shape == (h, w) and pred.labels.max() < 19
    assert pred.logits.shape == pred.probabilities.shape == (19, h, w)
    assert predictor.padded_size(h, w) == (17, 17)
    # Exactly the network's answer on the border-repeated 17 x 17 image, top-left h x w.
    padded = np.pad(image, ((0, 17 - h), (0, 17 - w), (0, 0)), mode="edge")
    np.testing.assert_array_equal(pred.labels, _network_labels(load_model(tiny_checkpoint), padded)[:h, :w])
    np.testing.assert_array_equal(pred.labels, pred.logits.argmax(0))


def test_tiny_images_in_a_batch_with_others(predictor: Predictor) -> None:
    images = [_rng_image(1, 1, 1), _rng_image(2), _rng_image(3, 4, 4), _rng_image(4, 16, 3), _rng_image(5)]
    together = predictor.predict(images)
    alone = [predictor.predict_one(im) for im in images]
    for t, a, im in zip(together, alone, images):
        assert t.labels.shape == im.shape[:2]
        np.testing.assert_array_equal(t.labels, a.labels)


def test_small_input_size_is_padded_too(tiny_checkpoint: Path) -> None:
    small = Predictor(TorchBackend(load_model(tiny_checkpoint)), input_size=(8, 12))
    pred = small.predict_one(_rng_image(6), return_logits=True)
    assert pred.labels.shape == (48, 64) and pred.logits.shape == (19, 48, 64)


@pytest.mark.parametrize("channels", [1, 2, 19, 300])
def test_argmax_channels_equals_numpy_argmax_including_ties(channels: int) -> None:
    rng = np.random.default_rng(channels)
    # small integer scores: many ties, where the first maximal channel must win as in argmax
    logits = rng.integers(-3, 4, size=(2, channels, 9, 13)).astype(np.float32)
    dtype = labels_dtype(channels)
    got = argmax_channels(logits, dtype)
    assert got.dtype == dtype and got.shape == (2, 9, 13)
    np.testing.assert_array_equal(got, logits.argmax(axis=1))
    with pytest.raises(ValueError, match="N x C x H x W"):
        argmax_channels(logits[0])
