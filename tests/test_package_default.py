"""The model card names the recipe a run trained, from its resolved config (not a hard-coded "BlindNet")."""

from __future__ import annotations

import pytest

from blindnet.config import to_dict
from blindnet.train.config import load_config
from blindnet.train.package_default import recipe_lines, recipe_name


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
    ],
)
def test_recipe_is_described_from_the_config(preset: str, name: str, facts: list[str]) -> None:
    cfg = to_dict(load_config(preset))
    assert recipe_name(cfg) == name
    text = recipe_lines(cfg)
    assert all(f in text for f in facts), text
