"""The procedural aligned-appearance generator: determinism, shared masks, class coverage, speed, on-disk layout, clips."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from blindnet.data import AlignedAppearanceDataset, DatasetError, build_eval_dataset, build_train_dataset
from blindnet.data.synthetic import APPEARANCES, render_clip, render_scene, write_aligned_dataset, write_clip

H, W = 64, 128


def test_deterministic_by_seed():
    a_imgs, a_mask = render_scene(3, H, W)
    b_imgs, b_mask = render_scene(3, H, W)
    c_imgs, c_mask = render_scene(4, H, W)
    assert np.array_equal(a_mask, b_mask)
    for app in APPEARANCES:
        assert np.array_equal(a_imgs[app], b_imgs[app])
    assert not np.array_equal(a_mask, c_mask)


def test_appearances_share_the_mask_and_differ_in_pixels():
    imgs, mask = render_scene(7, H, W)
    assert mask.shape == (H, W) and mask.dtype == np.uint8
    assert mask.max() <= 18
    for app in APPEARANCES:
        assert imgs[app].shape == (H, W, 3) and imgs[app].dtype == np.uint8
    # a subset renders the same pixels and the same mask (one rasterisation, appearance-independent)
    night_only, mask2 = render_scene(7, H, W, appearances=("night",))
    assert np.array_equal(mask, mask2) and np.array_equal(night_only["night"], imgs["night"])
    means = {a: imgs[a].reshape(-1, 3).mean(0) for a in APPEARANCES}
    for i, a in enumerate(APPEARANCES):
        for b in APPEARANCES[i + 1 :]:
            diff = np.abs(imgs[a].astype(int) - imgs[b].astype(int)).mean()
            assert diff > 8, f"{a} vs {b} differ by only {diff:.1f} grey levels on average"
    assert means["night"].mean() < 0.5 * means["noon"].mean()  # night is dark
    assert means["sunset"][0] > means["sunset"][2]  # sunset is warm (red over blue)


def test_unknown_appearance_is_a_clear_error():
    with pytest.raises(KeyError, match="dusk"):
        render_scene(0, H, W, appearances=("dusk",))


def test_all_19_classes_appear_over_20_scenes():
    seen = np.zeros(19, int)
    for seed in range(20):
        _, mask = render_scene(seed, H * 2, W * 2, appearances=("noon",))
        ids = np.unique(mask)
        seen[ids[ids < 19]] += 1
    assert (seen > 0).all(), f"classes never drawn: {np.flatnonzero(seen == 0).tolist()}"
    # the common street classes are in most scenes
    for c in (0, 1, 2, 5, 8, 10, 13):
        assert seen[c] >= 15, (c, seen[c])


def test_write_aligned_dataset_round_trips(tmp_path):
    split_dir = write_aligned_dataset(tmp_path, 4, seed=5, height=H, width=W, progress=False)
    assert (split_dir / "meta.json").is_file()
    assert sorted(p.name for p in (split_dir / "labels").iterdir()) == [f"scene_{i:06d}.png" for i in range(4)]
    assert not list(split_dir.rglob("*.tmp*"))
    ev = build_eval_dataset("aligned", tmp_path, split="train")
    assert len(ev) == 4 * len(APPEARANCES)
    item = ev[0]
    assert item["image"].shape == (3, H, W) and item["label"].shape == (H, W) and item["label"].dtype == torch.int64
    # the stored label is exactly the generator's mask and the stored image its pixels (PNG is lossless)
    from blindnet.data.synthetic.dataset import _scene_seed

    imgs, mask = render_scene(_scene_seed(5, 0), H, W)
    night = AlignedAppearanceDataset(tmp_path, "train", train=False, appearance="night")
    first = night[0]
    assert first["name"] == "scene_000000" and first["appearance"] == "night"
    assert np.array_equal(first["label"].numpy(), mask)
    stored = cv2.imread(str(split_dir / "night" / "scene_000000.png"))[:, :, ::-1]
    assert np.array_equal(stored, imgs["night"])
    # a second call with the same request is a no-op; a training pair is two real appearances of one scene
    mtime = (split_dir / "meta.json").stat().st_mtime_ns
    write_aligned_dataset(tmp_path, 4, seed=5, height=H, width=W, progress=False)
    assert (split_dir / "meta.json").stat().st_mtime_ns == mtime
    tr = build_train_dataset(
        "aligned", tmp_path, crop_size=(32, 48), pair="aligned", appearances=["noon", "fog"], class_uniform_pct=0.0
    )
    it = tr.get_seeded(1, seed=11)
    assert it["appearance"] != it["appearance_aug"] and {it["appearance"], it["appearance_aug"]} <= {"noon", "fog"}
    assert it["image"].shape == it["image_aug"].shape == (3, 32, 48) and it["label"].shape == (32, 48)
    assert not torch.equal(it["image"], it["image_aug"])
    # the pair mode does not move the crop: jittered and aligned x_a runs see the same geometry and appearance of x
    three = ["noon", "fog", "night"]  # x_a then has two candidates, so choosing it takes a random draw
    aligned, jittered = (
        build_train_dataset("aligned", tmp_path, crop_size=(32, 48), pair=p, appearances=three, class_uniform_pct=0.0)
        for p in ("aligned", "augment")
    )
    for index, seed in [(0, 3), (1, 11), (2, 5), (3, 8)]:
        a, b = aligned.get_seeded(index, seed=seed), jittered.get_seeded(index, seed=seed)
        assert torch.equal(a["label"], b["label"]) and a["appearance"] == b["appearance"]


def test_aligned_dataset_reports_missing_files(tmp_path):
    split_dir = write_aligned_dataset(
        tmp_path, 3, seed=1, height=32, width=64, appearances=("noon", "fog"), progress=False
    )
    (split_dir / "fog" / "scene_000001.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of 3 scenes have no 'fog' image.*scene_000001"):
        AlignedAppearanceDataset(tmp_path, "train")
    with pytest.raises(DatasetError, match="does not exist"):
        AlignedAppearanceDataset(tmp_path / "nowhere", "train")
    with pytest.raises(DatasetError, match="missing"):
        AlignedAppearanceDataset(tmp_path, "train", appearances=["rain"])


def test_clip_moves_forward_and_writes_readable_mp4(tmp_path):
    frames, masks = render_clip(2, num_frames=6, height=H, width=W, appearances=("noon", "night"))
    assert len(masks) == 6 and all(len(v) == 6 for v in frames.values())
    # driving forward: the road (class 0) keeps its place, near things grow -> the share of non-sky pixels changes
    assert not np.array_equal(masks[0], masks[-1])
    for t in range(6):
        assert frames["noon"][t].shape == (H, W, 3)
    out = write_clip(tmp_path / "clip", seed=2, num_frames=5, height=H, width=W, appearances=("fog",), fps=10)
    cap = cv2.VideoCapture(str(out["videos"]["fog"]))
    n = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        assert frame.shape == (H, W, 3)
        n += 1
    cap.release()
    assert n == 5
    assert len(out["masks"]) == 5 and cv2.imread(str(out["masks"][0]), cv2.IMREAD_UNCHANGED).shape == (H, W)


def test_clip_objects_approach():
    """A static object ahead covers more pixels as the camera drives towards it."""
    import dataclasses

    from blindnet.data.synthetic.raster import _rasterise
    from blindnet.data.synthetic.world import POLE, _build_world

    world = _build_world(9, length=20)
    lamp = next(p for p in world.parts if p.cls == POLE and p.vz == 0 and 80 < p.key < 140)
    solo = dataclasses.replace(world, parts=[lamp])
    areas = [int((_rasterise(solo, H * 4, W * 4, cam_z=z).ids > 0).sum()) for z in (0.0, 10.0, 20.0)]
    assert areas[0] < areas[1] < areas[2], areas


def test_parallel_writer_matches_serial(tmp_path):
    a = write_aligned_dataset(tmp_path / "a", 3, seed=2, height=32, width=64, appearances=("rain",), progress=False)
    b = write_aligned_dataset(
        tmp_path / "b", 3, seed=2, height=32, width=64, appearances=("rain",), num_workers=2, progress=False
    )
    for sub in ("labels", "rain"):
        for p in sorted((a / sub).iterdir()):
            assert p.read_bytes() == (b / sub / p.name).read_bytes()


def test_a_scene_without_visible_sky_renders() -> None:
    # Seed 10015 at 256x512 hides the sky behind the street's objects: every appearance must still render.
    images, mask = render_scene(10015, 256, 512)
    assert mask.shape == (256, 512) and all(img.shape == (256, 512, 3) for img in images.values())
    assert not (mask == 10).any()  # no sky pixel at all
