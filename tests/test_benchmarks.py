"""benchmarks/: the library measures real (tiny) networks on the CPU and writes rows of the documented schema.

No timing assertions (shared CI machines are noisy): only that times exist, are positive and finite, and that the
arithmetic counts and files are right.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from blindnet.benchmarks.__main__ import main
from blindnet.benchmarks.config import (
    PAPER_ROW,
    PEER_MODEL,
    R50_FLOPS_2048,
    ROW_FIELDS,
    TIME_FIELDS,
    VARIANTS,
    BenchConfig,
)
from blindnet.benchmarks.environment import device_slug, environment_info
from blindnet.benchmarks.latency import run_benchmarks
from blindnet.benchmarks.models import _meta_flops, model_cost, model_specs
from blindnet.benchmarks.profiling import op_type
from blindnet.benchmarks.report import legend_entries, merge_rows, write_results
from blindnet.benchmarks.timing import input_pool, time_calls
from blindnet.models import ModelConfig, build_model, count_parameters

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run():
    """One real run: MobileNetV2 BlindNet at 64x96, batch 1 and 2, eager float32 plus a variant CPUs cannot run."""
    cfg = BenchConfig(
        device="cpu",
        backbones=("mobilenetv2",),
        networks=("blindnet",),
        peer=False,
        size=(64, 96),
        trials=3,
        warmup=1,
        batches=(1, 2),
        variants=("torch-fp32", "torch-tf32"),
        threads=1,
        max_seconds=20.0,
    )
    threads_before = torch.get_num_threads()
    result = run_benchmarks(cfg, log=None)
    assert torch.get_num_threads() == threads_before  # the run restores the caller's thread setting
    return cfg, result


def _assert_timed(row: dict) -> None:
    for key in TIME_FIELDS:
        assert isinstance(row[key], float) and math.isfinite(row[key]), (key, row[key])
    for key in ("mean_ms", "median_ms", "p90_ms", "p99_ms", "min_ms"):
        assert row[key] > 0, (key, row)
    assert row["std_ms"] >= 0
    assert row["min_ms"] <= row["median_ms"] <= row["p99_ms"] + 1e-9
    assert row["trials"] >= 1 and row["images_per_s"] > 0 and row["achieved_tflops"] > 0


def test_rows_follow_the_schema_and_count_flops(tiny_run):
    cfg, result = tiny_run
    rows = result.rows
    assert rows and all(set(r) == set(ROW_FIELDS) for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["scope"], r["batch"]) for r in ok} == {("network", 1), ("network", 2), ("end-to-end", 1)}

    model = build_model(ModelConfig(backbone="mobilenetv2"))
    with torch.device("meta"):
        expected_flops = _meta_flops(build_model(ModelConfig(backbone="mobilenetv2")).eval(), (1, 3, 64, 96))
    for r in ok:
        _assert_timed(r)
        assert (r["height"], r["width"], r["device_type"]) == (64, 96, "cpu")
        assert r["params_deployable"] == count_parameters(model)
        assert r["params_paper"] > r["params_deployable"]  # + the training-only aux head the paper counted
        assert r["flops_g"] == pytest.approx(expected_flops / 1e9, rel=1e-3)
        assert r["macs_g"] > 0
        # achieved TFLOP/s and images/s are derived from the median and the batch
        batch = r["batch"]
        assert r["images_per_s"] == pytest.approx(batch * 1e3 / r["median_ms"], rel=1e-3)
        # GFLOP / ms = TFLOP / s
        assert r["achieved_tflops"] == pytest.approx(
            r["flops_g"] * 1e9 * batch / (r["median_ms"] * 1e-3) / 1e12, rel=1e-3
        )
        assert r["torch"] == torch.__version__ and r["device_name"]


def test_unavailable_variants_become_rows_with_a_reason(tiny_run):
    _, result = tiny_run
    skipped = [r for r in result.rows if r["variant"] == "torch-tf32"]
    assert skipped and all(r["status"] == "skipped" and "cuda" in r["note"] for r in skipped)
    assert all(r["median_ms"] == "" for r in skipped)


def test_profile_groups_time_by_layer_type(tiny_run):
    _, result = tiny_run
    prof = result.profiles["torch-fp32"]
    kinds = {e["type"]: e for e in prof["by_type"]}
    assert "convolution" in kinds and kinds["convolution"]["ms"] > 0
    assert sum(e["share"] for e in prof["by_type"]) == pytest.approx(1.0, rel=1e-6)
    assert prof["top_ops"] and prof["top_ops"][0]["ms"] > 0
    assert op_type("aten::mkldnn_convolution") == "convolution"
    assert op_type("sm90_xmma_fprop_implicit_gemm_f16") == "convolution"
    assert op_type("triton_poi_fused_add_relu_0") == "fused (triton)"
    assert op_type("InstanceNormalization") == "normalization"
    assert op_type("ReorderOutput") == "copy/layout/cast"


def test_write_results_and_append(tiny_run, tmp_path):
    _, result = tiny_run
    paths = write_results(result, tmp_path, "run", command="python -m blindnet.benchmarks --test")
    assert {p.suffix for p in paths.values()} == {".csv", ".json", ".md", ".png"}
    with open(paths["csv"]) as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == ROW_FIELDS
        assert len(list(reader)) == len(result.rows)
    md = paths["md"].read_text()
    assert "Cost table" in md and "Where the time goes" in md and "End-to-end" in md and "Throughput" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Appending the same measurements replaces rows instead of duplicating them; new keys are added.
    write_results(result, tmp_path, "run", command="again", append=True)
    data = json.loads(paths["json"].read_text())
    assert len(data["rows"]) == len(result.rows) and data["command"] == [
        "python -m blindnet.benchmarks --test",
        "again",
    ]
    extra = dict(result.rows[0], batch=99)
    assert len(merge_rows(result.rows, [extra])) == len(result.rows) + 1


def test_cli_quick_writes_every_file(tmp_path):
    from blindnet.checkpoint import load_checkpoint_state
    from blindnet.resolve import default_checkpoint

    assert main(["--quick", "--out", str(tmp_path), "--name", "quick"]) == 0
    data = json.loads((tmp_path / "quick.json").read_text())
    rows = data["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    # --quick times the model a user runs by default: the shipped checkpoint, its backbone and variant.
    shipped = load_checkpoint_state(default_checkpoint())[0]
    network = "blindnet" if shipped.instance_norm else "baseline"
    assert {r["model"] for r in ok} == {f"{network}-{shipped.backbone}"}
    assert {r["weights"] for r in ok} == {f"checkpoint {default_checkpoint().name}"}
    # The latency legend lists what ran, nothing else.
    assert legend_entries([r for r in ok if r["scope"] == "network" and r["batch"] == 1]) == (
        ["torch", "onnxruntime"],
        ["float32"],
    )
    assert {r["backend"] for r in ok} >= {"torch"}
    for r in ok:
        _assert_timed(r)
        assert r["flops_g"] > 0
    assert {r["variant"] for r in rows} == {"torch-fp32", "ort-cpu-fp32"}
    for suffix in ("csv", "md", "png"):
        assert (tmp_path / f"quick.{suffix}").stat().st_size > 0
    assert data["environment"]["device_type"] == "cpu"
    assert data["command"] == [f"python -m blindnet.benchmarks --quick --out {tmp_path} --name quick"]


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        BenchConfig(variants=("nope",)).validate()
    with pytest.raises(ValueError, match="unknown backbone"):
        BenchConfig(backbones=("vgg",)).validate()
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--variants", "nope"])
    assert exc.value.code == 2
    assert main(["--list-variants"]) == 0
    assert set(VARIANTS) >= {"torch-fp32", "torch-compile-ro-fp16-cl", "ort-cuda-fp16", "trt-fp16"}


def test_time_calls_rotates_fresh_random_inputs():
    pool = input_pool(
        (1, 3, 8, 8), dtype=torch.float32, device=torch.device("cpu"), channels_last=False, pool_bytes=1 << 20, seed=0
    )
    assert 2 <= len(pool) <= 8
    assert all(float(x.abs().sum()) > 0 for x in pool)  # never zeros
    assert not torch.equal(pool[0], pool[1])
    seen: list[int] = []
    timing = time_calls(lambda x: seen.append(id(x)), pool, device="cpu", warmup=2, trials=10)
    assert timing.trials == 10 and timing.warmup == 2 and len(seen) == 12
    assert set(seen) == {id(x) for x in pool}
    assert np.isfinite(timing.ms).all() and (timing.ms >= 0).all()


def test_paper_row_footnote_uses_the_counted_flops():
    with torch.device("meta"):
        flops = _meta_flops(build_model(ModelConfig(backbone="resnet50")).eval(), (1, 3, 1024, 2048))
    assert flops == pytest.approx(R50_FLOPS_2048, rel=1e-4)
    # At V100's float32 peak one image needs >= 70 ms; the paper reports 10.03 ms.
    assert flops / 15.7e12 * 1e3 > 70 > PAPER_ROW["mean_ms"]


def test_peer_is_torchvision_deeplabv3_with_our_contract():
    specs = model_specs(BenchConfig(backbones=("resnet50",), networks=("blindnet", "baseline")))
    assert [s.name for s in specs] == ["blindnet-resnet50", "baseline-resnet50", PEER_MODEL]
    peer = specs[-1].build("cpu").eval()
    with torch.no_grad():
        out = peer(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 19, 64, 64)  # x -> logits, same classes as ours
    cost = model_cost(specs[-1], (64, 64))
    assert cost.flops_g > 0 and cost.params_deployable == count_parameters(peer)


def test_device_slug_is_file_name_safe():
    slug = device_slug(environment_info("cpu"))
    assert slug.startswith("cpu-") and all(c.isalnum() or c == "-" for c in slug)
