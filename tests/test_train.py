"""The training loop end to end on CPU: a tiny MobileNetV2 BlindNet on procedural aligned scenes trains, writes
atomic checkpoints and logs, resumes exactly, evaluates, stops on a NaN loss, and rejects broken configs/data."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch

from blindnet.checkpoint import load_model
from blindnet.config import ConfigError
from blindnet.data.synthetic import write_aligned_dataset
from blindnet.task import ABLATIONS
from blindnet.train.config import CONFIG_DIR, load_config

H, W = 64, 128


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    write_aligned_dataset(root, num_scenes=6, seed=0, height=H, width=W, split="train", progress=False)
    write_aligned_dataset(root, num_scenes=2, seed=99, height=H, width=W, split="val", progress=False)
    return root


def tiny_overrides(root: Path, **extra: object) -> list[str]:
    """synthetic_smoke, made smaller and single-threaded (the CI CPU is shared; OpenMP spinning makes 2 threads
    ten times slower there)."""
    ov = {
        "data.train": f"[{{dataset: aligned, root: '{root}', split: train, options: {{appearances: [noon, sunset]}}}}]",
        "eval.targets": f"[{{dataset: aligned, root: '{root}', split: val, options: {{appearance: night}}}}]",
        "data.crop_size": "[48, 96]",
        "data.synthetic.generate": "false",
        "optim.max_iter": "6",
        "runtime.ckpt_interval": "3",
        "runtime.log_interval": "2",
        "eval.interval": "3",
        "runtime.threads": "1",
        "runtime.progress": "false",
        "runtime.keep_checkpoints": "0",
    }
    ov.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in ov.items()]


def test_every_preset_loads_and_ablations_match() -> None:
    presets = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(presets) >= 18
    for path in presets:
        cfg = load_config(path)
        assert cfg.name, path
    for row, loss in ABLATIONS.items():
        cfg = load_config(CONFIG_DIR / f"ablation_{row.replace('+', '_')}.yaml")
        for k in ("cml", "ccl", "cwcl", "sdcl", "aux"):
            assert getattr(cfg.loss, k) == getattr(loss, k), (row, k)
    full = load_config("synthetic_full")
    assert [t.options["appearance"] for t in full.eval.targets] == ["noon", "sunset", "night", "fog", "rain"]
    assert full.data.train[0].options["appearances"] == ["noon", "sunset"]
    assert load_config("batch_stats_r50_gtav").model.in_train_stats == "batch"


def test_unknown_keys_and_bad_values_raise(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 0.01, lerning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match="lerning_rate"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config("synthetic_smoke", ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="max_iter"):
        load_config("synthetic_smoke", ["optim.max_iter=0"])
    with pytest.raises(ConfigError, match="no preset"):
        load_config("no_such_preset")


def _log_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.numerics
def test_smoke_train_checkpoint_resume_evaluate(scenes: Path, tmp_path: Path) -> None:
    from blindnet.train.evaluate_cli import main as evaluate_main
    from blindnet.train.loop import train

    cfg = load_config("synthetic_smoke", tiny_overrides(scenes))
    run = tmp_path / "run"
    full = train(cfg, run)

    # Everything a run promises is on disk.
    for name in ("config.yaml", "train_log.csv", "eval.csv", "model.safetensors", "miou.md", "class_iou.csv"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert load_config(run / "config.yaml").optim.max_iter == 6  # the resolved config round-trips
    ckpts = sorted((run / "checkpoints").glob("ckpt_*.pt"))
    assert [p.name for p in ckpts] == ["ckpt_0000003.pt", "ckpt_0000006.pt"]
    state = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    assert {"model", "model_config", "task", "optimizer", "scheduler", "step", "config", "rng", "version"} <= set(state)
    assert state["step"] == 3 and state["config"]["optim"]["max_iter"] == 6
    assert not list((run / "checkpoints").glob(".*tmp"))  # atomic writes leave no temporaries
    rows = _log_rows(run / "train_log.csv")
    assert [int(r["step"]) for r in rows] == [2, 4, 6] and all(math.isfinite(float(r["loss"])) for r in rows)
    assert {"ce", "aux", "cml", "ccl", "cwcl", "sdcl", "lr", "it_per_s"} <= set(rows[0])
    evals = _log_rows(run / "eval.csv")
    assert [(int(r["step"]), r["final"]) for r in evals] == [(3, "0"), (6, "1")]
    losses = [h["loss"] for h in full["history"]]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    # Poly LR per iteration: lr_t = 0.01 * (1 - t / 6) ** 0.9 (the same float64 formula: measured equal).
    assert full["history"][1]["lr"] == pytest.approx(0.01 * (1 - 1 / 6) ** 0.9)

    # Resume from the mid-run checkpoint in a fresh folder: same data, same sampling, same losses. The same kernels
    # on the same inputs give bitwise the same numbers (measured equal with AVX-512 and with ATEN_CPU_CAPABILITY=default
    # ONEDNN_MAX_CPU_ISA=SSE41); the tolerances are slack for float32 round-off only.
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpts[0], resumed_dir / "checkpoints" / ckpts[0].name)
    resumed = train(cfg, resumed_dir, resume=resumed_dir)
    assert [h["step"] for h in resumed["history"]] == [4, 5, 6]
    for a, b in zip(full["history"][3:], resumed["history"]):
        for key in ("loss", "ce", "cwcl", "sdcl", "cml"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    night = "aligned:night"
    assert resumed["eval"][night].miou == pytest.approx(full["eval"][night].miou, abs=1e-6)

    # The deployable file and the training checkpoint both load as the bare network, and agree.
    net = load_model(run / "model.safetensors")
    net_pt = load_model(ckpts[-1])
    x = torch.randn(1, 3, H, W)
    assert torch.allclose(net(x), net_pt(x), atol=1e-5)  # the same weights: measured equal on both paths

    # Evaluation CLI: a table shaped like Table 1, plus per-class tables.
    out = tmp_path / "eval"
    rc = evaluate_main(
        [
            "--checkpoint",
            str(run / "model.safetensors"),
            "--dataset",
            "aligned",
            "aligned",
            "--root",
            str(scenes),
            str(scenes),
            "--option",
            "appearance=fog",
            "--out",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    md = (out / "miou.md").read_text()
    assert md.startswith("| method | aligned:fog |") and "| run |" in md
    assert "road" in (out / "class_iou.csv").read_text().splitlines()[0]


def test_nan_loss_stops_with_step_terms_and_checkpoint(scenes: Path, tmp_path: Path, capsys) -> None:
    from blindnet.train.__main__ import main

    ov = tiny_overrides(scenes, **{"optim.lr": "1e30", "runtime.ckpt_interval": "1", "eval.targets": "[]"})
    args = ["--config", "synthetic_smoke", "--out", str(tmp_path / "nan")]
    for o in ov:
        args += ["--set", o]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "non-finite loss at iteration 2" in err
    assert "ce=" in err and "cwcl=" in err
    assert "ckpt_0000001.pt" in err


def test_dataset_with_missing_labels_fails_before_training(tmp_path: Path) -> None:
    from blindnet.data import DatasetError
    from blindnet.train.loop import train

    root = tmp_path / "broken"
    write_aligned_dataset(root, num_scenes=3, seed=1, height=H, width=W, split="train", progress=False)
    write_aligned_dataset(root, num_scenes=1, seed=2, height=H, width=W, split="val", progress=False)
    (root / "train" / "labels" / "scene_000001.png").unlink()
    cfg = load_config("synthetic_smoke", tiny_overrides(root))
    with pytest.raises(DatasetError, match="no label"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # not even a config.yaml: the failed start wrote nothing
    # With --overwrite, the run already in the folder stays where it was, byte for byte, when the new one cannot start.
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"the previous run's weights")
    (old / "config.yaml").write_text("name: previous\n")
    with pytest.raises(DatasetError, match="no label"):
        train(cfg, old, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "old"]
    assert (old / "model.safetensors").read_bytes() == b"the previous run's weights"


def test_evaluate_cli_offers_exactly_the_library_protocols() -> None:
    from blindnet.data.transforms import EVAL_PROTOCOLS
    from blindnet.train.evaluate_cli import PROTOCOLS

    assert tuple(PROTOCOLS) == tuple(EVAL_PROTOCOLS)
