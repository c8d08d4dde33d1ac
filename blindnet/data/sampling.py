"""Class-uniform sampling of the original recipe (``docs/original_implementation.md``, "Sampling").

Every image's label is cut into ``tile x tile`` tiles; for each tile and each class present in it, the centre of mass
of that class's pixels is a *centroid*. An epoch of ``N`` items holds ``int(N * pct / C)`` items per class drawn
from that class's centroid list, the rest are uniformly drawn images, all shuffled. A class-uniform item's crop is
forced to contain its centroid (see :class:`blindnet.data.transforms.TrainTransform`).

When a class has no centroid at all, its share of the epoch is dropped and the epoch is shorter, as in the original
(``keep_size=True`` fills that share with uniformly drawn images instead, keeping the epoch at ``N`` items).

Deviation, on purpose: the original only used *full* tiles (a 1914x1052 GTAV image contributes its top-left 1024x1024
tile only); here tiles at the right/bottom edges are kept too, so the whole image is indexed.

Everything is a pure function of ``(seed, epoch)``: a resumed run sees the same item list. Items are keys:
``int`` (uniform image index) or :class:`SampleKey` ``(index, class_id, row, col)``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from torch.utils.data import Sampler

NUM_CLASSES = 19


class SampleKey(NamedTuple):
    """A class-uniform item: image ``index`` whose crop must contain pixel ``(row, col)`` of class ``class_id``."""

    index: int  # type: ignore[assignment]  # the field shadows tuple.index: keys are read by name
    class_id: int
    row: int
    col: int


Centroids = list[list[tuple[int, int, int]]]  # per class: [(image index, row, col), ...]


def label_centroids(
    label: np.ndarray, tile: int = 1024, num_classes: int = NUM_CLASSES
) -> dict[int, list[tuple[int, int]]]:
    """Per class present in ``label`` (``H x W`` train ids), the (row, col) centre of mass inside each tile."""
    out: dict[int, list[tuple[int, int]]] = {}
    h, w = label.shape
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            t = label[y0 : y0 + tile, x0 : x0 + tile]
            counts = np.bincount(t.ravel(), minlength=256)[:num_classes]
            for c in np.flatnonzero(counts):
                ys, xs = np.nonzero(t == c)
                out.setdefault(int(c), []).append((int(ys.mean()) + y0, int(xs.mean()) + x0))
    return out


def build_centroids(
    load_label: Callable[[int], np.ndarray],
    num_images: int,
    *,
    tile: int = 1024,
    num_classes: int = NUM_CLASSES,
    cache_file: str | Path | None = None,
    progress: bool = True,
) -> Centroids:
    """Centroid lists for all images; read from / written to ``cache_file`` (JSON) when given.

    ``load_label(i)`` returns image ``i``'s ``H x W`` train-id label. The cache is written atomically.
    """
    if cache_file is not None and Path(cache_file).is_file():
        data = json.loads(Path(cache_file).read_text())
        if data.get("num_images") == num_images and data.get("tile") == tile:
            return [[tuple(e) for e in lst] for lst in data["centroids"]]
    from tqdm import tqdm

    cents: Centroids = [[] for _ in range(num_classes)]
    for i in tqdm(range(num_images), desc="class centroids", unit="img", disable=not progress):
        for c, pts in label_centroids(load_label(i), tile, num_classes).items():
            cents[c].extend((i, r, q) for r, q in pts)
    if cache_file is not None:
        path = Path(cache_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"num_images": num_images, "tile": tile, "centroids": cents}))
        os.replace(tmp, path)
    return cents


def cache_name(dataset: str, split: str, names: Sequence[str], tile: int) -> str:
    """Cache file name that changes whenever the image list changes (so a stale index is never reused)."""
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:12]
    return f"{dataset}_{split}_tile{tile}_{digest}.json"


def class_uniform_epoch_size(num_images: int, centroids: Centroids | None, pct: float, keep_size: bool = False) -> int:
    """Number of items :func:`class_uniform_epoch` returns (known without drawing anything)."""
    if keep_size or centroids is None or pct <= 0:
        return num_images
    per_class = int(num_images * pct / len(centroids))
    return num_images - per_class * sum(1 for lst in centroids if not lst)


def class_uniform_epoch(
    num_images: int,
    centroids: Centroids | None,
    pct: float,
    seed: int,
    epoch: int,
    keep_size: bool = False,
) -> list[int | SampleKey]:
    """The item keys of one epoch, a pure function of ``(seed, epoch)``.

    ``num_images - per_class * C`` uniformly drawn images plus ``per_class = int(N * pct / C)`` centroid items of
    every class that has centroids; a class without centroids adds nothing, so the epoch is shorter than
    ``num_images`` (the original's rule), unless ``keep_size``, where uniform images take that share.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0xC1A55])
    keys: list[int | SampleKey] = []
    rest = num_images
    if centroids is not None and pct > 0:
        per_class = int(num_images * pct / len(centroids))
        rest = num_images - per_class * len(centroids)
        for c, lst in enumerate(centroids):
            if not lst or per_class == 0:
                continue
            # without replacement while the list is long enough, like the original's random_sampling
            reps = -(-per_class // len(lst))
            pick = np.concatenate([rng.permutation(len(lst)) for _ in range(reps)])[:per_class]
            keys.extend(SampleKey(int(lst[j][0]), c, int(lst[j][1]), int(lst[j][2])) for j in pick)
    if keep_size:
        rest = num_images - len(keys)
    if rest > 0:
        keys.extend(int(i) for i in rng.permutation(num_images)[:rest])
    order = rng.permutation(len(keys))
    return [keys[j] for j in order]


class ClassUniformSampler(Sampler):
    """Epoch-wise sampler over keys of :func:`class_uniform_epoch`, optionally sharded across ranks.

    ``set_epoch(epoch, start=k)`` makes the next iteration produce epoch ``epoch`` from global position ``k`` (to
    resume mid-epoch). The global list is cut to a multiple of ``num_replicas`` and rank ``r`` takes positions
    ``r, r + R, ...``, so the union over ranks of the first ``B`` positions is the same for every world size.
    Yields ``(key, item_seed)`` pairs; datasets accept them in ``__getitem__``.
    """

    def __init__(
        self,
        num_images: int,
        centroids: Centroids | None = None,
        class_uniform_pct: float = 0.5,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        keep_size: bool = False,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.num_images, self.centroids, self.pct = num_images, centroids, class_uniform_pct
        self.keep_size = keep_size
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def epoch_keys(self, epoch: int) -> list[int | SampleKey]:
        return class_uniform_epoch(self.num_images, self.centroids, self.pct, self.seed, epoch, self.keep_size)

    def _total(self) -> int:
        size = class_uniform_epoch_size(self.num_images, self.centroids, self.pct, self.keep_size)
        return (size // self.num_replicas) * self.num_replicas

    def __len__(self) -> int:
        return max(0, self._total() - self.start) // self.num_replicas

    def __iter__(self) -> Iterator[tuple[int | SampleKey, int]]:
        keys = self.epoch_keys(self.epoch)[: self._total()]
        for pos in range(self.start + self.rank, len(keys), self.num_replicas):
            yield keys[pos], item_seed(self.seed, self.epoch, pos)


def item_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of the item at ``position`` of ``epoch`` (SeedSequence mixing: neighbouring items are uncorrelated)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(position)]).generate_state(1)[0])
