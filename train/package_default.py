"""Package a finished run as the checkpoint shipped inside ``blindnet`` and write its model card.

    python -m blindnet.train.package_default --run runs/default_shufflenetv2_baseline --reference-run runs/default_shufflenetv2
    python -m blindnet.train.package_default --run runs/default_shufflenetv2 --compare "previous default=old.safetensors"

Steps: store the run's weights in float16 (``blindnet/weights/default.safetensors``, < 30 MB) with the training facts in
the header; score the shipped file and the run trained beside it on the run's held-out targets (all five
appearances); run the main job's synthetic clip (the numbers ``blindnet segment --synthetic night,fog,rain`` prints);
write ``MODEL_CARD.md`` (with ``--why``: why this model was chosen).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import yaml

from blindnet.backends.torch_backend import TorchBackend
from blindnet.checkpoint import CheckpointError, load_model, read_metadata, save_model
from blindnet.config import ConfigError, key_value_pairs
from blindnet.inference import Predictor
from blindnet.io import MediaError, atomic_write, file_slug, write_png
from blindnet.media import FrameSource
from blindnet.resolve import DEFAULT_CHECKPOINT, MODEL_CARD
from blindnet.segment import run_synthetic_showcase
from blindnet.task import BLINDNET_LOSSES
from blindnet.train.config import load_config
from blindnet.train.data import build_eval_dataset
from blindnet.train.evaluate import evaluate_checkpoints


def _run_facts(run: Path) -> dict:
    missing = [name for name in ("config.yaml", "train_log.csv") if not (run / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{run}: not a finished training run (no {', '.join(missing)}); pass the folder `blindnet train --out` wrote"
        )
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    rows = list(csv.DictReader((run / "train_log.csv").open()))
    last = rows[-1] if rows else {}
    return {
        "config": cfg,
        "iterations": int(last.get("step", cfg["optim"]["max_iter"])),
        "train_seconds": float(last.get("elapsed_s", "nan")),
        "final_loss": float(last.get("loss", "nan")),
    }


def _evaluate(checkpoints: dict[str, Path], config_path: Path) -> dict[str, dict[str, float]]:
    targets = load_config(config_path).eval.targets
    names = {spec.label: spec.options.get("appearance", spec.label) for spec in targets}
    results = evaluate_checkpoints(
        checkpoints, {spec.label: build_eval_dataset(spec) for spec in targets}, progress=False
    )
    return {label: {names[t]: round(s.miou * 100.0, 2) for t, s in row.items()} for label, row in results.items()}


def package_default(
    run: str | Path,
    reference_run: str | Path | None = None,
    *,
    dest: str | Path = DEFAULT_CHECKPOINT,
    command: str = "",
    device: str = "",
    clip_out: str | Path = "outputs/package_showcase",
    compare: Mapping[str, str | Path] | None = None,
    showcase_image: str | Path | None = None,
    why: str = "",
    clip_frames: int = 24,
    clip_size: tuple[int, int] = (256, 512),
) -> dict:
    """Ship ``run``'s model as the package default and write the model card; returns the card's numbers.

    ``reference_run`` is a run trained beside ``run`` (same data, seed and budget, another recipe): its weights are
    scored too and its training facts go into the card. ``compare`` maps labels to further checkpoints (for example
    the previously shipped file, copied away first) scored on the same held-out scenes and clip; their header facts go
    into the card. ``showcase_image`` receives the shipped model's clip as one picture (:func:`write_showcase_image`).
    ``why`` is the card's "Why this model" paragraph (left out when empty). ``clip_frames`` and ``clip_size`` (H, W)
    are the main job's clip (its defaults); smaller values are for tests.

    Every input is read before anything is written, and the new file replaces ``dest`` only once it has been scored:
    a wrong path or a failure half-way leaves the shipped model and its card as they were.
    """
    run, dest = Path(run), Path(dest)
    reference_run = Path(reference_run) if reference_run is not None else None
    extra = {label: _existing_checkpoint(path) for label, path in (compare or {}).items()}
    facts = _run_facts(run)
    reference_facts = _run_facts(reference_run) if reference_run is not None else None
    meta = _header_facts(run, facts, command, device)
    model = load_model(run / "model.safetensors")
    reference = load_model(reference_run / "model.safetensors") if reference_run is not None else None
    staged = save_model(model, dest.with_name(f".{dest.stem}.staged{dest.suffix}"), half=True, extra_metadata=meta)
    try:
        checkpoints = {f"{recipe_name(facts['config'])} (shipped)": staged}
        if reference is not None:
            assert reference_run is not None and reference_facts is not None  # read with the reference model
            half = save_model(reference, reference_run / "model_fp16.safetensors", half=True)
            checkpoints[recipe_name(reference_facts["config"])] = half
        checkpoints.update(extra)
        scores = _evaluate(checkpoints, run / "config.yaml")
        clip = _score_clips(checkpoints, Path(clip_out), showcase_image, clip_frames, clip_size)
        clip_facts = f"{clip_frames} frames at {clip_size[0]}x{clip_size[1]}"
        card = _card(facts, reference_facts, meta, scores, clip, staged, clip_facts, _compare_lines(extra), why)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    os.replace(staged, dest)
    card_path = dest.parent / MODEL_CARD.name
    atomic_write(card_path, lambda tmp: Path(tmp).write_text(card))
    summary = {"meta": meta, "heldout_miou": scores, "showcase_clip_miou": clip}
    atomic_write(card_path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    return summary


def _header_facts(run: Path, facts: dict, command: str, device: str) -> dict[str, str]:
    """The training facts stored in the shipped file's header (``blindnet info`` shows them)."""
    cfg = facts["config"]
    cpu = f"CPU ({platform.processor() or platform.machine()}), {cfg['runtime'].get('threads', 0)} thread(s)"
    return {
        "training_command": command or f"python -m blindnet.train --config {cfg['name']} --out {run}",
        "config_name": cfg["name"],
        "data_seed": str(cfg["data"]["seed"]),
        "synthetic_seed": str(cfg["data"]["synthetic"]["seed"]),
        "iterations": str(facts["iterations"]),
        "train_seconds": f"{facts['train_seconds']:.0f}",
        "device": device or ("a CUDA GPU" if cfg["runtime"].get("device") == "cuda" else cpu),
    }


def _score_clips(
    checkpoints: Mapping[str, Path],
    clip_out: Path,
    showcase_image: str | Path | None,
    frames: int,
    size: tuple[int, int],
) -> dict[str, dict[str, float]]:
    """The main job's clip for every checkpoint: mIoU per appearance; the first one's clip also as one picture."""
    clip: dict[str, dict[str, float]] = {}
    for label, path in checkpoints.items():
        predictor = Predictor(TorchBackend(load_model(path)), batch_size=4)
        # One folder per full label: two labels that start alike ("BlindNet (shipped)", "BlindNet (old)") must not share one.
        res = run_synthetic_showcase(predictor, clip_out / file_slug(label), frames=frames, size=size)
        clip[label] = {k: v["miou"] for k, v in res.items() if isinstance(v, dict)}
        if showcase_image is not None and label == next(iter(checkpoints)):
            write_showcase_image(res, showcase_image, frame=frames // 2)
    return clip


def _video_frame(path: str | Path, index: int) -> np.ndarray:
    frames = [f.rgb for f in FrameSource(path, max_frames=index + 1)]
    if len(frames) <= index:
        raise MediaError(f"{path}: has {len(frames)} frames, frame {index} was asked for")
    return frames[index]


def write_showcase_image(results: Mapping, path: str | Path, frame: int = 12, width: int = 256) -> Path:
    """One row per appearance of a ``run_synthetic_showcase`` result: input frame | overlay, each ``width`` wide.

    Returns the PNG's path (the README's picture of what the main job shows).
    """
    rows = []
    for res in results.values():
        if not isinstance(res, Mapping):
            continue
        pair = [_video_frame(res[key], frame) for key in ("input_video", "overlay")]
        height = round(pair[0].shape[0] * width / pair[0].shape[1])
        rows.append(np.concatenate([cv2.resize(im, (width, height), interpolation=cv2.INTER_AREA) for im in pair], 1))
    return write_png(path, np.concatenate(rows, 0))


#: How the alignment losses are written in recipe names.
ALIGN_NAMES = {"l2": "L2", "mmd": "MMD", "cosine": "cosine"}


def recipe_name(cfg: dict) -> str:
    """A short name of a run's recipe from its resolved config: ``BlindNet``, ``DeepLabV3+ baseline, one view``,
    ``DeepLabV3+ on aligned appearances + MMD alignment``, ..."""
    loss, aligned, aligning = cfg["loss"], cfg["data"]["pair"] == "aligned", cfg["loss"].get("align", 0) > 0
    norm = cfg["model"].get("instance_norm", True)
    active = [k.upper() for k in BLINDNET_LOSSES if loss[k] > 0]
    blindnet = norm and bool(active)
    name = "BlindNet" if blindnet else "DeepLabV3+ with InstanceNorm layers" if norm else "DeepLabV3+"
    if blindnet and len(active) < len(BLINDNET_LOSSES):
        # A recipe with only some of the four losses (the decoder's two, say) must not read as the full method.
        name += f" ({' + '.join(active)} only)"
    if aligned:
        name += " on aligned appearances"
    if aligning:
        name += f" + {ALIGN_NAMES.get(loss['align_kind'], loss['align_kind'])} alignment"
    if not (norm or aligned or aligning):
        name += " baseline" + (", one view" if loss.get("views", 2) == 1 else "")
    return name


def recipe_lines(cfg: dict) -> str:
    """Markdown bullets saying what a run trained: the network variant, the loss terms and where x_a came from."""
    loss, model = cfg["loss"], cfg["model"]
    variant = (
        "BlindNet variant (InstanceNorm layers)" if model.get("instance_norm", True) else "Plain (no InstanceNorm)"
    )
    terms = [f"{k.upper()} {loss[k]}" for k in BLINDNET_LOSSES if loss[k] > 0]
    ce = "cross-entropy on x only" if loss.get("views", 2) == 1 else "two-view cross-entropy (x and x_a)"
    if loss.get("align", 0) > 0:
        terms.append(f"{loss['align_kind']} feature alignment {loss['align']} on {', '.join(loss['align_levels'])}")
    pair = (
        "x_a is not used"
        if loss.get("views", 2) == 1
        else "x_a = another real appearance of the same layout (one shared mask)"
        if cfg["data"]["pair"] == "aligned"
        else "x_a = the paper's strong colour jitter + blur of x"
    )
    losses = f"{', '.join(terms)} plus {ce}" if terms else ce.capitalize()
    return f"- {variant}.\n- {losses} and the aux head ({loss['aux']}); {pair}."


def init_text(cfg: dict) -> str:
    """How a run's weights started, from its resolved config and, when it is still there, the init file's header."""
    init = cfg.get("init") or {}
    if not init.get("checkpoint"):
        return "random initialisation (no ImageNet weights: nothing is downloaded)"
    path = Path(init["checkpoint"])
    which = "the encoder" if init.get("part") == "encoder" else "every weight"
    try:
        meta = read_metadata(path)
    except (OSError, CheckpointError):
        meta = {}
    origin = f" (a `--config {meta['run']}` run, {meta.get('step', '?')} iterations)" if "run" in meta else ""
    return f"{which} initialised from `{path}`{origin}, no ImageNet weights"


def _existing_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--compare checkpoint {path} does not exist")
    return path


def _compare_lines(compare: Mapping[str, Path]) -> str:
    """One bullet per extra checkpoint, from the training facts stored in its header (when it has them)."""
    lines = []
    for label, path in compare.items():
        meta = read_metadata(path)
        facts = ""
        if "config_name" in meta:
            minutes = float(meta.get("train_seconds", "nan")) / 60
            facts = f": `--config {meta['config_name']}`, {meta.get('iterations', '?')} iterations, {minutes:.0f} min"
        lines.append(f"- Also scored: {label} (`{path}`){facts}.\n")
    return "".join(lines)


def _table(rows: dict[str, dict[str, float]], columns: Sequence[str]) -> str:
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, vals in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{vals.get(c, float('nan')):.1f}" for c in columns) + " |")
    return "\n".join(lines)


def _card(
    facts, reference_facts, meta, scores, clip, dest: Path, clip_facts: str, extra: str = "", why: str = ""
) -> str:
    cfg = facts["config"]
    apps = ["noon", "sunset", "night", "fog", "rain"]
    size_mb = dest.stat().st_size / 2**20
    n_params = sum(p.numel() for p in load_model(dest).parameters())
    b_line = ""
    if reference_facts is not None:
        b_cfg = reference_facts["config"]
        b_line = (
            f"- Compared with: {recipe_name(b_cfg)} (`--config {b_cfg['name']}`, same data and iterations): "
            f"{reference_facts['iterations']} iterations, {reference_facts['train_seconds'] / 60:.0f} min on the same device.\n"
        )
    why_section = f"\n## Why this model\n{why.strip()}\n" if why.strip() else ""
    return f"""# Model card: blindnet default model

The checkpoint shipped in `blindnet/weights/default.safetensors` ({size_mb:.1f} MB, float16 weights; `load_model`
restores float32). Every entry point (segment, serve, demo, export, benchmarks) uses it when no `--checkpoint` is given.

## What it is
- DeepLabV3+ with a **{cfg["model"]["backbone"]}** encoder, output stride {cfg["model"]["output_stride"]},
  {cfg["model"]["num_classes"]} Cityscapes classes, {n_params:,} parameters, {init_text(cfg)}.
  Recipe: **{recipe_name(cfg)}**.
{recipe_lines(cfg)}
- Data: procedural street scenes from `blindnet.data.synthetic` (synthetic seed {meta["synthetic_seed"]}, data-order
  seed {meta["data_seed"]}), {cfg["data"]["synthetic"]["train_scenes"]} training layouts at
  {cfg["data"]["synthetic"]["height"]}x{cfg["data"]["synthetic"]["width"]}, **only the noon and sunset appearances**;
  night, fog and rain are never seen in training. Crops {cfg["data"]["crop_size"][0]}x{cfg["data"]["crop_size"][1]},
  scale {cfg["data"]["scale_min"]}-{cfg["data"]["scale_max"]}, batch {cfg["optim"]["batch_size"]}, SGD lr
  {cfg["optim"]["lr"]} poly 0.9.

## Training
- Command: `{meta["training_command"]}`
- Config: `train/configs/{cfg["name"]}.yaml` (the resolved config is in the run folder's `config.yaml`).
- {meta["iterations"]} iterations in {float(meta["train_seconds"]) / 60:.0f} minutes on {meta["device"]}, final loss
  {facts["final_loss"]:.3f}. This is a short budget; the model is a demonstrator, not a converged result.
{b_line}{extra}{why_section}
## Held-out scenes: mIoU (%) per appearance
{cfg["data"]["synthetic"]["val_scenes"]} held-out layouts at full {cfg["data"]["synthetic"]["height"]}x{cfg["data"]["synthetic"]["width"]} resolution, last weights, single scale.
Made by `python -m blindnet.train.package_default` (it calls `train.evaluate` on the shipped float16 file):

{_table(scores, apps)}

## The main job's clip: mIoU (%) per appearance
What `blindnet segment --synthetic night,fog,rain --out outputs/showcase` prints with the default seed (2024),
{clip_facts}:

{_table(clip, ["night", "fog", "rain"])}

## Limits
Synthetic scenes are far simpler than real driving footage; this model is for trying the tools, not for driving.
Train on real data with `python -m blindnet.train --config paper_r50_gtav` (see the README).
"""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument(
        "--reference-run", help="a run trained beside --run (same data and budget, another recipe) to score with it"
    )
    p.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="LABEL=CHECKPOINT",
        help="further checkpoints to score beside the shipped model (copy the old default away first)",
    )
    p.add_argument("--dest", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--command", default="")
    p.add_argument("--device", default="")
    p.add_argument("--showcase-image", default=None, help="also write the shipped model's clip as one PNG here")
    p.add_argument("--why", default="", help="the model card's 'Why this model' paragraph (Markdown)")
    args = p.parse_args(argv)
    try:
        compare = key_value_pairs(args.compare, "--compare", form="LABEL=CHECKPOINT")
    except ConfigError as exc:
        p.error(str(exc))
    summary = package_default(
        args.run,
        args.reference_run,
        dest=args.dest,
        command=args.command,
        device=args.device,
        compare=compare,
        showcase_image=args.showcase_image,
        why=args.why,
    )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
