"""Cost report: the paper's parameter counts, MACs in both conventions, what 277.78 "GFLOPs" means, and the
BlindNet-vs-baseline graph difference. Counting runs on the meta device (no memory, about a second per size)."""

from __future__ import annotations

import pytest

from blindnet.export.__main__ import main as export_main
from blindnet.export.cost import aux_head_params, compare_with_baseline, cost_report, parameter_counts, render_markdown
from blindnet.models import ModelConfig


@pytest.fixture(scope="module")
def r50_report() -> dict:
    return cost_report("resnet50", sizes=[(1024, 2048), (1024, 1024)])


def test_resnet50_parameter_counts(r50_report: dict) -> None:
    p = r50_report["parameters"]
    assert p["deployable"] == 40_351_539  # 40.35M: what export/serve ship
    assert p["aux_head"] == 4_729_875  # 3x3 conv 1024->512 + bias, BN(512), 1x1 conv 512->19 + bias
    assert p["paper_comparable"] == 45_081_414  # the paper's 45.08M
    assert round(p["paper_comparable"] / 1e6, 2) == 45.08 and round(p["deployable"] / 1e6, 2) == 40.35
    assert p["executed"] == p["deployable"]
    assert p["with_projection_heads"] == 50_104_694  # all training modules of the original
    base = r50_report["baseline"]["parameters"]
    assert base["deployable"] - p["deployable"] == 128  # stem BatchNorm(64) weight + bias
    assert base["paper_comparable"] == 45_081_542


def test_aux_head_is_generic() -> None:
    assert aux_head_params(1024, 19) == 4_729_875
    # MobileNetV2 (layer3 320 ch) and ShuffleNetV2 (464 ch): the original's counts with/without the dsn head.
    assert parameter_counts("mobilenetv2")["paper_comparable"] == 14_840_966
    assert parameter_counts("shufflenetv2")["paper_comparable"] == 12_637_738
    assert parameter_counts(ModelConfig(backbone="resnet50", num_classes=7))["aux_head"] == aux_head_params(1024, 7)


def test_resnet50_macs_both_conventions(r50_report: dict) -> None:
    full, square = r50_report["costs"]
    assert (full["height"], full["width"]) == (1024, 2048)
    # FlopCounterMode: FLOPs = 2 x conv MACs = 1107.43 G at 2048x1024.
    assert full["flop_counter"]["flops"] == pytest.approx(1107.43e9, rel=1e-4)
    assert full["flop_counter"]["macs"] * 2 == full["flop_counter"]["flops"]
    assert full["conv_macs"] == full["flop_counter"]["macs"]  # the hooks and FlopCounterMode agree on convolutions
    # thop-style MACs (conv + norm + pool + upsample): ~556 G at 2048x1024, ~277.5 G at 1024x1024.
    assert full["thop"]["macs"] == pytest.approx(556e9, rel=0.01)
    assert square["thop"]["macs"] == pytest.approx(277.5e9, rel=0.01)
    assert full["thop"]["macs"] > full["conv_macs"]
    assert set(full["thop"]["by_kind"]) >= {"conv", "norm", "pool", "upsample"}


def test_paper_number_is_thop_macs_at_1024x1024(r50_report: dict) -> None:
    paper = r50_report["paper"]
    best = paper["best_match"]
    assert best["convention"] == "thop MACs" and (best["height"], best["width"]) == (1024, 1024)
    assert abs(best["off_by_pct"]) < 0.5
    # Nothing at the stated 2048x1024 comes within 90% of it.
    assert all(abs(c["off_by_pct"]) > 90 for c in paper["at_stated_resolution"])
    md = render_markdown(r50_report)
    assert "277.78" in md and "1024x1024" in md and "45,081,414" in md and "40,351,539" in md


def test_any_size_and_bad_sizes() -> None:
    r = cost_report("mobilenetv2", sizes=[(720, 1280)], baseline=False)
    assert r["costs"][0]["width"] == 1280 and r["costs"][0]["thop"]["macs"] > 0
    with pytest.raises(ValueError, match="sizes"):
        cost_report("mobilenetv2", sizes=[(8, 8)])


def _check_comparison(cmp: dict, n_in: int) -> None:
    assert cmp["same_size"], cmp["unexplained"]
    assert cmp["blindnet"]["ops"]["InstanceNormalization"] == n_in
    assert "InstanceNormalization" not in cmp["baseline"]["ops"]
    for d in cmp["op_differences"]:
        assert d["explanation"], d  # every difference explained
    assert cmp["blindnet"]["ops"]["Conv"] == cmp["baseline"]["ops"]["Conv"]


def test_blindnet_and_baseline_graphs_mobilenet() -> None:
    cmp = compare_with_baseline(ModelConfig(backbone="mobilenetv2"), exporter="torchscript")
    _check_comparison(cmp, 3)
    assert cmp["parameters"]["delta"] == 0  # MobileNetV2's IN layers are added after blocks: no BN replaced


@pytest.mark.slow
def test_blindnet_and_baseline_graphs_resnet50() -> None:
    cmp = compare_with_baseline(ModelConfig(backbone="resnet50"), exporter="torchscript")
    _check_comparison(cmp, 3)
    assert cmp["parameters"]["delta"] == -128
    (row,) = cmp["parameters"]["breakdown"]
    assert row["delta"] == -128 and "stem" in row["explanation"]
    assert row["keys"] == ["encoder.layer0.1.bias", "encoder.layer0.1.weight"]


@pytest.mark.slow
def test_blindnet_and_baseline_graphs_shufflenet() -> None:
    cmp = compare_with_baseline(ModelConfig(backbone="shufflenetv2"), exporter="auto")
    _check_comparison(cmp, 3)
    assert any("never executed" in r["explanation"] for r in cmp["parameters"]["breakdown"])


def test_cost_report_alone_exports_nothing(tiny_checkpoint, tmp_path) -> None:
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--cost-report", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "cost.json").is_file() and (tmp_path / "cost.md").is_file()
    assert not list(tmp_path.glob("*.onnx"))  # the report is counted on the model, no ONNX export first
