"""Joint (image, label) transforms of the original BlindNet recipe (``docs/original_implementation.md``, "Training
recipe"), in numpy/cv2, driven by an explicit ``np.random.Generator`` so that an item's augmentation is a pure
function of its seed.

Geometry (shared by x, x_a and the label):
  1. random rescale ``s ~ U(scale_min, scale_max)`` of the full image (bicubic image, nearest label);
  2. pad to at least the crop size (image 0 = black before normalisation, label 255), centred;
  3. random crop; for class-uniform items the crop is placed around the chosen class centroid: by default as the
     original (offset drawn in ``[c - crop, c]`` and clipped into the image, so crops pile up at the image border),
     or ``centroid_crop="uniform"`` (uniform among the crops that contain the centroid);
  4. horizontal flip with p = 0.5.

Photometric (independent per view, both from the same cropped image):
  * x:   with p = 0.5 ColorJitter(0.4, 0.4, 0.4, 0.1), then Gaussian blur sigma ~ U(0.15, 1.3);
  * x_a: ColorJitter(0.8, 0.8, 0.8, 0.3) always, then Gaussian blur (the "augment" pair), or, when a real aligned
    appearance is given, that appearance with the weak x photometric;
then ToTensor + ImageNet normalisation (:func:`blindnet.backends.base.normalize`).

ColorJitter follows torchvision's definition (factors b, c, s ~ U(max(0, 1-v), 1+v), hue ~ U(-h, h), the four ops in a
random order, contrast against the mean grey level, values clamped to [0, 1]). The blur follows the original
``skimage.filters.gaussian`` call (truncate 4, edge-replicate border, result truncated to uint8).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast, get_args

import cv2
import numpy as np
import torch

from blindnet.models.inputs import normalize as imagenet_normalize

IGNORE_INDEX = 255
_GRAY = np.asarray([0.299, 0.587, 0.114], np.float32)  # torchvision rgb_to_grayscale weights


def to_tensor(image: np.ndarray, normalize: bool = True) -> torch.Tensor:
    """``H x W x 3`` uint8 RGB -> float32 ``3 x H x W`` tensor in [0, 1], ImageNet-normalised unless told not to."""
    x = imagenet_normalize(image[None])[0] if normalize else image.astype(np.float32) * (1.0 / 255.0)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def label_to_tensor(label: np.ndarray) -> torch.Tensor:
    """``H x W`` uint8 train ids -> int64 ``H x W`` tensor (255 = ignore)."""
    return torch.from_numpy(np.ascontiguousarray(label)).long()


# --------------------------------------------------------------------------------------------------------------------
# Photometric
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColorJitter:
    """torchvision-style colour jitter on ``H x W x 3`` uint8 RGB with an explicit generator."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x: np.ndarray = image.astype(np.float32) * (1.0 / 255.0)
        ops = []
        if self.brightness > 0:
            ops.append(("b", rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness)))
        if self.contrast > 0:
            ops.append(("c", rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast)))
        if self.saturation > 0:
            ops.append(("s", rng.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation)))
        if self.hue > 0:
            ops.append(("h", rng.uniform(-self.hue, self.hue)))
        for j in rng.permutation(len(ops)):
            kind, f = ops[j]
            if kind == "b":
                x = x * f
            elif kind == "c":
                mean = float((x @ _GRAY).mean())
                x = x * f + mean * (1 - f)
            elif kind == "s":
                gray = (x @ _GRAY)[:, :, None]
                x = x * f + gray * (1 - f)
            else:
                hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # float input: H in [0, 360)
                hsv[:, :, 0] = np.mod(hsv[:, :, 0] + f * 360.0, 360.0)
                x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
            np.clip(x, 0.0, 1.0, out=x)
        return (x * 255.0 + 0.5).astype(np.uint8)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of ``H x W x C`` uint8 like ``skimage.filters.gaussian`` (truncate 4, 'nearest' border)."""
    radius = int(4.0 * sigma + 0.5)
    k = 2 * radius + 1
    out = cv2.GaussianBlur(image.astype(np.float32), (k, k), sigma, borderType=cv2.BORDER_REPLICATE)
    return out.astype(np.uint8)  # truncation, as the original's ``(x * 255).astype(uint8)``


# --------------------------------------------------------------------------------------------------------------------
# Joint transforms
# --------------------------------------------------------------------------------------------------------------------


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(v) for v in size)
    return h, w


@dataclass(frozen=True)
class TrainTransform:
    """The training recipe; call it as ``t(image, label, rng, centroid=..., image_aug=...)``.

    Attributes:
        crop_size: ``(H, W)`` of the crop.
        scale_min, scale_max: rescale range.
        flip: random horizontal flip.
        jitter, jitter_p: x's ColorJitter (brightness, contrast, saturation, hue) and its probability.
        aug_jitter: x_a's ColorJitter (always applied).
        blur: Gaussian blur on both views; ``blur_sigma`` its sigma range.
        centroid_crop: where a class-uniform crop lands around its centroid ``c`` (per axis): ``"original"``
            draws the offset uniformly in ``[c - crop, c]`` and clips it into the image, as the original (near a border
            most draws clip to the border; at ``c - crop`` the centroid sits one pixel outside the crop);
            ``"uniform"`` draws uniformly among the crops that contain ``c``.
    """

    crop_size: tuple[int, int] = (768, 768)
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.5
    aug_jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.3)
    blur: bool = True
    blur_sigma: tuple[float, float] = (0.15, 1.3)
    ignore_index: int = IGNORE_INDEX
    centroid_crop: Literal["original", "uniform"] = "original"

    def __post_init__(self) -> None:
        if self.centroid_crop not in ("original", "uniform"):
            raise ValueError(f"centroid_crop must be 'original' or 'uniform', got {self.centroid_crop!r}")

    def geometry(
        self,
        image: np.ndarray,
        label: np.ndarray,
        rng: np.random.Generator,
        *,
        centroid: tuple[int, int] | None = None,
        extra: Sequence[np.ndarray] = (),
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Rescale, pad, crop (containing ``centroid`` = (row, col) in input pixels when given) and flip.

        ``image`` ``H x W x 3`` uint8, ``label`` ``H x W`` uint8, ``extra`` more ``H x W x 3`` images aligned with
        ``image`` (they get the identical geometry). Returns ``crop_h x crop_w`` arrays.
        """
        if image.shape[:2] != label.shape[:2]:
            raise ValueError(f"image {image.shape[:2]} and label {label.shape[:2]} sizes differ")
        ch, cw = self.crop_size
        h, w = label.shape
        s = float(rng.uniform(self.scale_min, self.scale_max))
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        imgs = [image, *extra]
        if (nh, nw) != (h, w):
            imgs = [cv2.resize(im, (nw, nh), interpolation=cv2.INTER_CUBIC) for im in imgs]
            label = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST)
        ph, pw = max(ch - nh, 0), max(cw - nw, 0)
        top, left = ph // 2, pw // 2
        if ph or pw:
            imgs = [
                cv2.copyMakeBorder(im, top, ph - top, left, pw - left, cv2.BORDER_CONSTANT, value=(0, 0, 0))
                for im in imgs
            ]
            label = cv2.copyMakeBorder(
                label, top, ph - top, left, pw - left, cv2.BORDER_CONSTANT, value=self.ignore_index
            )
        H, W = label.shape
        if centroid is not None:
            cy = min(max(int(centroid[0] * nh / h) + top, 0), H - 1)
            cx = min(max(int(centroid[1] * nw / w) + left, 0), W - 1)
            y0, x0 = self._centroid_offset(cy, ch, H, rng), self._centroid_offset(cx, cw, W, rng)
        else:
            y0 = int(rng.integers(0, H - ch + 1))
            x0 = int(rng.integers(0, W - cw + 1))
        imgs = [im[y0 : y0 + ch, x0 : x0 + cw] for im in imgs]
        label = label[y0 : y0 + ch, x0 : x0 + cw]
        if self.flip and rng.random() < 0.5:
            imgs = [im[:, ::-1] for im in imgs]
            label = label[:, ::-1]
        imgs = [np.ascontiguousarray(im) for im in imgs]
        return imgs[0], np.ascontiguousarray(label), imgs[1:]

    def _centroid_offset(self, c: int, size: int, full: int, rng: np.random.Generator) -> int:
        """Start of a crop of ``size`` (of ``full``) around centroid coordinate ``c``, per :attr:`centroid_crop`."""
        if self.centroid_crop == "original":
            return min(max(int(rng.integers(c - size, c + 1)), 0), full - size)
        return int(rng.integers(max(0, c - size + 1), min(c, full - size) + 1))

    def weak(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """x's photometric: ColorJitter(0.4, 0.4, 0.4, 0.1) with p = jitter_p, then blur."""
        if self.jitter_p > 0 and rng.random() < self.jitter_p:
            image = ColorJitter(*self.jitter)(image, rng)
        if self.blur:
            image = gaussian_blur(image, float(rng.uniform(*self.blur_sigma)))
        return image

    def strong(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """x_a's photometric: ColorJitter(0.8, 0.8, 0.8, 0.3) always, then blur."""
        image = ColorJitter(*self.aug_jitter)(image, rng)
        if self.blur:
            image = gaussian_blur(image, float(rng.uniform(*self.blur_sigma)))
        return image

    def __call__(
        self,
        image: np.ndarray,
        label: np.ndarray,
        rng: np.random.Generator,
        *,
        centroid: tuple[int, int] | None = None,
        image_aug: np.ndarray | None = None,
    ) -> dict[str, torch.Tensor]:
        """-> ``{"image": 3 x h x w float32, "image_aug": 3 x h x w float32, "label": h x w int64}``.

        ``image_aug`` is a real aligned appearance of the same scene (same size as ``image``); without it x_a is the
        strong colour augmentation of x's crop.
        """
        x, y, extra = self.geometry(
            image, label, rng, centroid=centroid, extra=() if image_aug is None else (image_aug,)
        )
        if image_aug is None:
            xa = self.strong(x, rng)
        else:
            xa = self.weak(extra[0], rng)
        x = self.weak(x, rng)
        return {"image": to_tensor(x), "image_aug": to_tensor(xa), "label": label_to_tensor(y)}


EvalProtocol = Literal["clean", "original", "unnormalised"]
EVAL_PROTOCOLS: tuple[str, ...] = get_args(EvalProtocol)


@dataclass(frozen=True)
class EvalTransform:
    """Evaluation items ``{"image": 3 x H' x W' float32, "label": H' x W' int64}``, no augmentation.

    The defaults are the clean protocol: full resolution, ImageNet normalisation. The other fields express the
    original's per-dataset quirks (see :func:`build_eval_transform`).

    Attributes:
        normalize: ImageNet mean/std normalisation (False: plain [0, 1] values).
        resize_height: first resize to this height keeping the aspect ratio (image bicubic, label nearest).
        center_crop: then a ``center_crop x center_crop`` centre crop, padding narrower/shorter images the way the
            original's ``CenterCropPad`` does: the crop offset is computed from the *unpadded* size, so a portrait
            image's content is shifted and the columns left of it are filled with image 0 and label ``pad_label``.
        pad_label: label of padded/out-of-image pixels in that crop (the original: 0 = road).
    """

    normalize: bool = True
    resize_height: int | None = None
    center_crop: int | None = None
    pad_label: int = 0

    def __call__(self, image: np.ndarray, label: np.ndarray) -> dict[str, torch.Tensor]:
        if image.shape[:2] != label.shape[:2]:
            raise ValueError(f"image {image.shape[:2]} and label {label.shape[:2]} sizes differ")
        if self.resize_height is not None:
            h, w = label.shape
            nw = int(w / h * self.resize_height)
            image = cv2.resize(image, (nw, self.resize_height), interpolation=cv2.INTER_CUBIC)
            # NEAREST_EXACT samples pixel centres like PIL's nearest resize (plain NEAREST is shifted by half a pixel).
            label = cv2.resize(label, (nw, self.resize_height), interpolation=cv2.INTER_NEAREST_EXACT)
        if self.center_crop is not None:
            image = _center_crop_pad(image, self.center_crop, 0)
            label = _center_crop_pad(label, self.center_crop, self.pad_label)
        return {"image": to_tensor(image, self.normalize), "label": label_to_tensor(label)}


def _center_crop_pad(arr: np.ndarray, size: int, fill: int) -> np.ndarray:
    """The original's ``CenterCropPad(size)``: pad by ``size - w`` (``size - h``) on *both* sides where smaller, then
    crop ``size x size`` at ``round((w - size) / 2)`` of the unpadded width (height), filling outside pixels with 0.

    ``arr``: ``H x W`` or ``H x W x C``. Returns ``size x size`` (x C).
    """
    h, w = arr.shape[:2]
    pad_y, pad_x = max(size - h, 0), max(size - w, 0)
    widths = [(pad_y, pad_y), (pad_x, pad_x)] + [(0, 0)] * (arr.ndim - 2)
    padded = np.pad(arr, widths, constant_values=fill)
    y1, x1 = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    out = np.zeros((size, size, *arr.shape[2:]), arr.dtype)  # PIL fills a crop outside the image with 0
    ph, pw = padded.shape[:2]
    ys, xs = max(y1, 0), max(x1, 0)
    ye, xe = min(y1 + size, ph), min(x1 + size, pw)
    if ye > ys and xe > xs:
        out[ys - y1 : ye - y1, xs - x1 : xe - x1] = padded[ys:ye, xs:xe]
    return out


def build_train_transform(
    crop_size: int | Sequence[int] = 768,
    scale_min: float = 0.5,
    scale_max: float = 2.0,
    flip: bool = True,
    jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
    jitter_p: float = 0.5,
    aug_jitter: Sequence[float] = (0.8, 0.8, 0.8, 0.3),
    blur: bool = True,
    blur_sigma: Sequence[float] = (0.15, 1.3),
    centroid_crop: Literal["original", "uniform"] = "original",
) -> TrainTransform:
    """The paper's training transform. ``crop_size`` is an int or ``(H, W)``; see :class:`TrainTransform`."""
    if not 0 < scale_min <= scale_max:
        raise ValueError(f"need 0 < scale_min <= scale_max, got {scale_min}, {scale_max}")
    return TrainTransform(
        _pair(crop_size),
        float(scale_min),
        float(scale_max),
        bool(flip),
        # the lengths are not checked here: ColorJitter takes four factors, the blur range is two sigmas
        cast("tuple[float, float, float, float]", tuple(jitter)),
        float(jitter_p),
        cast("tuple[float, float, float, float]", tuple(aug_jitter)),
        bool(blur),
        cast("tuple[float, float]", tuple(blur_sigma)),
        centroid_crop=centroid_crop,
    )


def build_eval_transform(protocol: EvalProtocol = "clean", dataset: str | None = None) -> EvalTransform:
    """The evaluation transform of ``protocol`` for ``dataset`` (a key of ``blindnet.data.DATASETS``).

    * ``clean`` (default): every dataset at full resolution with ImageNet normalisation, the same input statistics
      the network was trained on.
    * ``original``: what the original evaluation did, for like-for-like comparisons with published numbers:
      Cityscapes un-normalised ([0, 1] inputs: its Cityscapes dataset class had the normalisation commented out);
      Mapillary resized to height 1024 and centre-cropped to 1024 x 1024 (portrait images padded with label 0);
      every other dataset as ``clean``.
    * ``unnormalised``: the original's Cityscapes input quirk ([0, 1] values, no ImageNet normalisation) on every
      dataset, to measure on any data what that quirk does to a model (a network with an InstanceNorm right after
      its first convolution is nearly blind to a per-channel affine change of its input; a plain one is not).
    """
    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; choose one of {list(EVAL_PROTOCOLS)}")
    if protocol == "unnormalised" or (protocol == "original" and dataset == "cityscapes"):
        return EvalTransform(normalize=False)
    if protocol == "original" and dataset == "mapillary":
        return EvalTransform(resize_height=1024, center_crop=1024, pad_label=0)
    return EvalTransform()
