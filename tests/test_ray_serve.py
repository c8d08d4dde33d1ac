"""The Ray Serve deployment on a local Ray instance (``pytest -m ray``; skipped where Ray is not installed)."""

from __future__ import annotations

import io
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from blindnet.checkpoint import save_model
from blindnet.inference import Predictor, TorchBackend
from blindnet.models import ModelConfig, build_model
from blindnet.serve.ray_serve import REPO_ROOT, RayServeConfig


def test_config_is_strict_and_guards_batching() -> None:
    with pytest.raises(ValueError, match="unknown config key.*for RayServeConfig"):
        RayServeConfig.from_dict({"replicas": 2})
    with pytest.raises(ValueError, match="#43288"):
        RayServeConfig.from_dict({"max_batch_size": 8, "max_ongoing_requests": 4})
    opts = RayServeConfig.from_dict({"num_replicas": 3, "num_gpus_per_replica": 0.5}).deployment_options()
    assert opts["num_replicas"] == 3 and opts["ray_actor_options"]["num_gpus"] == 0.5
    assert opts["max_ongoing_requests"] == 16


@pytest.mark.ray
def test_local_ray_deployment_matches_predictor(tmp_path) -> None:
    pytest.importorskip("ray", reason="ray[serve] is an optional extra (pip install 'blindnet[ray]')")
    import httpx
    import ray
    from ray import serve

    from blindnet.serve.ray_serve import start

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="mobilenetv2", num_classes=19))
    ckpt = save_model(model, tmp_path / "tiny.safetensors")
    reference = Predictor(TorchBackend(model))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(8)]
    expected = [p.labels for p in reference.predict(images)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = RayServeConfig(checkpoint=str(ckpt), max_batch_size=4, batch_wait_timeout_s=0.05, num_cpus_per_replica=1)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    try:
        handle = start(config, port=port)
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda img: handle.segment.remote(img).result(timeout_s=120), images))
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g, e)
        buf = io.BytesIO()
        Image.fromarray(images[0]).save(buf, format="PNG")
        r = httpx.post(f"http://127.0.0.1:{port}/", content=buf.getvalue(), timeout=120)
        assert r.status_code == 200
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected[0])
        bad = httpx.post(f"http://127.0.0.1:{port}/", content=b"not an image", timeout=120)
        assert bad.status_code == 400 and "not a recognised image" in bad.json()["error"]
    finally:
        serve.shutdown()
        ray.shutdown()
