"""The training loop: :func:`train` runs one BlindNet (or baseline) training to the end, on CPU, one GPU or many.

Recipe (``docs/original_implementation.md``, "Training recipe"): SGD (lr 0.01, momentum 0.9, wd 5e-4 on every parameter), poly 0.9 stepped every iteration, a
global batch of 8 split across ranks, SyncBN across ranks. Differences from the original, on purpose:

* SyncBN conversion happens **before** the optimizer is built (the original converted after).
* bfloat16 autocast and channels_last on GPU (the original ran FP32 with anomaly detection on).
* Evaluation reports the **last** weights on every target; no per-target best-checkpoint selection.
* Checkpoints are atomic and hold every random state, and the data stream is a pure function of (seed, step), so
  ``resume`` continues the exact same run.
"""

from __future__ import annotations

import csv
import math
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from blindnet.checkpoint import FORMAT_VERSION, deployable_state_dict, load_state_into, save_model
from blindnet.config import save_yaml, to_dict
from blindnet.io import atomic_write
from blindnet.metrics import SegScores
from blindnet.models import build_model
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
    npk = np.random.get_state()
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


def _gather_rng(device: torch.device, info: DistInfo) -> list[dict[str, Any]]:
    mine = get_rng_state(device)
    if not info.enabled:
        return [mine]
    everyone: list[Any] = [None] * info.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


class _CsvLog:
    """Append-only CSV whose columns are fixed by the first row; on resume, rows past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path, self.fields = path, None
        if resume_step is not None and path.exists():
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            if rows:
                self.fields = list(rows[0].keys())
                kept = [r for r in rows if int(r["step"]) <= resume_step]
                text_rows = kept
                with open(path, "w", newline="") as fh:
                    w = csv.DictWriter(fh, self.fields)
                    w.writeheader()
                    w.writerows(text_rows)
        elif path.exists():
            path.unlink()

    def write(self, row: dict[str, Any]) -> None:
        new = self.fields is None
        if new:
            self.fields = list(row.keys())
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


# ---- the loop, in stages ------------------------------------------------------------------------------------------
class _Logs:
    """Where one run reports: CSV logs and TensorBoard (main rank only) and a tqdm bar (main rank, if asked)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, info: DistInfo, start_step: int, resumed: bool) -> None:
        keep = start_step if resumed else None
        self.train_csv = _CsvLog(run_dir / "train_log.csv", keep) if info.is_main else None
        self.eval_csv = _CsvLog(run_dir / "eval.csv", keep) if info.is_main else None
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
    net: nn.Module  # the task, wrapped in DDP and/or torch.compile as configured
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    source: Any
    targets: dict[str, Any]
    start_step: int = 0
    last_ckpt: Path | None = None


def _resolve_resume(cfg: TrainConfig, resume: str | Path | dict | None) -> tuple[TrainConfig, dict | None]:
    """The checkpoint to resume from (read once) and the config to run: the checkpoint's, with this session's
    ``runtime`` and ``eval`` (how a run executes and evaluates may change; what it computes may not)."""
    if resume is None:
        return cfg, None
    ckpt = resume if isinstance(resume, dict) else load_training_checkpoint(resume)
    stored = config_from_dict(ckpt["config"])
    stored.runtime, stored.eval = cfg.runtime, cfg.eval
    if to_dict(stored) != to_dict(cfg):
        warnings.warn(
            "resuming: model/loss/data/optim settings come from the checkpoint, not the given config", stacklevel=3
        )
    return stored, ckpt


def _build_run(cfg: TrainConfig, out_dir: str | Path) -> _Run:
    """Runtime, data (checked before the slow model build), model, task, optimizer and schedule."""
    rt = cfg.runtime
    info = init_distributed("cuda" if resolve_device(rt.device).type == "cuda" else "cpu")
    device = resolve_device(rt.device, info)
    if cfg.optim.batch_size % info.world_size:
        raise ValueError(f"optim.batch_size {cfg.optim.batch_size} is not divisible by {info.world_size} ranks")
    if rt.threads > 0:
        torch.set_num_threads(rt.threads)
    if rt.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    run_dir = Path(out_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
    prepare_data(cfg, info)  # a dataset folder with missing files fails here, before the model is built
    source = build_train_source(cfg)
    targets = {spec.label: build_eval_dataset(spec) for spec in cfg.eval.targets}
    seed_everything(rt.seed)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    task = BlindNetTask(build_model(cfg.model), cfg.loss)
    if info.enabled and rt.sync_bn:
        task = convert_sync_batchnorm(task, device.type)  # before the optimizer: it must see the final parameters
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
    )
    return loader, sampler


def train_step(run: _Run, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
    """One optimisation step on ``batch`` (``image``/``image_aug`` B x 3 x H x W, ``label`` B x H x W).

    Returns the rank-averaged scalar loss terms and the learning rate used. Raises :class:`NonFiniteLossError`
    (before any update) when a term is NaN/Inf.
    """
    per_rank = run.cfg.optim.batch_size // run.info.world_size
    x, x_a, y = (batch[k].to(run.device, non_blocking=True) for k in ("image", "image_aug", "label"))
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
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        keep = run.cfg.runtime.keep_checkpoints
        if keep > 0:
            for old in sorted((run.run_dir / CKPT_DIR).glob("ckpt_*.pt"))[:-keep]:
                old.unlink(missing_ok=True)
    if run.info.enabled:
        dist.barrier()
    return path


def run_eval(run: _Run, logs: _Logs, step: int, final: bool) -> dict[str, SegScores]:
    """Score the current weights on every target (the whole set when ``final``, else ``eval.max_images``)."""
    out = {}
    for label, ds in run.targets.items():
        scores = evaluate(
            run.task.get_eval_model(),
            ds,
            device=run.device,
            amp=run.use_amp,
            channels_last=run.channels_last,
            num_workers=run.cfg.eval.num_workers,
            max_images=0 if final else run.cfg.eval.max_images,
            progress=run.cfg.runtime.progress,
            desc=f"eval {label}",
        )
        out[label] = scores
        if run.info.is_main:
            logs.eval_csv.write({"step": step, "target": label, "final": int(final), **scores.as_row()})
            logs.scalars(f"eval/{label}", {"mIoU": scores.miou * 100, "mAcc": scores.macc * 100}, step)
            logs.say(f"[step {step}] {label}: mIoU {scores.miou * 100:.2f}  mAcc {scores.macc * 100:.2f}")
    return out


def _loop(run: _Run, logs: _Logs) -> tuple[int, list[dict[str, float]], float]:
    """Iterate to ``optim.max_iter``: step, log every ``log_interval``, checkpoint, evaluate on schedule."""
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
        if cfg.eval.interval > 0 and step % cfg.eval.interval == 0 and step != cfg.optim.max_iter and run.targets:
            run_eval(run, logs, step, final=False)
    return step, history, t0


def train(cfg: TrainConfig, out_dir: str | Path, resume: str | Path | dict | None = None) -> dict[str, Any]:
    """Train to ``cfg.optim.max_iter`` iterations and evaluate the last weights on every target.

    Launch with ``torchrun`` for several processes (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) or
    call it directly for one. The run folder ``out_dir`` receives ``config.yaml``, ``train_log.csv``, ``eval.csv``,
    ``tensorboard/``, ``checkpoints/ckpt_<step>.pt``, ``model.safetensors`` (deployable) and the result tables.

    Args:
        cfg: the resolved config (ignored in favour of the checkpoint's own when ``resume`` is given, except for
            ``runtime`` and ``eval``, which may change between sessions).
        out_dir: the run folder.
        resume: a checkpoint file, a run folder (its newest checkpoint), or a checkpoint already read with
            :func:`load_training_checkpoint`.

    Returns:
        ``{"run_dir", "step", "last_checkpoint", "model_path", "eval": {target: SegScores}, "history": [per-step
        rank-averaged loss terms of this session], "seconds"}``.

    Raises:
        NonFiniteLossError: the loss became NaN/Inf (nothing is updated with it).
    """
    cfg, ckpt = _resolve_resume(cfg, resume)
    cfg.validate()
    run = _build_run(cfg, out_dir)
    _restore(run, ckpt)
    del ckpt
    _wrap(run)
    logs = _Logs(cfg, run.run_dir, run.info, run.start_step, resumed=resume is not None)
    try:
        step, history, t0 = _loop(run, logs)
        results = run_eval(run, logs, step, final=True) if run.targets else {}
        model_path = run.run_dir / "model.safetensors"
        if run.info.is_main:
            save_model(run.task.get_eval_model(), model_path, extra_metadata={"run": cfg.name, "step": str(step)})
            if results:
                write_tables({cfg.name: results}, run.run_dir)
    finally:
        logs.close()
    if run.info.enabled:
        dist.barrier()
    return {
        "run_dir": run.run_dir,
        "step": step,
        "last_checkpoint": run.last_ckpt,
        "model_path": model_path,
        "eval": results,
        "history": history,
        "seconds": time.perf_counter() - t0,
        "world_size": run.info.world_size,
        "rank": run.info.rank,
    }
