"""Training runs as a user drives them from the command line: a folder holding a run is never overwritten, a killed
write leaves nothing behind after the next start, a full disk is named and leaves a resumable run, a finished run can
be extended, Ctrl-C saves and says how to resume, a run can start from existing weights, and the final evaluation
equals ``blindnet evaluate`` on the saved model."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blindnet.data.synthetic import write_aligned_dataset

H, W = 64, 128
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    write_aligned_dataset(root, num_scenes=4, seed=0, height=H, width=W, split="train", progress=False)
    write_aligned_dataset(root, num_scenes=1, seed=99, height=H, width=W, split="val", progress=False)
    return root


def tiny_args(root: Path, out: Path, **extra: object) -> list[str]:
    """``blindnet train`` arguments for a 2-iteration MobileNetV2 run on 48x96 crops, single-threaded (the shared CPU
    is oversubscribed otherwise), evaluated on one held-out night scene."""
    ov = {
        "data.train": f"[{{dataset: aligned, root: '{root}', split: train, options: {{appearances: [noon, sunset]}}}}]",
        "eval.targets": f"[{{dataset: aligned, root: '{root}', split: val, options: {{appearance: night}}}}]",
        "data.crop_size": "[48, 96]",
        "data.synthetic.generate": "false",
        "optim.max_iter": "2",
        "runtime.ckpt_interval": "1",
        "runtime.log_interval": "1",
        "runtime.threads": "1",
        "runtime.progress": "false",
        "runtime.keep_checkpoints": "0",
        "runtime.amp": "bfloat16",  # the periodic evaluations may use autocast; the final one must not
    }
    ov.update({k: str(v) for k, v in extra.items()})
    args = ["--config", "synthetic_smoke", "--out", str(out)]
    for k, v in ov.items():
        args += ["--set", f"{k}={v}"]
    return args


def cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blindnet.train", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


@pytest.fixture(scope="module")
def finished(scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-iteration run (checkpoints at 1 and 2, the model, the tables), written by the real CLI."""
    from blindnet.train.__main__ import main

    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(tiny_args(scenes, run)) == 0
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_second_train_out_leaves_a_finished_run_alone(scenes: Path, finished: Path, tmp_path: Path) -> None:
    from blindnet.train.__main__ import main
    from blindnet.train.loop import describe_existing_run

    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    res = cli(tiny_args(scenes, run))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "already holds a finished run (2 iterations)" in res.stderr and "--resume" in res.stderr
    assert "Traceback" not in res.stderr
    assert _snapshot(run) == before  # not one byte changed

    # A folder whose run stopped before its first checkpoint holds nothing to resume: a new run may start there.
    stopped_early = tmp_path / "early"
    stopped_early.mkdir()
    for name in ("config.yaml", "train_log.csv"):
        shutil.copy(run / name, stopped_early / name)
    assert describe_existing_run(stopped_early) is None
    assert describe_existing_run(run) == "a finished run (2 iterations)"

    # --overwrite moves the old run aside, whole, and starts a new one in its place.
    assert main([*tiny_args(scenes, run, **{"optim.max_iter": 1}), "--overwrite"]) == 0
    (aside,) = tmp_path.glob("run.replaced-*")
    assert _snapshot(aside) == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt_0000001.pt"]


def test_a_killed_write_leaves_no_temporary_after_the_next_start(finished: Path, tmp_path: Path, capsys) -> None:
    from blindnet.train.__main__ import main

    run = _copy(finished, tmp_path)
    (run / "model.safetensors").unlink()  # killed before the final save ...
    # ... while writing a checkpoint: atomic_write's temporary sibling, holding the first half of a real checkpoint.
    data = (run / "checkpoints" / "ckpt_0000002.pt").read_bytes()
    stale = run / "checkpoints" / ".ckpt_0000002.pt.k1ll3d.tmp"
    stale.write_bytes(data[: len(data) // 2])
    assert main(["--resume", str(run)]) == 0
    assert not stale.exists() and not list(run.rglob(".*.tmp"))
    assert "removed 1 temporary file(s) left by an interrupted write" in capsys.readouterr().out
    # The final evaluation ran again and replaced its earlier row instead of adding a second one.
    finals = [r for r in _rows(run / "eval.csv") if r["final"] == "1"]
    assert [r["step"] for r in finals] == ["2"]
    assert [r["step"] for r in _rows(run / "train_log.csv")] == ["1", "2"]


def test_resume_extends_a_finished_run_and_refuses_what_cannot_change(finished: Path, tmp_path: Path) -> None:
    from blindnet.train.__main__ import main
    from blindnet.train.loop import load_training_checkpoint

    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    res = cli(["--resume", str(run)])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "already finished (2 of 2 iterations); nothing to do" in res.stdout
    assert "optim.max_iter=" in res.stdout and "UserWarning" not in res.stderr
    assert _snapshot(run) == before

    res = cli(["--resume", str(run), "--set", "optim.lr=0.1", "--set", "loss.cml=0.25"])
    assert res.returncode == 2 and "cannot change on resume" in res.stderr
    assert "optim.lr (0.01 -> 0.1)" in res.stderr and "loss.cml (" in res.stderr

    res = cli(["--resume", str(run), "--set", "optim.max_iter=4"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "schedule: 2 -> 4 iterations" in res.stdout
    assert [r["step"] for r in _rows(run / "train_log.csv")] == ["1", "2", "3", "4"]
    lr3 = float(_rows(run / "train_log.csv")[2]["lr"])
    assert lr3 == pytest.approx(0.01 * (1 - 2 / 4) ** 0.9, rel=1e-9)  # the poly schedule over 4, not 0 (over 2)
    finals = [(r["step"], r["final"]) for r in _rows(run / "eval.csv")]
    assert finals == [("2", "1"), ("4", "1")]  # the step-2 result stays on record, once
    assert load_training_checkpoint(run)["step"] == 4
    assert main(["--resume", str(run), "--set", "optim.max_iter=3"]) == 2  # shorter than done: refused
    # Resuming into another folder that holds a run would take it over: refused like a new run.
    other = _copy(finished, tmp_path / "other")
    before = _snapshot(other)
    assert main(["--resume", str(run), "--out", str(other), "--set", "optim.max_iter=5"]) == 2
    assert _snapshot(other) == before


def test_final_evaluation_equals_blindnet_evaluate_on_the_saved_model(scenes: Path, finished: Path) -> None:
    from blindnet.data import build_eval_dataset
    from blindnet.train.evaluate import evaluate_checkpoints

    final = next(r for r in _rows(finished / "eval.csv") if r["final"] == "1")
    ds = build_eval_dataset("aligned", str(scenes), "val", appearance="night")
    got = evaluate_checkpoints({"run": finished / "model.safetensors"}, {"night": ds}, progress=False)
    # Same float32 weights, same data, same float32 forward pass: the same confusion matrix, to the printed digit.
    assert f"{got['run']['night'].miou * 100:.4f}" == f"{float(final['mIoU']):.4f}"


def test_init_from_a_checkpoint_loads_exactly_the_encoder(finished: Path, scenes: Path, tmp_path: Path) -> None:
    from blindnet.checkpoint import load_model
    from blindnet.models import build_model
    from blindnet.train.__main__ import main
    from blindnet.train.config import load_config
    from blindnet.train.loop import init_weights

    source = load_model(finished / "model.safetensors").state_dict()
    torch.manual_seed(1)
    net = build_model(load_config(finished / "config.yaml").model)
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    loaded = init_weights(net, finished / "model.safetensors", "encoder")
    assert loaded == sorted(k for k in fresh if k.startswith("encoder."))
    for k, v in net.state_dict().items():
        expected = source[k] if k.startswith("encoder.") else fresh[k]
        assert torch.equal(v, expected), k

    out = tmp_path / "ft"
    args = tiny_args(scenes, out, **{"optim.max_iter": 1, "eval.targets": "[]"})
    assert main([*args, "--init", str(finished / "model.safetensors"), "--init-part", "encoder"]) == 0
    recorded = load_config(out / "config.yaml").init
    assert recorded.part == "encoder" and Path(recorded.checkpoint) == (finished / "model.safetensors").resolve()


def test_ctrl_c_saves_names_the_checkpoint_and_the_resume_command(scenes: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = tiny_args(scenes, run, **{"optim.max_iter": 500, "runtime.ckpt_interval": 1000, "eval.targets": "[]"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "blindnet.train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "train_log.csv").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (run / "train_log.csv").exists(), "training never started"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    (ckpt,) = (run / "checkpoints").glob("ckpt_*.pt")
    step = int(ckpt.stem.split("_")[1])
    assert f"interrupted after iteration {step}; last checkpoint: {ckpt}" in err
    assert f"python -m blindnet.train --resume {run}" in err
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["step"] == step
    # The printed command continues from there (shortened here to one more iteration).
    from blindnet.train.__main__ import main

    assert main(["--resume", str(run), "--set", f"optim.max_iter={step + 1}"]) == 0
    assert [int(r["step"]) for r in _rows(run / "train_log.csv")][-2:] == [step, step + 1]


def _userns_tmpfs_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _userns_tmpfs_works(), reason="needs user+mount namespaces to mount a small tmpfs")
def test_a_full_disk_is_named_and_the_last_checkpoint_resumes(finished: Path, scenes: Path, tmp_path: Path) -> None:
    from blindnet.train.__main__ import main

    # A real full disk: a tmpfs in a private mount namespace with room for one checkpoint, not two.
    ckpt_size = (finished / "checkpoints" / "ckpt_0000001.pt").stat().st_size
    disk, saved = tmp_path / "disk", tmp_path / "saved"
    disk.mkdir()
    args = " ".join(f"'{a}'" for a in tiny_args(scenes, disk / "run", **{"eval.targets": "[]"}))
    script = (
        f"mount -t tmpfs -o size={int(ckpt_size * 1.5)} tmpfs {disk} && "
        f"{sys.executable} -m blindnet.train {args}; rc=$?; cp -a {disk}/run {saved}; exit $rc"
    )
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=240, env=ENV)
    assert res.returncode == 4, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "ckpt_0000002.pt: the disk is full" in last and "ckpt_0000001.pt is intact" in last
    assert "Traceback" not in res.stderr and "unexpected pos" not in res.stderr
    assert sorted(p.name for p in (saved / "checkpoints").iterdir()) == ["ckpt_0000001.pt"]  # no temporary left
    assert main(["--resume", str(saved)]) == 0  # the last good checkpoint continues the run on a disk with room
    assert (saved / "model.safetensors").is_file()
