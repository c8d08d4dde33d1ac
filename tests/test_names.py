"""Every backbone name is defined once (:data:`blindnet.architectures.BACKBONES`), every precision name once
(:data:`blindnet.precisions.PRECISIONS`); every place that lists or keys by them agrees."""

from __future__ import annotations

import typing

import pytest

from blindnet.architectures import BACKBONE_NAMES, BACKBONES
from blindnet.backends.base import norm_stride_of
from blindnet.benchmarks.config import BACKBONES as BENCH_BACKBONES
from blindnet.checkpoint import VARIANT_PROBES
from blindnet.cli import main
from blindnet.models import ModelConfig, build_model
from blindnet.models.backbones import ENCODERS


def test_model_encoders_config_cli_and_benchmarks_use_the_one_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert tuple(ENCODERS) == BACKBONE_NAMES
    assert typing.get_args(typing.get_type_hints(ModelConfig)["backbone"]) == BACKBONE_NAMES
    assert BENCH_BACKBONES == BACKBONE_NAMES
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "{" + ",".join(BACKBONE_NAMES) + "}" in capsys.readouterr().out
    assert set(VARIANT_PROBES) == {n for n, b in BACKBONES.items() if b.variant_probes}


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_each_backbone_entry_matches_the_network_it_builds(name: str) -> None:
    facts = BACKBONES[name]
    model = build_model(ModelConfig(backbone=name, instance_norm=True))
    assert tuple(model.encoder.style_channels) == facts.style_channels
    modules = dict(model.named_modules())
    for probe in facts.variant_probes:
        assert type(modules[probe.removeprefix("model.")]).__name__ == "BatchNorm2d", probe
    assert norm_stride_of(ModelConfig(backbone=name)) == facts.norm_stride
    assert norm_stride_of(ModelConfig(backbone=name, instance_norm=False)) == 0


def test_an_unknown_backbone_is_named_not_defaulted() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        norm_stride_of({"backbone": "vgg16"})
    assert norm_stride_of({}) == 16  # a foreign file that names no backbone: a multiple of every stride


def test_every_precision_list_uses_the_one_spelling(capsys: pytest.CaptureFixture[str]) -> None:
    from blindnet.backends.base import DTYPES
    from blindnet.benchmarks.config import VARIANTS
    from blindnet.export.engine import PRECISIONS as TRT_PRECISIONS
    from blindnet.precisions import INFERENCE_PRECISIONS, PRECISIONS
    from blindnet.train.config import RuntimeConfig

    assert set(INFERENCE_PRECISIONS) <= set(PRECISIONS)
    assert set(DTYPES) <= set(PRECISIONS) and set(TRT_PRECISIONS) <= set(PRECISIONS)
    amp = typing.get_args(typing.get_type_hints(RuntimeConfig)["amp"])
    assert set(amp) - {"auto", "off"} <= set(PRECISIONS)
    assert {v.precision for v in VARIANTS.values()} <= set(PRECISIONS)
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    assert "{" + ",".join(INFERENCE_PRECISIONS) + "}" in capsys.readouterr().out


def test_every_backend_choice_is_the_backend_table(capsys: pytest.CaptureFixture[str]) -> None:
    from blindnet.backends import BACKEND_NAMES
    from blindnet.backends.select import BACKENDS

    assert set(BACKEND_NAMES) == set(BACKENDS) and len(BACKEND_NAMES) == len(BACKENDS)
    for job, names in (("segment", BACKEND_NAMES), ("serve", BACKEND_NAMES), ("demo", sorted(BACKEND_NAMES))):
        with pytest.raises(SystemExit):
            main([job, "--help"])
        assert "{" + ",".join(names) + "}" in capsys.readouterr().out, job


def test_the_pair_mode_has_one_name_per_mode() -> None:
    from blindnet.data.datasets import PAIR_MODES
    from blindnet.train.config import DataConfig

    assert typing.get_args(typing.get_type_hints(DataConfig)["pair"]) == PAIR_MODES
