"""The training loop: :func:`train` runs one BlindNet (or baseline) training to the end, on CPU, one GPU or many.

Recipe (facts §4): SGD (lr 0.01, momentum 0.9, wd 5e-4 on every parameter), poly 0.9 stepped every iteration, a
global batch of 8 split across ranks, SyncBN across ranks. Differences from the original, on purpose:

* SyncBN conversion happens **before** the optimizer is built (the original converted after; facts §8.1.2).
* bfloat16 autocast and channels_last on GPU (the original ran FP32 with anomaly detection on).
* Evaluation reports the **last** weights on every target; no per-target best-checkpoint selection (facts §8.2).
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

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


# ---- the loop ------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, out_dir: str | Path, resume: str | Path | None = None) -> dict[str, Any]:
    """Train to ``cfg.optim.max_iter`` iterations and evaluate the last weights on every target.

    Launch with ``torchrun`` for several processes (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) or
    call it directly for one. The run folder ``out_dir`` receives ``config.yaml``, ``train_log.csv``, ``eval.csv``,
    ``tensorboard/``, ``checkpoints/ckpt_<step>.pt``, ``model.safetensors`` (deployable) and the result tables.

    Args:
        cfg: the resolved config (ignored in favour of the checkpoint's own when ``resume`` is given, except for
            ``runtime`` and ``eval``, which may change between sessions).
        out_dir: the run folder.
        resume: a checkpoint file or a run folder (its newest checkpoint).

    Returns:
        ``{"run_dir", "step", "last_checkpoint", "model_path", "eval": {target: SegScores}, "history": [per-step
        rank-averaged loss terms of this session], "seconds"}``.

    Raises:
        NonFiniteLossError: the loss became NaN/Inf (nothing is updated with it).
    """
    ckpt = load_training_checkpoint(resume) if resume is not None else None
    if ckpt is not None:
        stored = config_from_dict(ckpt["config"])
        # Everything that shapes the trajectory comes from the checkpoint; how it runs/evaluates may change.
        stored.runtime, stored.eval = cfg.runtime, cfg.eval
        if to_dict(stored) != to_dict(cfg):
            warnings.warn(
                "resuming: model/loss/data/optim settings come from the checkpoint, not the given config", stacklevel=2
            )
        cfg = stored
    cfg.validate()
    rt = cfg.runtime
    info = init_distributed("cuda" if resolve_device(rt.device).type == "cuda" else "cpu")
    device = resolve_device(rt.device, info)
    if cfg.optim.batch_size % info.world_size:
        raise ValueError(f"optim.batch_size {cfg.optim.batch_size} is not divisible by {info.world_size} ranks")
    use_amp = rt.use_amp(device.type)
    channels_last = rt.use_channels_last(device.type)
    if rt.threads > 0:
        torch.set_num_threads(rt.threads)
    if rt.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    run_dir = Path(out_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")

    # Data first: a dataset folder with missing files must fail before the (slow) model build.
    prepare_data(cfg, info)
    source = build_train_source(cfg)
    targets = {spec.label: build_eval_dataset(spec) for spec in cfg.eval.targets}

    # Same initial weights on every rank (DDP would broadcast rank 0's anyway).
    seed_everything(rt.seed)
    model = build_model(cfg.model)
    task: nn.Module = BlindNetTask(model, cfg.loss)
    if info.enabled and rt.sync_bn:
        task = convert_sync_batchnorm(task, device.type)  # before the optimizer: it must see the final parameters
    task.to(device)
    if channels_last:
        task.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        task.parameters(),
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        nesterov=cfg.optim.nesterov,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(cfg.optim.max_iter, cfg.optim.poly_power))
    start_step = 0
    last_ckpt: Path | None = None
    if ckpt is not None:
        load_state_into(task.get_eval_model(), ckpt["model"], source=str(ckpt["path"]))
        task.load_task_state(ckpt["task"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_step = int(ckpt["step"])
        last_ckpt = ckpt["path"]
        states = ckpt["rng"]["ranks"]
        if len(states) == info.world_size:
            set_rng_state(states[info.rank], device)
        else:
            warnings.warn(
                f"checkpoint has random states for {len(states)} ranks, running {info.world_size}: "
                "loss sampling will differ from the original run",
                stacklevel=2,
            )
            seed_everything(rt.seed + 7919 * info.rank + start_step)
    else:
        # Loss sampling (CWCL/SDCL pixels, dropout) differs per rank, like the original's per-GPU processes.
        seed_everything(rt.seed + 7919 * info.rank + 1)
    del ckpt

    net: nn.Module = task
    if info.enabled:
        net = DistributedDataParallel(
            task, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    if rt.compile:
        net = torch.compile(net)

    per_rank = cfg.optim.batch_size // info.world_size
    sampler = StepBatchSampler(
        source,
        cfg.optim.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        start_step=start_step,
        max_iter=cfg.optim.max_iter,
        seed=cfg.data.seed,
    )
    loader = DataLoader(
        SeededItems(source.dataset),
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        # Explicit generator: the loader must not draw from (and thereby shift) the global RNG.
        generator=torch.Generator().manual_seed(cfg.data.seed),
    )

    csv_log = _CsvLog(run_dir / "train_log.csv", start_step if resume is not None else None) if info.is_main else None
    eval_log = _CsvLog(run_dir / "eval.csv", start_step if resume is not None else None) if info.is_main else None
    tb = None
    if info.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if resume is not None else None)
        except ImportError:  # tensorboard is a dependency, but a missing one should not stop training
            warnings.warn("tensorboard not installed: TensorBoard logs disabled", stacklevel=2)

    bar = None
    if info.is_main and rt.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.optim.max_iter, initial=start_step, desc=cfg.name, unit="it", dynamic_ncols=True)

    def save_checkpoint(step: int) -> Path:
        rng = _gather_rng(device, info)  # collective: every rank must call it
        path = run_dir / CKPT_DIR / CKPT_PATTERN.format(step=step)
        if info.is_main:
            eval_model = task.get_eval_model()
            state = {
                "model": deployable_state_dict(eval_model),
                "model_config": eval_model.config.to_dict(),
                "task": task.get_task_state(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "config": to_dict(cfg),
                "rng": {"ranks": rng},
                "version": FORMAT_VERSION,
            }
            atomic_write(path, lambda tmp: torch.save(state, tmp))
            if rt.keep_checkpoints > 0:
                old = sorted((run_dir / CKPT_DIR).glob("ckpt_*.pt"))[: -rt.keep_checkpoints]
                for p in old:
                    p.unlink(missing_ok=True)
        if info.enabled:
            dist.barrier()
        return path

    def run_eval(step: int, final: bool) -> dict[str, SegScores]:
        out = {}
        for label, ds in targets.items():
            scores = evaluate(
                task.get_eval_model(),
                ds,
                device=device,
                amp=use_amp,
                channels_last=channels_last,
                num_workers=cfg.eval.num_workers,
                max_images=0 if final else cfg.eval.max_images,
                progress=rt.progress,
                desc=f"eval {label}",
            )
            out[label] = scores
            if info.is_main:
                row = {"step": step, "target": label, "final": int(final), **scores.as_row()}
                eval_log.write(row)
                if tb is not None:
                    tb.add_scalar(f"eval/{label}/mIoU", scores.miou * 100, step)
                    tb.add_scalar(f"eval/{label}/mAcc", scores.macc * 100, step)
                msg = f"[step {step}] {label}: mIoU {scores.miou * 100:.2f}  mAcc {scores.macc * 100:.2f}"
                (bar.write if bar is not None else print)(msg)
        return out

    history: list[dict[str, float]] = []
    window: list[dict[str, float]] = []
    t0 = time.perf_counter()
    t_window = t0
    task.train()
    data_iter: Iterator = iter(loader)
    step = start_step
    try:
        while step < cfg.optim.max_iter:
            batch = next(data_iter)
            x = batch["image"].to(device, non_blocking=True)
            x_a = batch["image_aug"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            if x.shape[0] != per_rank:
                raise RuntimeError(f"batch of {x.shape[0]} images, expected {per_rank} per rank")
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
                x_a = x_a.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = net(x, x_a, y)
            loss = out["loss"]
            names = [k for k in out if torch.is_tensor(out[k]) and out[k].numel() == 1]
            terms = torch.stack([out[k].detach().float().reshape(()) for k in names])
            if info.enabled:
                # Averaged over ranks: what one process with the whole batch would log; also makes every rank take
                # the same NaN decision.
                dist.all_reduce(terms)
                terms /= info.world_size
            values = dict(zip(names, terms.tolist()))
            if not all(math.isfinite(v) for v in values.values()):
                raise NonFiniteLossError(step + 1, values, last_ckpt)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            values["lr"] = lr
            history.append({"step": step, **values})
            window.append(values)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k != "lr"}, refresh=False)

            if info.is_main and (step % rt.log_interval == 0 or step == cfg.optim.max_iter):
                now = time.perf_counter()
                mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                row = {
                    "step": step,
                    "epoch": sampler.epoch_of(step - 1),
                    **mean,
                    "it_per_s": len(window) / max(now - t_window, 1e-9),
                    "elapsed_s": now - t0,
                }
                csv_log.write(row)
                if tb is not None:
                    for k, v in mean.items():
                        tb.add_scalar(f"train/{k}", v, step)
                window, t_window = [], now
            elif not info.is_main:
                window = []

            if step % rt.ckpt_interval == 0 or step == cfg.optim.max_iter:
                last_ckpt = save_checkpoint(step)
            if cfg.eval.interval > 0 and step % cfg.eval.interval == 0 and step != cfg.optim.max_iter and targets:
                run_eval(step, final=False)
    finally:
        if bar is not None:
            bar.close()

    results = run_eval(step, final=True) if targets else {}
    model_path = run_dir / "model.safetensors"
    if info.is_main:
        save_model(task.get_eval_model(), model_path, extra_metadata={"run": cfg.name, "step": str(step)})
        if results:
            write_tables({cfg.name: results}, run_dir)
        if tb is not None:
            tb.close()
    if info.enabled:
        dist.barrier()
    return {
        "run_dir": run_dir,
        "step": step,
        "last_checkpoint": last_ckpt,
        "model_path": model_path,
        "eval": results,
        "history": history,
        "seconds": time.perf_counter() - t0,
        "world_size": info.world_size,
        "rank": info.rank,
    }
