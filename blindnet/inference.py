"""The one inference entry point: :class:`Predictor` owns pre- and post-processing; backends only run the network.

Serve, demo, benchmarks and ``blindnet segment`` all go through this module, so an image is normalised, batched,
resized and coloured the same way everywhere.

A backend receives a batch of RGB uint8 images ``N x H x W x 3`` (all the same size) and returns
:class:`BackendOutput`: label maps ``N x H x W`` and, when asked, float32 logits ``N x C x H x W``. Normalisation with
ImageNet mean/std is the backend's job, so that a GPU backend can upload uint8 and normalise on the device, and an
exported engine can do it in-graph.
"""

from __future__ import annotations

import abc
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from blindnet.classes import class_names, class_shares, colorize, overlay

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ImageError(ValueError):
    """An input could not be turned into an RGB uint8 image; the message says which input and why."""


class ImageTooLargeError(ImageError):
    """An encoded image declares more pixels than allowed (refused from its header, before any pixel is decoded)."""


# --------------------------------------------------------------------------------------------------------------------
# Image input
# --------------------------------------------------------------------------------------------------------------------


def to_rgb_uint8(image: np.ndarray, *, name: str = "image") -> np.ndarray:
    """Convert an array to ``H x W x 3`` uint8 RGB.

    Accepts grayscale ``H x W`` / ``H x W x 1``, RGB, RGBA (alpha dropped), uint8, uint16 (scaled by 1/257), bool,
    and float images in ``[0, 1]``. Anything else raises :class:`ImageError`.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"{name}: expected an H x W, H x W x 1, x 3 or x 4 image, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"{name}: empty image of shape {arr.shape}")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError(f"{name}: float image contains NaN or Inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(f"{name}: float images must lie in [0, 1], found values in [{lo:.3g}, {hi:.3g}]")
        arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"{name}: unsupported pixel type {arr.dtype}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def decode_image(
    data: bytes, *, name: str = "upload", max_pixels: int | None = None, formats: Sequence[str] | None = None
) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, ...) to ``H x W x 3`` uint8 RGB; bad or truncated data raises.

    Args:
        data: the encoded file.
        name: how error messages call the input.
        max_pixels: refuse (:class:`ImageTooLargeError`) an image whose header declares more ``H*W`` than this,
            before decoding any pixel.
        formats: Pillow format names to try (e.g. ``("PNG", "JPEG")``); None tries every format Pillow knows. A
            restricted list keeps container formats (ICO, ...), whose header size need not match what they decode to,
            away from the pixel check.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data), formats=list(formats) if formats is not None else None) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageTooLargeError(
                    f"{name}: image of {img.width}x{img.height} = {img.width * img.height} pixels exceeds the "
                    f"limit of {max_pixels}"
                )
            img.load()  # the current (first) frame only, of the size checked above
            arr = _pil_to_array(img)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a recognised image format") from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: {exc}") from exc
    except Exception as exc:
        # Pillow's decoders raise many types on hostile bytes (OSError, SyntaxError, struct.error, IndexError, ...);
        # all of them mean the file is unusable.
        raise ImageError(f"{name}: corrupt or truncated image ({type(exc).__name__}: {exc})") from exc
    return to_rgb_uint8(arr, name=name)


def load_image(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as ``H x W x 3`` uint8 RGB, with a clear error for missing, corrupt or odd files."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory")
    return decode_image(path.read_bytes(), name=str(path), max_pixels=max_pixels)


def _pil_to_array(img) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.uint16)
    if img.mode == "I":  # 32-bit integer PNGs (often 16-bit data)
        arr = np.asarray(img)
        return arr.astype(np.uint16) if arr.max() < 65536 else (arr >> 16).astype(np.uint16)
    if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1", "F"):
        img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
    if img.mode == "LA":
        img = img.convert("RGBA")
    return np.asarray(img)


# --------------------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class BackendOutput:
    """Network output for a batch: ``labels`` ``N x H x W`` (uint8, or int32 for > 255 classes) and optional float32
    ``logits`` ``N x C x H x W``."""

    labels: np.ndarray
    logits: np.ndarray | None = None


class Backend(abc.ABC):
    """Runs the network on a batch of same-size RGB uint8 images. Implementations: torch, ONNX Runtime, TensorRT."""

    name: str = "backend"
    num_classes: int = 19
    #: fixed ``(H, W)`` the backend needs (an engine built for one shape), or None for any size
    fixed_size: tuple[int, int] | None = None
    #: stride of the network's deepest InstanceNorm: an input whose sides are both <= it reaches that layer as one
    #: pixel, which cannot be normalised, so the Predictor pads such inputs (0: the network has no such layer)
    norm_stride: int = 16
    #: smallest ``(H, W)`` the backend runs (an exported graph's or engine's lower bound); the Predictor pads up to it
    min_size: tuple[int, int] = (1, 1)

    @abc.abstractmethod
    def infer(self, images: np.ndarray, *, return_logits: bool = False) -> BackendOutput:
        """``images``: ``N x H x W x 3`` uint8 -> :class:`BackendOutput`."""

    def describe(self) -> dict[str, str]:
        """Short facts for logs and benchmark rows."""
        return {"backend": self.name}


#: Stride of the deepest InstanceNorm of each BlindNet encoder (ResNet-50: stem, layer1, layer2 at /2, /4, /8;
#: MobileNetV2 and ShuffleNetV2: the last one at /16).
NORM_STRIDES = {"resnet50": 8, "mobilenetv2": 16, "shufflenetv2": 16}


def norm_stride_of(model_config: object) -> int:
    """:attr:`Backend.norm_stride` for a model config (a ``ModelConfig`` or its dict); 16 when it cannot tell."""
    get = model_config.get if isinstance(model_config, dict) else lambda k, d=None: getattr(model_config, k, d)
    if get("instance_norm", True) is False:
        return 0
    return NORM_STRIDES.get(str(get("backbone", "")), 16)


def _labels_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.int32)


class TorchBackend(Backend):
    """PyTorch eager (optionally ``torch.compile``) on CPU or CUDA, float32/float16/bfloat16, channels_last."""

    name = "torch"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: str | torch.device = "cpu",
        precision: str = "float32",
        channels_last: bool = False,
        compile: bool | str = False,
    ) -> None:
        if precision not in DTYPES:
            raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(DTYPES)}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available on this machine")
        if self.device.type == "cpu" and precision == "float16":
            raise ValueError("float16 inference is not supported on CPU; use float32 or bfloat16")
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.channels_last = channels_last
        self.model = model.eval().to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.num_classes = int(getattr(getattr(model, "config", None), "num_classes", 19))
        self.norm_stride = norm_stride_of(getattr(model, "config", None))
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255.0
        self._run = self.model
        if compile:
            mode = compile if isinstance(compile, str) else None
            self._run = torch.compile(self.model, mode=mode)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> TorchBackend:
        from blindnet.checkpoint import load_model

        return cls(load_model(path), **kwargs)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """``N x H x W x 3`` uint8 -> normalised ``N x 3 x H x W`` tensor on the device (channels_last if set)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        x = (x - self._mean) / self._std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.inference_mode()
    def infer(self, images: np.ndarray, *, return_logits: bool = False) -> BackendOutput:
        x = self.preprocess(images)
        use_autocast = self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=use_autocast):
            logits = self._run(x)
        labels = logits.argmax(1).to(torch.uint8 if self.num_classes <= 256 else torch.int32).cpu().numpy()
        out = BackendOutput(labels=labels)
        if return_logits:
            out.logits = logits.float().cpu().numpy()
        return out

    def describe(self) -> dict[str, str]:
        return {
            "backend": self.name,
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": str(self.channels_last),
        }


# --------------------------------------------------------------------------------------------------------------------
# Predictor
# --------------------------------------------------------------------------------------------------------------------


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


ImageInput = np.ndarray | str | Path


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
        self.input_size = tuple(input_size) if input_size is not None else None
        self.batch_size = batch_size
        self.num_classes = backend.num_classes
        self.class_names = class_names(self.num_classes)
        self.stats = PredictorStats()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | None = None,
        *,
        backend: str = "torch",
        device: str | None = None,
        input_size: tuple[int, int] | None = None,
        batch_size: int = 8,
        **backend_kwargs,
    ) -> Predictor:
        """Build a predictor for a checkpoint (the shipped default when ``path`` is None) and a backend by name.

        ``backend_kwargs`` go to the backend (e.g. ``precision="bfloat16"``); unset, each backend uses its default.
        ``device`` None is the backend's default (CPU for torch and onnx; the machine's best for ``auto``).
        """
        from blindnet.backends import make_backend

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
            images: an ``H x W x C`` array, an ``N x H x W x C`` array, a path, or a list of arrays/paths.
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
        if isinstance(images, (str, Path)):
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
        raise ImageError(f"image {index}: unsupported input type {type(item).__name__}")

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
