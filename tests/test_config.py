"""Strict config loading: defaults < YAML < --set overrides; typos and wrong types fail loudly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from blindnet.config import ConfigError, key_value_pairs, resolve, save_yaml, to_dict
from blindnet.train.config import load_config


@dataclass
class Inner:
    lr: float = 0.01
    kind: Literal["sgd", "adamw"] = "sgd"
    sizes: tuple[int, int] = (768, 768)


@dataclass
class Outer:
    name: str = "run"
    steps: int = 10
    seed: int | None = None
    inner: Inner = field(default_factory=Inner)
    targets: list[str] = field(default_factory=lambda: ["cityscapes"])


def test_merge_order_and_coercion(tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("steps: 20\ninner:\n  lr: 0.1\n  sizes: [64, 128]\n")
    cfg = resolve(Outer, preset, ["inner.lr=1e-3", "targets=[bdd100k, mapillary]", "seed=3"])
    assert cfg.steps == 20 and cfg.inner.lr == 0.001 and cfg.inner.sizes == (64, 128)
    assert cfg.targets == ["bdd100k", "mapillary"] and cfg.seed == 3 and cfg.inner.kind == "sgd"
    save_yaml(cfg, tmp_path / "resolved.yaml")
    assert resolve(Outer, tmp_path / "resolved.yaml") == cfg
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text()) == to_dict(cfg)


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("stepz: 3\n", [], r"unknown config key\(s\) \['stepz'\]"),
        ("inner:\n  lrr: 3\n", [], r"inner.lrr"),
        ("", ["inner.kind=adam"], "not one of"),
        ("", ["steps=ten"], "expected an integer"),
        ("", ["inner.nope=1"], "unknown key inner.nope"),
        ("", ["steps"], "key.sub=value"),
        ("- a\n- b\n", [], "must be a mapping"),
        ("inner: [1\n", [], "invalid YAML"),
    ],
)
def test_errors_name_the_problem(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve(Outer, preset, overrides)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        resolve(Outer, "/nonexistent/preset.yaml")


def test_extends_merges_over_the_parent_preset(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("steps: 20\ninner:\n  lr: 0.1\n  kind: adamw\ntargets: [a, b]\n")
    (tmp_path / "mid.yaml").write_text("extends: base\ninner:\n  lr: 0.5\n")
    (tmp_path / "leaf.yaml").write_text("extends: mid.yaml\nname: leaf\ntargets: [c]\n")
    cfg = resolve(Outer, tmp_path / "leaf.yaml", ["steps=7"])
    # mappings merge key by key through the chain, lists are replaced, overrides still win
    assert cfg == Outer(name="leaf", steps=7, inner=Inner(lr=0.5, kind="adamw"), targets=["c"])


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"leaf.yaml": "extends: nowhere\n"}, r"'nowhere' not found"),
        ({"leaf.yaml": "extends: [base]\n"}, "must name a preset"),
        ({"leaf.yaml": "extends: a\n", "a.yaml": "extends: leaf\n"}, "loops back"),
        ({"leaf.yaml": "extends: a\n", "a.yaml": "stepz: 1\n"}, r"unknown config key\(s\) \['stepz'\]"),
    ],
)
def test_extends_errors_name_the_file(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve(Outer, tmp_path / "leaf.yaml")


def test_key_value_pairs_split_at_the_first_equals_and_name_the_flag() -> None:
    assert key_value_pairs(["a=1", "b=x=y"], "--opt") == {"a": "1", "b": "x=y"}
    assert key_value_pairs(["blindnet", "b2=Two views"], "--arm", value_optional=True) == {
        "blindnet": "blindnet",
        "b2": "Two views",
    }
    for bad, match in ((["a"], "--opt takes KEY=VALUE, got 'a'"), (["=1"], "got '=1'"), (["a=1", "a=2"], "twice")):
        with pytest.raises(ConfigError, match=match):
            key_value_pairs(bad, "--opt")


def test_yaml_booleans_mean_the_words_on_and_off_where_a_choice_has_them(tmp_path: Path) -> None:
    """YAML 1.1 reads a bare ``off`` as False; a choice field that takes "off" gets the word, in a preset file and in
    ``--set`` alike, and the resolved config written back reads the same."""
    cfg = load_config("dg_cpu_shufflenetv2", ["runtime.amp=off", "runtime.channels_last=on"])
    assert (cfg.runtime.amp, cfg.runtime.channels_last) == ("off", "on")
    assert not cfg.runtime.use_amp("cpu") and cfg.runtime.use_channels_last("cpu")
    preset = tmp_path / "p.yaml"
    preset.write_text("runtime: {amp: off}\n")
    assert load_config(preset).runtime.amp == "off"
    save_yaml(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml").runtime.amp == "off"
    with pytest.raises(ConfigError, match="not one of"):  # a choice without the words stays an error
        resolve(Outer, None, ["inner.kind=yes"])
