"""Segmentation datasets mapped to the 19 Cityscapes train ids (255 = ignore), with up-front layout validation.

Layouts (``docs/original_implementation.md``, "Datasets and label mappings"):

* ``gtav``: ``ROOT/images/{train,valid,test}/<any>/NNNNN.png`` + same under ``ROOT/labels/`` (the original's layout),
  or the official flat ``ROOT/images/NNNNN.png`` + ``ROOT/labels/NNNNN.png`` split by the original split lists
  (``blindnet/data/splits/gtav_split_{train,val,test}.txt``; ``split_file=`` overrides). Labels are palette PNGs:
  colours are matched against the Cityscapes colour table (unmatched -> 255).
* ``synthia``: ``ROOT/RGB/{train,val}/*.png`` + ``ROOT/GT/LABELS/{train,val}/*.png``, or flat ``ROOT/RGB/*.png`` +
  ``ROOT/GT/LABELS/*.png`` with the SYNTHIA split lists. Labels: 16-bit PNG, class id in the red channel.
* ``cityscapes``: ``ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` + ``ROOT/gtFine/<split>/<city>/
  *_gtFine_labelIds.png`` (also under ``leftImg8bit_trainvaltest/``, ``gtFine_trainvaltest/``);
  ``label_type="labelTrainIds"`` reads ready-made train-id files instead.
* ``bdd100k``: ``ROOT/images/<split>/*.jpg`` + ``ROOT/labels/<split>/<name>.png`` or ``<name>_train_id.png``
  (also under ``ROOT/seg/``). Labels are train ids already.
* ``mapillary``: ``ROOT/{training,validation}/images/*.jpg`` + ``.../labels/*.png`` (v1.2 palette PNGs, 66 ids; also
  ``.../v1.2/labels``), mapped 66 -> 19.
* ``acdc``: ``ROOT/rgb_anon/<condition>/<split>/<seq>/*_rgb_anon.png`` + ``ROOT/gt/<condition>/<split>/<seq>/
  *_gt_labelTrainIds.png`` (or ``label_type="labelIds"``); items carry ``"appearance"`` = the condition.
* ``dark_zurich``: ``ROOT/rgb_anon/<split>/night/<seq>/*_rgb_anon.png`` + ``ROOT/gt/<split>/night/<seq>/
  *_gt_labelTrainIds.png`` (labels exist for ``val``).
* ``aligned``: one mask per scene and one folder per appearance, see :mod:`blindnet.data.synthetic`.

Items (dicts): training ``{"image", "image_aug": 3 x h x w float32 (ImageNet-normalised), "label": h x w int64,
"name": str}`` after :class:`~blindnet.data.transforms.TrainTransform`; evaluation ``{"image": 3 x H x W,
"label": H x W, "name"}`` at full resolution, plus ``"appearance"`` where the dataset has one.

Keys accepted by ``__getitem__``: an ``int``; a :class:`~blindnet.data.sampling.SampleKey` (class-uniform item); or
``(key, seed)`` as yielded by :class:`~blindnet.data.sampling.ClassUniformSampler`. With an explicit seed the item's
augmentation is a pure function of it; a bare key draws its seed from numpy's global RNG (which torch's DataLoader
and ``train.data.SeededItems`` seed).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
from torch.utils.data import Dataset

from blindnet.data.sampling import Centroids, SampleKey, build_centroids, cache_name, class_uniform_epoch
from blindnet.data.transforms import EvalTransform, TrainTransform, build_eval_transform, build_train_transform

IGNORE_INDEX = 255
SPLITS_DIR = Path(__file__).resolve().parent / "splits"


class DatasetError(ValueError):
    """A dataset root is missing or inconsistent; the message names what is missing and how many."""


# --------------------------------------------------------------------------------------------------------------------
# Label mappings (docs/original_implementation.md, "Datasets and label mappings")
# --------------------------------------------------------------------------------------------------------------------


def _lut(pairs: dict[int, int]) -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for k, v in pairs.items():
        lut[k] = v
    return lut


CITYSCAPES_ID_TO_TRAIN: dict[int, int] = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
SYNTHIA_ID_TO_TRAIN: dict[int, int] = {
    1: 10,
    2: 2,
    3: 0,
    4: 1,
    5: 4,
    6: 8,
    7: 5,
    8: 13,
    9: 7,
    10: 11,
    11: 18,
    12: 17,
    15: 6,
    16: 9,
    17: 12,
    18: 14,
    19: 15,
    20: 16,
    21: 3,
}
MAPILLARY_ID_TO_TRAIN: dict[int, int] = {
    13: 0,
    24: 0,
    41: 0,
    2: 1,
    15: 1,
    17: 2,
    6: 3,
    3: 4,
    45: 5,
    47: 5,
    48: 6,
    50: 7,
    30: 8,
    29: 9,
    27: 10,
    19: 11,
    20: 12,
    21: 12,
    22: 12,
    55: 13,
    61: 14,
    54: 15,
    58: 16,
    57: 17,
    52: 18,
}
#: GTAV label colours (Cityscapes colour table) -> train id; any other colour -> 255.
GTAV_COLOR_TO_TRAIN: dict[tuple[int, int, int], int] = {
    (128, 64, 128): 0,
    (244, 35, 232): 1,
    (70, 70, 70): 2,
    (102, 102, 156): 3,
    (190, 153, 153): 4,
    (153, 153, 153): 5,
    (250, 170, 30): 6,
    (220, 220, 0): 7,
    (107, 142, 35): 8,
    (152, 251, 152): 9,
    (70, 130, 180): 10,
    (220, 20, 60): 11,
    (255, 0, 0): 12,
    (0, 0, 142): 13,
    (0, 0, 70): 14,
    (0, 60, 100): 15,
    (0, 80, 100): 16,
    (0, 0, 230): 17,
    (119, 11, 32): 18,
}
#: CARLA >= 0.9.14 semantic tags (red channel) -> train id: tag - 1 for 1..19, RoadLine (24) -> road.
CARLA_TAG_TO_TRAIN: dict[int, int] = {**{t: t - 1 for t in range(1, 20)}, 24: 0}
#: CARLA <= 0.9.13 tags -> train id (one "Vehicles" tag, mapped to car).
CARLA_LEGACY_TAG_TO_TRAIN: dict[int, int] = {
    1: 2,
    2: 4,
    4: 11,
    5: 5,
    6: 0,
    7: 0,
    8: 1,
    9: 8,
    10: 13,
    11: 3,
    12: 7,
    13: 10,
    18: 6,
    22: 9,
}

CITYSCAPES_LUT = _lut(CITYSCAPES_ID_TO_TRAIN)
SYNTHIA_LUT = _lut(SYNTHIA_ID_TO_TRAIN)
MAPILLARY_LUT = _lut(MAPILLARY_ID_TO_TRAIN)
TRAIN_ID_LUT = _lut({i: i for i in range(19)})
_GTAV_KEYS = np.array(sorted((r << 16) | (g << 8) | b for r, g, b in GTAV_COLOR_TO_TRAIN), np.int64)
_GTAV_VALS = np.array([GTAV_COLOR_TO_TRAIN[((k >> 16) & 255, (k >> 8) & 255, k & 255)] for k in _GTAV_KEYS], np.uint8)


def map_colors(rgb: np.ndarray, keys: np.ndarray = _GTAV_KEYS, vals: np.ndarray = _GTAV_VALS) -> np.ndarray:
    """``H x W x 3`` uint8 RGB label colours -> ``H x W`` uint8 train ids (unknown colours -> 255)."""
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    pos = np.clip(np.searchsorted(keys, packed), 0, len(keys) - 1)
    return np.where(keys[pos] == packed, vals[pos], IGNORE_INDEX).astype(np.uint8)


def _read_rgb(path: Path) -> np.ndarray:
    # IMREAD_COLOR applies a JPEG's EXIF orientation (as viewers and blindnet.io.decode_image do), so a photo in a
    # user's folder meets its label drawn on the picture as shown; tests/test_media.py checks it.
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"cannot read image {path}")
    return np.ascontiguousarray(img[:, :, ::-1])


def _read_ids(path: Path) -> np.ndarray:
    """A single-channel id PNG (8 or 16 bit) as an integer array."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DatasetError(f"cannot read label {path}")
    if arr.ndim == 3:
        arr = arr[:, :, 2]  # cv2 gives BGR: channel 2 is red, where id-in-colour formats store the id
    return arr


def _read_palette_indices(path: Path) -> np.ndarray:
    """Palette PNG -> its index array (cv2 would expand the palette to colours)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("P", "L", "I;16", "I"):
            return np.asarray(im)
        return np.asarray(im.convert("RGB"))[:, :, 0]


def _apply_lut(lut: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if ids.dtype != np.uint8:
        ids = np.minimum(ids, 255).astype(np.uint8)  # ids above 255 are not classes of any table here
    return lut[ids]


# --------------------------------------------------------------------------------------------------------------------
# File discovery and validation
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One image and its label; ``name`` is the path relative to the split folder without suffix."""

    name: str
    image: Path
    label: Path
    appearance: str | None = None


def _require_dir(path: Path, what: str, dataset: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{dataset}: {what} folder {path} does not exist")
    return path


def _first_dir(candidates: Sequence[Path], what: str, dataset: str) -> Path:
    for c in candidates:
        if c.is_dir():
            return c
    raise DatasetError(f"{dataset}: no {what} folder; looked for " + ", ".join(str(c) for c in candidates))


def _index(folder: Path, suffix: str, recursive: bool = True) -> dict[str, Path]:
    """``{relative path without suffix: path}`` of files under ``folder`` ending with ``suffix``."""
    it = folder.rglob(f"*{suffix}") if recursive else folder.glob(f"*{suffix}")
    out = {}
    for p in it:
        if p.is_file() and not p.name.startswith("."):
            out[p.relative_to(folder).as_posix()[: -len(suffix)]] = p
    return out


def _examples(names: Sequence[str], k: int = 3) -> str:
    names = sorted(names)
    more = f", ... ({len(names) - k} more)" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def _pair(
    dataset: str,
    images: dict[str, Path],
    labels: dict[str, Path],
    image_dir: Path,
    label_dir: Path,
    appearance: str | None = None,
) -> list[Sample]:
    """Match images to labels by key; any image without a label (or label without image) is an error."""
    if not images:
        raise DatasetError(f"{dataset}: no images found in {image_dir}")
    missing = [k for k in images if k not in labels]
    if missing:
        raise DatasetError(
            f"{dataset}: {len(missing)} of {len(images)} images in {image_dir} have no label in {label_dir} "
            f"(e.g. {_examples(missing)})"
        )
    orphans = [k for k in labels if k not in images]
    if orphans:
        raise DatasetError(
            f"{dataset}: {len(orphans)} labels in {label_dir} have no image in {image_dir} (e.g. {_examples(orphans)})"
        )
    return [Sample(k, images[k], labels[k], appearance) for k in sorted(images)]


def _read_split_list(path: Path, dataset: str) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{dataset}: split list {path} does not exist")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _from_list(dataset: str, names: Sequence[str], image_dir: Path, label_dir: Path, list_path: Path) -> list[Sample]:
    """Samples named by a split list (``NNNNN.png``) in flat image/label folders; missing files are errors."""
    missing_img = [n for n in names if not (image_dir / n).is_file()]
    if missing_img:
        raise DatasetError(
            f"{dataset}: {len(missing_img)} of {len(names)} images listed in {list_path} are missing from {image_dir} "
            f"(e.g. {_examples(missing_img)})"
        )
    missing_lab = [n for n in names if not (label_dir / n).is_file()]
    if missing_lab:
        raise DatasetError(
            f"{dataset}: {len(missing_lab)} of {len(names)} images have no label in {label_dir} (e.g. {_examples(missing_lab)})"
        )
    return [Sample(Path(n).stem, image_dir / n, label_dir / n) for n in names]


def default_cache_dir(root: str | Path | None = None) -> Path:
    """Where class-centroid indices are cached: ``$BLINDNET_CACHE/centroids`` if set, else ``ROOT/.cache`` when the
    dataset root is writable (the index belongs with the data, like the original's JSON), else
    ``~/.cache/blindnet/centroids``."""
    env = os.environ.get("BLINDNET_CACHE")
    if env:
        return Path(env).expanduser() / "centroids"
    if root is not None and os.access(root, os.W_OK):
        return Path(root) / ".cache"
    return Path("~/.cache/blindnet/centroids").expanduser()


# --------------------------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------------------------


class SegmentationDataset(Dataset):
    """Base: ``samples`` found and validated in ``__init__``; items via the train or eval transform.

    Args:
        root: dataset folder.
        split: split name (``train``, ``val``, ...).
        train: training items (crop, flip, x/x_a pair) or evaluation items (full resolution). Default: ``split ==
            "train"``.
        transform: a :class:`TrainTransform` / :class:`EvalTransform` (defaults: the paper's recipe / full resolution).
        class_uniform_pct: share of each epoch drawn class-uniformly by :meth:`epoch_items` (0 = uniform).
        class_uniform_tile: tile size of the centroid index.
        class_uniform_keep_size: keep every epoch at ``len(self)`` items when a class has no centroid (its share goes
            to uniformly drawn images); default False = the original's rule, the epoch shrinks by that share.
        cache_dir: where the centroid index JSON is cached (default :func:`default_cache_dir`).
        limit: keep only the first ``limit`` samples (quick checks).
    """

    dataset_name: ClassVar[str] = "dataset"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        train: bool | None = None,
        transform: TrainTransform | EvalTransform | None = None,
        class_uniform_pct: float = 0.0,
        class_uniform_tile: int = 1024,
        class_uniform_keep_size: bool = False,
        cache_dir: str | Path | None = None,
        limit: int | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(f"{self.dataset_name}: dataset root {self.root} does not exist")
        self.split = split
        self.train = (split == "train") if train is None else bool(train)
        self.transform = (
            transform if transform is not None else (build_train_transform() if self.train else build_eval_transform())
        )
        if self.train and not isinstance(self.transform, TrainTransform):
            raise TypeError(
                f"{self.dataset_name}: training items need a TrainTransform, got {type(self.transform).__name__}"
            )
        self.class_uniform_pct = float(class_uniform_pct)
        self.class_uniform_tile = int(class_uniform_tile)
        self.class_uniform_keep_size = bool(class_uniform_keep_size)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(self.root)
        self.samples: list[Sample] = self._discover()
        if limit is not None:
            self.samples = self.samples[: int(limit)]
        if not self.samples:
            raise DatasetError(f"{self.dataset_name}: no samples for split {split!r} under {self.root}")
        self._centroids: Centroids | None = None
        self._warned_size = False

    # -- to implement --------------------------------------------------------------------------------------------
    def _discover(self) -> list[Sample]:
        raise NotImplementedError

    def decode_label(self, path: Path) -> np.ndarray:
        """Read a label file -> ``H x W`` uint8 train ids."""
        raise NotImplementedError

    # -- loading -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def names(self) -> list[str]:
        return [s.name for s in self.samples]

    def read_label(self, index: int) -> np.ndarray:
        return self.decode_label(self.samples[index].label)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, Sample]:
        """``(H x W x 3 uint8 RGB, H x W uint8 train ids, sample)``.

        An image whose label has a different size is skipped for the next one, as the original did for GTAV's few
        mismatched pairs (warned once).
        """
        for k in range(len(self.samples)):
            s = self.samples[(index + k) % len(self.samples)]
            image, label = _read_rgb(s.image), self.decode_label(s.label)
            if image.shape[:2] == label.shape[:2]:
                return image, label, s
            if not self._warned_size:
                warnings.warn(
                    f"{self.dataset_name}: {s.image} is {image.shape[:2]} but its label is {label.shape[:2]}; skipped",
                    stacklevel=2,
                )
                self._warned_size = True
        raise DatasetError(f"{self.dataset_name}: no image has a label of the same size")

    # -- class-uniform sampling ---------------------------------------------------------------------------------
    def centroids(self, progress: bool = True) -> Centroids:
        """Per-class centroid lists, computed once and cached as JSON in ``cache_dir``."""
        if self._centroids is None:
            # the root and every label path go into the file name's digest: another copy or list never reuses it
            name = cache_name(
                self.dataset_name,
                self.split,
                [str(self.root.resolve()), *(str(s.label) for s in self.samples)],
                self.class_uniform_tile,
            )
            self._centroids = build_centroids(
                self.read_label,
                len(self),
                tile=self.class_uniform_tile,
                cache_file=self.cache_dir / name,
                progress=progress,
            )
        return self._centroids

    def epoch_items(self, epoch: int, seed: int = 0) -> list[int | SampleKey]:
        """This epoch's item keys: class-uniform for ``class_uniform_pct`` of them, the rest a random permutation."""
        cents = self.centroids() if self.class_uniform_pct > 0 else None
        return class_uniform_epoch(len(self), cents, self.class_uniform_pct, seed, epoch, self.class_uniform_keep_size)

    # -- items ---------------------------------------------------------------------------------------------------
    def __getitem__(self, key: Any) -> dict[str, Any]:
        if isinstance(key, tuple) and not isinstance(key, SampleKey) and len(key) == 2:
            return self.get_seeded(key[0], int(key[1]))
        if not self.train:
            return self.get_seeded(key, 0)
        return self.get_seeded(key, int(np.random.randint(0, 2**31 - 1)))

    def get_seeded(self, key: int | SampleKey, seed: int) -> dict[str, Any]:
        """The item for ``key`` with its augmentation drawn from ``np.random.default_rng(seed)``."""
        index, centroid = (key.index, (key.row, key.col)) if isinstance(key, SampleKey) else (int(key), None)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.dataset_name}: index {index} outside 0..{len(self) - 1}")
        rng = np.random.default_rng(seed)
        return self._item(index, centroid, rng)

    def _item(self, index: int, centroid: tuple[int, int] | None, rng: np.random.Generator) -> dict[str, Any]:
        image, label, s = self.load(index)
        if self.train:
            tensors = self.transform(image, label, rng, centroid=centroid)  # type: ignore[call-arg]
        else:
            tensors = self.transform(image, label)  # type: ignore[call-arg]
        item: dict[str, Any] = tensors  # the transform's tensors, then the names added below
        item["name"] = s.name
        if s.appearance is not None:
            item["appearance"] = s.appearance
        return item

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, train={self.train})"
        )


# --------------------------------------------------------------------------------------------------------------------
# Real datasets
# --------------------------------------------------------------------------------------------------------------------


class GTAV(SegmentationDataset):
    """GTA V (Richter et al.), colour/palette labels matched to the Cityscapes colour table."""

    dataset_name = "gtav"
    _SPLIT_DIRS: ClassVar[dict[str, str]] = {"train": "train", "val": "valid", "valid": "valid", "test": "test"}

    def __init__(
        self, root: str | Path, split: str = "train", *, split_file: str | Path | None = None, **kw: Any
    ) -> None:
        self.split_file = Path(split_file) if split_file is not None else None
        super().__init__(root, split, **kw)

    def _discover(self) -> list[Sample]:
        if self.split not in self._SPLIT_DIRS:
            raise DatasetError(f"gtav: unknown split {self.split!r}; use one of train, val, test")
        sub = self._SPLIT_DIRS[self.split]
        img_root, lab_root = (
            _require_dir(self.root / "images", "images", "gtav"),
            _require_dir(self.root / "labels", "labels", "gtav"),
        )
        if (img_root / sub).is_dir():  # the original's images/<split>/<folder>/ layout
            lab_dir = _require_dir(lab_root / sub, "labels", "gtav")
            return _pair("gtav", _index(img_root / sub, ".png"), _index(lab_dir, ".png"), img_root / sub, lab_dir)
        list_path = self.split_file or SPLITS_DIR / f"gtav_split_{'val' if sub == 'valid' else sub}.txt"
        return _from_list("gtav", _read_split_list(list_path, "gtav"), img_root, lab_root, list_path)

    def decode_label(self, path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as im:
            if im.mode == "P":  # map each palette entry's colour once, then index: same result as colour matching
                pal = np.asarray((im.getpalette() or [])[: 256 * 3], np.uint8)  # a "P" image has one; typed Optional
                pal = np.pad(pal, (0, 768 - len(pal))).reshape(256, 1, 3)
                return map_colors(pal)[:, 0][np.asarray(im)]
            return map_colors(np.asarray(im.convert("RGB")))


class SYNTHIA(SegmentationDataset):
    """SYNTHIA-RAND-CITYSCAPES; 16-bit labels with the class id in the red channel (read with cv2, no FreeImage)."""

    dataset_name = "synthia"

    def __init__(
        self, root: str | Path, split: str = "train", *, split_file: str | Path | None = None, **kw: Any
    ) -> None:
        self.split_file = Path(split_file) if split_file is not None else None
        super().__init__(root, split, **kw)

    def _discover(self) -> list[Sample]:
        img_root = _require_dir(self.root / "RGB", "RGB", "synthia")
        lab_root = _require_dir(self.root / "GT" / "LABELS", "GT/LABELS", "synthia")
        if (img_root / self.split).is_dir():
            lab_dir = _require_dir(lab_root / self.split, "GT/LABELS", "synthia")
            return _pair(
                "synthia",
                _index(img_root / self.split, ".png"),
                _index(lab_dir, ".png"),
                img_root / self.split,
                lab_dir,
            )
        list_path = self.split_file or SPLITS_DIR / f"synthia_split_{self.split}.txt"
        return _from_list("synthia", _read_split_list(list_path, "synthia"), img_root, lab_root, list_path)

    def decode_label(self, path: Path) -> np.ndarray:
        return _apply_lut(SYNTHIA_LUT, _read_ids(path))


class Cityscapes(SegmentationDataset):
    """Cityscapes fine annotations; ``label_type`` ``labelIds`` (mapped) or ``labelTrainIds``."""

    dataset_name = "cityscapes"

    def __init__(self, root: str | Path, split: str = "val", *, label_type: str = "labelIds", **kw: Any) -> None:
        if label_type not in ("labelIds", "labelTrainIds"):
            raise ValueError(f"cityscapes: label_type must be labelIds or labelTrainIds, got {label_type!r}")
        self.label_type = label_type
        super().__init__(root, split, **kw)

    def _discover(self) -> list[Sample]:
        r = self.root
        img = _first_dir(
            [r / "leftImg8bit" / self.split, r / "leftImg8bit_trainvaltest" / "leftImg8bit" / self.split],
            "image",
            "cityscapes",
        )
        lab = _first_dir(
            [r / "gtFine" / self.split, r / "gtFine_trainvaltest" / "gtFine" / self.split], "label", "cityscapes"
        )
        return _pair(
            "cityscapes", _index(img, "_leftImg8bit.png"), _index(lab, f"_gtFine_{self.label_type}.png"), img, lab
        )

    def decode_label(self, path: Path) -> np.ndarray:
        return _apply_lut(CITYSCAPES_LUT if self.label_type == "labelIds" else TRAIN_ID_LUT, _read_ids(path))


class BDD100K(SegmentationDataset):
    """BDD100K semantic segmentation (10k); labels are train ids already (``<name>.png`` or ``<name>_train_id.png``)."""

    dataset_name = "bdd100k"

    def __init__(self, root: str | Path, split: str = "val", **kw: Any) -> None:
        super().__init__(root, split, **kw)

    def _discover(self) -> list[Sample]:
        r, s = self.root, self.split
        img = _first_dir([r / "images" / s, r / "seg" / "images" / s, r / "images" / "10k" / s], "image", "bdd100k")
        lab = _first_dir(
            [r / "labels" / s, r / "seg" / "labels" / s, r / "labels" / "sem_seg" / "masks" / s], "label", "bdd100k"
        )
        images = _index(img, ".jpg", recursive=False) or _index(img, ".png", recursive=False)
        labels = {
            k[: -len("_train_id")] if k.endswith("_train_id") else k: p
            for k, p in _index(lab, ".png", recursive=False).items()
        }
        return _pair("bdd100k", images, labels, img, lab)

    def decode_label(self, path: Path) -> np.ndarray:
        return _apply_lut(TRAIN_ID_LUT, _read_ids(path))


class Mapillary(SegmentationDataset):
    """Mapillary Vistas v1.2 (66 classes, palette PNGs) mapped to the 19 train ids."""

    dataset_name = "mapillary"
    _SPLIT_DIRS: ClassVar[dict[str, str]] = {
        "train": "training",
        "training": "training",
        "val": "validation",
        "validation": "validation",
    }

    def __init__(self, root: str | Path, split: str = "val", **kw: Any) -> None:
        super().__init__(root, split, **kw)

    def _discover(self) -> list[Sample]:
        if self.split not in self._SPLIT_DIRS:
            raise DatasetError(f"mapillary: unknown split {self.split!r}; use train or val")
        base = _require_dir(self.root / self._SPLIT_DIRS[self.split], "split", "mapillary")
        img = _require_dir(base / "images", "images", "mapillary")
        lab = _first_dir([base / "v1.2" / "labels", base / "labels"], "label", "mapillary")
        return _pair("mapillary", _index(img, ".jpg", recursive=False), _index(lab, ".png", recursive=False), img, lab)

    def decode_label(self, path: Path) -> np.ndarray:
        return _apply_lut(MAPILLARY_LUT, _read_palette_indices(path))


class ACDC(SegmentationDataset):
    """ACDC adverse conditions; items carry ``"appearance"`` = condition (fog, night, rain, snow)."""

    dataset_name = "acdc"
    CONDITIONS: ClassVar[tuple[str, ...]] = ("fog", "night", "rain", "snow")

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        *,
        conditions: Sequence[str] | None = None,
        appearance: str | None = None,
        label_type: str = "labelTrainIds",
        **kw: Any,
    ) -> None:
        conds = tuple(conditions) if conditions else ((appearance,) if appearance else self.CONDITIONS)
        bad = [c for c in conds if c not in self.CONDITIONS]
        if bad:
            raise ValueError(f"acdc: unknown condition(s) {bad}; known: {', '.join(self.CONDITIONS)}")
        if label_type not in ("labelIds", "labelTrainIds"):
            raise ValueError(f"acdc: label_type must be labelIds or labelTrainIds, got {label_type!r}")
        self.conditions, self.label_type = conds, label_type
        super().__init__(root, split, **kw)

    def _discover(self) -> list[Sample]:
        out: list[Sample] = []
        for c in self.conditions:
            img = _require_dir(self.root / "rgb_anon" / c / self.split, f"rgb_anon/{c}/{self.split}", "acdc")
            lab = _require_dir(self.root / "gt" / c / self.split, f"gt/{c}/{self.split}", "acdc")
            out += _pair(
                "acdc", _index(img, "_rgb_anon.png"), _index(lab, f"_gt_{self.label_type}.png"), img, lab, appearance=c
            )
        return out

    def decode_label(self, path: Path) -> np.ndarray:
        return _apply_lut(CITYSCAPES_LUT if self.label_type == "labelIds" else TRAIN_ID_LUT, _read_ids(path))


class DarkZurich(SegmentationDataset):
    """Dark Zurich; only ``val`` (50 night images) has public labels."""

    dataset_name = "dark_zurich"

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        *,
        time_of_day: str = "night",
        label_type: str = "labelTrainIds",
        **kw: Any,
    ) -> None:
        if label_type not in ("labelIds", "labelTrainIds"):
            raise ValueError(f"dark_zurich: label_type must be labelIds or labelTrainIds, got {label_type!r}")
        self.time_of_day, self.label_type = time_of_day, label_type
        super().__init__(root, split, **kw)

    def _discover(self) -> list[Sample]:
        img = _require_dir(
            self.root / "rgb_anon" / self.split / self.time_of_day,
            f"rgb_anon/{self.split}/{self.time_of_day}",
            "dark_zurich",
        )
        lab = _require_dir(
            self.root / "gt" / self.split / self.time_of_day, f"gt/{self.split}/{self.time_of_day}", "dark_zurich"
        )
        return _pair(
            "dark_zurich",
            _index(img, "_rgb_anon.png"),
            _index(lab, f"_gt_{self.label_type}.png"),
            img,
            lab,
            appearance=self.time_of_day,
        )

    def decode_label(self, path: Path) -> np.ndarray:
        return _apply_lut(CITYSCAPES_LUT if self.label_type == "labelIds" else TRAIN_ID_LUT, _read_ids(path))


# --------------------------------------------------------------------------------------------------------------------
# Aligned multi-appearance scenes
# --------------------------------------------------------------------------------------------------------------------

#: How x_a is made: the same two names as the training config's ``data.pair``.
PAIR_MODES = ("augment", "aligned")
_LABEL_FORMATS: dict[str, np.ndarray] = {
    "trainids": TRAIN_ID_LUT,
    "carla": _lut(CARLA_TAG_TO_TRAIN),
    "carla_legacy": _lut(CARLA_LEGACY_TAG_TO_TRAIN),
}


class AlignedAppearanceDataset(SegmentationDataset):
    """Scenes rendered in several appearances sharing one mask (``ROOT/<split>/labels``, ``ROOT/<split>/<appearance>``).

    Args:
        appearances: appearances x is drawn from (training) or that are enumerated (evaluation); default: all folders
            (from ``meta.json`` when present).
        appearance: shorthand for a single appearance (e.g. evaluation on ``night``).
        pair_mode: ``"augment"``: x_a = strong colour jitter + blur of x (BlindNet); ``"aligned"``: x_a = a different
            real appearance of the same scene from ``pair_appearances``.
        pair_appearances: where x_a is drawn from in ``aligned`` mode (default: ``appearances``).
        label_format: ``trainids`` (as written by the synthetic generator), ``carla`` (CARLA >= 0.9.14 tags in the
            red channel) or ``carla_legacy``.

    Training items hold one scene each (x's appearance drawn per item); evaluation items enumerate every
    (scene, appearance) pair and carry ``"appearance"``.
    """

    dataset_name = "aligned"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        appearances: Sequence[str] | None = None,
        appearance: str | None = None,
        pair_mode: str = "augment",
        pair_appearances: Sequence[str] | None = None,
        label_format: str = "trainids",
        **kw: Any,
    ) -> None:
        if pair_mode not in PAIR_MODES:
            raise ValueError(f"aligned: pair_mode must be one of {PAIR_MODES}, got {pair_mode!r}")
        if label_format not in _LABEL_FORMATS:
            raise ValueError(f"aligned: label_format must be one of {sorted(_LABEL_FORMATS)}, got {label_format!r}")
        if appearance is not None and appearances is not None:
            raise ValueError("aligned: give either appearance or appearances, not both")
        self._want = (appearance,) if appearance is not None else (tuple(appearances) if appearances else None)
        self._want_pair = tuple(pair_appearances) if pair_appearances else None
        self.pair_mode, self.label_format = pair_mode, label_format
        super().__init__(root, split, **kw)

    def _discover(self) -> list[Sample]:
        split_dir = _require_dir(self.root / self.split, f"split {self.split!r}", "aligned")
        lab_dir = _require_dir(split_dir / "labels", "labels", "aligned")
        meta_path = split_dir / "meta.json"
        if meta_path.is_file():
            available = tuple(json.loads(meta_path.read_text())["appearances"])
        else:
            available = tuple(
                sorted(
                    p.name
                    for p in split_dir.iterdir()
                    if p.is_dir() and p.name != "labels" and not p.name.startswith(".")
                )
            )
        self.available = available
        self.appearances = self._want or available
        self.pair_appearances = self._want_pair or self.appearances
        needed = dict.fromkeys([*self.appearances, *(self.pair_appearances if self.pair_mode == "aligned" else ())])
        unknown = [a for a in needed if not (split_dir / a).is_dir()]
        if unknown:
            raise DatasetError(
                f"aligned: appearance folder(s) {unknown} missing in {split_dir}; present: {list(available)}"
            )
        if self.train and self.pair_mode == "aligned" and len(set(self.appearances) | set(self.pair_appearances)) < 2:
            raise DatasetError("aligned: pair_mode 'aligned' needs at least two distinct appearances")
        labels = _index(lab_dir, ".png", recursive=False)
        if not labels:
            raise DatasetError(f"aligned: no labels in {lab_dir}")
        self.scene_images: dict[str, dict[str, Path]] = {}
        for a in needed:
            imgs = _index(split_dir / a, ".png", recursive=False)
            missing = [k for k in labels if k not in imgs]
            if missing:
                raise DatasetError(
                    f"aligned: {len(missing)} of {len(labels)} scenes have no {a!r} image in {split_dir / a} "
                    f"(e.g. {_examples(missing)})"
                )
            orphans = [k for k in imgs if k not in labels]
            if orphans:
                raise DatasetError(
                    f"aligned: {len(orphans)} {a!r} images in {split_dir / a} have no label in {lab_dir} "
                    f"(e.g. {_examples(orphans)})"
                )
            for k in labels:
                self.scene_images.setdefault(k, {})[a] = imgs[k]
        scenes = sorted(labels)
        if self.train:
            return [Sample(k, self.scene_images[k][self.appearances[0]], labels[k]) for k in scenes]
        return [Sample(k, self.scene_images[k][a], labels[k], a) for k in scenes for a in self.appearances]

    def decode_label(self, path: Path) -> np.ndarray:
        return _apply_lut(_LABEL_FORMATS[self.label_format], _read_ids(path))

    def centroids(self, progress: bool = True) -> Centroids:
        if not self.train:
            raise DatasetError("aligned: class-uniform sampling is for training datasets")
        return super().centroids(progress)

    def _item(self, index: int, centroid: tuple[int, int] | None, rng: np.random.Generator) -> dict[str, Any]:
        if not self.train:
            return super()._item(index, centroid, rng)
        s = self.samples[index]
        label = self.decode_label(s.label)
        app = self.appearances[int(rng.integers(len(self.appearances)))]
        # Drawn in both pair modes, so that the crop, scale and flip drawn next are the same with jittered or with
        # aligned x_a: runs that differ only in the pair mode then see identical geometry (paired comparisons).
        pair_draw = float(rng.random())
        image = _read_rgb(self.scene_images[s.name][app])
        image_aug = None
        app_aug = None
        if self.pair_mode == "aligned":
            choices = [a for a in self.pair_appearances if a != app]
            if not choices:  # x drew the only pair appearance: swap roles so the pair stays two real appearances
                choices = [a for a in self.appearances if a != app]
            app_aug = choices[min(int(pair_draw * len(choices)), len(choices) - 1)]
            image_aug = _read_rgb(self.scene_images[s.name][app_aug])
            if image_aug.shape != image.shape:
                raise DatasetError(
                    f"aligned: {s.name}: {app!r} is {image.shape[:2]} but {app_aug!r} is {image_aug.shape[:2]}"
                )
        if image.shape[:2] != label.shape[:2]:
            raise DatasetError(f"aligned: {s.name}: image {image.shape[:2]} and label {label.shape[:2]} sizes differ")
        tensors = self.transform(image, label, rng, centroid=centroid, image_aug=image_aug)  # type: ignore[call-arg]
        item: dict[str, Any] = tensors  # the transform's tensors, then the names added below
        item["name"] = s.name
        item["appearance"] = app
        if app_aug is not None:
            item["appearance_aug"] = app_aug
        return item


# --------------------------------------------------------------------------------------------------------------------
# Registry and builders
# --------------------------------------------------------------------------------------------------------------------


class _Registry(dict):
    """A plain name -> class dict whose missing-key error lists the known names."""

    def __missing__(self, key: str) -> type:
        raise KeyError(f"unknown dataset {key!r}; known: {', '.join(sorted(self))}")


DATASETS: dict[str, type[SegmentationDataset]] = _Registry(
    gtav=GTAV,
    synthia=SYNTHIA,
    cityscapes=Cityscapes,
    bdd100k=BDD100K,
    mapillary=Mapillary,
    acdc=ACDC,
    dark_zurich=DarkZurich,
    aligned=AlignedAppearanceDataset,
)


def build_train_dataset(
    name: str,
    root: str | Path,
    split: str = "train",
    *,
    crop_size: int | Sequence[int] = 768,
    scale_range: Sequence[float] = (0.5, 2.0),
    flip: bool = True,
    class_uniform_pct: float = 0.5,
    class_uniform_tile: int = 1024,
    pair: str = "augment",
    cache_dir: str | Path | None = None,
    transform_factory: Callable[..., TrainTransform] = build_train_transform,
    centroid_crop: str = "original",
    **options: Any,
) -> SegmentationDataset:
    """A training dataset with the paper's transforms. ``pair``: ``augment`` (x_a = colour augmentation of x) or
    ``aligned`` (x_a = another real appearance; ``aligned`` datasets only). ``centroid_crop``: see
    :class:`TrainTransform`. ``options`` go to the dataset class (e.g. ``class_uniform_keep_size``)."""
    cls = DATASETS[name]
    if pair not in PAIR_MODES:
        raise ValueError(f"pair must be one of {PAIR_MODES}, got {pair!r}")
    if pair != "augment":
        if cls is not AlignedAppearanceDataset:
            raise ValueError(f"pair={pair!r} needs an aligned multi-appearance dataset, not {name!r}")
        options.setdefault("pair_mode", "aligned")
    transform = transform_factory(
        crop_size=crop_size,
        scale_min=float(scale_range[0]),
        scale_max=float(scale_range[1]),
        flip=flip,
        centroid_crop=centroid_crop,
    )
    return cls(
        root,
        split,
        train=True,
        transform=transform,
        class_uniform_pct=class_uniform_pct,
        class_uniform_tile=class_uniform_tile,
        cache_dir=cache_dir,
        **options,
    )


def build_eval_dataset(
    name: str, root: str | Path, split: str = "val", *, protocol: str = "clean", **options: Any
) -> SegmentationDataset:
    """An evaluation dataset (``{"image", "label", "name"}`` items, plus ``"appearance"``).

    ``protocol``: ``clean`` (full resolution, ImageNet-normalised; default) or ``original`` (the original's
    per-dataset quirks), see :func:`blindnet.data.transforms.build_eval_transform`.
    """
    transform = build_eval_transform(protocol, name)  # type: ignore[arg-type]
    return DATASETS[name](root, split, train=False, transform=transform, **options)
