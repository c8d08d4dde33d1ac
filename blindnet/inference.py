"""The one inference entry point: :class:`Predictor` owns pre- and post-processing; backends only run the network.

Serve, demo, benchmarks and ``blindnet segment`` all go through this module, so an image is decoded, batched,
padded, resized and coloured the same way everywhere. The backends (:mod:`blindnet.backends`) take ``N x H x W x 3``
uint8 batches of one size and return label maps (and logits when asked).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blindnet.backends.base import Backend
from blindnet.backends.select import make_backend
from blindnet.classes import class_names, class_shares, colorize, overlay
from blindnet.io import ImageError, load_image, to_rgb_uint8


@dataclass
class Prediction:
    """The result for one image, at the image's original size.

    Attributes:
        labels: ``H x W`` label map (uint8 for <= 256 classes).
        image: the ``H x W x 3`` uint8 RGB input (kept for overlays).
        probabilities: ``C x H x W`` float32 softmax scores, when requested.
        logits: ``C x H x W`` float32 scores, when requested.
        num_classes: number of classes of the model.
        source: path or name of the input, if known.
    """

    labels: np.ndarray
    image: np.ndarray
    num_classes: int = 19
    probabilities: np.ndarray | None = None
    logits: np.ndarray | None = None
    source: str | None = None

    def colorized(self) -> np.ndarray:
        """``H x W x 3`` Cityscapes-coloured label map."""
        return colorize(self.labels, self.num_classes)

    def overlay(self, alpha: float = 0.5) -> np.ndarray:
        """``H x W x 3`` blend of the colour map over the input (``alpha`` = label opacity)."""
        return overlay(self.image, self.labels, alpha, self.num_classes)

    def class_shares(self) -> dict[str, float]:
        """Pixel share of each class present, largest first."""
        return class_shares(self.labels, self.num_classes)


@dataclass
class PredictorStats:
    """Counters a caller can read after :meth:`Predictor.predict` (e.g. for a FPS summary)."""

    images: int = 0
    batches: int = 0
    seconds: float = 0.0
    #: seconds of the most recent batches (bounded, so a long-running server does not grow it forever)
    per_batch: deque[float] = field(default_factory=lambda: deque(maxlen=1024))


#: One image: a file path, an ``H x W x C`` array (see :func:`blindnet.io.to_rgb_uint8`), or a PIL image.
ImageInput = np.ndarray | str | Path | Image.Image


class Predictor:
    """Pre-processing, batching, a backend, and post-processing, in one object.

    Args:
        backend: any :class:`Backend`.
        input_size: ``(H, W)`` to resize every image to before the network (labels are resized back with nearest
            neighbour); None runs each image at its own size, batching images of equal size together.
        batch_size: the most images per backend call.
    """

    def __init__(self, backend: Backend, *, input_size: tuple[int, int] | None = None, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if input_size is None and backend.fixed_size is not None:
            input_size = backend.fixed_size
        if input_size is not None and (len(input_size) != 2 or min(input_size) < 1):
            raise ValueError(f"input_size must be (H, W) with positive sides, got {input_size}")
        self.backend = backend
        # a pair (checked above), as a tuple whatever sequence it came as
        self.input_size = (input_size[0], input_size[1]) if input_size is not None else None
        self.batch_size = batch_size
        self.num_classes = backend.num_classes
        self.class_names = class_names(self.num_classes)
        self.stats = PredictorStats()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | None = None,
        *,
        backend: str = "auto",
        device: str | None = None,
        input_size: tuple[int, int] | None = None,
        batch_size: int = 8,
        **backend_kwargs,
    ) -> Predictor:
        """Build a predictor for a checkpoint and a backend by name: ``Predictor.from_checkpoint("blindnet-r50-gtav")``.

        ``path`` is a file (checkpoint or exported model), a model name (``blindnet models``; fetched and cached on
        first use), or None for the shipped demo model. ``backend`` defaults to ``auto``, the same choice as the CLI
        (torch on CUDA; on CPU ONNX Runtime on a cached, parity-checked export when installed, else torch).
        ``backend_kwargs`` go to the backend (e.g. ``precision="bfloat16"``); unset, each backend uses its default.
        ``device`` None is the backend's default (CPU for torch and onnx; the machine's best for ``auto``).
        """
        if device is not None:
            backend_kwargs["device"] = device
        return cls(
            make_backend(backend, path, **backend_kwargs),
            input_size=input_size,
            batch_size=batch_size,
        )

    # ---- public API ---------------------------------------------------------------------------------------------

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        return_probabilities: bool = False,
        return_logits: bool = False,
    ) -> list[Prediction]:
        """Segment one image or many.

        Args:
            images: a path, a PIL image, an ``H x W x C`` array, an ``N x H x W x C`` array, or a list of those
                (arrays: uint8/uint16/float in [0, 1], grey, RGB or RGBA; PIL images in any mode, as RGB).
            return_probabilities: also return ``C x H x W`` softmax scores per image (memory: C floats per pixel).
            return_logits: also return ``C x H x W`` logits per image.

        Returns:
            One :class:`Prediction` per input image, in input order.
        """
        items = self._as_list(images)
        arrays = [self._load(item, i) for i, item in enumerate(items)]
        return self.predict_arrays(
            arrays,
            sources=[str(x) if isinstance(x, (str, Path)) else None for x in items],
            return_probabilities=return_probabilities,
            return_logits=return_logits,
        )

    def predict_one(self, image: ImageInput, **kwargs) -> Prediction:
        """Segment a single image."""
        return self.predict([image], **kwargs)[0]

    def predict_arrays(
        self,
        arrays: Sequence[np.ndarray],
        *,
        sources: Sequence[str | None] | None = None,
        return_probabilities: bool = False,
        return_logits: bool = False,
    ) -> list[Prediction]:
        """Segment already-decoded ``H x W x 3`` uint8 images (see :meth:`predict`)."""
        want_scores = return_probabilities or return_logits
        results: list[Prediction | None] = [None] * len(arrays)
        sources = list(sources) if sources is not None else [None] * len(arrays)
        for indices, batch in self._batches(arrays):
            t0 = time.perf_counter()
            out = self.backend.infer(batch, return_logits=want_scores)
            dt = time.perf_counter() - t0
            self.stats.images += len(indices)
            self.stats.batches += 1
            self.stats.seconds += dt
            self.stats.per_batch.append(dt)
            for j, idx in enumerate(indices):
                image = arrays[idx]
                net_h, net_w = self._network_size(image)  # before padding: crop the padding back off
                labels = self._restore_labels(_crop(out.labels[j], net_h, net_w), image.shape[:2])
                logits = probs = None
                if want_scores:
                    assert out.logits is not None, f"backend {self.backend.name} returned no logits"
                    logits = self._restore_scores(_crop(out.logits[j], net_h, net_w), image.shape[:2])
                    if return_probabilities:
                        probs = _softmax(logits)
                results[idx] = Prediction(
                    labels=labels,
                    image=image,
                    num_classes=self.num_classes,
                    probabilities=probs,
                    logits=logits if return_logits else None,
                    source=sources[idx],
                )
        return [r for r in results if r is not None]

    # ---- internals ----------------------------------------------------------------------------------------------

    @staticmethod
    def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
        if isinstance(images, (str, Path, Image.Image)):
            return [images]
        if isinstance(images, np.ndarray):
            if images.ndim == 4:
                return list(images)
            return [images]
        if isinstance(images, torch.Tensor):
            raise ImageError("pass numpy arrays (H x W x 3 uint8), not torch tensors")
        return list(images)

    @staticmethod
    def _load(item: ImageInput, index: int) -> np.ndarray:
        if isinstance(item, (str, Path)):
            return load_image(item)
        if isinstance(item, np.ndarray):
            return to_rgb_uint8(item, name=f"image {index}")
        if isinstance(item, Image.Image):
            # 16-bit grey keeps its range (to_rgb_uint8 scales it); palette, CMYK, alpha ... as the RGB they show.
            if item.mode.startswith("I;16"):
                return to_rgb_uint8(np.asarray(item, dtype=np.uint16), name=f"image {index}")
            return to_rgb_uint8(
                np.asarray(item if item.mode in ("RGB", "L") else item.convert("RGB")), name=f"image {index}"
            )
        raise ImageError(
            f"image {index}: unsupported input type {type(item).__name__} (give a path, a NumPy array or a PIL image)"
        )

    def _resize_in(self, image: np.ndarray) -> np.ndarray:
        if self.input_size is None or image.shape[:2] == self.input_size:
            return image
        import cv2

        h, w = self.input_size
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)

    def _network_size(self, image: np.ndarray) -> tuple[int, int]:
        """``(H, W)`` the network sees ``image`` at, before any padding: ``input_size`` or the image's own."""
        h, w = self.input_size if self.input_size is not None else image.shape[:2]
        return int(h), int(w)

    def padded_size(self, h: int, w: int) -> tuple[int, int]:
        """The ``(H, W)`` an ``h x w`` network input is padded to so that the backend can run it.

        Up to the backend's :attr:`~Backend.min_size`; and when both sides are <= :attr:`~Backend.norm_stride` (the
        deepest InstanceNorm would see one pixel) up to ``norm_stride + 1`` on both. Inputs the network runs as they
        are stay as they are, so their labels are exactly the unpadded network's.
        """
        min_h, min_w = self.backend.min_size
        h, w = max(h, min_h), max(w, min_w)
        s = self.backend.norm_stride
        if s and h <= s and w <= s:
            h = w = s + 1
        return h, w

    def _pad(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        ph, pw = self.padded_size(h, w)
        if (ph, pw) == (h, w):
            return image
        # Bottom/right only, so pixel (0, 0) stays on the network's stride grid and the crop is [:h, :w]; repeating
        # the border keeps the padding's statistics close to the image's own (InstanceNorm normalises over both).
        return np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")

    def _batches(self, arrays: Sequence[np.ndarray]) -> Iterable[tuple[list[int], np.ndarray]]:
        """Group images by (padded network input) shape, in order of first appearance, ``batch_size`` at a time."""
        groups: dict[tuple[int, ...], list[int]] = {}
        resized = [self._pad(self._resize_in(a)) for a in arrays]
        for i, a in enumerate(resized):
            groups.setdefault(a.shape, []).append(i)
        for idxs in groups.values():
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start : start + self.batch_size]
                yield chunk, np.stack([resized[i] for i in chunk])

    def _restore_labels(self, labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if labels.shape == tuple(size):
            return labels
        import cv2

        return cv2.resize(labels, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)

    def _restore_scores(self, scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if scores.shape[1:] == tuple(size):
            return scores
        t = torch.from_numpy(np.ascontiguousarray(scores))[None]
        t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
        return t[0].numpy()


def _crop(scores: np.ndarray, h: int, w: int) -> np.ndarray:
    """The top-left ``h x w`` of an ``H x W`` label map or ``C x H x W`` score array (a copy only when cropped)."""
    if scores.shape[-2:] == (h, w):
        return scores
    return np.ascontiguousarray(scores[..., :h, :w])


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=0, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)
