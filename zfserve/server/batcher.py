"""The dynamic batcher: concurrent classification requests (Classify and ModelInfer alike) become one engine call.

Triton's semantics and knob names:
- ``max_batch_size``: most images in one engine call. A single request larger than that runs alone (the engine
  splits it), so no request is ever refused for its size here.
- ``max_queue_delay_us``: a batch leaves when it is full or when its oldest request has waited this long.
- ``max_queue_size``: most requests waiting; one more is rejected at once with :class:`QueueFull`, which the
  servicers answer with UNAVAILABLE (Triton's choice: "try again later", safe to retry with backoff).
- ``default_timeout_us``: a request still queued after this long is rejected with :class:`QueueTimeout`
  (UNAVAILABLE, as in Triton); a request may only lower it (OIP parameter ``timeout``).
Requests join in arrival order. A request whose gRPC deadline has passed (DEADLINE_EXCEEDED) or whose client
has gone (its awaiting task was cancelled, so its future is cancelled) is dropped when the batch is formed:
it never takes a batch slot and is never computed.

One batch runs at a time, in one dedicated thread (ONNX Runtime releases the GIL and uses its own intra-op
threads); the next batch gathers while the current one runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import grpc

from .statistics import BatchTiming
from .status import ServiceError

log = logging.getLogger("zfserve.server")


class QueueFull(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class QueueTimeout(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExpired(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ShuttingDown(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


@dataclass
class BatcherConfig:
    max_batch_size: int = 32
    max_queue_delay_us: int = 5000
    max_queue_size: int = 256          # 0 = unbounded
    default_timeout_us: int = 0        # 0 = no queue timeout


@dataclass
class BatcherStats:
    """Counters, for metrics and tests: every submitted request ends in exactly one of the last five."""

    submitted: int = 0
    batches: int = 0
    images_computed: int = 0
    completed: int = 0
    rejected_full: int = 0
    dropped_timeout: int = 0
    dropped_deadline: int = 0
    dropped_cancelled: int = 0
    failed: int = 0


@dataclass
class _Pending:
    inputs: np.ndarray
    future: asyncio.Future
    enqueued: float
    expires: float | None       # queue timeout (loop time)
    deadline: float | None      # the client's gRPC deadline (loop time)
    timing: BatchTiming | None = None   # filled in for the statistics extension
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    size: int = field(init=False)

    def __post_init__(self):
        self.size = int(self.inputs.shape[0])


class DynamicBatcher:
    """Queue + batch worker around ``run(batch) -> outputs`` (a blocking function; rows follow the inputs)."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], config: BatcherConfig, *, name: str = "model",
                 on_batch: Callable[[int], None] | None = None,
                 on_queue_depth: Callable[[int], None] | None = None):
        self._run = run
        self.config = config
        self.name = name
        self.stats = BatcherStats()
        self._on_batch = on_batch or (lambda size: None)
        self._on_queue_depth = on_queue_depth or (lambda depth: None)
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._closing = False
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"batch-{name}")
        self._worker: asyncio.Task | None = None
        self.in_flight = 0    # images in the engine call now running

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def submit(self, inputs: np.ndarray, *, timeout_us: int | None = None, deadline: float | None = None,
                     timing: BatchTiming | None = None) -> np.ndarray:
        """Queue ``inputs`` (N, ...) and wait for its N output rows.

        ``timeout_us`` may only lower the configured queue timeout; ``deadline`` is the client's deadline in
        ``loop.time()`` units; ``timing``, when given, receives the request's queue and compute times and its
        batch. Raises QueueFull, QueueTimeout, DeadlineExpired or ShuttingDown.
        """
        if self._closing:
            raise ShuttingDown("server is shutting down; retry on another replica")
        loop = asyncio.get_running_loop()
        now = loop.time()
        if deadline is not None and deadline <= now:
            self.stats.submitted += 1
            self.stats.dropped_deadline += 1
            raise DeadlineExpired("deadline expired before the request was queued")
        limit = self.config.max_queue_size
        if limit and len(self._queue) >= limit:
            self._prune(now)
        self.stats.submitted += 1
        if limit and len(self._queue) >= limit:
            self.stats.rejected_full += 1
            raise QueueFull(f"queue full: {len(self._queue)} requests waiting for model {self.name!r} "
                            f"(--max-queue-size {limit}); retry later")
        timeouts = [t for t in (self.config.default_timeout_us, timeout_us) if t]
        expires = now + min(timeouts) / 1e6 if timeouts else None
        item = _Pending(inputs, loop.create_future(), now, expires, deadline, timing)
        self._queue.append(item)
        self._on_queue_depth(len(self._queue))
        self._arrived.set()
        # A cancelled caller (client gone, deadline hit) cancels this future: the worker then skips the item.
        return await item.future

    def _drop_reason(self, item: _Pending, now: float):
        """Why a queued item must not be computed, or None."""
        if item.future.cancelled():
            return "cancelled"
        if item.future.done():
            return "done"
        if item.deadline is not None and item.deadline <= now:
            return "deadline"
        if item.expires is not None and item.expires <= now:
            return "timeout"
        return None

    def _drop(self, item: _Pending, reason: str) -> None:
        if reason == "cancelled":
            self.stats.dropped_cancelled += 1
        elif reason == "deadline":
            self.stats.dropped_deadline += 1
            item.future.set_exception(DeadlineExpired("deadline expired while queued; not computed"))
        elif reason == "timeout":
            self.stats.dropped_timeout += 1
            item.future.set_exception(QueueTimeout(
                f"request waited longer than its queue timeout for model {self.name!r} "
                f"(--default-timeout-us {self.config.default_timeout_us} or the request's timeout); retry later"))

    def _prune(self, now: float) -> None:
        kept = deque()
        for item in self._queue:
            reason = self._drop_reason(item, now)
            if reason:
                self._drop(item, reason)
            else:
                kept.append(item)
        self._queue = kept

    def _take_batch(self, now: float) -> list[_Pending]:
        """Pop requests in arrival order up to max_batch_size images, skipping dead ones."""
        batch, images = [], 0
        while self._queue:
            item = self._queue[0]
            reason = self._drop_reason(item, now)
            if reason:
                self._queue.popleft()
                self._drop(item, reason)
                continue
            if batch and images + item.size > self.config.max_batch_size:
                break
            batch.append(self._queue.popleft())
            images += item.size
            if images >= self.config.max_batch_size:
                break
        self._on_queue_depth(len(self._queue))
        return batch

    def _queued_images(self) -> int:
        return sum(item.size for item in self._queue)

    async def _gather(self, loop) -> None:
        """Wait until a full batch is queued or the oldest request has waited max_queue_delay_us."""
        delay = self.config.max_queue_delay_us / 1e6
        while self._queue and not self._closing and self._queued_images() < self.config.max_batch_size:
            remaining = self._queue[0].enqueued + delay - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._gather(loop)
            batch = self._take_batch(loop.time())
            if not batch:
                continue
            inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([b.inputs for b in batch])
            started = time.perf_counter_ns()
            self.in_flight = len(inputs)
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, inputs)
            except Exception as exc:  # an engine failure fails this batch only, never the server
                log.exception("batch of %d for model %s failed", len(inputs), self.name)
                for item in batch:
                    self.stats.failed += 1
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            finally:
                self.in_flight = 0
            compute_ns = time.perf_counter_ns() - started
            self.stats.batches += 1
            self.stats.images_computed += len(inputs)
            self._on_batch(len(inputs))
            log.debug("batch model=%s images=%d requests=%d ms=%.1f", self.name, len(inputs), len(batch),
                      compute_ns / 1e6)
            start = 0
            for item in batch:
                rows = outputs[start:start + item.size]
                start += item.size
                self.stats.completed += 1
                if item.timing is not None:
                    t = item.timing
                    t.batch_id, t.batch_size, t.compute_ns = self.stats.batches, len(inputs), compute_ns
                    t.queue_ns = started - item.enqueued_ns
                if not item.future.done():  # the caller may have gone while the batch ran
                    item.future.set_result(rows)

    async def close(self) -> None:
        """Stop taking requests, finish every queued one, stop the worker."""
        self._closing = True
        self._arrived.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)
