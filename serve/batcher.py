"""A pure-Python dynamic batcher in front of a :class:`~blindnet.inference.Predictor`.

Callers :meth:`DynamicBatcher.submit` one request (``N x H x W x 3`` uint8 images) and get a
:class:`concurrent.futures.Future` for its ``N`` :class:`~blindnet.inference.Prediction` objects. One worker thread
groups queued requests into backend batches:

* A batch holds at most ``max_batch_size`` images. The oldest queued request waits at most ``max_queue_delay_ms``
  for company; a batch that is full goes at once (Triton's ``max_queue_delay_microseconds`` semantics).
* Only images with the same *network input shape* share a batch (a backend runs one ``N x H x W x 3`` array). When
  the predictor has an ``input_size`` every image is resized to it, so everything shares one bucket; without one,
  images are bucketed by their exact ``H x W`` and each bucket is batched separately (FIFO by the oldest request).
* The queue is bounded: ``max_queue_size`` counts *images* waiting (not requests) and ``max_queue_pixels`` their
  pixels, so memory stays bounded whatever the request mix. A full queue raises :class:`QueueFullError` at submit
  time; nothing is buffered beyond it.
* A batch holds at most ``max_batch_pixels`` network input pixels (but always at least one image), so large images
  queue and run in small batches instead of being stacked into one huge allocation; a request whose images exceed
  it is split into parts that run in separate batches (its future resolves when all parts are done).
* A backend exception fails only the requests of that batch (:class:`BatchFailedError`); the worker keeps going.
* :meth:`close` with ``drain=True`` refuses new work and finishes everything already queued (SIGTERM path).

Pre- and post-processing (resize in, nearest-neighbour labels back to each image's own size) is the Predictor's, so
a served label map equals ``Predictor.predict`` for the same image.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from blindnet.inference import Prediction, Predictor


class BatcherError(RuntimeError):
    """Base class of errors a request can get from the batcher."""


class QueueFullError(BatcherError):
    """The bounded queue has no room for this request; retry after :attr:`retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDownError(BatcherError):
    """The batcher is draining or stopped and takes no new work."""


class BatchFailedError(BatcherError):
    """The backend raised while running the batch this request was part of (other batches are unaffected)."""


@dataclass(eq=False)  # identity semantics: items hold arrays, and the queue removes by identity
class _Item:
    images: np.ndarray  # N x H x W x 3 uint8
    key: tuple
    want_logits: bool
    future: Future
    enqueued: float


@dataclass
class BatchRecord:
    """What one backend batch looked like, passed to the ``on_batch`` observer (metrics)."""

    size: int  # images in the batch
    requests: int
    queue_waits_s: list[float]  # per request: submit -> batch start
    compute_s: float  # Predictor.predict_arrays wall time (pre + backend + post)
    ok: bool


@dataclass
class BatcherStats:
    """Counters since start (read by tests, the introspection endpoint and the load benchmark)."""

    requests: int = 0
    images: int = 0
    batches: int = 0
    failed_batches: int = 0
    rejected: int = 0
    cancelled: int = 0
    max_batch_seen: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)


class DynamicBatcher:
    """Group concurrent requests into backend batches (see the module docstring for the policy).

    Args:
        predictor: does pre-processing, the backend call and post-processing for one batch.
        max_batch_size: most images per backend call; a single request may not exceed it.
        max_queue_delay_ms: longest the oldest waiting request is held back to fill a batch.
        max_queue_size: most images waiting in the queue (not counting the batch being computed).
        max_batch_pixels: most network input pixels in one batch (None: no limit); at least one image always fits.
        max_queue_pixels: most image pixels waiting in the queue (None: no limit); one image always fits an empty
            queue.
        on_batch: called on the worker thread after each batch (for metrics); exceptions in it are ignored.
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_batch_size: int = 8,
        max_queue_delay_ms: float = 5.0,
        max_queue_size: int = 64,
        max_batch_pixels: int | None = None,
        max_queue_pixels: int | None = None,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {max_queue_delay_ms}")
        if max_queue_size < max_batch_size:
            raise ValueError(
                f"max_queue_size ({max_queue_size}) must be >= max_batch_size ({max_batch_size}), "
                "or a full-size request could never be queued"
            )
        self.predictor = predictor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.max_batch_pixels = max_batch_pixels
        self.max_queue_pixels = max_queue_pixels
        self.on_batch = on_batch
        self.stats = BatcherStats()
        self._pending: deque[_Item] = deque()
        self._pending_images = 0
        self._pending_pixels = 0
        self._cond = threading.Condition()
        self._accepting = True
        self._stop = False
        self._busy = False
        # Running estimate of one batch's wall time, for Retry-After hints.
        self._batch_seconds_ema = 0.1
        self._thread = threading.Thread(target=self._worker, name="blindnet-batcher", daemon=True)
        self._thread.start()

    # ---- public API ------------------------------------------------------------------------------------------------

    def bucket_key(self, images: np.ndarray) -> tuple[int, int]:
        """The network input ``(H, W)`` these images run at: the predictor's ``input_size`` or their own size."""
        if self.predictor.input_size is not None:
            return tuple(self.predictor.input_size)  # type: ignore[return-value]
        return (int(images.shape[1]), int(images.shape[2]))

    def submit(self, images: np.ndarray, *, want_logits: bool = False) -> Future:
        """Queue one request of ``N x H x W x 3`` uint8 images; the future resolves to ``N`` Predictions in order.

        Raises:
            ValueError: wrong dtype/shape, or ``N`` > ``max_batch_size``.
            QueueFullError: no room in the queue right now.
            ShuttingDownError: the batcher is draining or stopped.
        """
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if images.ndim != 4 or images.shape[3] != 3 or min(images.shape[:3]) < 1:
            raise ValueError(f"images must be N x H x W x 3 with N, H, W >= 1, got shape {list(images.shape)}")
        n = int(images.shape[0])
        if n > self.max_batch_size:
            raise ValueError(f"a request may hold at most max_batch_size={self.max_batch_size} images, got {n}")
        key = self.bucket_key(images)
        pixels = n * int(images.shape[1]) * int(images.shape[2])
        parts = self._split(images, key)
        items = [_Item(p, (key, want_logits), want_logits, Future(), time.perf_counter()) for p in parts]
        with self._cond:
            if not self._accepting:
                raise ShuttingDownError("server is shutting down and accepts no new requests")
            queue_pixels_full = (
                self.max_queue_pixels is not None
                and self._pending_pixels > 0
                and self._pending_pixels + pixels > self.max_queue_pixels
            )
            if self._pending_images + n > self.max_queue_size or queue_pixels_full:
                self.stats.rejected += 1
                raise QueueFullError(
                    f"queue full ({self._pending_images} of {self.max_queue_size} image slots, "
                    f"{self._pending_pixels} pixels in use); retry later",
                    retry_after_s=self._retry_after_locked(),
                )
            self._pending.extend(items)
            self._pending_images += n
            self._pending_pixels += pixels
            self.stats.requests += 1
            self._cond.notify_all()
        return items[0].future if len(items) == 1 else _joined([i.future for i in items])

    def _batch_limit(self, key: tuple[int, int]) -> int:
        """Most images of network size ``key`` one batch may hold: ``max_batch_size``, fewer for large images."""
        if self.max_batch_pixels is None:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, self.max_batch_pixels // max(1, key[0] * key[1])))

    def _split(self, images: np.ndarray, key: tuple[int, int]) -> list[np.ndarray]:
        """``images`` in parts of at most :meth:`_batch_limit` images (one part when it fits a batch)."""
        step = self._batch_limit(key)
        return [images[i : i + step] for i in range(0, len(images), step)]

    def predict(
        self, images: np.ndarray, *, want_logits: bool = False, timeout: float | None = None
    ) -> list[Prediction]:
        """Blocking convenience: :meth:`submit` and wait."""
        return self.submit(images, want_logits=want_logits).result(timeout)

    @property
    def queue_depth(self) -> int:
        """Images waiting in the queue (not yet in a running batch)."""
        return self._pending_images

    @property
    def alive(self) -> bool:
        """Whether the worker thread still runs (False once :meth:`close` has drained or failed everything)."""
        return self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        """True until :meth:`close` is called."""
        return self._accepting and self._thread.is_alive()

    def retry_after_s(self) -> float:
        """Rough seconds until the current queue has been worked off (a Retry-After hint)."""
        with self._cond:
            return self._retry_after_locked()

    def close(self, *, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop taking requests; with ``drain`` finish everything queued first, otherwise fail it. Idempotent."""
        with self._cond:
            self._accepting = False
            if not drain:
                while self._pending:
                    item = self._pending.popleft()
                    item.future.set_exception(ShuttingDownError("server stopped before this request ran"))
                self._pending_images = 0
                self._pending_pixels = 0
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- worker ----------------------------------------------------------------------------------------------------

    def _retry_after_locked(self) -> float:
        batches_ahead = math.ceil(self._pending_images / self.max_batch_size) + (1 if self._busy else 0)
        return max(1.0, batches_ahead * self._batch_seconds_ema)

    def _select_locked(self) -> list[_Item]:
        """FIFO items sharing the oldest item's bucket, up to ``max_batch_size`` images (skipping ones that don't fit)."""
        key = self._pending[0].key
        limit = self._batch_limit(key[0])
        chosen: list[_Item] = []
        count = 0
        for item in self._pending:
            if item.key != key:
                continue
            n = len(item.images)
            if count + n <= limit:
                chosen.append(item)
                count += n
                if count == limit:
                    break
        return chosen

    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while True:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if not self._pending:
                    return None  # stopped and drained
                head = self._pending[0]
                deadline = head.enqueued + self.max_queue_delay_s
                chosen = self._select_locked()
                full = sum(len(i.images) for i in chosen) >= self._batch_limit(head.key[0])
                now = time.perf_counter()
                # When stopping we no longer wait for company: drain as fast as possible.
                if full or now >= deadline or self._stop:
                    break
                self._cond.wait(deadline - now)
            taken = {id(item) for item in chosen}
            self._pending = deque(item for item in self._pending if id(item) not in taken)
            self._pending_images -= sum(len(item.images) for item in chosen)
            self._pending_pixels -= sum(i.images.shape[0] * i.images.shape[1] * i.images.shape[2] for i in chosen)
            self._busy = True
            return chosen

    def _worker(self) -> None:
        while True:
            items = self._next_batch()
            if items is None:
                return
            try:
                self._run(items)
            except Exception as exc:  # a bug outside the backend call must not strand callers or kill the worker
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(BatchFailedError(f"internal error running the batch: {exc!r}"))
            finally:
                with self._cond:
                    self._busy = False

    def _run(self, items: list[_Item]) -> None:
        # A caller that gave up (client disconnected, cancelled await) should not cost compute.
        live = [i for i in items if i.future.set_running_or_notify_cancel()]
        self.stats.cancelled += len(items) - len(live)
        if not live:
            return
        start = time.perf_counter()
        waits = [start - i.enqueued for i in live]
        arrays = [img for i in live for img in i.images]
        want_logits = live[0].want_logits  # part of the bucket key, so the same for all
        ok = True
        try:
            preds = self.predictor.predict_arrays(arrays, return_logits=want_logits)
        except Exception as exc:  # the backend's failure belongs to this batch only
            ok = False
            err = BatchFailedError(
                f"backend failure while running a batch of {len(arrays)} image(s) "
                f"({len(live)} request(s)): {type(exc).__name__}: {exc}"
            )
            for i in live:
                i.future.set_exception(err)
        compute = time.perf_counter() - start
        self._batch_seconds_ema = 0.8 * self._batch_seconds_ema + 0.2 * compute
        s = self.stats
        s.batches += 1
        s.images += len(arrays)
        s.max_batch_seen = max(s.max_batch_seen, len(arrays))
        s.batch_sizes[len(arrays)] = s.batch_sizes.get(len(arrays), 0) + 1
        if ok:
            offset = 0
            for i in live:
                n = len(i.images)
                i.future.set_result(preds[offset : offset + n])
                offset += n
        else:
            s.failed_batches += 1
        if self.on_batch is not None:
            try:
                self.on_batch(BatchRecord(len(arrays), len(live), waits, compute, ok))
            except Exception:  # metrics must never break serving
                pass


def _joined(parts: list[Future]) -> Future:
    """One future for the concatenated results of ``parts`` (in order); the first failure fails it, and cancelling
    it cancels the parts not yet running."""
    whole: Future = Future()
    lock = threading.Lock()

    def part_done(_: Future) -> None:
        with lock:
            if whole.done() or not all(p.done() for p in parts) and not any(_failed(p) for p in parts):
                return
            failed = next((p for p in parts if _failed(p)), None)
            if failed is not None:
                if failed.cancelled():
                    whole.cancel()
                else:
                    whole.set_exception(failed.exception())
                return
            whole.set_result([pred for p in parts for pred in p.result()])

    def whole_done(f: Future) -> None:
        if f.cancelled():
            for p in parts:
                p.cancel()

    whole.add_done_callback(whole_done)
    for p in parts:
        p.add_done_callback(part_done)
    return whole


def _failed(f: Future) -> bool:
    return f.done() and (f.cancelled() or f.exception() is not None)
