"""The style benchmark's presets: arms that differ only in what defines them, and three disjoint sets of layouts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blindnet.config import ConfigError
from blindnet.train.config import load_config
from blindnet.train.data import ensure_synthetic

ARMS = {
    "style_cpu_shufflenetv2": {},  # F: the reference
    "style_cpu_shufflenetv2_plain": {
        "model.instance_norm": False,
        "loss.cml": 0.0,
        "loss.ccl": 0.0,
        "loss.cwcl": 0.0,
        "loss.sdcl": 0.0,
    },
    "style_cpu_shufflenetv2_in": {"loss.cml": 0.0, "loss.ccl": 0.0, "loss.cwcl": 0.0, "loss.sdcl": 0.0},
    "style_cpu_shufflenetv2_in_cml_ccl": {"loss.cwcl": 0.0, "loss.sdcl": 0.0},
    "style_cpu_shufflenetv2_in_cwcl_sdcl": {"loss.cml": 0.0, "loss.ccl": 0.0},
}


def _flat(obj: object, prefix: str = "") -> dict[str, object]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, object] = {}
        for f in dataclasses.fields(obj):
            out.update(_flat(getattr(obj, f.name), f"{prefix}{f.name}."))
        return out
    return {prefix[:-1]: obj}


@pytest.mark.parametrize("arm", list(ARMS))
def test_each_arm_differs_from_f_only_in_what_defines_it(arm: str) -> None:
    ref, cfg = _flat(load_config("style_cpu_shufflenetv2", [])), _flat(load_config(arm, []))
    diff = {k: cfg[k] for k in ref if cfg[k] != ref[k] and k != "name"}
    assert diff == ARMS[arm]
    assert cfg["init.checkpoint"] and cfg["init.part"] == "encoder"  # every arm starts from the warm start's encoder


def test_train_sees_style_a_only_and_the_targets_cover_style_lighting_and_both() -> None:
    cfg = load_config("style_cpu_shufflenetv2", [])
    assert cfg.data.train[0].options["appearances"] == ["noon", "sunset"]
    shown = [t.options["appearance"] for t in cfg.eval.targets]
    assert shown == ["noon", "sunset", "b-noon", "night", "fog", "rain", "b-night", "b-fog", "b-rain"]
    select = load_config("style_cpu_shufflenetv2_select", [])
    assert {t.split for t in select.eval.targets} == {"select"} and {t.split for t in cfg.eval.targets} == {"val"}
    # Both sets score side by side in one eval.csv, so their labels must differ.
    assert not {t.label for t in select.eval.targets} & {t.label for t in cfg.eval.targets}
    warm = load_config("style_warmstart_shufflenetv2", [])
    assert warm.loss.views == 1 and not warm.model.instance_norm and not warm.init.checkpoint


def test_train_val_and_select_layouts_are_disjoint(tmp_path: Path) -> None:
    cfg = load_config(
        "style_cpu_shufflenetv2",
        [
            "data.synthetic.train_scenes=2",
            "data.synthetic.val_scenes=2",
            "data.synthetic.height=32",
            "data.synthetic.width=64",
            "data.synthetic.appearances=[noon, b-noon]",
            "runtime.progress=false",
        ],
    )
    masks = {}
    for split in ("train", "val", "select"):
        root = ensure_synthetic(tmp_path, split, cfg)
        masks[split] = [np.array(Image.open(p)) for p in sorted((root / split / "labels").glob("*.png"))]
        assert len(masks[split]) == 2 and (root / split / "b-noon").is_dir()
    for a, b in (("train", "val"), ("train", "select"), ("val", "select")):
        assert not any(np.array_equal(x, y) for x in masks[a] for y in masks[b]), (a, b)
    with pytest.raises(ConfigError, match="synthetic split 'test'"):
        ensure_synthetic(tmp_path, "test", cfg)


@pytest.mark.slow
def test_the_gpu_script_runs_every_arm_and_seed_at_toy_size(tmp_path: Path) -> None:
    """``SMOKE=1`` runs benchmarks/evidence_gpu.sh's steps on the CPU at toy sizes (about 90 s on 2 cores)."""
    import os
    import subprocess
    import sys
    import tarfile

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path / "out"), "PY": sys.executable}
    res = subprocess.run(
        ["bash", str(repo / "benchmarks" / "evidence_gpu.sh"), "900"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    with tarfile.open(tmp_path / "out" / "runs.tgz") as tar:
        names = tar.getnames()
    runs = {n.split("/")[1] for n in names if n.count("/") == 2 and n.endswith("/eval.csv")}
    assert runs == {f"{arm}_s{s}" for arm in ("plain", "in", "f") for s in (1, 2, 3)} | {"warmstart"}
