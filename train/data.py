"""Glue between the training loop and ``blindnet.data``: dataset construction from the config, synthetic-data
generation, and a data stream that is a pure function of (seed, step).

Exact resume needs two things from the data side, both provided here rather than by the datasets:

* **order**: :class:`StepBatchSampler` derives every epoch's item list from ``(seed, epoch)`` only and can start at
  any step, so a resumed run reads the same batches an uninterrupted one would;
* **augmentation**: :class:`SeededItems` reseeds ``random``/``numpy``/``torch`` from ``(seed, epoch, position)``
  before each item, so an item's crop, flip and colour jitter do not depend on which worker loads it or on what that
  worker loaded before.

The global batch of step ``s`` is the same set of items whatever the world size; rank ``r`` of ``W`` takes the
``r``-th contiguous ``B / W`` slice (so a 2-process run sees exactly the batches of a 1-process run).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import ConcatDataset, Dataset, Sampler, get_worker_info

from blindnet import data
from blindnet.config import ConfigError
from blindnet.data import DATASETS
from blindnet.data.synthetic import write_aligned_dataset
from blindnet.train.config import DatasetSpec, TrainConfig
from blindnet.train.distributed import DistInfo


# ---- seeded items -------------------------------------------------------------------------------------------------
def item_seed(seed: int, epoch: int, position: int) -> int:
    """A well-mixed 63-bit seed for one item of one epoch (SeedSequence avoids correlated neighbouring seeds)."""
    s = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, position]).generate_state(2, dtype=np.uint32)
    return int((int(s[0]) << 31) ^ int(s[1]))


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # In a worker process the global RNGs belong to the worker; in the main process (num_workers=0) they also drive
    # the losses' sampling, so they are restored afterwards to keep that stream independent of data loading.
    in_main = get_worker_info() is None
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if in_main else None
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class SeededItems(Dataset):
    """Wraps a dataset so that ``ds[(key, seed)]`` loads ``dataset[key]`` with every global RNG seeded by ``seed``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[Any, int]) -> dict[str, Any]:
        index, seed = key
        with _seeded(seed):
            if hasattr(self.dataset, "get_seeded"):
                return self.dataset.get_seeded(index, seed)
            return self.dataset[index]


# ---- the training source ------------------------------------------------------------------------------------------
@dataclass
class TrainSource:
    """The training dataset and the rule that lists one epoch's item keys.

    ``epoch_keys(epoch)`` must depend only on ``(seed, epoch)``: class-uniform sampling redraws per epoch from it.
    """

    dataset: Dataset
    seed: int
    class_uniform_pct: float = 0.0

    def epoch_keys(self, epoch: int) -> list[Any]:
        ds = self.dataset
        if hasattr(ds, "epoch_items"):  # class-uniform sampling provided by the dataset
            return list(ds.epoch_items(epoch, seed=self.seed))
        g = torch.Generator().manual_seed(item_seed(self.seed, epoch, 2**31))  # a position no item uses
        return torch.randperm(len(ds), generator=g).tolist()  # type: ignore[arg-type]


class StepBatchSampler(Sampler[list[tuple[Any, int]]]):
    """Yields, for steps ``start_step .. max_iter-1``, this rank's slice of the global batch as ``(key, seed)`` pairs.

    Epoch ``e`` is ``source.epoch_keys(e)`` cut into ``len // global_batch`` full batches (the remainder is dropped,
    like ``drop_last``).
    """

    def __init__(
        self,
        source: TrainSource,
        global_batch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        max_iter: int,
        seed: int,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        self.source, self.global_batch = source, global_batch
        self.rank, self.world_size = rank, world_size
        self.start_step, self.max_iter, self.seed = start_step, max_iter, seed
        self._epoch_cache: dict[int, list[Any]] = {}
        self._starts: list[int] = [0]  # first global step of each epoch, extended lazily

    def _keys(self, epoch: int) -> list[Any]:
        if epoch not in self._epoch_cache:
            keys = self.source.epoch_keys(epoch)
            if len(keys) < self.global_batch:
                raise ValueError(
                    f"an epoch has {len(keys)} training items, fewer than the global batch of {self.global_batch}"
                )
            self._epoch_cache = {epoch: keys}  # one epoch in memory is enough: steps only move forward
            return keys
        return self._epoch_cache[epoch]

    def _locate(self, step: int) -> tuple[int, int]:
        """Global step -> (epoch, batch index within the epoch)."""
        while self._starts[-1] <= step:
            epoch = len(self._starts) - 1
            n = len(self.source.epoch_keys(epoch)) // self.global_batch
            if n == 0:
                raise ValueError(f"epoch {epoch} has fewer items than the global batch of {self.global_batch}")
            self._starts.append(self._starts[-1] + n)
        epoch = max(i for i, s in enumerate(self._starts[:-1]) if s <= step)
        return epoch, step - self._starts[epoch]

    def epoch_of(self, step: int) -> int:
        return self._locate(step)[0]

    def __len__(self) -> int:
        return max(0, self.max_iter - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[Any, int]]]:
        per_rank = self.global_batch // self.world_size
        for step in range(self.start_step, self.max_iter):
            epoch, b = self._locate(step)
            keys = self._keys(epoch)
            lo = b * self.global_batch + self.rank * per_rank
            yield [(keys[p], item_seed(self.seed, epoch, p)) for p in range(lo, lo + per_rank)]


# ---- construction from the config ---------------------------------------------------------------------------------
def _lookup(name: str) -> type:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]


def build_train_dataset(spec: DatasetSpec, cfg: TrainConfig) -> Dataset:
    """One training split with the recipe's joint transforms and the (x, x_a) pair."""
    d = cfg.data
    return data.build_train_dataset(
        spec.dataset,
        spec.root,
        split=spec.split,
        crop_size=tuple(d.crop_size),
        scale_range=(d.scale_min, d.scale_max),
        flip=d.flip,
        class_uniform_pct=d.class_uniform_pct,
        class_uniform_tile=d.class_uniform_tile,
        pair=d.pair,
        **spec.options,
    )


def build_train_source(cfg: TrainConfig) -> TrainSource:
    parts = [build_train_dataset(spec, cfg) for spec in cfg.data.train]
    dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    return TrainSource(dataset, cfg.data.seed, cfg.data.class_uniform_pct)


def build_eval_dataset(spec: DatasetSpec) -> Dataset:
    """A full-resolution evaluation split (no crop, no flip, normalised images)."""
    return data.build_eval_dataset(spec.dataset, spec.root, split=spec.split, **spec.options)


# ---- synthetic data -----------------------------------------------------------------------------------------------
def _synthetic_specs(cfg: TrainConfig) -> list[DatasetSpec]:
    return [s for s in [*cfg.data.train, *cfg.eval.targets] if s.dataset == "aligned"]


#: Seed offset of each synthetic split: disjoint layouts for training, model choices (``select``) and reporting
#: (``val``), so that what picks a model is never what reports it.
SPLIT_SEED_OFFSETS: dict[str, int] = {"train": 0, "val": 1_000_003, "select": 2_000_003}


def ensure_synthetic(root: str | Path, split: str, cfg: TrainConfig) -> Path:
    """Render the synthetic aligned scenes of ``split`` into ``root`` unless they are already there.

    ``write_aligned_dataset`` is itself atomic per file and resumable (``meta.json`` is written last and a matching
    one makes the call a no-op), so a killed generation is simply repeated. Scene ``i`` of a split is seeded by
    ``(seed + SPLIT_SEED_OFFSETS[split], i)``, so the layouts of ``val`` and ``select`` are held out from training and
    from each other; ``select`` has ``val_scenes`` scenes too.
    """
    s = cfg.data.synthetic
    if split not in SPLIT_SEED_OFFSETS:
        raise ConfigError(f"synthetic split {split!r}: choose one of {', '.join(SPLIT_SEED_OFFSETS)}")
    n = s.train_scenes if split == "train" else s.val_scenes
    seed = s.seed + SPLIT_SEED_OFFSETS[split]
    write_aligned_dataset(
        root,
        num_scenes=n,
        seed=seed,
        height=s.height,
        width=s.width,
        appearances=tuple(s.appearances),
        split=split,
        progress=cfg.runtime.progress,
    )
    return Path(root)


def prepare_data(cfg: TrainConfig, info: DistInfo) -> None:
    """Generate missing synthetic splits (rank 0; the others wait) when ``data.synthetic.generate`` is on."""
    if cfg.data.synthetic.generate:
        if info.is_main:
            for spec in _synthetic_specs(cfg):
                ensure_synthetic(spec.root, spec.split, cfg)
        if info.enabled:
            dist.barrier()


def describe(keys: Sequence[Any]) -> str:  # pragma: no cover - debugging aid
    return f"{len(keys)} items, first {list(keys[:3])}"
