"""Joint transforms and class-uniform sampling: alignment of image and label, padding, centroid crops, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blindnet.backends.base import IMAGENET_MEAN, IMAGENET_STD
from blindnet.classes import PALETTE
from blindnet.data import (
    ClassUniformSampler,
    ColorJitter,
    SampleKey,
    build_train_transform,
    class_uniform_epoch,
    gaussian_blur,
)
from blindnet.data.sampling import build_centroids, class_uniform_epoch_size, label_centroids
from blindnet.data.transforms import build_eval_transform, to_tensor


def _blocks(h: int, w: int, block: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A label of random-class blocks and an image whose colour is the class's palette colour."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 19, (h // block, w // block)).astype(np.uint8)
    label = np.kron(small, np.ones((block, block), np.uint8))
    return PALETTE[label], label


def _interior(label: np.ndarray) -> np.ndarray:
    """Pixels whose 5x5 neighbourhood has one class (away from edges blurred by bicubic resizing)."""
    pad = np.pad(label, 2, mode="edge").astype(int)
    same = np.ones(label.shape, bool)
    for dy in range(5):
        for dx in range(5):
            same &= pad[dy : dy + label.shape[0], dx : dx + label.shape[1]] == label
    return same & (label != 255)


@pytest.mark.parametrize("seed", range(6))
def test_geometry_keeps_image_and_label_aligned(seed):
    image, label = _blocks(96, 160, 16, seed)
    t = build_train_transform(crop_size=(64, 80), scale_min=0.5, scale_max=2.0)
    img, lab, (extra,) = t.geometry(image, label, np.random.default_rng(seed), extra=[255 - image])
    assert img.shape == (64, 80, 3) and lab.shape == (64, 80) and extra.shape == img.shape
    inside = _interior(lab)
    assert inside.sum() > 100
    err = np.abs(img[inside].astype(int) - PALETTE[lab[inside]].astype(int)).max(axis=1)
    assert np.percentile(err, 95) <= 10 and err.mean() < 3, (np.percentile(err, 95), err.mean())
    # the extra view (another appearance) got the identical geometry
    err2 = np.abs(extra[inside].astype(int) - (255 - PALETTE[lab[inside]]).astype(int)).max(axis=1)
    assert np.percentile(err2, 95) <= 10 and err2.mean() < 3


def test_flip_and_scale_both_happen_across_seeds():
    image, label = _blocks(64, 64, 8)
    t = build_train_transform(crop_size=32, scale_min=1.0, scale_max=1.0)
    flipped = 0
    for s in range(20):
        _, lab, _ = t.geometry(image, label, np.random.default_rng(s))
        # with scale 1 the crop is a window of the label or of its mirror image
        found = any(
            np.array_equal(lab, ref[y : y + 32, x : x + 32])
            for ref in (label, label[:, ::-1])
            for y in range(33)
            for x in range(33)
        )
        assert found
        flipped += not any(np.array_equal(lab, label[y : y + 32, x : x + 32]) for y in range(33) for x in range(33))
    assert 0 < flipped < 20


def test_padding_is_black_image_and_ignore_label():
    image = np.full((20, 30, 3), 200, np.uint8)
    label = np.full((20, 30), 3, np.uint8)
    t = build_train_transform(crop_size=(64, 64), scale_min=1.0, scale_max=1.0, flip=False)
    img, lab, _ = t.geometry(image, label, np.random.default_rng(0))
    assert img.shape == (64, 64, 3)
    assert (lab == 3).sum() == 20 * 30 and (lab == 255).sum() == 64 * 64 - 600
    assert (img[lab == 255] == 0).all() and (img[lab == 3] == 200).all()
    out = t(image, label, np.random.default_rng(0))
    assert out["label"].dtype == torch.int64 and int(out["label"].max()) == 255


def test_centroid_crop_contains_the_class():
    label = np.zeros((300, 400), np.uint8)
    label[250:256, 380:386] = 17  # a tiny motorcycle in a corner
    image = PALETTE[label]
    (cents,) = [v for k, v in label_centroids(label, tile=1024).items() if k == 17]
    t = build_train_transform(crop_size=64, scale_min=0.5, scale_max=2.0)
    for s in range(15):
        _, lab, _ = t.geometry(image, label, np.random.default_rng(s), centroid=cents[0])
        assert (lab == 17).any(), s


def test_train_transform_is_deterministic_and_views_differ():
    image, label = _blocks(96, 128, 16, 1)
    t = build_train_transform(crop_size=64)
    a = t(image, label, np.random.default_rng(42))
    b = t(image, label, np.random.default_rng(42))
    c = t(image, label, np.random.default_rng(43))
    for k in ("image", "image_aug", "label"):
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == a["image_aug"].shape == (3, 64, 64) and a["image"].dtype == torch.float32
    assert not torch.allclose(a["image"], a["image_aug"])  # x_a is strongly jittered


def test_real_aligned_view_replaces_the_colour_augmentation():
    image, label = _blocks(64, 64, 16, 2)
    other = 255 - image
    t = build_train_transform(crop_size=48, scale_min=1.0, scale_max=1.0, jitter_p=0.0, blur=False)
    out = t(image, label, np.random.default_rng(0), image_aug=other)
    x = out["image"].numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    xa = out["image_aug"].numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    assert np.allclose(x + xa, 1.0, atol=1e-5)  # same crop and flip, and no photometric change (p=0, no blur)


def test_normalisation_and_eval_transform():
    img = (np.array(IMAGENET_MEAN) * 255 + 0.5).astype(np.uint8)[None, None].repeat(4, 0).repeat(5, 1)
    t = to_tensor(img)
    assert t.shape == (3, 4, 5) and t.abs().max() < 0.01
    out = build_eval_transform()(img, np.full((4, 5), 255, np.uint8))
    assert out["label"].shape == (4, 5) and out["label"].dtype == torch.int64
    with pytest.raises(ValueError, match="sizes differ"):
        build_eval_transform()(img, np.zeros((3, 5), np.uint8))


def test_color_jitter_and_blur():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(ColorJitter(0, 0, 0, 0)(img, rng), img)
    out = ColorJitter(0.8, 0.8, 0.8, 0.3)(img, np.random.default_rng(1))
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)
    # hue only: grey pixels stay grey
    grey = np.full((4, 4, 3), 128, np.uint8)
    assert np.abs(ColorJitter(0, 0, 0, 0.3)(grey, np.random.default_rng(2)).astype(int) - 128).max() <= 1
    blurred = gaussian_blur(img, 1.3)
    assert blurred.dtype == np.uint8 and blurred.astype(float).std() < img.astype(float).std()


def test_class_uniform_epoch_is_deterministic_and_balanced(tmp_path):
    labels = []
    for i in range(40):
        lab = np.zeros((40, 40), np.uint8)
        if i % 10 == 0:
            lab[:5, :5] = 16  # a rare class in 4 of 40 images
        labels.append(lab)
    cache = tmp_path / "c.json"
    cents = build_centroids(lambda i: labels[i], 40, tile=1024, cache_file=cache, progress=False)
    assert cache.is_file() and {e[0] for e in cents[16]} == {0, 10, 20, 30}
    again = build_centroids(
        lambda i: (_ for _ in ()).throw(AssertionError("cache not used")), 40, tile=1024, cache_file=cache
    )
    assert again == cents
    e0 = class_uniform_epoch(40, cents, 0.5, seed=1, epoch=0)
    assert e0 == class_uniform_epoch(40, cents, 0.5, seed=1, epoch=0)
    assert e0 != class_uniform_epoch(40, cents, 0.5, seed=1, epoch=1)
    # 17 of the 19 classes have no centroid: as the original, their share (1 item each) is dropped from the epoch.
    per_class = int(40 * 0.5 / 19)
    assert len(e0) == 40 - 17 * per_class == class_uniform_epoch_size(40, cents, 0.5)
    assert sum(isinstance(k, int) for k in e0) == 40 - 19 * per_class
    rare = [k for k in e0 if isinstance(k, SampleKey) and k.class_id == 16]
    assert len(rare) == per_class
    assert all(k.index % 10 == 0 and k.row < 5 and k.col < 5 for k in rare)
    # The option keeps the epoch's length by drawing uniform images instead.
    kept = class_uniform_epoch(40, cents, 0.5, seed=1, epoch=0, keep_size=True)
    assert len(kept) == 40 == class_uniform_epoch_size(40, cents, 0.5, keep_size=True)
    assert sum(isinstance(k, int) for k in kept) == 40 - 2 * per_class
    sampler = ClassUniformSampler(40, cents, 0.5, seed=1)
    assert len(sampler) == len(list(sampler)) == 23
    assert len(ClassUniformSampler(40, cents, 0.5, seed=1, keep_size=True)) == 40


def _crop_rows(t, label: np.ndarray, centroid: tuple[int, int], draws: int) -> np.ndarray:
    """First row of each crop: the label stores its row index, so the crop's top-left label is the offset."""
    image = np.zeros((*label.shape, 3), np.uint8)
    return np.array(
        [t.geometry(image, label, np.random.default_rng(s), centroid=centroid)[1][0, 0] for s in range(draws)]
    )


def test_centroid_crop_placement_original_and_uniform():
    rows = np.repeat(np.arange(100, dtype=np.uint8)[:, None], 100, axis=1)  # label = row index
    kw = dict(crop_size=40, scale_min=1.0, scale_max=1.0, flip=False)
    original = build_train_transform(**kw)
    uniform = build_train_transform(**kw, centroid_crop="uniform")
    assert original.centroid_crop == "original"
    # Centroid at row 5: the original draws the offset in [5 - 40, 5] and clips it to 0, so 36 of 41 values land on
    # the border; uniform among crops containing row 5 gives offsets 0..5, each 1/6.
    y_orig = _crop_rows(original, rows, (5, 50), 1500)
    y_unif = _crop_rows(uniform, rows, (5, 50), 1500)
    assert set(y_orig) <= set(range(6)) and set(y_unif) == set(range(6))
    assert abs((y_orig == 0).mean() - 36 / 41) < 0.04
    assert abs((y_unif == 0).mean() - 1 / 6) < 0.04
    # Away from the borders the original offset is uniform on [c - 40, c] (41 values; at c - 40 the centroid row is
    # just outside the crop), the uniform mode on [c - 39, c].
    y_orig = _crop_rows(original, rows, (50, 50), 1500)
    y_unif = _crop_rows(uniform, rows, (50, 50), 1500)
    assert y_orig.min() == 10 and y_orig.max() == 50 and y_unif.min() == 11 and y_unif.max() == 50
    with pytest.raises(ValueError, match="centroid_crop"):
        build_train_transform(centroid_crop="clip")


def test_sampler_shards_resume_and_world_size_invariance():
    single = ClassUniformSampler(20, None, 0.0, seed=3)
    single.set_epoch(4)
    full = list(single)
    assert len(full) == 20 and len({k for k, _ in full}) == 20
    r0, r1 = (
        ClassUniformSampler(20, None, 0.0, seed=3, num_replicas=2, rank=0),
        ClassUniformSampler(20, None, 0.0, seed=3, num_replicas=2, rank=1),
    )
    for s in (r0, r1):
        s.set_epoch(4)
    merged = [x for pair in zip(list(r0), list(r1)) for x in pair]
    assert merged == full  # same keys and the same per-item seeds whatever the world size
    single.set_epoch(4, start=6)
    assert list(single) == full[6:]
    assert len(r0) == 10


def test_original_mapillary_protocol_crop_and_portrait_padding():
    t = build_eval_transform("original", "mapillary")
    assert t.normalize and t.resize_height == 1024 and t.center_crop == 1024 and t.pad_label == 0
    # Landscape 256 x 512 -> 1024 x 2048 -> crop columns 512..1535: left half class 1, right half class 2.
    label = np.full((256, 512), 2, np.uint8)
    label[:, :256] = 1
    out = t(np.full((256, 512, 3), 200, np.uint8), label)
    lab = out["label"].numpy()
    assert lab.shape == (1024, 1024) and (lab[:, :512] == 1).all() and (lab[:, 512:] == 2).all()
    # Portrait 512 x 256 -> 1024 x 512, padded by 512 on both sides, crop offset round((512 - 1024) / 2) = -256 from
    # the unpadded width: 256 columns outside + 512 padding columns, all label 0 (road) and black, then the content.
    out = t(np.full((512, 256, 3), 200, np.uint8), np.full((512, 256), 5, np.uint8))
    lab, img = out["label"].numpy(), out["image"]
    assert (lab[:, :768] == 0).all() and (lab[:, 768:] == 5).all()
    black = to_tensor(np.zeros((1, 1, 3), np.uint8))[:, 0, 0]
    torch.testing.assert_close(img[:, :, :768], black[:, None, None].expand(3, 1024, 768))
    assert not torch.allclose(img[:, 0, 800], black)
    # Other datasets and the clean protocol: untouched full resolution, normalised.
    for proto, ds in (("original", "bdd100k"), ("clean", "mapillary"), ("clean", "cityscapes")):
        assert build_eval_transform(proto, ds) == build_eval_transform()
    assert not build_eval_transform("original", "cityscapes").normalize
    for ds in ("cityscapes", "mapillary", "aligned", None):  # the Cityscapes input quirk alone, on any dataset
        assert build_eval_transform("unnormalised", ds) == build_eval_transform("original", "cityscapes")
