"""Real-dataset loaders on miniature fake copies of their folder layouts: id mappings, items, clear errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from blindnet.data import (
    ACDC,
    BDD100K,
    DATASETS,
    GTAV,
    SYNTHIA,
    Cityscapes,
    DarkZurich,
    DatasetError,
    Mapillary,
    SampleKey,
    build_eval_dataset,
    build_train_dataset,
)

H, W = 8, 12


def _rgb(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)


def _gray(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), ids)


def _ids(*values: int) -> np.ndarray:
    """An H x W id map whose first row starts with ``values`` (the rest of the image is the first value)."""
    arr = np.full((H, W), values[0], np.uint8)
    arr[0, : len(values)] = values
    return arr


def _palette_png(path: Path, indices: np.ndarray, colors: dict[int, tuple[int, int, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(indices.astype(np.uint8), mode="P")
    pal = np.zeros((256, 3), np.uint8)
    for k, c in colors.items():
        pal[k] = c
    im.putpalette(pal.ravel().tolist())
    im.save(path)


# ---- Cityscapes ------------------------------------------------------------------------------------------------------
def _cityscapes(root: Path, split: str = "val", names=("aachen_000000_000019", "aachen_000001_000019")) -> None:
    for i, n in enumerate(names):
        _rgb(root / "leftImg8bit" / split / "aachen" / f"{n}_leftImg8bit.png", i)
        _gray(root / "gtFine" / split / "aachen" / f"{n}_gtFine_labelIds.png", _ids(7, 26, 0, 33, 24, 6))


def test_cityscapes_maps_label_ids(tmp_path):
    _cityscapes(tmp_path)
    ds = Cityscapes(tmp_path, "val")
    assert len(ds) == 2 and not ds.train
    item = ds[0]
    assert item["image"].shape == (3, H, W) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["name"] == "aachen/aachen_000000_000019"
    assert item["label"][0, :6].tolist() == [0, 13, 255, 18, 11, 255]


def test_cityscapes_missing_label_is_named(tmp_path):
    _cityscapes(tmp_path)
    (tmp_path / "gtFine/val/aachen/aachen_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of 2 images .* have no label .*aachen_000001_000019"):
        Cityscapes(tmp_path, "val")
    with pytest.raises(DatasetError, match="does not exist"):
        Cityscapes(tmp_path / "missing", "val")
    (tmp_path / "leftImg8bit/train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no label folder"):
        Cityscapes(tmp_path, "train")


# ---- GTAV ------------------------------------------------------------------------------------------------------------
_GTAV_PALETTE = {
    7: (128, 64, 128),
    26: (0, 0, 142),
    0: (0, 0, 0),
    17: (153, 153, 153),
    18: (153, 153, 153),
    24: (220, 20, 60),
}


def test_gtav_original_layout_palette_and_rgb_labels(tmp_path):
    _rgb(tmp_path / "images/train/01/00001.png")
    _palette_png(tmp_path / "labels/train/01/00001.png", _ids(7, 26, 0, 17, 18, 24), _GTAV_PALETTE)
    _rgb(tmp_path / "images/train/01/00002.png")
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:] = (0, 0, 142)
    rgb[0, 0] = (119, 11, 32)
    rgb[0, 1] = (1, 2, 3)  # not a class colour
    Image.fromarray(rgb).save(tmp_path / "labels/train/01/00002.png")
    ds = GTAV(tmp_path, "train", train=False)
    assert [s.name for s in ds.samples] == ["01/00001", "01/00002"]
    assert ds[0]["label"][0, :6].tolist() == [0, 13, 255, 5, 5, 11]  # polegroup shares pole's colour -> pole
    lab = ds[1]["label"]
    assert lab[0, 0] == 18 and lab[0, 1] == 255 and lab[1, 1] == 13


def test_gtav_flat_layout_with_split_list(tmp_path):
    for n in ("00001.png", "00002.png", "00003.png"):
        _rgb(tmp_path / "images" / n)
        _palette_png(tmp_path / "labels" / n, _ids(7), _GTAV_PALETTE)
    split = tmp_path / "split.txt"
    split.write_text("00001.png\n00003.png\n")
    ds = GTAV(tmp_path, "val", split_file=split)
    assert [s.name for s in ds.samples] == ["00001", "00003"]
    (tmp_path / "labels/00003.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of 2 images have no label .*00003"):
        GTAV(tmp_path, "val", split_file=split)
    # the packaged lists are the original ones: 12,388 train names, missing files are counted
    with pytest.raises(DatasetError, match=r"12385 of 12388 images listed"):
        GTAV(tmp_path, "train")


def test_gtav_skips_size_mismatched_pairs(tmp_path):
    _rgb(tmp_path / "images/train/a/00001.png")
    _palette_png(tmp_path / "labels/train/a/00001.png", np.full((H + 1, W), 7, np.uint8), _GTAV_PALETTE)
    _rgb(tmp_path / "images/train/a/00002.png")
    _palette_png(tmp_path / "labels/train/a/00002.png", _ids(26), _GTAV_PALETTE)
    ds = GTAV(tmp_path, "train", train=False)
    with pytest.warns(UserWarning, match="skipped"):
        item = ds[0]
    assert item["name"] == "a/00002"


# ---- SYNTHIA ---------------------------------------------------------------------------------------------------------
def _synthia_label(path: Path, ids: np.ndarray) -> None:
    arr = np.zeros((H, W, 3), np.uint16)
    arr[:, :, 2] = ids  # cv2 writes BGR: channel 2 is the PNG's red channel, where SYNTHIA stores the class id
    arr[:, :, 1] = 1000  # instance ids live in another channel and must be ignored
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)


def test_synthia_16bit_red_channel_ids(tmp_path):
    _rgb(tmp_path / "RGB/train/0000001.png")
    _synthia_label(tmp_path / "GT/LABELS/train/0000001.png", _ids(3, 8, 0, 22, 1, 21))
    ds = SYNTHIA(tmp_path, "train", train=False)
    assert ds[0]["label"][0, :6].tolist() == [0, 13, 255, 255, 10, 3]
    # what the file holds really is a 16-bit RGB PNG with the id in red
    with Image.open(tmp_path / "GT/LABELS/train/0000001.png") as im:
        assert im.mode.startswith("RGB") or im.mode.startswith("I")
    _rgb(tmp_path / "RGB/train/0000002.png")
    with pytest.raises(DatasetError, match=r"1 of 2 images .*0000002"):
        SYNTHIA(tmp_path, "train")


def test_synthia_flat_layout_with_split_list(tmp_path):
    for n in ("0000000.png", "0000003.png"):
        _rgb(tmp_path / "RGB" / n)
        _synthia_label(tmp_path / "GT/LABELS" / n, _ids(4))
    lst = tmp_path / "val.txt"
    lst.write_text("0000000.png\n0000003.png\n")
    ds = SYNTHIA(tmp_path, "val", split_file=lst)
    assert len(ds) == 2 and int(ds[1]["label"][0, 0]) == 1


# ---- BDD100K ---------------------------------------------------------------------------------------------------------
def test_bdd100k_train_ids_and_both_label_names(tmp_path):
    _rgb(tmp_path / "images/val/a.jpg")
    _gray(tmp_path / "labels/val/a_train_id.png", _ids(0, 13, 255, 19, 18))
    _rgb(tmp_path / "images/val/b.jpg")
    _gray(tmp_path / "labels/val/b.png", _ids(2))
    ds = BDD100K(tmp_path, "val")
    assert [s.name for s in ds.samples] == ["a", "b"]
    assert ds[0]["label"][0, :5].tolist() == [0, 13, 255, 255, 18]
    (tmp_path / "labels/val/b.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of 2 images .* no label .*b"):
        BDD100K(tmp_path, "val")


# ---- Mapillary -------------------------------------------------------------------------------------------------------
def test_mapillary_66_to_19(tmp_path):
    _rgb(tmp_path / "validation/images/x1.jpg")
    _palette_png(
        tmp_path / "validation/labels/x1.png", _ids(55, 13, 65, 24, 20, 2), {55: (0, 0, 142), 13: (128, 64, 128)}
    )
    ds = Mapillary(tmp_path, "val")
    assert ds[0]["label"][0, :6].tolist() == [13, 0, 255, 0, 12, 1]
    _rgb(tmp_path / "validation/images/x2.jpg")
    with pytest.raises(DatasetError, match=r"1 of 2 images .*x2"):
        Mapillary(tmp_path, "val")


# ---- ACDC / Dark Zurich ----------------------------------------------------------------------------------------------
def test_acdc_conditions_and_label_types(tmp_path):
    for c in ("fog", "night"):
        stem = f"GOPR0475_frame_0000{41 if c == 'fog' else 42}"
        _rgb(tmp_path / f"rgb_anon/{c}/val/GOPR0475/{stem}_rgb_anon.png")
        _gray(tmp_path / f"gt/{c}/val/GOPR0475/{stem}_gt_labelTrainIds.png", _ids(13, 255, 10))
        _gray(tmp_path / f"gt/{c}/val/GOPR0475/{stem}_gt_labelIds.png", _ids(26, 0, 23))
    ds = ACDC(tmp_path, "val", conditions=["fog", "night"])
    assert len(ds) == 2 and [ds[i]["appearance"] for i in range(2)] == ["fog", "night"]
    assert ds[0]["label"][0, :3].tolist() == [13, 255, 10]
    ids = ACDC(tmp_path, "val", appearance="night", label_type="labelIds")
    assert len(ids) == 1 and ids[0]["label"][0, :3].tolist() == [13, 255, 10]
    with pytest.raises(DatasetError, match="rgb_anon/rain/val"):
        ACDC(tmp_path, "val")  # all four conditions by default; rain and snow are missing
    (tmp_path / "gt/fog/val/GOPR0475/GOPR0475_frame_000041_gt_labelTrainIds.png").unlink()
    with pytest.raises(DatasetError, match="1 of 1 images .* no label"):
        ACDC(tmp_path, "val", conditions=["fog"])


def test_dark_zurich_val(tmp_path):
    stem = "GOPR0356_frame_000321"
    _rgb(tmp_path / f"rgb_anon/val/night/GOPR0356/{stem}_rgb_anon.png")
    _gray(tmp_path / f"gt/val/night/GOPR0356/{stem}_gt_labelTrainIds.png", _ids(8, 10, 255))
    ds = DarkZurich(tmp_path)
    item = ds[0]
    assert (
        item["label"][0, :3].tolist() == [8, 10, 255]
        and item["appearance"] == "night"
        and item["image"].shape == (3, H, W)
    )
    (tmp_path / f"gt/val/night/GOPR0356/{stem}_gt_labelTrainIds.png").unlink()
    with pytest.raises(DatasetError, match="1 of 1 images"):
        DarkZurich(tmp_path)


# ---- registry and builders -------------------------------------------------------------------------------------------
def test_registry_lists_names_on_unknown_key():
    assert {"gtav", "synthia", "cityscapes", "bdd100k", "mapillary", "acdc", "dark_zurich", "aligned"} <= set(DATASETS)
    with pytest.raises(KeyError, match="known: acdc, aligned, bdd100k"):
        DATASETS["kitti"]
    with pytest.raises(KeyError, match="kitti"):
        build_eval_dataset("kitti", ".")


def test_train_dataset_items_and_class_uniform_keys(tmp_path):
    names = [f"c_{i:06d}_000019" for i in range(19)]  # int(19 * 1.0 / 19) = 1 class-uniform item per class
    for i, n in enumerate(names):
        _rgb(tmp_path / "leftImg8bit/train/c" / f"{n}_leftImg8bit.png", i)
        lab = np.full((H, W), 7, np.uint8)
        if i % 3 == 0:
            lab[5:7, 9:11] = 33  # bicycle, in a corner of a third of the images
        _gray(tmp_path / "gtFine/train/c" / f"{n}_gtFine_labelIds.png", lab)
    ds = build_train_dataset(
        "cityscapes",
        tmp_path,
        split="train",
        crop_size=(4, 4),
        scale_range=(1.0, 1.0),
        class_uniform_pct=1.0,
        cache_dir=tmp_path / "cache",
        centroid_crop="uniform",  # the crop always contains the centroid (the original's may miss it by a pixel)
    )
    keys = ds.epoch_items(0, seed=1)
    # Only 2 of 19 classes have centroids: the original's epoch keeps just their items (19 - 17 * 1).
    assert keys == ds.epoch_items(0, seed=1) and len(keys) == 2
    kept = build_train_dataset(
        "cityscapes",
        tmp_path,
        split="train",
        class_uniform_pct=1.0,
        cache_dir=tmp_path / "cache",
        class_uniform_keep_size=True,
    )
    assert len(kept.epoch_items(0, seed=1)) == 19 and kept.transform.centroid_crop == "original"
    assert list((tmp_path / "cache").glob("cityscapes_train_tile1024_*.json"))
    bikes = [k for k in keys if isinstance(k, SampleKey) and k.class_id == 18]
    assert bikes
    for k in bikes:
        item = ds.get_seeded(k, seed=7)
        assert item["image"].shape == item["image_aug"].shape == (3, 4, 4)
        assert (item["label"] == 18).any()  # the forced crop contains the chosen class
    a, b = ds[(keys[0], 5)], ds[(keys[0], 5)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["image_aug"], b["image_aug"])
    with pytest.raises(ValueError, match="aligned"):
        build_train_dataset("cityscapes", tmp_path, pair="aligned")


# ---- evaluation protocols ----------------------------------------------------------------------------------------
def test_original_protocol_cityscapes_unnormalised_mapillary_cropped(tmp_path):
    _cityscapes(tmp_path / "cs")
    clean = build_eval_dataset("cityscapes", tmp_path / "cs", "val")[0]
    orig = build_eval_dataset("cityscapes", tmp_path / "cs", "val", protocol="original")[0]
    raw = cv2.cvtColor(cv2.imread(str(tmp_path / "cs/leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png")),
                       cv2.COLOR_BGR2RGB)  # fmt: skip
    torch.testing.assert_close(orig["image"], torch.from_numpy(raw.transpose(2, 0, 1) / 255.0).float())
    assert clean["image"].min() < 0 and torch.equal(orig["label"], clean["label"])
    # Mapillary: height 1024, 1024 x 1024 centre crop (tiny 8 x 12 image -> 1024 x 1536 -> columns 256..1279).
    mp = tmp_path / "mp"
    _rgb(mp / "validation/images/x1.jpg")
    _palette_png(mp / "validation/labels/x1.png", np.full((H, W), 55, np.uint8), {55: (0, 0, 142)})
    item = build_eval_dataset("mapillary", mp, "val", protocol="original")[0]
    assert item["image"].shape == (3, 1024, 1024) and (item["label"] == 13).all()
    assert build_eval_dataset("mapillary", mp, "val")[0]["image"].shape == (3, H, W)  # clean: full resolution
    with pytest.raises(ValueError, match="protocol"):
        build_eval_dataset("mapillary", mp, "val", protocol="paper")
