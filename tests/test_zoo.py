"""Models by name: the published model fetched from a real HTTP server on loopback, converted, checked and cached;
interrupted, wrong and offline downloads; ``blindnet models``; manual registration; the one-line Python API."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import importlib
import inspect
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import blindnet
from blindnet import cli, zoo
from blindnet.checkpoint import read_metadata
from blindnet.inference import Predictor
from blindnet.io import ImageError, write_png
from blindnet.modelnames import MODEL_NAMES
from tests.original_reference import original_forward
from tests.original_snapshot import write_original_snapshot
from tests.test_checkpoint import fabricate_variant_state

REPO = Path(__file__).resolve().parents[1]
NAME = zoo.PUBLISHED_NAME
URL_VAR = zoo.url_override_variable(NAME)
#: How long a "stall" server hangs: several times the 0.5 s read timeout the stall test sets, so the download can
#: only have ended through the timeout.
STALL_S = 4.0


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files[path] = (bytes, mode)``; mode ``"cut"`` announces the full length and sends half,
    ``"stall"`` sends half and then nothing for ``STALL_S`` seconds (a server that hangs mid-file)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        data, mode = self.server.files.get(self.path, (None, ""))  # type: ignore[attr-defined]
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if mode in ("cut", "stall") else data)
        if mode == "stall":
            self.wfile.flush()
            time.sleep(STALL_S)
        if mode in ("cut", "stall"):
            self.close_connection = True  # the connection drops mid-file, as a network failure would do

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serving(files: dict[str, tuple[bytes, str]]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 (a free port) in a thread; yields its base URL, stops on exit."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    server.files = files  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def dead_url() -> str:
    """A loopback URL on a port that nothing listens on (connection refused: what offline looks like)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/blindnet.pth"


@pytest.fixture(scope="module")
def r50_snapshot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ResNet-50 BlindNet snapshot written as the original writes it (what the published Drive file is)."""
    torch.set_num_threads(1)
    official = fabricate_variant_state("resnet50", True)
    path = write_original_snapshot(tmp_path_factory.mktemp("snap") / "best_cityscapes.pth", official)
    return path, official


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BLINDNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "cache"


def _cache_is_empty(cache: Path) -> bool:
    models = cache / "models"
    return not models.exists() or not any(models.iterdir())


def test_every_public_name_resolves() -> None:
    for name in blindnet.__all__:
        assert getattr(blindnet, name) is not None, name
    assert blindnet.TorchBackend.__name__ == "TorchBackend" and blindnet.BackendOutput.__name__ == "BackendOutput"
    with pytest.raises(AttributeError):
        blindnet.NoSuchThing  # noqa: B018


def test_segment_by_name_downloads_once_then_works_offline(tmp_path: Path, r50_snapshot) -> None:
    """``blindnet segment photo.jpg --checkpoint blindnet-r50-gtav``: first run fetches from a loopback server,
    converts, checks and caches (SHA-256 printed and recorded); the second runs with the server stopped."""
    snapshot, official = r50_snapshot
    data = snapshot.read_bytes()
    photo = tmp_path / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photo, quality=95)
    env = {**os.environ, "BLINDNET_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}

    def segment(out: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "blindnet",
            "segment",
            str(photo),
            "--checkpoint",
            NAME,
            "--out",
            str(tmp_path / out),
        ]
        # --backend torch: the auto backend would also export ResNet-50 to ONNX here, which is not what this tests.
        return subprocess.run([*cmd, "--backend", "torch"], env=env, capture_output=True, text=True, timeout=300)

    with serving({"/best.pth": (data, "")}) as base:
        env[URL_VAR] = f"{base}/best.pth"
        first = segment("first")
    assert first.returncode == 0, first.stderr[-3000:]
    digest = hashlib.sha256(data).hexdigest()
    assert f"downloading once from {base}/best.pth" in first.stderr
    assert "CC BY-NC-SA" in first.stderr and "BSD-3-Clause" in first.stderr and zoo.ORIGINAL_REPOSITORY in first.stderr
    assert f"SHA-256 of the downloaded file: {digest}" in first.stderr
    record = json.loads((tmp_path / "cache" / "models" / f"{NAME}.json").read_text())
    assert record["sha256"] == digest and record["source"] == f"{base}/best.pth"
    # The server is gone: the second run needs no network.
    second = segment("second")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "downloading" not in second.stderr
    labels = [Image.open(next((tmp_path / d).rglob("*_labels.png"))) for d in ("first", "second")]
    assert np.array_equal(np.asarray(labels[0]), np.asarray(labels[1]))
    # What was cached is the original network: its logits match the independent reference of the original forward.
    model = blindnet.load_model(tmp_path / "cache" / "models" / f"{NAME}.safetensors")
    x = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, _ = original_forward(official, x, backbone="resnet50", blindnet=True)
        # 1e-4 relative: float32 summation order differs between the two implementations, nothing else.
        assert (model(x) - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_interrupted_and_wrong_downloads_leave_no_cache_entry(
    cache: Path, monkeypatch: pytest.MonkeyPatch, r50_snapshot
) -> None:
    data = r50_snapshot[0].read_bytes()
    mobilenet = io.BytesIO()
    torch.save({"state_dict": fabricate_variant_state("mobilenetv2", True)}, mobilenet)
    files = {
        "/cut.pth": (data, "cut"),
        "/page.pth": (b"<!DOCTYPE html><html><title>Google Drive - Virus scan warning</title></html>", ""),
        "/junk.pth": (b"\x80\x02 not a pickle at all " * 100, ""),
        "/other-network.pth": (mobilenet.getvalue(), ""),
    }
    with serving(files) as base:
        for path, reason in [
            ("/cut.pth", "stopped after"),
            ("/page.pth", "web page"),
            ("/junk.pth", "cannot read the official checkpoint"),
            ("/other-network.pth", "missing tensor"),
            ("/missing.pth", "HTTP 404"),
        ]:
            monkeypatch.setenv(URL_VAR, base + path)
            with pytest.raises(zoo.ZooError, match=reason):
                zoo.fetch(NAME, progress=False)
            assert not zoo.is_cached(NAME) and _cache_is_empty(cache), path


def test_a_stalled_server_ends_the_download_with_the_manual_route(
    cache: Path, monkeypatch: pytest.MonkeyPatch, r50_snapshot
) -> None:
    """Both download routes give up once the server sends nothing for the read timeout, with the by-hand command."""
    monkeypatch.setattr(zoo, "DOWNLOAD_TIMEOUT_S", 0.5)
    with serving({"/stall.pth": (r50_snapshot[0].read_bytes(), "stall")}) as base:
        monkeypatch.setenv(URL_VAR, base + "/stall.pth")
        start = time.monotonic()
        with pytest.raises(zoo.ZooError, match="timed out.*blindnet convert FILE --name"):
            zoo.fetch(NAME, progress=False)
        assert time.monotonic() - start < STALL_S and not zoo.is_cached(NAME) and _cache_is_empty(cache)


def test_the_drive_route_runs_gdown_against_a_real_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Google Drive route is gdown; a plain loopback URL takes its non-Drive path, which is the same transfer
    (Drive itself cannot be reached here). A whole file arrives, and a cut or stalled one is a ZooError."""
    pytest.importorskip("gdown")
    monkeypatch.setattr(zoo, "DOWNLOAD_TIMEOUT_S", 0.5)
    payload = os.urandom(1 << 16)
    files = {"/whole.pth": (payload, ""), "/cut.pth": (payload, "cut"), "/stall.pth": (payload, "stall")}
    with serving(files) as base:
        zoo._download_drive(base + "/whole.pth", tmp_path / "whole.pth", name=NAME, progress=False)
        assert (tmp_path / "whole.pth").read_bytes() == payload
        for path in ("/cut.pth", "/stall.pth"):
            start = time.monotonic()
            with pytest.raises(zoo.ZooError, match="cannot download .*blindnet convert FILE --name") as err:
                zoo._download_drive(base + path, tmp_path / path[1:], name=NAME, progress=False)
            assert time.monotonic() - start < STALL_S, path
            # One line, without gdown's advice to resume with its own command line.
            assert "\n" not in str(err.value) and "--continue" not in str(err.value)


def test_folders_left_by_a_killed_download_are_removed_later(cache: Path) -> None:
    models = cache / "models"
    old, live = models / f".{NAME}-download-abc", models / f".{NAME}-download-def"
    for folder in (old, live):
        folder.mkdir(parents=True)
        (folder / "download.pth").write_bytes(b"partial")
    day_ago = time.time() - zoo.STALE_DOWNLOAD_SECONDS - 60
    os.utime(old, (day_ago, day_ago))
    assert zoo.remove_stale_downloads(NAME) == 1
    assert not old.exists() and live.exists() and not zoo.is_cached(NAME)  # a recent one may be another download


def test_offline_gives_one_line_with_the_url_and_the_manual_command(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    url = dead_url()
    monkeypatch.setenv(URL_VAR, url)
    assert cli.main(["info", NAME]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("blindnet info: error: cannot download blindnet-r50-gtav from " + url)
    assert err.endswith(f"blindnet convert FILE --name {NAME}")
    # Jobs that check their files before PyTorch loads take the name too, and fail the same way.
    assert cli.main(["export", "--checkpoint", NAME, "--out", str(cache.parent / "export")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"cannot download blindnet-r50-gtav from {url}" in err and "no such file" not in err
    assert _cache_is_empty(cache)


def test_a_file_downloaded_by_hand_is_registered_under_the_name(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, r50_snapshot
) -> None:
    monkeypatch.setenv(URL_VAR, dead_url())  # nothing would download: the registered file must be what is used
    assert cli.main(["convert", str(r50_snapshot[0]), "--name", NAME]) == 0
    assert f"registered {NAME}" in capsys.readouterr().out
    path = zoo.checkpoint_path(NAME)
    assert path == cache / "models" / f"{NAME}.safetensors" and zoo.is_cached(NAME)
    assert zoo.read_record(NAME)["sha256"] == hashlib.sha256(r50_snapshot[0].read_bytes()).hexdigest()
    meta = read_metadata(path)
    assert meta["model_name"] == NAME and meta["variant"] == "blindnet"
    with pytest.raises(SystemExit):  # a file to write and a name: one or the other
        cli.main(["convert", str(r50_snapshot[0]), "out.safetensors", "--name", NAME])
    assert cli.main(["models", "--remove", NAME]) == 0
    assert not zoo.is_cached(NAME) and _cache_is_empty(cache)


def test_models_lists_every_entry_with_its_terms(cache: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["models"]) == 0
    text = capsys.readouterr().out
    for name in zoo.MODELS:
        assert f"\n{name}  [" in "\n" + text, name
    assert "CC BY-NC-SA" in text and "BSD-3-Clause" in text and zoo.ORIGINAL_REPOSITORY in text
    assert f"blindnet convert FILE --name {NAME}" in text and "not cached" in text
    assert cli.main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert set(listed) == set(zoo.MODELS)
    assert listed[NAME]["url"] == "https://drive.google.com/uc?id=1Kkdl_2xjE9iooA1Is5VWcjeRcuzaJ8Pi"
    assert listed[NAME]["cached"] is False and listed[zoo.SHIPPED_NAME]["cached"] is True
    for entry in listed.values():
        assert all(entry[k] for k in ("source", "recipe", "data", "scores", "size", "terms")), entry["name"]


def test_backbone_entries_are_torchvisions_files_and_a_bad_download_is_refused(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.models import MobileNet_V2_Weights, ResNet50_Weights, ShuffleNet_V2_X1_0_Weights

    weights = {
        "resnet50": ResNet50_Weights.IMAGENET1K_V1,
        "mobilenetv2": MobileNet_V2_Weights.IMAGENET1K_V1,
        "shufflenetv2": ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1,
    }
    for backbone, w in weights.items():
        e = zoo.MODELS[f"imagenet-{backbone}"]
        assert e.url == w.url and e.kind == "backbone"
        # Where torchvision itself would look, so a training run with pretrained_backbone finds the file.
        assert zoo.cached_file(e.name) == Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
        with pytest.raises(zoo.ZooError, match="not a segmentation model"):
            zoo.checkpoint_path(e.name)
    # A file whose SHA-256 does not start with the hash in torchvision's file name is refused and not kept.
    with serving({"/r50.pth": (b"not the resnet weights", "")}) as base:
        monkeypatch.setenv(zoo.url_override_variable("imagenet-resnet50"), f"{base}/r50.pth")
        with pytest.raises(zoo.ZooError, match="cannot download imagenet-resnet50"):
            zoo.fetch("imagenet-resnet50", progress=False)
    assert not zoo.cached_file("imagenet-resnet50").exists()


def test_a_training_run_is_told_which_imagenet_file_it_needs(cache: Path) -> None:
    line = zoo.backbone_report("mobilenetv2")
    assert "imagenet-mobilenetv2 is not cached" in line and "blindnet models --fetch imagenet-mobilenetv2" in line
    target = zoo.cached_file("imagenet-mobilenetv2")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"weights")  # what torchvision would have fetched (content is torchvision's concern)
    assert zoo.backbone_report("mobilenetv2") == f"ImageNet weights: imagenet-mobilenetv2 ({target})"
    assert zoo.describe("imagenet-mobilenetv2")["cached"] is True


def test_names_resolve_wherever_a_checkpoint_is_taken(cache: Path) -> None:
    from blindnet.resolve import DEFAULT_CHECKPOINT, is_shipped_model, resolve_checkpoint

    assert MODEL_NAMES == tuple(zoo.MODELS)  # the light list the CLIs check arguments with
    assert resolve_checkpoint(zoo.SHIPPED_NAME) == DEFAULT_CHECKPOINT and is_shipped_model(zoo.SHIPPED_NAME)
    with pytest.raises(blindnet.CheckpointError, match="neither a file nor a model name.*blindnet-r50-gtav"):
        resolve_checkpoint("blindnet-r50-gta")
    with pytest.raises(blindnet.CheckpointError, match="checkpoint not found: runs/x/model.safetensors"):
        resolve_checkpoint("runs/x/model.safetensors")  # a missing path is named as one, before any backend opens it
    assert resolve_checkpoint(str(DEFAULT_CHECKPOINT)) == DEFAULT_CHECKPOINT  # a path stays a path
    demo_main = importlib.import_module("blindnet.demo.__main__")
    assert demo_main.model_specs([zoo.SHIPPED_NAME], None) == [("default", DEFAULT_CHECKPOINT)]
    ray_serve = importlib.import_module("blindnet.serve.ray_serve")  # replicas get the cached file, not the name
    args = ray_serve.build_parser("serve --ray").parse_args(["--checkpoint", zoo.SHIPPED_NAME])
    assert ray_serve.config_from_args(args).checkpoint == str(DEFAULT_CHECKPOINT)


def test_predictor_from_checkpoint_uses_auto_and_takes_paths_arrays_pil_images_and_lists(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # The default backend is the CLI's (`auto`; what it picks is tested in test_auto_backend.py); torch here keeps
    # this test clear of the ONNX export that `auto` makes on CPU.
    default = inspect.signature(Predictor.from_checkpoint).parameters["backend"].default
    assert default == "auto" == cli.segment_parser().get_default("backend")
    predictor = Predictor.from_checkpoint(tiny_checkpoint, backend="torch")
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    write_png(path, array)
    pil = Image.fromarray(array)
    single = [predictor.predict(x)[0].labels for x in (array, str(path), path, pil)]
    batch = predictor.predict([array, path, pil])
    assert len(batch) == 3 and all(np.array_equal(p.labels, single[0]) for p in batch)
    assert all(np.array_equal(lab, single[0]) for lab in single)
    grey16 = Image.fromarray(array[..., 0].astype(np.uint16) * 257)  # a 16-bit grey PIL image (mode I;16)
    assert predictor.predict(grey16)[0].labels.shape == (40, 56)
    with pytest.raises(ImageError, match="PIL image"):
        predictor.predict([object()])
