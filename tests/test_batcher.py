"""The dynamic batcher on a real (tiny) TorchBackend: grouping, bucketing, ordering, backpressure, failure, drain."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from blindnet.backends.base import BackendOutput
from blindnet.backends.torch_backend import TorchBackend
from blindnet.inference import Predictor
from blindnet.models import ModelConfig, build_model
from blindnet.serve.batcher import BatchFailedError, BatchRecord, DynamicBatcher, QueueFullError, ShuttingDownError
from tests.conftest import FailFirstBackend, GatedBackend


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="mobilenetv2", num_classes=19))


def _images(n: int, h: int = 64, w: int = 96, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_concurrent_requests_are_batched_and_returned_to_their_caller(model) -> None:
    predictor = Predictor(TorchBackend(model), batch_size=8)
    images = _images(24)
    expected = [p.labels for p in Predictor(TorchBackend(model), batch_size=8).predict(images)]
    assert len({e.tobytes() for e in expected}) == len(expected), "test images must give distinct label maps"
    records: list[BatchRecord] = []
    batcher = DynamicBatcher(
        predictor, max_batch_size=8, max_queue_delay_ms=20, max_queue_size=64, on_batch=records.append
    )
    try:
        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(lambda img: batcher.predict(img[None], timeout=60)[0].labels, images))
    finally:
        batcher.close()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)
    assert batcher.stats.requests == 24 and batcher.stats.images == 24
    assert batcher.stats.batches < 24, batcher.stats
    assert max(r.size for r in records) <= 8
    assert sum(r.size for r in records) == 24


def test_multi_image_request_keeps_order(model) -> None:
    predictor = Predictor(TorchBackend(model), batch_size=4)
    images = np.stack(_images(3, seed=1))
    batcher = DynamicBatcher(predictor, max_batch_size=4, max_queue_delay_ms=0, max_queue_size=8)
    try:
        got = batcher.predict(images, timeout=60)
    finally:
        batcher.close()
    want = predictor.predict(list(images))
    assert [g.labels.tobytes() for g in got] == [w.labels.tobytes() for w in want]


def test_without_input_size_batches_hold_one_shape_only(model) -> None:
    predictor = Predictor(TorchBackend(model), batch_size=8)
    images = _images(6, 64, 96, seed=2) + _images(6, 32, 48, seed=3)
    expected = [p.labels for p in predictor.predict(images)]
    shapes_per_batch: list[int] = []
    batcher = DynamicBatcher(predictor, max_batch_size=8, max_queue_delay_ms=50, max_queue_size=64)
    orig = predictor.backend.infer

    def spy(batch: np.ndarray, **kw) -> BackendOutput:  # a real call, only recording the batch shape
        shapes_per_batch.append(len({batch.shape[1:]}))
        return orig(batch, **kw)

    predictor.backend.infer = spy  # type: ignore[method-assign]
    try:
        order = [images[i] for i in (0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11)]  # interleave the two sizes
        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(lambda img: batcher.predict(img[None], timeout=60)[0].labels, order))
    finally:
        batcher.close()
    want = [expected[i] for i in (0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11)]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert shapes_per_batch and all(n == 1 for n in shapes_per_batch)


def test_with_input_size_mixed_sizes_share_batches(model) -> None:
    predictor = Predictor(TorchBackend(model), input_size=(64, 96), batch_size=8)
    images = _images(4, 64, 96, seed=4) + _images(4, 48, 80, seed=5)
    expected = [p.labels for p in predictor.predict(images)]
    batcher = DynamicBatcher(predictor, max_batch_size=8, max_queue_delay_ms=2000, max_queue_size=16)
    try:
        futures = [batcher.submit(img[None]) for img in images]  # 8 images = one full batch, sent at once
        got = [f.result(60)[0].labels for f in futures]
    finally:
        batcher.close()
    for g, w, img in zip(got, expected, images):
        assert g.shape == img.shape[:2]  # labels come back at the image's own size
        np.testing.assert_array_equal(g, w)
    assert batcher.stats.batches == 1  # a full batch does not wait for max_queue_delay


def test_lone_request_waits_at_most_the_queue_delay(model) -> None:
    batcher = DynamicBatcher(Predictor(TorchBackend(model)), max_batch_size=8, max_queue_delay_ms=30, max_queue_size=8)
    try:
        batcher.predict(_images(1)[0][None], timeout=60)  # warm-up
        t0 = time.perf_counter()
        batcher.predict(_images(1)[0][None], timeout=60)
        assert time.perf_counter() - t0 < 2.0
    finally:
        batcher.close()


def test_full_queue_rejects_with_retry_after_then_recovers(model) -> None:
    backend = GatedBackend(model)
    batcher = DynamicBatcher(Predictor(backend), max_batch_size=2, max_queue_delay_ms=0, max_queue_size=4)
    img = _images(1)[0][None]
    try:
        running = batcher.submit(img)
        assert backend.entered.wait(30)  # the worker holds this one inside the backend
        queued = [batcher.submit(img) for _ in range(4)]
        assert batcher.queue_depth == 4
        with pytest.raises(QueueFullError, match="queue full") as info:
            batcher.submit(img)
        assert info.value.retry_after_s >= 1
        assert batcher.stats.rejected == 1
        backend.gate.set()
        for f in [running, *queued]:
            assert f.result(60)[0].labels.shape == (64, 96)
        batcher.predict(img, timeout=60)  # room again
    finally:
        backend.gate.set()
        batcher.close()


def test_backend_failure_fails_only_its_batch(model) -> None:
    batcher = DynamicBatcher(
        Predictor(FailFirstBackend(model)), max_batch_size=4, max_queue_delay_ms=0, max_queue_size=8
    )
    img = _images(1)[0][None]
    try:
        with pytest.raises(BatchFailedError, match="backend failure.*simulated device fault"):
            batcher.predict(img, timeout=60)
        assert batcher.predict(img, timeout=60)[0].labels.shape == (64, 96)
        assert batcher.stats.failed_batches == 1
    finally:
        batcher.close()


def test_close_drains_queue_and_refuses_new_work(model) -> None:
    backend = GatedBackend(model)
    batcher = DynamicBatcher(Predictor(backend), max_batch_size=2, max_queue_delay_ms=10_000, max_queue_size=8)
    img = _images(1)[0][None]
    futures = [batcher.submit(img) for _ in range(5)]
    assert backend.entered.wait(30)  # the first full batch of 2 went without waiting
    closer = threading.Thread(target=batcher.close, kwargs={"drain": True, "timeout": 60})
    closer.start()
    time.sleep(0.05)
    with pytest.raises(ShuttingDownError):
        batcher.submit(img)
    backend.gate.set()
    closer.join(60)
    # The delay is 10 s, yet draining runs the leftover (incomplete) batch at once.
    assert all(f.result(0)[0].labels.shape == (64, 96) for f in futures)
    assert not batcher.accepting


def test_cancelled_request_is_skipped(model) -> None:
    backend = GatedBackend(model)
    batcher = DynamicBatcher(Predictor(backend), max_batch_size=1, max_queue_delay_ms=0, max_queue_size=4)
    img = _images(1)[0][None]
    try:
        first = batcher.submit(img)
        assert backend.entered.wait(30)
        gone = batcher.submit(img)
        assert gone.cancel()
        backend.gate.set()
        first.result(60)
        batcher.predict(img, timeout=60)
        assert batcher.stats.cancelled == 1
    finally:
        backend.gate.set()
        batcher.close()


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((1, 8, 8, 3), np.float32), "uint8"),
        (np.zeros((8, 8, 3), np.uint8), "N x H x W x 3"),
        (np.zeros((1, 8, 8, 4), np.uint8), "N x H x W x 3"),
        (np.zeros((3, 8, 8, 3), np.uint8), "at most max_batch_size=2"),
    ],
)
def test_bad_requests_are_refused_before_queueing(model, images: np.ndarray, message: str) -> None:
    batcher = DynamicBatcher(Predictor(TorchBackend(model)), max_batch_size=2, max_queue_size=4)
    try:
        with pytest.raises(ValueError, match=message):
            batcher.submit(images)
        assert batcher.queue_depth == 0
    finally:
        batcher.close()


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="max_queue_size"):
        DynamicBatcher(None, max_batch_size=8, max_queue_size=4)  # type: ignore[arg-type]


def test_large_images_are_split_over_batches_within_the_pixel_budget(model) -> None:
    predictor = Predictor(TorchBackend(model), batch_size=8)
    images = _images(5, 32, 48, seed=7)
    records: list[BatchRecord] = []
    # Two 32 x 48 images per batch at most; the queue holds at most 8 such images' pixels.
    batcher = DynamicBatcher(
        predictor,
        max_batch_size=8,
        max_queue_delay_ms=0,
        max_queue_size=64,
        max_batch_pixels=2 * 32 * 48,
        max_queue_pixels=8 * 32 * 48,
        on_batch=records.append,
    )
    try:
        got = batcher.predict(np.stack(images), timeout=60)  # one request of five, run as 2 + 2 + 1
        gate = threading.Event()
        orig = predictor.backend.infer

        def held(batch: np.ndarray, **kw) -> BackendOutput:  # the real call, after the queue has been filled
            gate.wait(30)
            return orig(batch, **kw)

        predictor.backend.infer = held  # type: ignore[method-assign]
        first = batcher.submit(np.stack(images[:1]))  # taken by the worker, which then waits
        while batcher.queue_depth:
            time.sleep(0.001)
        queued = [batcher.submit(np.stack(images[:4])), batcher.submit(np.stack(images[:4]))]  # 8 images queued
        with pytest.raises(QueueFullError, match="pixels in use"):
            batcher.submit(np.stack(images[:1]))
        gate.set()
        assert [len(f.result(60)) for f in (first, *queued)] == [1, 4, 4]
    finally:
        batcher.close()
    want = predictor.predict(images)
    assert [g.labels.tobytes() for g in got] == [w.labels.tobytes() for w in want]
    assert [r.size for r in records[:3]] == [2, 2, 1] and max(r.size for r in records) == 2
