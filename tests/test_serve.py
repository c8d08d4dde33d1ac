"""The real HTTP server on loopback with a tiny real model: Triton client, concurrency, bad input, backpressure, auth.

Every test talks HTTP to uvicorn running the app (in a thread, or ``python -m blindnet.serve`` in a subprocess for SIGTERM).
"""

from __future__ import annotations

import io
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from blindnet.backends.torch_backend import TorchBackend
from blindnet.serve import client
from blindnet.serve.__main__ import main as serve_main
from blindnet.serve.app import BackgroundServer, InsecureBindError, check_bind, create_app
from blindnet.serve.config import ServeConfig
from tests.conftest import FailFirstBackend, GatedBackend

tritonclient_http = pytest.importorskip("tritonclient.http")

H, W = 64, 96
MAX_PIXELS = 200 * 200
MAX_BYTES = 1024 * 1024


@pytest.fixture(scope="module")
def server(backend: TorchBackend):
    config = ServeConfig(
        max_batch_size=8,
        max_queue_delay_ms=10,
        max_queue_size=128,
        max_request_bytes=MAX_BYTES,
        max_image_pixels=MAX_PIXELS,
    )
    with BackgroundServer(create_app(backend, config)) as srv:
        yield srv


def _image(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(image: np.ndarray) -> bytes:
    return client.encode_upload(image)


def _v2_binary(images: np.ndarray, *, name: str = "images", datatype: str = "UINT8") -> tuple[bytes, dict]:
    """A binary-tensor v2 request (tritonclient, in the tests above, checks the wire format independently)."""
    return client.encode_infer(images, input_name=name, datatype=datatype)


def _v2_labels(response: httpx.Response) -> np.ndarray:
    labels = client.decode_infer(response.content, response.headers)["labels"]
    assert labels.dtype == np.uint8
    return labels


def _stats(url: str) -> dict:
    return httpx.get(f"{url}/v1/stats").json()


# ----------------------------------------------------------------------------------------------------------------------


def test_tritonclient_infers_binary_and_json(server, reference) -> None:
    client = tritonclient_http.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("blindnet")
    meta = client.get_model_metadata("blindnet")
    assert meta["inputs"][0] == {"name": "images", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}
    assert client.get_model_config("blindnet")["max_batch_size"] == 8
    images = np.stack([_image(1), _image(2)])
    want = np.stack([p.labels for p in reference.predict(list(images))])
    for binary in (True, False):
        inp = tritonclient_http.InferInput("images", list(images.shape), "UINT8")
        inp.set_data_from_numpy(images, binary_data=binary)
        outputs = [
            tritonclient_http.InferRequestedOutput("labels", binary_data=binary),
            tritonclient_http.InferRequestedOutput("logits", binary_data=binary),
        ]
        result = client.infer("blindnet", [inp], outputs=outputs, request_id=f"r-{binary}")
        np.testing.assert_array_equal(result.as_numpy("labels"), want)
        assert result.get_response()["id"] == f"r-{binary}"
        logits = result.as_numpy("logits")
        assert logits.shape == (2, 19, H, W) and logits.dtype == np.float32
        np.testing.assert_array_equal(logits.argmax(1), want)
    # No outputs named: labels only, in binary (what tritonclient asks for by default).
    result = client.infer("blindnet", [inp])
    np.testing.assert_array_equal(result.as_numpy("labels"), want)
    assert result.as_numpy("logits") is None
    with pytest.raises(tritonclient_http.InferenceServerException, match="unknown model 'nope'"):
        client.infer("nope", [inp])


def test_segment_endpoint_formats(server, reference) -> None:
    image = _image(3)
    pred = reference.predict_one(image)
    # multipart upload -> PNG of class ids
    r = httpx.post(f"{server.url}/v1/segment", files={"file": ("a.png", _png(image), "image/png")})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), pred.labels)
    # raw body, other formats
    r = httpx.post(f"{server.url}/v1/segment", params={"format": "overlay", "alpha": 0.3}, content=_png(image))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), pred.overlay(0.3))
    r = httpx.post(f"{server.url}/v1/segment", params={"format": "color"}, content=_png(image))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), pred.colorized())
    r = httpx.post(f"{server.url}/v1/segment", params={"format": "json"}, content=_png(image))
    body = r.json()
    assert (body["height"], body["width"]) == (H, W)
    assert body["class_shares"] == pytest.approx(pred.class_shares())


def test_64_concurrent_clients_get_their_own_answers(server, reference) -> None:
    clients, per_client = 64, 3
    seeds = [100 + c * per_client + k for c in range(clients) for k in range(per_client)]
    images = {s: _image(s) for s in seeds}
    expected = dict(zip(seeds, (p.labels for p in reference.predict([images[s] for s in seeds]))))
    assert len({e.tobytes() for e in expected.values()}) == len(seeds), "images must give distinct label maps"
    before = _stats(server.url)
    barrier = threading.Barrier(clients)

    def client(c: int) -> list[bool]:
        ok = []
        with httpx.Client(base_url=server.url, timeout=120) as http:
            barrier.wait()  # everyone starts together: real concurrency
            for k in range(per_client):
                s = seeds[c * per_client + k]
                if (c + k) % 2:  # half over the v2 binary protocol, half over /v1/segment
                    body, headers = _v2_binary(images[s][None])
                    r = http.post("/v2/models/blindnet/infer", content=body, headers=headers)
                    got = _v2_labels(r)[0]
                else:
                    r = http.post("/v1/segment", content=_png(images[s]))
                    got = np.asarray(Image.open(io.BytesIO(r.content)))
                ok.append(r.status_code == 200 and np.array_equal(got, expected[s]))
        return ok

    with ThreadPoolExecutor(clients) as pool:
        results = [ok for oks in pool.map(client, range(clients)) for ok in oks]
    assert all(results), f"{results.count(False)} of {len(results)} responses wrong"
    after = _stats(server.url)
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == clients * per_client
    assert batches < requests, (batches, requests)
    assert after["max_batch_seen"] > 1
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "blindnet_batch_size_count" in metrics and "blindnet_queue_depth" in metrics


BAD_INPUTS = [
    # (name, method kwargs builder, expected status, message fragment)
    ("not an image", lambda: {"url": "/v1/segment", "content": b"definitely not a png"}, 400, "not a recognised image"),
    ("truncated png", lambda: {"url": "/v1/segment", "content": _png(_image(0))[:300]}, 400, "truncated"),
    ("empty body", lambda: {"url": "/v1/segment", "content": b""}, 400, "empty file"),
    ("bad format", lambda: {"url": "/v1/segment?format=tiff", "content": _png(_image(0))}, 400, "unknown format"),
    ("bad alpha", lambda: {"url": "/v1/segment?alpha=lots", "content": _png(_image(0))}, 400, "alpha"),
    (
        "multipart without file",
        lambda: {"url": "/v1/segment", "files": {"note": (None, "no image here")}},
        400,
        "no file part",
    ),
    ("too many pixels", lambda: {"url": "/v1/segment", "content": _png(_image(0, 300, 300))}, 413, "exceeds the limit"),
    ("too many bytes", lambda: {"url": "/v1/segment", "content": b"\0" * (MAX_BYTES + 1)}, 413, "exceeds the limit"),
    ("unknown model", lambda: _v2_kwargs(_image(0)[None], model="nope"), 404, "unknown model 'nope'"),
    ("wrong dtype", lambda: _v2_kwargs(_image(0)[None].astype(np.float32), datatype="FP32"), 400, "UINT8"),
    ("wrong rank", lambda: _v2_kwargs(_image(0)), 400, "shape [N, H, W, 3]"),
    ("wrong channels", lambda: _v2_kwargs(np.zeros((1, H, W, 4), np.uint8)), 400, "shape [N, H, W, 3]"),
    ("wrong input name", lambda: _v2_kwargs(_image(0)[None], name="x"), 400, "exactly one input named 'images'"),
    ("batch too big", lambda: _v2_kwargs(np.zeros((9, 8, 8, 3), np.uint8)), 400, "max_batch_size 8"),
    ("tensor too many pixels", lambda: _v2_kwargs(np.zeros((1, 300, 300, 3), np.uint8)), 413, "exceed the limit"),
    ("binary size mismatch", lambda: _v2_kwargs(_image(0)[None], cut=10), 400, "binary"),
    (
        "invalid json",
        lambda: {"url": "/v2/models/blindnet/infer", "content": b"{not json"},
        400,
        "not valid JSON",
    ),
    (
        "json data wrong length",
        lambda: {
            "url": "/v2/models/blindnet/infer",
            "json": {"inputs": [{"name": "images", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [1, 2, 3]}]},
        },
        400,
        "needs 12",
    ),
    (
        "json data out of range",
        lambda: {
            "url": "/v2/models/blindnet/infer",
            "json": {"inputs": [{"name": "images", "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [1, 2, 300]}]},
        },
        400,
        "0..255",
    ),
    (
        "unknown output",
        lambda: {
            "url": "/v2/models/blindnet/infer",
            "json": {
                "inputs": [{"name": "images", "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [1, 2, 3]}],
                "outputs": [{"name": "probs"}],
            },
        },
        400,
        "unknown output 'probs'",
    ),
]


def _v2_kwargs(
    images: np.ndarray, *, model: str = "blindnet", name: str = "images", datatype: str = "UINT8", cut: int = 0
):
    body, headers = _v2_binary(images, name=name, datatype=datatype)
    return {"url": f"/v2/models/{model}/infer", "content": body[: len(body) - cut], "headers": headers}


def test_bad_inputs_get_clear_errors_and_never_hurt_other_callers(server, reference) -> None:
    good = {s: _image(s) for s in range(500, 516)}
    expected = dict(zip(good, (p.labels for p in reference.predict(list(good.values())))))

    def bad(case) -> tuple[str, int, str]:
        name, kwargs, _, _ = case
        with httpx.Client(base_url=server.url, timeout=60) as http:
            r = http.post(**kwargs())
            return name, r.status_code, r.json().get("error", "")

    def ok(seed: int) -> bool:
        body, headers = _v2_binary(good[seed][None])
        r = httpx.post(f"{server.url}/v2/models/blindnet/infer", content=body, headers=headers, timeout=60)
        return r.status_code == 200 and np.array_equal(_v2_labels(r)[0], expected[seed])

    # Bad and good requests interleaved: the bad ones are refused before they reach a batch.
    with ThreadPoolExecutor(16) as pool:
        bad_futures = [pool.submit(bad, case) for case in BAD_INPUTS]
        good_futures = [pool.submit(ok, s) for s in good]
        answers = {name: (status, msg) for name, status, msg in (f.result() for f in bad_futures)}
        assert all(f.result() for f in good_futures)
    for name, _, status, fragment in BAD_INPUTS:
        got_status, message = answers[name]
        assert got_status == status, f"{name}: {got_status} {message}"
        assert fragment in message, f"{name}: {message!r} lacks {fragment!r}"
    assert ok(516 - 1)  # still serving afterwards
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_queue_full_gets_503_with_retry_after(backend) -> None:
    gated = GatedBackend(backend.model)
    config = ServeConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2)
    png = _png(_image(7))
    with BackgroundServer(create_app(gated, config)) as srv, ThreadPoolExecutor(3) as pool:
        post = lambda: httpx.post(f"{srv.url}/v1/segment", content=png, timeout=60)  # noqa: E731
        first = pool.submit(post)
        assert gated.entered.wait(30)  # one request is inside the backend
        queued = [pool.submit(post) for _ in range(2)]
        deadline = time.monotonic() + 30
        while _stats(srv.url)["queue_depth"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = post()
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) >= 1
        assert "queue full" in r.json()["error"]
        gated.gate.set()
        assert [f.result().status_code for f in [first, *queued]] == [200, 200, 200]
        assert post().status_code == 200
        assert (
            'blindnet_requests_total{endpoint="/v1/segment",status="503"} 1.0' in httpx.get(f"{srv.url}/metrics").text
        )


def test_backend_failure_is_a_500_for_that_batch_only(backend) -> None:
    broken = FailFirstBackend(backend.model)
    with BackgroundServer(create_app(broken, ServeConfig(max_queue_delay_ms=0))) as srv:
        r = httpx.post(f"{srv.url}/v1/segment", content=_png(_image(8)), timeout=60)
        assert r.status_code == 500
        assert "backend failure" in r.json()["error"] and "simulated device fault" in r.json()["error"]
        assert httpx.post(f"{srv.url}/v1/segment", content=_png(_image(8)), timeout=60).status_code == 200
        assert 'blindnet_batches_total{outcome="error"} 1.0' in httpx.get(f"{srv.url}/metrics").text


def test_api_key_is_enforced(backend) -> None:
    with BackgroundServer(create_app(backend, ServeConfig(api_key="s3cret"))) as srv:
        assert httpx.get(f"{srv.url}/v2/health/live").status_code == 200  # probes stay open
        r = httpx.get(f"{srv.url}/v2/models/blindnet")
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert httpx.get(f"{srv.url}/v2/models/blindnet", headers={"X-API-Key": "wrong"}).status_code == 401
        assert httpx.get(f"{srv.url}/metrics").status_code == 401
        assert httpx.get(f"{srv.url}/v2/models/blindnet", headers={"X-API-Key": "s3cret"}).status_code == 200
        ok = httpx.post(
            f"{srv.url}/v1/segment", content=_png(_image(9)), headers={"Authorization": "Bearer s3cret"}, timeout=60
        )
        assert ok.status_code == 200
        client = tritonclient_http.InferenceServerClient(srv.url.removeprefix("http://"))
        inp = tritonclient_http.InferInput("images", [1, H, W, 3], "UINT8")
        inp.set_data_from_numpy(_image(9)[None])
        with pytest.raises(tritonclient_http.InferenceServerException, match="API key"):
            client.infer("blindnet", [inp])
        result = client.infer("blindnet", [inp], headers={"Authorization": "Bearer s3cret"})
        assert result.as_numpy("labels").shape == (1, H, W)


def test_non_loopback_bind_needs_a_key(caplog) -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "key")
    with pytest.raises(InsecureBindError, match="--api-key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", None, allow_unauthenticated=True)
    assert "WITHOUT authentication" in caplog.text
    assert serve_main(["--host", "0.0.0.0", "--checkpoint", "unused.safetensors"]) == 2


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys) -> None:
    assert serve_main(["--checkpoint", str(tmp_path / "missing.safetensors"), "--port", "0"]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_sigterm_finishes_queued_requests_before_exit(checkpoint, reference, serve_process) -> None:
    # A long queue delay keeps the request queued when SIGTERM arrives.
    proc = serve_process(checkpoint, "--max-queue-delay-ms", "1500", "--log-level", "warning")
    image = _image(11)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(lambda: httpx.post(f"{proc.url}/v1/segment", content=_png(image), timeout=60))
        while httpx.get(f"{proc.url}/v1/stats", timeout=5).json()["queue_depth"] < 1:
            time.sleep(0.01)
        proc.proc.send_signal(signal.SIGTERM)
        r = pending.result()
    assert r.status_code == 200
    np.testing.assert_array_equal(client.decode_png(r.content), reference.predict_one(image).labels)
    # Everything was answered: a clean drain, exit status 0.
    assert proc.proc.wait(60) == 0


def test_png_helper_roundtrip_matches_cv2() -> None:
    # The server writes PNGs with OpenCV; make sure RGB order survives (PIL reads them here).
    image = _image(12)
    from blindnet.serve.responses import encode_png

    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(image)))), image)
    assert cv2.imdecode(np.frombuffer(encode_png(image[:, :, 0]), np.uint8), cv2.IMREAD_UNCHANGED).shape == (H, W)
