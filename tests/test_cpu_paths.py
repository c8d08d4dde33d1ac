"""``blindnet bench cpu-paths`` on a tiny network: every path runs, the ratios come from the recorded times."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from blindnet.benchmarks.__main__ import main
from blindnet.benchmarks.cpu_paths import PATHS


def test_cpu_paths_report(tmp_path: Path) -> None:
    argv = [
        "cpu-paths",
        "--backbones",
        "mobilenetv2",
        "--size",
        "64",
        "128",
        "--trials",
        "2",
        "--warmup",
        "0",
        "--threads",
        "1",
        # The TorchScript exporter: seconds instead of ~30 s; the dynamo exporter has its own tests.
        "--onnx-exporter",
        "torchscript",
        "--train-backbones",
        "mobilenetv2",
        "--train-steps",
        "1",
        "--train-size",
        "64",
        "96",
        "--out",
        str(tmp_path),
        "--name",
        "tiny",
    ]
    assert main(argv) == 0
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert (tmp_path / "tiny.md").read_text().count("| mobilenetv2 |") == len(PATHS)
    assert (tmp_path / "tiny.png").stat().st_size > 0
    [bb] = result["inference"]
    assert [r["path"] for r in bb["rows"]] == list(PATHS)
    med = {name: statistics.median(ts) for name, ts in bb["times_ms"].items()}
    # The report rounds each ratio to 3 decimals (<= 5e-4 absolute) and keeps the raw times: the speedup check holds
    # for any speedup above 0.05 (measured <= 5.2e-4 relative), the overhead check with 4x margin (measured 4.3e-4).
    for r in bb["rows"]:
        assert r["trials"] == 2
        assert r["network_speedup"] == pytest.approx(med["torch-eager/network"] / med[f"{r['path']}/network"], rel=1e-2)
        assert r["end_to_end_overhead"] == pytest.approx(
            med[f"{r['path']}/end_to_end"] / med[f"{r['path']}/network"] - 1, abs=2e-3
        )
    assert 0.0 <= bb["int8_check"]["label_agreement"] <= 1.0
    [train] = result["train_step"]
    assert len(train["eager_losses"]) == len(train["best_losses"]) == 1
