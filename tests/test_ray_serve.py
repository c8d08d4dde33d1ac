"""Scale-out on Ray Serve: the documented command, run as a subprocess, serves the same API as ``blindnet serve``.

The tests marked ``ray`` start a real private Ray instance with two single-threaded replicas of a tiny real model
(``pytest -m ray``; skipped where ``ray[serve]`` is not installed) and compare every answer, status code and probe
with the single-machine server (uvicorn, in this process) and with the in-process Predictor.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from blindnet.backends.torch_backend import TorchBackend
from blindnet.serve.__main__ import build_parser as serve_main_parser
from blindnet.serve.app import BackgroundServer, create_app
from blindnet.serve.config import ServeConfig, serve_values
from blindnet.serve.ray_serve import RayServeConfig, build_parser, config_from_args
from tests.conftest import free_port_number
from tests.test_serve import BAD_INPUTS, MAX_BYTES, MAX_PIXELS

tritonclient_http = pytest.importorskip("tritonclient.http")
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray[serve] is an optional extra (pip install 'blindnet[ray]')"
)
H, W = 64, 96
# The batch size of test_serve's server (its bad-input messages name it); a long queue delay keeps requests queued in
# the replicas when SIGTERM arrives.
BATCH, DELAY_MS = 8, 1500.0


def test_config_is_strict_and_guards_batching() -> None:
    with pytest.raises(ValueError, match="unknown config key.*for RayServeConfig"):
        RayServeConfig.from_dict({"replica": 2})
    with pytest.raises(ValueError, match="never hold enough requests to fill a batch"):
        RayServeConfig.from_dict({"max_batch_size": 8, "max_ongoing_requests": 4})
    opts = RayServeConfig.from_dict({"num_replicas": 3, "num_gpus_per_replica": 0.5}).deployment_options()
    assert opts["num_replicas"] == 3 and opts["ray_actor_options"]["num_gpus"] == 0.5
    assert opts["max_ongoing_requests"] == 16


def test_flags_override_the_yaml_file_and_paths_resolve_from_the_current_folder(tmp_path, monkeypatch) -> None:
    (tmp_path / "ray.yaml").write_text("checkpoint: m.safetensors\nnum_replicas: 3\nmax_batch_size: 2\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"")
    cfg = config_from_args(
        build_parser().parse_args(["--config", "ray.yaml", "--replicas", "2", "--checkpoint", "x.safetensors"]), {}
    )
    assert cfg.num_replicas == 2 and cfg.max_batch_size == 2  # the flag wins, the file's other keys stay
    assert cfg.checkpoint == str(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="m.safetensors does not exist"):  # refused before Ray starts
        config_from_args(build_parser().parse_args(["--config", "ray.yaml"]), {})
    (tmp_path / "bad.yaml").write_text("replicas: 2\n")
    with pytest.raises(ValueError, match="unknown config key"):
        config_from_args(build_parser().parse_args(["--config", "bad.yaml"]), {})


def test_replicas_get_exactly_the_settings_blindnet_serve_gets() -> None:
    flags = [
        "--max-batch-size", "4", "--max-request-mb", "2", "--max-decode-pixels", "5000", "--body-timeout-s", "3",
        "--overlay-alpha", "0.25", "--max-json-values", "1000", "--header-timeout-s", "2", "--input-size", "8", "16",
    ]  # fmt: skip
    single = ServeConfig(**serve_values(serve_main_parser().parse_args(flags)))
    ray = config_from_args(build_parser().parse_args(flags), {})
    assert ray.serve == single  # what each replica's app is built with (ray_replica.serve_config)
    assert single.max_decode_pixels == 5000 and single.overlay_alpha == 0.25 and single.input_size == (8, 16)
    # Every ServeConfig field is a flag of both commands, and a YAML key of both forms.
    names = {f.name for f in dataclasses.fields(ServeConfig)}
    assert names <= set(vars(serve_main_parser().parse_args([])))
    assert RayServeConfig.from_dict({"serve": {"max_json_values": 7}}).serve.max_json_values == 7
    assert RayServeConfig.from_dict({"max_json_values": 7}).serve.max_json_values == 7
    with pytest.raises(ValueError, match="both at the top level and under 'serve'"):
        RayServeConfig.from_dict({"max_json_values": 7, "serve": {"max_json_values": 8}})


# ----------------------------------------------------------------------------------------------------------------------
# The command, for real
# ----------------------------------------------------------------------------------------------------------------------


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def single(checkpoint: Path) -> Iterator[BackgroundServer]:
    """``blindnet serve``'s app under uvicorn, with the settings the Ray service gets."""
    config = ServeConfig(
        max_batch_size=BATCH,
        max_queue_delay_ms=DELAY_MS,
        max_request_bytes=MAX_BYTES,
        max_image_pixels=MAX_PIXELS,
    )
    with BackgroundServer(create_app(TorchBackend.from_checkpoint(checkpoint), config)) as srv:
        yield srv


@pytest.fixture(scope="module")
def service(checkpoint: Path, tmp_path_factory) -> Iterator[tuple[subprocess.Popen, str]]:
    """``python -m blindnet.serve.ray_serve --config ray.yaml --replicas 2`` from a folder of its own."""
    folder = tmp_path_factory.mktemp("service")
    (folder / "tiny.safetensors").write_bytes(checkpoint.read_bytes())
    settings = {
        "checkpoint": "tiny.safetensors",  # relative: taken from the folder the command runs in
        "serve": {  # the ServeConfig of blindnet serve, nested
            "max_batch_size": BATCH,
            "max_queue_delay_ms": DELAY_MS,
            "max_request_bytes": MAX_BYTES,
            "max_image_pixels": MAX_PIXELS,
        },
        "num_cpus_per_replica": 1,
    }
    (folder / "ray.yaml").write_text(yaml.safe_dump(settings))
    port = free_port_number()
    cmd = [sys.executable, "-m", "blindnet.serve.ray_serve", "--config", "ray.yaml", "--replicas", "2"]
    cmd += ["--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the installed package, not this checkout's folders
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a cold Ray start on a busy 2-core machine takes a minute or more
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the Ray service did not become ready"
            time.sleep(0.5)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _triton_labels(url: str, images: np.ndarray) -> np.ndarray:
    client = tritonclient_http.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("blindnet")
    inp = tritonclient_http.InferInput("images", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images, binary_data=True)
    return client.infer("blindnet", [inp]).as_numpy("labels")


@needs_ray
@pytest.mark.ray
def test_same_answers_as_serve_and_the_predictor(service, single, reference) -> None:
    _, url = service
    images = np.stack([_image(s) for s in range(4)])
    expected = np.stack([p.labels for p in reference.predict(list(images))])
    np.testing.assert_array_equal(_triton_labels(url, images), expected)
    np.testing.assert_array_equal(_triton_labels(single.url, images), expected)
    # /v1/segment: raw and multipart bodies, from concurrent callers, so both replicas answer.
    with ThreadPoolExecutor(8) as pool:
        raw = pool.map(lambda i: httpx.post(f"{url}/v1/segment", content=_png(images[i % 4]), timeout=120), range(8))
        multi = pool.map(
            lambda i: httpx.post(f"{url}/v1/segment", files={"file": ("x.png", _png(images[i % 4]))}, timeout=120),
            range(8),
        )
        answers = list(raw) + list(multi)
    for i, r in enumerate(answers):
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected[i % 4])
    shares = [
        httpx.post(f"{u}/v1/segment?format=json", content=_png(images[0]), timeout=120) for u in (url, single.url)
    ]
    assert shares[0].status_code == shares[1].status_code == 200 and shares[0].json() == shares[1].json()


@needs_ray
@pytest.mark.ray
def test_probes_metadata_and_metrics_match_serve(service, single) -> None:
    _, url = service
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/blindnet", "/v2/models/blindnet/config"):
        ours, theirs = httpx.get(url + path, timeout=30), httpx.get(single.url + path, timeout=30)
        assert ours.status_code == theirs.status_code == 200, path
        assert ours.json() == theirs.json(), path
    for path in ("/v2/models/other", "/v2/models/blindnet/versions/7/ready", "/no/such/path"):
        assert httpx.get(url + path, timeout=30).status_code == httpx.get(single.url + path, timeout=30).status_code
    metrics = httpx.get(f"{url}/metrics", timeout=30)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in ("blindnet_requests_total", "blindnet_batch_size", "blindnet_queue_depth"):
        assert name in metrics.text
    assert set(httpx.get(f"{url}/v1/stats", timeout=30).json()) == set(httpx.get(f"{single.url}/v1/stats").json())


@needs_ray
@pytest.mark.ray
def test_bad_inputs_get_the_same_codes_and_messages_as_serve(service, single) -> None:
    _, url = service

    def answer(base: str, make) -> tuple[int, str]:
        with httpx.Client(base_url=base, timeout=60) as http:
            r = http.post(**make())
            return r.status_code, r.json().get("error", "")

    for name, make, status, fragment in BAD_INPUTS:
        ours, theirs = answer(url, make), answer(single.url, make)
        assert ours == theirs, name
        assert ours[0] == status and fragment in ours[1], (name, ours)


@needs_ray
@pytest.mark.ray
def test_sigterm_returns_every_request_in_flight_and_exits_cleanly(service, reference) -> None:
    proc, url = service
    images = [_image(100 + i) for i in range(3)]  # fewer than a batch: they wait out the queue delay
    expected = [p.labels for p in reference.predict(images)]
    with ThreadPoolExecutor(len(images)) as pool:
        pending = [pool.submit(httpx.post, f"{url}/v1/segment", content=_png(im), timeout=120) for im in images]
        deadline = time.monotonic() + 30
        # /v1/stats answers from one replica at a time: poll until one of them holds a queued request.
        while httpx.get(f"{url}/v1/stats", timeout=10).json()["queue_depth"] < 1:
            assert time.monotonic() < deadline, "no request was ever seen queued"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        answers = [f.result() for f in pending]
    for r, e in zip(answers, expected):
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), e)
    assert proc.wait(120) == 0
    out = proc.stdout.read()
    assert "stopped" in out and "Traceback" not in out, out
