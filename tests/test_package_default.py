"""The model card names the recipe a run trained, from its resolved config (not a hard-coded "BlindNet")."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from blindnet.backends.torch_backend import TorchBackend
from blindnet.checkpoint import CheckpointError, load_model, read_metadata, save_model
from blindnet.config import save_yaml, to_dict
from blindnet.data.datasets import DatasetError
from blindnet.data.synthetic import write_aligned_dataset
from blindnet.inference import Predictor
from blindnet.models import build_model
from blindnet.segment import run_synthetic_showcase
from blindnet.train.config import load_config
from blindnet.train.package_default import (
    _card,
    _compare_lines,
    init_text,
    main,
    package_default,
    recipe_lines,
    recipe_name,
    write_showcase_image,
)


@pytest.mark.parametrize(
    ("preset", "name", "facts"),
    [
        ("dg_cpu_shufflenetv2", "BlindNet", ["InstanceNorm layers", "CML 0.2, CCL 0.2, CWCL 0.3, SDCL 0.3", "jitter"]),
        ("dg_cpu_shufflenetv2_baseline", "DeepLabV3+ baseline", ["no InstanceNorm", "Two-view cross-entropy"]),
        ("dg_cpu_shufflenetv2_baseline_one_view", "DeepLabV3+ baseline, one view", ["on x only", "x_a is not used"]),
        (
            "dg_cpu_shufflenetv2_aligned_mmd",
            "DeepLabV3+ on aligned appearances + MMD alignment",
            ["mmd feature alignment 1.0 on layer3, layer4", "another real appearance"],
        ),
        ("dg_cpu_shufflenetv2_blindnet_aligned", "BlindNet on aligned appearances", ["SDCL 0.3", "real appearance"]),
        (
            "default_shufflenetv2_aligned_mmd",
            "DeepLabV3+ on aligned appearances + MMD alignment",
            ["another real appearance"],
        ),
        ("default_shufflenetv2", "BlindNet", ["CML 0.2, CCL 0.2, CWCL 0.3, SDCL 0.3", "jitter"]),
        ("default_shufflenetv2_baseline", "DeepLabV3+ baseline", ["no InstanceNorm", "jitter"]),
        ("default_shufflenetv2_in_cwcl_sdcl", "BlindNet (CWCL + SDCL only)", ["InstanceNorm layers", "CWCL 0.3, SDCL"]),
        ("style_cpu_shufflenetv2_in", "DeepLabV3+ with InstanceNorm layers", ["InstanceNorm layers", "Two-view"]),
    ],
)
def test_recipe_is_described_from_the_config(preset: str, name: str, facts: list[str]) -> None:
    cfg = to_dict(load_config(preset))
    assert recipe_name(cfg) == name
    text = recipe_lines(cfg)
    assert all(f in text for f in facts), text


def test_card_says_where_the_weights_started(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A warm-started recipe names its init file and what trained it; a fresh one says random initialisation."""
    assert init_text(to_dict(load_config("default_shufflenetv2_baseline"))).startswith("random initialisation")
    warm = tmp_path / "warm.safetensors"
    save_model(
        load_model(tiny_checkpoint), warm, extra_metadata={"run": "default_warmstart_shufflenetv2", "step": "1200"}
    )
    cfg = to_dict(load_config("default_shufflenetv2_in_cwcl_sdcl"))
    cfg["init"]["checkpoint"] = str(warm)
    expected = (
        f"the encoder initialised from `{warm}` (a `--config default_warmstart_shufflenetv2` run, 1200 iterations)"
    )
    assert init_text(cfg) == expected + ", no ImageNet weights"
    # The card is written after training, when the init file may be gone: the path alone still says where it began.
    cfg["init"] |= {"checkpoint": str(tmp_path / "gone.safetensors"), "part": "model"}
    assert init_text(cfg) == f"every weight initialised from `{tmp_path / 'gone.safetensors'}`, no ImageNet weights"


def test_compared_checkpoints_are_described_from_their_headers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """An extra checkpoint (the previously shipped file, say) is listed with the training facts its header holds."""
    old = tmp_path / "old.safetensors"
    facts = {"config_name": "default_shufflenetv2_blindnet", "iterations": "800", "train_seconds": "2994"}
    save_model(load_model(tiny_checkpoint), old, half=True, extra_metadata=facts)
    text = _compare_lines({"previous default": old, "bare": tiny_checkpoint})
    assert "previous default" in text and "`--config default_shufflenetv2_blindnet`, 800 iterations, 50 min" in text
    assert f"bare (`{tiny_checkpoint}`)." in text


def test_compare_needs_label_and_existing_file(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--run", str(tmp_path), "--compare", str(tiny_checkpoint)])
    assert "LABEL=CHECKPOINT" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        main(["--run", str(tmp_path), "--compare", f"old={tmp_path / 'missing.safetensors'}"])


def test_showcase_image_pairs_each_appearance_input_with_its_overlay(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The README picture: one row per appearance, the clip's input frame left and the model's overlay right."""
    predictor = Predictor(TorchBackend(load_model(tiny_checkpoint)), batch_size=2)
    res = run_synthetic_showcase(predictor, tmp_path, appearances=("night", "fog"), frames=3, size=(64, 128))
    image = np.array(Image.open(write_showcase_image(res, tmp_path / "show.png", frame=1, width=96)))
    assert image.shape == (2 * 48, 2 * 96, 3)
    for row, app in enumerate(("night", "fog")):
        cap = cv2.VideoCapture(res[app]["input_video"])
        for _ in range(2):
            ok, frame = cap.read()
        cap.release()
        expected = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), (96, 48), interpolation=cv2.INTER_AREA)
        left, right = image[row * 48 : (row + 1) * 48, :96], image[row * 48 : (row + 1) * 48, 96:]
        assert ok and np.abs(left.astype(int) - expected).mean() < 1.0
        assert np.abs(right.astype(int) - left).mean() > 5.0  # the overlay is not the input


def test_card_says_why_this_model_only_when_told(tiny_checkpoint: Path) -> None:
    """The card's "Why this model" section carries the packager's reason, and is absent without one."""
    cfg = to_dict(load_config("default_shufflenetv2_baseline"))
    facts = {"config": cfg, "iterations": 1600, "train_seconds": 133.0, "final_loss": 0.9}
    meta = {"training_command": "blindnet train", "iterations": "1600", "train_seconds": "133", "device": "a GPU"}
    meta |= {"synthetic_seed": "0", "data_seed": "304"}
    scores = {"DeepLabV3+ baseline (shipped)": {"noon": 36.43, "night": 13.27}}
    clip = {"DeepLabV3+ baseline (shipped)": {"night": 7.61}}
    with_why = _card(facts, None, meta, scores, clip, tiny_checkpoint, "24 frames", why="It scored best on night.\n")
    assert "Recipe: **DeepLabV3+ baseline**" in with_why
    assert "\n## Why this model\nIt scored best on night.\n" in with_why
    assert "| DeepLabV3+ baseline (shipped) | 36.4 | nan | 13.3 |" in with_why
    assert "Why this model" not in _card(facts, None, meta, scores, clip, tiny_checkpoint, "24 frames")


APPEARANCES = ("noon", "sunset", "night", "fog", "rain")


def _run_folder(root: Path, preset: str, scenes: Path, seed: int) -> Path:
    """A finished run as ``blindnet train`` leaves it (resolved config, log, last weights), scored on ``scenes``."""
    targets = ", ".join(
        f"{{dataset: aligned, root: '{scenes}', split: val, options: {{appearance: {a}}}}}" for a in APPEARANCES
    )
    cfg = load_config(preset, [f"eval.targets=[{targets}]", "runtime.device=cpu"])
    root.mkdir()
    save_yaml(cfg, root / "config.yaml")
    (root / "train_log.csv").write_text("step,elapsed_s,loss\n1600,133.0,1.071\n")
    torch.manual_seed(seed)
    save_model(build_model(cfg.model), root / "model.safetensors")
    return root


def test_packaging_ships_the_run_and_scores_it_beside_the_reference(tmp_path: Path) -> None:
    """A baseline run packaged with a BlindNet run beside it: the shipped file holds the baseline's weights (float16)
    and training facts, the card and its JSON name each recipe and score both on every held-out appearance."""
    scenes = tmp_path / "scenes"
    write_aligned_dataset(scenes, num_scenes=2, seed=99, height=64, width=128, split="val", progress=False)
    base = _run_folder(tmp_path / "gpu_baseline", "default_shufflenetv2_baseline", scenes, seed=0)
    blind = _run_folder(tmp_path / "gpu_blindnet", "default_shufflenetv2", scenes, seed=1)
    dest = tmp_path / "weights" / "default.safetensors"
    summary = package_default(
        base, blind, dest=dest, clip_out=tmp_path / "clip", showcase_image=tmp_path / "show.png",
        why="The better of two.", clip_frames=2, clip_size=(64, 128),
    )  # fmt: skip

    shipped, trained = load_model(dest), load_model(base / "model.safetensors")
    assert not shipped.config.instance_norm
    for (name, a), b in zip(shipped.state_dict().items(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b.half().float() if b.is_floating_point() else b), name
    meta = read_metadata(dest)
    assert meta["config_name"] == "default_shufflenetv2_baseline" and meta["iterations"] == "1600"

    labels = ["DeepLabV3+ baseline (shipped)", "BlindNet"]
    assert list(summary["heldout_miou"]) == labels and list(summary["showcase_clip_miou"]) == labels
    assert all(sorted(row) == sorted(APPEARANCES) for row in summary["heldout_miou"].values())
    assert summary["heldout_miou"][labels[0]] != summary["heldout_miou"][labels[1]]  # two different models scored
    assert json.loads((dest.parent / "MODEL_CARD.json").read_text()) == json.loads(json.dumps(summary))
    card = (dest.parent / "MODEL_CARD.md").read_text()
    assert "Recipe: **DeepLabV3+ baseline**" in card and "- Plain (no InstanceNorm)." in card
    assert "Compared with: BlindNet (`--config default_shufflenetv2`, same data and iterations)" in card
    assert "## Why this model\nThe better of two.\n" in card and "2 frames at 64x128" in card
    assert np.array(Image.open(tmp_path / "show.png")).shape == (3 * 128, 2 * 256, 3)


def test_a_failed_packaging_leaves_the_shipped_model_and_card_as_they_were(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A reference run without weights is refused before anything is written; a failure while scoring (here the
    held-out scenes are missing) removes the staged file and keeps the old model and card."""
    dest = tmp_path / "weights" / "default.safetensors"
    dest.parent.mkdir()
    dest.write_bytes(tiny_checkpoint.read_bytes())
    (dest.parent / "MODEL_CARD.md").write_text("old card")
    scenes = tmp_path / "scenes"
    write_aligned_dataset(scenes, num_scenes=1, seed=99, height=64, width=128, split="val", progress=False)
    good = _run_folder(tmp_path / "good", "default_shufflenetv2_baseline", scenes, seed=0)
    no_weights = _run_folder(tmp_path / "no_weights", "default_shufflenetv2", scenes, seed=1)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="checkpoint not found: .*no_weights"):
        package_default(good, no_weights, dest=dest, clip_out=tmp_path / "clip", clip_frames=2, clip_size=(64, 128))
    with pytest.raises(FileNotFoundError, match=r"not_a_run: not a finished training run \(no config.yaml, train_log"):
        package_default(tmp_path / "not_a_run", dest=dest)
    broken = _run_folder(tmp_path / "broken", "default_shufflenetv2_baseline", tmp_path / "missing", seed=0)
    with pytest.raises(DatasetError, match="missing does not exist"):
        package_default(broken, dest=dest, clip_out=tmp_path / "clip", clip_frames=2, clip_size=(64, 128))
    assert dest.read_bytes() == tiny_checkpoint.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["MODEL_CARD.md", "default.safetensors"]
    assert (dest.parent / "MODEL_CARD.md").read_text() == "old card"
