"""The training loop: :func:`train` runs one BlindNet (or baseline) training to the end, on CPU, one GPU or many.

Recipe (``docs/original_implementation.md``, "Training recipe"): SGD (lr 0.01, momentum 0.9, wd 5e-4 on every parameter), poly 0.9 stepped every iteration, a
global batch of 8 split across ranks, SyncBN across ranks. Differences from the original, on purpose:

* SyncBN conversion happens **before** the optimizer is built (the original converted after).
* bfloat16 autocast and channels_last on GPU (the original ran FP32 with anomaly detection on).
* Evaluation reports the **last** weights on every target; no per-target best-checkpoint selection. The final
  evaluation runs in float32 whatever ``runtime.amp`` says, so it equals ``blindnet evaluate`` on the saved model.
* Checkpoints are atomic and hold every random state, and the data stream is a pure function of (seed, step), so
  ``resume`` continues the exact same run.
"""

from __future__ import annotations

import csv
import errno
import io
import math
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from blindnet.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    deployable_state_dict,
    load_checkpoint_state,
    load_state_into,
    read_metadata,
    save_model,
)
from blindnet.config import ConfigError, save_yaml, to_dict
from blindnet.io import atomic_write
from blindnet.metrics import SegScores
from blindnet.models import DeepLabV3Plus, build_model
from blindnet.task import BlindNetTask
from blindnet.train.config import TrainConfig, config_from_dict
from blindnet.train.data import SeededItems, StepBatchSampler, build_eval_dataset, build_train_source, prepare_data
from blindnet.train.distributed import DistInfo, convert_sync_batchnorm, init_distributed
from blindnet.train.evaluate import evaluate, write_tables

CKPT_DIR = "checkpoints"
CKPT_PATTERN = "ckpt_{step:07d}.pt"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the message names the step, every loss term and the last good checkpoint."""

    def __init__(self, step: int, terms: dict[str, float], last_checkpoint: Path | None) -> None:
        self.step, self.terms, self.last_checkpoint = step, terms, last_checkpoint
        shown = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
        where = str(last_checkpoint) if last_checkpoint else "none written yet"
        super().__init__(
            f"non-finite loss at iteration {step}: {shown}. Stopped before the update. Last good checkpoint: {where} "
            "(resume from it with a lower optim.lr, or check the data)."
        )


class RunExistsError(ValueError):
    """``out_dir`` already holds a run and neither resuming nor overwriting was asked for."""


class DiskFullError(RuntimeError):
    """A file of the run could not be written because the disk is full; the message names the file and the last
    good checkpoint (which the failed write left untouched)."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C (SIGINT) stopped the run; ``last_checkpoint`` is what a ``--resume`` continues from."""

    def __init__(self, run_dir: Path, step: int | None, last_checkpoint: Path | None) -> None:
        self.run_dir, self.step, self.last_checkpoint = run_dir, step, last_checkpoint
        at = f" after iteration {step}" if step is not None else ""
        saved = f"last checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        super().__init__(f"interrupted{at}; {saved}")


# ---- small helpers -------------------------------------------------------------------------------------------------
def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("runtime.device=cuda but no CUDA device is available")
        return torch.device("cuda", info.local_rank if info else 0)
    return torch.device("cpu")


def poly_lambda(max_iter: int, power: float):
    """``lr(it) = base * (1 - it / max_iter) ** power`` (a plain function, so the scheduler state stays tensors-only)."""

    def f(it: int) -> float:
        return max(0.0, 1.0 - it / max_iter) ** power

    return f


def get_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random states as tensors and plain numbers (loadable with ``weights_only=True``)."""
    py = random.getstate()
    npk = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())  # the legacy tuple (default)
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(py[0]), "state": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]},
        "numpy": {
            "keys": torch.from_numpy(npk[1].astype(np.int64)),
            "pos": int(npk[2]),
            "has_gauss": int(npk[3]),
            "cached_gaussian": float(npk[4]),
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest ``checkpoints/ckpt_*.pt`` of a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted((path / CKPT_DIR).glob("ckpt_*.pt")) or sorted(path.glob("ckpt_*.pt"))
        if found:
            return found[-1]
        raise FileNotFoundError(f"no checkpoints/ckpt_*.pt in run folder {path}")
    raise FileNotFoundError(f"resume target not found: {path}")


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint safely (``weights_only=True``); raises with the path on failure."""
    path = find_checkpoint(path)
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"{path}: cannot read training checkpoint ({type(exc).__name__}: {exc})") from exc
    missing = {"model", "task", "optimizer", "scheduler", "step", "config", "rng"} - set(ckpt)
    if missing:
        raise RuntimeError(f"{path}: not a training checkpoint, missing {sorted(missing)}")
    ckpt["path"] = path
    return ckpt


def describe_existing_run(run_dir: str | Path) -> str | None:
    """What run ``run_dir`` holds, in words (``"a finished run (10 iterations)"``), or None when it holds none.

    A folder holds a run when it has a checkpoint or a saved model. The config and logs of a run that stopped before
    its first checkpoint (a data error, a kill in the first iterations) hold nothing to resume, and a new run in that
    folder replaces them.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    ckpts = sorted((run_dir / CKPT_DIR).glob("ckpt_*.pt"))
    if not ckpts and not (run_dir / "model.safetensors").is_file():
        return None
    step = int(ckpts[-1].stem.split("_")[-1]) if ckpts else None
    model = run_dir / "model.safetensors"
    if model.is_file():
        try:
            done = read_metadata(model).get("step", "?")
        except (CheckpointError, OSError, ValueError):
            done = "?"
        return f"a finished run ({done} iterations)"
    return f"an unfinished run (last checkpoint at iteration {step})"


def move_run_aside(run_dir: str | Path) -> Path:
    """Rename ``run_dir`` to ``<run_dir>.replaced-<UTC time>`` (never deleted); returns the new path."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    n = 1
    while target.exists():  # two overwrites within one second
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}")
    run_dir.rename(target)
    return target


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the ``.<name>.<random>.tmp`` files a killed atomic write left in ``run_dir`` and its checkpoints.

    Only the main process of a run writes there, and it calls this before writing anything, so no live write can
    own one of these files.
    """
    run_dir = Path(run_dir)
    stale = [f for d in (run_dir, run_dir / CKPT_DIR) if d.is_dir() for f in d.glob(".*.tmp") if f.is_file()]
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


def _is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it chains) is a write that failed for lack of space.

    PyTorch's zip writer reports a short write as ``RuntimeError: ... unexpected pos N vs M`` and only sometimes
    chains the OSError; a short write of a local file means the disk (or the quota) is full.
    """
    chain: BaseException | None = exc
    while chain is not None:
        if getattr(chain, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(chain):
            return True
        if isinstance(chain, RuntimeError) and "unexpected pos" in str(chain):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def _write_or_disk_full(path: Path, write: Any, last_good: Path | None) -> None:
    """Call ``write()`` (an atomic write of ``path``), with a full disk reported as :class:`DiskFullError` naming
    ``path`` and ``last_good`` (the atomic write left both the old file and that checkpoint as they were)."""
    try:
        write()
    except (OSError, RuntimeError) as exc:
        if not _is_disk_full(exc):
            raise
        keep = f"the last good checkpoint {last_good} is intact" if last_good else "no checkpoint was written yet"
        raise DiskFullError(
            f"cannot write {path}: the disk is full (no space left on device). Nothing was replaced; {keep}. "
            "Free some space and resume the run."
        ) from None


def _gather_rng(device: torch.device, info: DistInfo) -> list[dict[str, Any]]:
    mine = get_rng_state(device)
    if not info.enabled:
        return [mine]
    everyone: list[Any] = [None] * info.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def _csv_text(fields: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fields)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


class _CsvLog:
    """Append-only CSV whose columns are fixed by the first row; on resume, rows past the resumed step are dropped.

    ``redo_final``: the final evaluation at ``resume_step`` will run again (the run stopped between it and the saved
    model), so its earlier rows are dropped too and the table never holds the same evaluation twice.
    """

    def __init__(self, path: Path, resume_step: int | None, redo_final: bool = False) -> None:
        self.path, self.fields = path, None
        if resume_step is not None and path.exists():
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            if rows:
                self.fields = list(rows[0].keys())
                kept = [
                    r
                    for r in rows
                    if int(r["step"]) < resume_step
                    or (int(r["step"]) == resume_step and not (redo_final and r.get("final") == "1"))
                ]
                text = _csv_text(self.fields, kept)
                atomic_write(path, lambda tmp: Path(tmp).write_text(text, newline=""))
        elif path.exists():
            path.unlink()

    def write(self, row: dict[str, Any]) -> None:
        new = self.fields is None
        fields = self.fields = list(row.keys()) if self.fields is None else self.fields
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


# ---- the loop, in stages ------------------------------------------------------------------------------------------
class _Logs:
    """Where one run reports: CSV logs and TensorBoard (main rank only) and a tqdm bar (main rank, if asked)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, info: DistInfo, start_step: int, resumed: bool) -> None:
        keep = start_step if resumed else None
        redo_final = start_step >= cfg.optim.max_iter  # stopped after the last step, before the saved model
        self.train_csv = _CsvLog(run_dir / "train_log.csv", keep) if info.is_main else None
        self.eval_csv = _CsvLog(run_dir / "eval.csv", keep, redo_final) if info.is_main else None
        self.tb = None
        self.bar = None
        if info.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: the 'train' extra installs it

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if resumed else None)
            except ImportError:  # a missing TensorBoard must not stop training
                warnings.warn("tensorboard not installed: TensorBoard logs disabled", stacklevel=2)
            if cfg.runtime.progress:
                self.bar = tqdm(
                    total=cfg.optim.max_iter, initial=start_step, desc=cfg.name, unit="it", dynamic_ncols=True
                )

    def say(self, message: str) -> None:
        (self.bar.write if self.bar is not None else print)(message)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


@dataclass
class _Run:
    """Everything one training run holds while it runs (built by :func:`_build_run`)."""

    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    use_amp: bool
    channels_last: bool
    run_dir: Path
    task: BlindNetTask
    net: Callable[..., Any]  # the task, wrapped in DDP and/or torch.compile as configured
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    source: Any
    targets: dict[str, Any]
    start_step: int = 0
    last_ckpt: Path | None = None


#: What may differ between a run and its resumption: how it executes and evaluates, its length (the poly schedule
#: is recomputed over the new length) and its name. Everything else defines what the run computes.
RESUMABLE_CHANGES = ("runtime.", "eval.", "optim.max_iter", "name")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _resolve_resume(cfg: TrainConfig, resume: str | Path | dict | None) -> tuple[TrainConfig, dict | None]:
    """The checkpoint to resume from (read once) and the config to run: the checkpoint's, with this session's
    ``runtime``, ``eval``, ``name`` and ``optim.max_iter`` (how a run executes and evaluates, and how long it is, may
    change; what it computes may not: any other difference is a :class:`ConfigError` naming each setting)."""
    if resume is None:
        return cfg, None
    ckpt = resume if isinstance(resume, dict) else load_training_checkpoint(resume)
    stored = config_from_dict(ckpt["config"])
    old, new = _flatten(to_dict(stored)), _flatten(to_dict(cfg))
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    refused = [
        k for k in changed if not any(k == a or (a.endswith(".") and k.startswith(a)) for a in RESUMABLE_CHANGES)
    ]
    if refused:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in refused[:6])
        raise ConfigError(
            f"cannot change on resume: {shown}; they define what the run computes. Resuming may change only "
            "runtime.*, eval.*, optim.max_iter and name; start a new run from these weights with --init instead"
        )
    step = int(ckpt["step"])
    if cfg.optim.max_iter < step:
        raise ConfigError(f"optim.max_iter={cfg.optim.max_iter} is below the checkpoint's iteration {step}")
    stored.runtime, stored.eval, stored.name = cfg.runtime, cfg.eval, cfg.name
    stored.optim.max_iter = cfg.optim.max_iter
    return stored, ckpt


def _prepare_run_dir(run_dir: Path, replace: bool) -> None:
    """Move an old run aside (``replace``), create the folder and delete temporaries of a killed write."""
    if replace:
        print(f"moved the run that was in {run_dir} to {move_run_aside(run_dir)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temporaries(run_dir)
    if stale:
        print(
            f"removed {len(stale)} temporary file(s) left by an interrupted write: {', '.join(f.name for f in stale)}"
        )


def init_weights(model: DeepLabV3Plus, path: str | Path, part: str) -> list[str]:
    """Load ``part`` (``model``: every tensor; ``encoder``: only ``encoder.*``) of checkpoint ``path`` into ``model``.

    The checkpoint may be a deployable ``.safetensors`` or a training ``.pt``. Returns the names of the loaded tensors.
    Raises CheckpointError naming what does not fit (another backbone, another class count for ``model``).
    """
    src_cfg, state, _ = load_checkpoint_state(path)
    if src_cfg.backbone != model.config.backbone:
        raise CheckpointError(
            f"{path}: a {src_cfg.backbone} checkpoint cannot initialise a {model.config.backbone} run"
        )
    if part == "model":
        load_state_into(model, state, source=str(path))
        return sorted(state)
    own = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    enc = {k: v for k, v in state.items() if k.startswith("encoder.")}
    missing = sorted(set(own) - set(enc))
    bad = [k for k in sorted(set(own) & set(enc)) if enc[k].shape != own[k].shape]
    if missing or bad or set(enc) - set(own):
        raise CheckpointError(
            f"{path}: its encoder does not fit this run's ({len(missing)} missing, {len(bad)} of another shape, "
            f"{len(set(enc) - set(own))} unexpected tensor(s); e.g. {(missing + bad)[:3]})"
        )
    model.encoder.load_state_dict({k[len("encoder.") :]: v.to(own[k].dtype) for k, v in enc.items()}, strict=True)
    return sorted(enc)


def _build_run(cfg: TrainConfig, out_dir: str | Path, replace: bool = False) -> _Run:
    """Runtime, data (checked before the slow model build), model, task, optimizer and schedule.

    ``replace``: ``out_dir`` holds another run, which is moved aside (never deleted) before anything is written.
    """
    rt = cfg.runtime
    info = init_distributed("cuda" if resolve_device(rt.device).type == "cuda" else "cpu")
    device = resolve_device(rt.device, info)
    if cfg.optim.batch_size % info.world_size:
        raise ValueError(f"optim.batch_size {cfg.optim.batch_size} is not divisible by {info.world_size} ranks")
    if rt.threads > 0:
        torch.set_num_threads(rt.threads)
    if rt.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    prepare_data(cfg, info)  # a dataset folder with missing files fails here, before the model is built
    source = build_train_source(cfg)
    targets = {spec.label: build_eval_dataset(spec) for spec in cfg.eval.targets}
    seed_everything(rt.seed)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    net = build_model(cfg.model)
    loaded = init_weights(net, cfg.init.checkpoint, cfg.init.part) if cfg.init.checkpoint else []
    # The run folder is touched only now: a start that fails on its data or init weights writes nothing there and
    # leaves a run that --overwrite would have moved aside where it was.
    run_dir = Path(out_dir)
    if info.is_main:
        _prepare_run_dir(run_dir, replace)
        save_yaml(cfg, run_dir / "config.yaml")
        if loaded:
            print(f"initialised the {cfg.init.part} ({len(loaded)} tensors) from {cfg.init.checkpoint}")
    if info.enabled:
        dist.barrier()  # nobody writes into the folder before the main process has moved an old run aside
    task = BlindNetTask(net, cfg.loss)
    if info.enabled and rt.sync_bn:
        # before the optimizer: it must see the final parameters. In place: the task stays the task.
        task = cast(BlindNetTask, convert_sync_batchnorm(task, device.type))
    task.to(device)
    channels_last = rt.use_channels_last(device.type)
    if channels_last:
        task.to(memory_format=torch.channels_last)
    o = cfg.optim
    optimizer = torch.optim.SGD(
        task.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(o.max_iter, o.poly_power))
    use_amp = rt.use_amp(device.type)
    return _Run(cfg, info, device, use_amp, channels_last, run_dir, task, task, optimizer, scheduler, source, targets)


def _restore(run: _Run, ckpt: dict | None) -> None:
    """Load weights, task, optimizer, schedule and random states from ``ckpt`` (or seed a fresh run)."""
    info, seed = run.info, run.cfg.runtime.seed
    if ckpt is None:
        # Loss sampling (CWCL/SDCL pixels, dropout) differs per rank, like the original's per-GPU processes.
        seed_everything(seed + 7919 * info.rank + 1)
        return
    load_state_into(run.task.get_eval_model(), ckpt["model"], source=str(ckpt["path"]))
    run.task.load_task_state(ckpt["task"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    # The schedule is recomputed from this session's optim.max_iter (longer when a run is extended): the restored
    # optimizer holds the learning rate of the old schedule (0 at the end of a finished run).
    lam = poly_lambda(run.cfg.optim.max_iter, run.cfg.optim.poly_power)
    old_lr = run.optimizer.param_groups[0]["lr"]
    for group, base in zip(run.optimizer.param_groups, run.scheduler.base_lrs):
        group["lr"] = base * lam(run.scheduler.last_epoch)
    run.scheduler._last_lr = [g["lr"] for g in run.optimizer.param_groups]
    stored_max = int(ckpt["config"]["optim"]["max_iter"])
    if stored_max != run.cfg.optim.max_iter and info.is_main:
        print(
            f"schedule: {stored_max} -> {run.cfg.optim.max_iter} iterations; poly learning rate recomputed over "
            f"{run.cfg.optim.max_iter}: {run.optimizer.param_groups[0]['lr']:.6g} at iteration {ckpt['step']} "
            f"(was {old_lr:.6g})"
        )
    run.start_step, run.last_ckpt = int(ckpt["step"]), ckpt["path"]
    states = ckpt["rng"]["ranks"]
    if len(states) == info.world_size:
        set_rng_state(states[info.rank], run.device)
    else:
        warnings.warn(
            f"checkpoint has random states for {len(states)} ranks, running {info.world_size}: loss "
            "sampling will differ from the original run",
            stacklevel=3,
        )
        seed_everything(seed + 7919 * info.rank + run.start_step)


def _wrap(run: _Run) -> None:
    """DDP across ranks (after restoring, so every rank starts from the restored weights) and torch.compile."""
    if run.info.enabled:
        ids = [run.device.index] if run.device.type == "cuda" else None
        run.net = DistributedDataParallel(run.task, device_ids=ids, find_unused_parameters=True)
    if run.cfg.runtime.compile:
        run.net = torch.compile(run.net)


def _ignore_sigint(worker_id: int) -> None:
    # A terminal's Ctrl-C reaches the loader workers too; the main process decides when to stop (after the current
    # step, with a checkpoint), and a worker dying of KeyboardInterrupt first would turn that into a loader error.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _loader(run: _Run) -> tuple[DataLoader, StepBatchSampler]:
    """The batches of this rank from ``run.start_step`` on: a pure function of (data seed, step)."""
    cfg, info = run.cfg, run.info
    sampler = StepBatchSampler(
        run.source,
        cfg.optim.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        start_step=run.start_step,
        max_iter=cfg.optim.max_iter,
        seed=cfg.data.seed,
    )
    loader = DataLoader(
        SeededItems(run.source.dataset),
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=run.device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator().manual_seed(cfg.data.seed),  # must not draw from (and shift) the global RNG
        worker_init_fn=_ignore_sigint,
    )
    return loader, sampler


def train_step(run: _Run, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
    """One optimisation step on ``batch`` (``image``/``image_aug`` B x 3 x H x W, ``label`` B x H x W).

    Returns the rank-averaged scalar loss terms and the learning rate used. Raises :class:`NonFiniteLossError`
    (before any update) when a term is NaN/Inf.
    """
    per_rank = run.cfg.optim.batch_size // run.info.world_size
    x, x_a, y = (batch[k].to(run.device, non_blocking=True) for k in ("image", "image_aug", "label"))
    # Images follow the parameters' dtype, so a run built under torch.set_default_dtype(torch.float64) trains in
    # float64 end to end (numerical checks; the loader always yields float32).
    dtype = next(run.task.parameters()).dtype
    x, x_a = x.to(dtype), x_a.to(dtype)
    if x.shape[0] != per_rank:
        raise RuntimeError(f"batch of {x.shape[0]} images, expected {per_rank} per rank")
    if run.channels_last:
        x, x_a = x.contiguous(memory_format=torch.channels_last), x_a.contiguous(memory_format=torch.channels_last)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_amp):
        out = run.net(x, x_a, y)
    names = [k for k in out if torch.is_tensor(out[k]) and out[k].numel() == 1]
    terms = torch.stack([out[k].detach().float().reshape(()) for k in names])
    if run.info.enabled:
        # Averaged over ranks: what one process with the whole batch would log; every rank takes the same NaN
        # decision.
        dist.all_reduce(terms)
        terms /= run.info.world_size
    values = dict(zip(names, terms.tolist()))
    if not all(math.isfinite(v) for v in values.values()):
        raise NonFiniteLossError(step + 1, values, run.last_ckpt)
    run.optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    values["lr"] = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    return values


def _torch_save(obj: Any, path: str) -> None:
    # Through a Python file object: a full disk then raises OSError(ENOSPC) instead of PyTorch's "unexpected pos".
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def save_checkpoint(run: _Run, step: int) -> Path:
    """Write ``checkpoints/ckpt_<step>.pt`` atomically with every random state (collective: all ranks call it)."""
    rng = _gather_rng(run.device, run.info)
    path = run.run_dir / CKPT_DIR / CKPT_PATTERN.format(step=step)
    if run.info.is_main:
        eval_model = run.task.get_eval_model()
        state = {
            "model": deployable_state_dict(eval_model),
            "model_config": eval_model.config.to_dict(),
            "task": run.task.get_task_state(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "step": step,
            "config": to_dict(run.cfg),
            "rng": {"ranks": rng},
            "version": FORMAT_VERSION,
        }
        _write_or_disk_full(path, lambda: atomic_write(path, lambda tmp: _torch_save(state, tmp)), run.last_ckpt)
        keep = run.cfg.runtime.keep_checkpoints
        if keep > 0:
            for old in sorted((run.run_dir / CKPT_DIR).glob("ckpt_*.pt"))[:-keep]:
                old.unlink(missing_ok=True)
    if run.info.enabled:
        dist.barrier()
    return path


def run_eval(run: _Run, logs: _Logs, step: int, final: bool) -> dict[str, SegScores]:
    """Score the current weights on every target (the whole set in float32 when ``final``, else ``eval.max_images``
    under the run's autocast setting)."""
    out = {}
    for label, ds in run.targets.items():
        scores = evaluate(
            run.task.get_eval_model(),
            ds,
            device=run.device,
            # The final numbers are float32, exactly what `blindnet evaluate` computes on the saved model; only the
            # periodic checks may run under bfloat16 autocast (on CPUs with native bf16 the two differ in the
            # second decimal of mIoU).
            amp=run.use_amp and not final,
            channels_last=run.channels_last and not final,
            num_workers=run.cfg.eval.num_workers,
            max_images=0 if final else run.cfg.eval.max_images,
            progress=run.cfg.runtime.progress,
            desc=f"eval {label}",
        )
        out[label] = scores
        if run.info.is_main:
            assert logs.eval_csv is not None  # the main rank's
            logs.eval_csv.write({"step": step, "target": label, "final": int(final), **scores.as_row()})
            logs.scalars(f"eval/{label}", {"mIoU": scores.miou * 100, "mAcc": scores.macc * 100}, step)
            logs.say(f"[step {step}] {label}: mIoU {scores.miou * 100:.2f}  mAcc {scores.macc * 100:.2f}")
    return out


class _StopOnSigint:
    """While active, the first Ctrl-C (SIGINT) only sets ``requested``: the loop finishes the current step, saves a
    checkpoint and stops cleanly. A second Ctrl-C interrupts at once (Python's default). Active only in the main
    thread of a single-process run: under torchrun every rank must stop at the same step, which a signal cannot
    promise, so there the default KeyboardInterrupt stands (and the last periodic checkpoint is named)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    def __enter__(self) -> _StopOnSigint:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)


def _loop(run: _Run, logs: _Logs) -> tuple[int, list[dict[str, float]], float]:
    """Iterate to ``optim.max_iter``: step, log every ``log_interval``, checkpoint, evaluate on schedule.

    Raises :class:`TrainingInterrupted` after saving a checkpoint of the last finished step on Ctrl-C.
    """
    with _StopOnSigint(not run.info.enabled) as stop:
        return _steps(run, logs, stop)


def _steps(run: _Run, logs: _Logs, stop: _StopOnSigint) -> tuple[int, list[dict[str, float]], float]:
    cfg, rt = run.cfg, run.cfg.runtime
    loader, sampler = _loader(run)
    history: list[dict[str, float]] = []
    window: list[dict[str, float]] = []
    t0 = t_window = time.perf_counter()
    run.task.train()
    data_iter: Iterator = iter(loader)
    step = run.start_step
    while step < cfg.optim.max_iter:
        values = train_step(run, next(data_iter), step)
        step += 1
        history.append({"step": step, **values})
        window.append(values)
        if logs.bar is not None:
            logs.bar.update(1)
            logs.bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k != "lr"}, refresh=False)
        if run.info.is_main and (step % rt.log_interval == 0 or step == cfg.optim.max_iter):
            now = time.perf_counter()
            mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            assert logs.train_csv is not None  # the main rank's
            logs.train_csv.write(
                {
                    "step": step,
                    "epoch": sampler.epoch_of(step - 1),
                    **mean,
                    "it_per_s": len(window) / max(now - t_window, 1e-9),
                    "elapsed_s": now - t0,
                }
            )
            logs.scalars("train", mean, step)
            window, t_window = [], now
        elif not run.info.is_main:
            window = []
        if step % rt.ckpt_interval == 0 or step == cfg.optim.max_iter:
            run.last_ckpt = save_checkpoint(run, step)
        if stop.requested:
            if run.last_ckpt is None or not run.last_ckpt.name == CKPT_PATTERN.format(step=step):
                run.last_ckpt = save_checkpoint(run, step)
            raise TrainingInterrupted(run.run_dir, step, run.last_ckpt)
        if cfg.eval.interval > 0 and step % cfg.eval.interval == 0 and step != cfg.optim.max_iter and run.targets:
            run_eval(run, logs, step, final=False)
    return step, history, t0


def _is_finished(run_dir: Path, step: int, cfg: TrainConfig) -> bool:
    """The run in ``run_dir`` reached ``optim.max_iter`` at ``step`` and saved its model (the last stage)."""
    model = run_dir / "model.safetensors"
    if step < cfg.optim.max_iter or not model.is_file():
        return False
    try:
        return read_metadata(model).get("step") == str(step)
    except (CheckpointError, OSError, ValueError):
        return False


def _same_run(run_dir: Path, ckpt_path: Path) -> bool:
    """Whether checkpoint ``ckpt_path`` lies in run folder ``run_dir`` (``run_dir/checkpoints/ckpt_N.pt`` or
    ``run_dir/ckpt_N.pt``): resuming into another folder must not take over a run that lives there."""
    home = ckpt_path.parent.parent if ckpt_path.parent.name == CKPT_DIR else ckpt_path.parent
    return home.resolve() == run_dir.resolve()


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: str | Path | dict | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train to ``cfg.optim.max_iter`` iterations and evaluate the last weights on every target.

    Launch with ``torchrun`` for several processes (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) or
    call it directly for one. The run folder ``out_dir`` receives ``config.yaml``, ``train_log.csv``, ``eval.csv``,
    ``tensorboard/``, ``checkpoints/ckpt_<step>.pt``, ``model.safetensors`` (deployable) and the result tables.

    Args:
        cfg: the resolved config (with ``resume``: the checkpoint's own wins, except ``runtime``, ``eval``, ``name``
            and ``optim.max_iter``; any other difference raises ConfigError naming it).
        out_dir: the run folder. A folder that already holds a run is refused (:class:`RunExistsError`) unless
            ``resume`` continues it or ``overwrite`` moves it aside to ``<out_dir>.replaced-<time>``.
        resume: a checkpoint file, a run folder (its newest checkpoint), or a checkpoint already read with
            :func:`load_training_checkpoint`. A larger ``optim.max_iter`` extends the run (the poly schedule is
            recomputed over the new length).
        overwrite: move an existing run in ``out_dir`` aside instead of refusing (nothing is deleted).

    Returns:
        ``{"run_dir", "step", "last_checkpoint", "model_path", "eval": {target: SegScores}, "history": [per-step
        rank-averaged loss terms of this session], "seconds", "finished_before"}``; ``finished_before`` is True when
        ``resume`` named a run that had already finished at ``optim.max_iter`` (nothing was run).

    Raises:
        NonFiniteLossError: the loss became NaN/Inf (nothing is updated with it).
        TrainingInterrupted: Ctrl-C; a checkpoint of the last finished step was saved (single process).
        DiskFullError: a checkpoint or the model could not be written; the last good checkpoint is intact.
    """
    cfg, ckpt = _resolve_resume(cfg, resume)
    cfg.validate()
    out = Path(out_dir)
    if ckpt is not None and _is_finished(out, int(ckpt["step"]), cfg):
        return _result(out, int(ckpt["step"]), ckpt["path"], {}, [], 0.0, finished_before=True)
    existing = describe_existing_run(out) if ckpt is None or not _same_run(out, ckpt["path"]) else None
    if existing and not overwrite:
        raise RunExistsError(
            f"{out} already holds {existing}; continue it with --resume {out}, write to another --out, or pass "
            "--overwrite to move it aside (nothing is deleted)"
        )
    run = _build_run(cfg, out, replace=existing is not None)
    _restore(run, ckpt)
    del ckpt
    _wrap(run)
    logs = _Logs(cfg, run.run_dir, run.info, run.start_step, resumed=resume is not None)
    try:
        step, history, t0 = _loop(run, logs)
        results = run_eval(run, logs, step, final=True) if run.targets else {}
        model_path = run.run_dir / "model.safetensors"
        if run.info.is_main:
            _save_final(run, model_path, step)
            if results:
                write_tables({cfg.name: results}, run.run_dir)
    except KeyboardInterrupt:
        # A second Ctrl-C, or one during the final evaluation or under torchrun: name what --resume continues.
        raise TrainingInterrupted(run.run_dir, None, run.last_ckpt) from None
    finally:
        logs.close()
    if run.info.enabled:
        dist.barrier()
    return _result(run.run_dir, step, run.last_ckpt, results, history, time.perf_counter() - t0)


def _save_final(run: _Run, model_path: Path, step: int) -> None:
    """The deployable ``model.safetensors``, with a full disk reported as :class:`DiskFullError`."""
    model = run.task.get_eval_model()
    meta = {"run": run.cfg.name, "step": str(step)}
    _write_or_disk_full(model_path, lambda: save_model(model, model_path, extra_metadata=meta), run.last_ckpt)


def _result(
    run_dir: Path,
    step: int,
    last_ckpt: Path | None,
    results: dict[str, SegScores],
    history: list[dict[str, float]],
    seconds: float,
    *,
    finished_before: bool = False,
) -> dict[str, Any]:
    return {
        "run_dir": run_dir,
        "step": step,
        "last_checkpoint": last_ckpt,
        "model_path": run_dir / "model.safetensors",
        "eval": results,
        "history": history,
        "seconds": seconds,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "rank": int(os.environ.get("RANK", "0")),
        "finished_before": finished_before,
    }
