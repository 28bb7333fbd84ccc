"""The dynamic batcher: concurrent classification requests (Classify and ModelInfer alike) become one engine call.

Triton's semantics and knob names:
- ``max_batch_size``: most images in one engine call. A request larger than that is split into parts of at
  most ``max_batch_size`` images, each scheduled on its own, so no request is refused for its size here.
- ``max_queue_delay_us``: a batch leaves when it is full or when its next part has waited this long.
- ``max_queue_size``: most requests waiting; one more is rejected at once with :class:`QueueFull`, which the
  servicers answer with UNAVAILABLE (Triton's choice: "try again later", safe to retry with backoff).
- ``default_timeout_us``: a request still queued after this long is rejected with :class:`QueueTimeout`
  (UNAVAILABLE, as in Triton); a request may only lower it (OIP parameter ``timeout``).
A request whose gRPC deadline has passed (DEADLINE_EXCEEDED) or whose client has gone (its awaiting task was
cancelled, so its future is cancelled) is dropped when a batch is formed: it never takes a batch slot and is
never computed.

Fairness, counted in images (one client's many-image requests must not starve single-image callers):
- parts are taken in fair order counted in images (:mod:`.fair`): each client's parts keep their order,
  clients with work waiting share batches in proportion to images, and a single-image request arriving behind
  any number of 64-image requests from other clients goes into the next batch;
- ``max_queue_images``: most images waiting (they are preprocessed tensors, 0.6 MB each at 224 x 224). A
  request that would pass it takes room from the client with the most images waiting, whose newest requests
  are shed (:class:`QueueFull`, UNAVAILABLE, counted as ``shed``) while that client holds more than the newcomer
  would; otherwise the newcomer is rejected.

One batch runs at a time, in one dedicated thread (ONNX Runtime releases the GIL and uses its own intra-op
threads); the next batch gathers while the current one runs. ``max_batch_size`` bounds how long a request
waits for the batch already running: on CPU the default is 8 (per-image time is flat from 8 images up there,
so larger batches only lengthen that wait), 32 on a GPU (``--device cuda``). A single-image request does not
wait at all for a running batch of several images that holds nothing of its client's (a part of another's
64-image request, other clients' images): it runs beside it, in a second thread (the express lane: one image
at a time, in fair order; the engine is safe to call from two threads, and one image costs little beside a
batch). A client's own requests never pass each other that way.

Memory: the engine keeps what its largest batch made it take (ONNX Runtime's arena). After a batch of more than
``release_above`` images, once no work has arrived for :data:`RELEASE_IDLE_S`, the batcher calls ``release``
in its thread (the server's: the classifier's ``release_memory`` and glibc's ``malloc_trim``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import grpc

from .fair import FairOrder
from .statistics import BatchTiming
from .status import ServiceError

log = logging.getLogger("zfserve.server")

CPU_MAX_BATCH_SIZE = 8       # the default --max-batch-size on CPU (see the module docstring)
GPU_MAX_BATCH_SIZE = 32      # ... and with --device cuda
RELEASE_ABOVE_IMAGES = 4     # a batch larger than this grows the engine's memory enough to give it back
RELEASE_IDLE_S = 1.0         # ... once the batcher has had no work for this long
EXPRESS_IMAGES = 1           # requests of at most this many images take the express lane (module docstring)


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
    max_batch_size: int = CPU_MAX_BATCH_SIZE
    max_queue_delay_us: int = 5000
    max_queue_size: int = 256          # requests; 0 = unbounded
    max_queue_images: int = 512        # images; 0 = unbounded
    default_timeout_us: int = 0        # 0 = no queue timeout


@dataclass
class BatcherStats:
    """Counters, for metrics and tests: every submitted request ends in exactly one of the last seven."""

    submitted: int = 0
    batches: int = 0
    images_computed: int = 0
    express_batches: int = 0     # of ``batches``: single images run beside a batch of several
    releases: int = 0            # the engine's memory given back after large batches
    completed: int = 0
    rejected_full: int = 0
    shed: int = 0
    dropped_timeout: int = 0
    dropped_deadline: int = 0
    dropped_cancelled: int = 0
    failed: int = 0


@dataclass(eq=False)
class _Request:
    inputs: np.ndarray
    future: asyncio.Future
    client: str
    enqueued: float
    expires: float | None       # queue timeout (loop time)
    deadline: float | None      # the client's gRPC deadline (loop time)
    timing: BatchTiming | None = None   # filled in for the statistics extension
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    queued_images: int = 0      # of its parts still waiting
    outputs: list = field(default_factory=list)   # per part, once computed
    parts_left: int = 0         # parts not computed yet
    started_ns: int = 0         # its first part's batch started
    compute_ns: int = 0
    dead: bool = False          # ended early (dropped, shed or failed): its other parts are skipped


@dataclass(order=True)
class _Part:
    """Rows ``start:stop`` of a request; ``tag``: its virtual finish time (self-clocked fair queuing)."""

    tag: float
    seq: int
    request: _Request = field(compare=False)
    index: int = field(compare=False)
    start: int = field(compare=False)
    stop: int = field(compare=False)

    @property
    def size(self) -> int:
        return self.stop - self.start


class DynamicBatcher:
    """Queue + batch worker around ``run(batch) -> outputs`` (a blocking function; rows follow the inputs).

    ``outputs`` are sliced by rows (``outputs[a:b]``) to hand each request its rows back; a request split into
    parts gets its parts' outputs joined by ``join`` (``np.concatenate`` for arrays). ``release``: called in the
    batch thread when the batcher goes idle after a batch of more than ``release_above`` images (see the module
    docstring)."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], config: BatcherConfig, *, name: str = "model",
                 on_batch: Callable[[int], None] | None = None,
                 on_queue_depth: Callable[[int], None] | None = None,
                 join: Callable[[list], object] = np.concatenate,
                 release: Callable[[], None] | None = None, release_above: int = RELEASE_ABOVE_IMAGES):
        self._run = run
        self._join = join
        self._release, self._release_above = release, release_above
        self._largest = 0     # the largest batch computed since the last release
        self.config = config
        self.name = name
        self.stats = BatcherStats()
        self._on_batch = on_batch or (lambda size: None)
        self._on_queue_depth = on_queue_depth or (lambda depth: None)
        self._heap: list[_Part] = []
        self._seq = 0
        self._order = FairOrder()                    # the parts' tags (fair queuing in images)
        self._waiting: dict[str, deque[_Request]] = {}   # per client: its requests with parts still queued
        self._client_images: dict[str, int] = {}
        self._queued_images = self._queued_requests = 0
        self._arrived = asyncio.Event()
        self._closing = False
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"batch-{name}")
        self._express_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"express-{name}")
        self._worker: asyncio.Task | None = None
        self._express: asyncio.Task | None = None     # the express batch now running
        self._running_clients: frozenset | None = None   # of the main batch now running, when it has several images
        self.in_flight = 0    # images in the engine calls now running

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    @property
    def queue_depth(self) -> int:
        return self._queued_requests

    async def submit(self, inputs: np.ndarray, *, timeout_us: int | None = None, deadline: float | None = None,
                     timing: BatchTiming | None = None, client: str = "") -> np.ndarray:
        """Queue ``inputs`` (N, ...) from ``client`` and wait for its N output rows.

        ``timeout_us`` may only lower the configured queue timeout; ``deadline`` is the client's deadline in
        ``loop.time()`` units; ``timing``, when given, receives the request's queue and compute times and its
        batch. Raises QueueFull, QueueTimeout, DeadlineExpired or ShuttingDown.
        """
        if self._closing:
            raise ShuttingDown("server is shutting down; retry on another replica")
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.stats.submitted += 1
        if deadline is not None and deadline <= now:
            self.stats.dropped_deadline += 1
            raise DeadlineExpired("deadline expired before the request was queued")
        size = int(inputs.shape[0])
        self._admit(size, client, now)
        timeouts = [t for t in (self.config.default_timeout_us, timeout_us) if t]
        request = _Request(inputs, loop.create_future(), client, now, now + min(timeouts) / 1e6 if timeouts else None,
                           deadline, timing)
        step = self.config.max_batch_size
        for index, start in enumerate(range(0, size, step)):
            stop = min(size, start + step)
            part = _Part(self._order.tag(client, stop - start), self._seq, request, index, start, stop)
            self._seq += 1
            heapq.heappush(self._heap, part)
            request.parts_left += 1
        request.outputs = [None] * request.parts_left
        self._count(request, size)
        self._arrived.set()
        self._start_express(loop)
        # A cancelled caller (client gone, deadline hit) cancels this future: the worker then skips the request.
        return await request.future

    # -------------------------------------------------------------------------------------- admission
    def _count(self, request: _Request, images: int) -> None:
        """Add ``images`` (negative: remove) to what ``request`` and its client have waiting."""
        client = request.client
        if images > 0 and request.queued_images == 0:
            self._waiting.setdefault(client, deque()).append(request)
            self._queued_requests += 1
        request.queued_images += images
        self._queued_images += images
        self._client_images[client] = self._client_images.get(client, 0) + images
        if request.queued_images == 0:
            self._waiting[client].remove(request)
            self._queued_requests -= 1
            if not self._waiting[client]:
                del self._waiting[client], self._client_images[client]
        self._on_queue_depth(self._queued_requests)

    def _fits(self, size: int) -> bool:
        c = self.config
        return (not c.max_queue_size or self._queued_requests < c.max_queue_size) and \
            (not c.max_queue_images or self._queued_images == 0 or self._queued_images + size <= c.max_queue_images)

    def _admit(self, size: int, client: str, now: float) -> None:
        """Make room for ``size`` images from ``client`` (see the module docstring), or raise QueueFull."""
        if self._fits(size):
            return
        self._prune(now)
        limit = self.config.max_queue_images
        while not self._fits(size) and limit and self._queued_images + size > limit and self._client_images:
            hog = max(self._client_images, key=self._client_images.get)
            if hog == client or self._client_images[hog] <= self._client_images.get(client, 0) + size or \
                    not self._shed_newest(hog):
                break
        if self._fits(size):
            return
        self.stats.rejected_full += 1
        if self.config.max_queue_size and self._queued_requests >= self.config.max_queue_size:
            raise QueueFull(f"queue full: {self._queued_requests} requests waiting for model {self.name!r} "
                            f"(--max-queue-size {self.config.max_queue_size}); retry later")
        raise QueueFull(f"queue full: {self._queued_images} images waiting for model {self.name!r}, "
                        f"{self._client_images.get(client, 0)} of them yours (--max-queue-images {limit}); retry "
                        f"later")

    def _shed_newest(self, client: str) -> bool:
        """End ``client``'s newest request none of whose parts has started; False when there is none."""
        for request in reversed(self._waiting.get(client, ())):
            if not request.started_ns:
                self.stats.shed += 1
                self._end(request, QueueFull(
                    f"queue full: this request was shed to make room for other clients' requests (its client had "
                    f"the most of the {self._queued_images} images waiting for model {self.name!r}, "
                    f"--max-queue-images {self.config.max_queue_images}); retry later"))
                return True
        return False

    def _end(self, request: _Request, error: Exception | None) -> None:
        """``request`` ends early: its waiting parts are skipped, its caller gets ``error`` (None: gone)."""
        request.dead = True
        if request.queued_images:
            self._count(request, -request.queued_images)
        if error is not None and not request.future.done():
            request.future.set_exception(error)

    # -------------------------------------------------------------------------------------- dropping
    def _drop_reason(self, request: _Request, now: float):
        """Why a queued request must not be computed, or None."""
        if request.future.cancelled():
            return "cancelled"
        if request.future.done():
            return "done"
        if request.deadline is not None and request.deadline <= now:
            return "deadline"
        if request.expires is not None and request.expires <= now:
            return "timeout"
        return None

    def _drop(self, request: _Request, reason: str) -> None:
        if reason == "cancelled":
            self.stats.dropped_cancelled += 1
            self._end(request, None)
        elif reason == "deadline":
            self.stats.dropped_deadline += 1
            self._end(request, DeadlineExpired("deadline expired while queued; not computed"))
        elif reason == "timeout":
            self.stats.dropped_timeout += 1
            self._end(request, QueueTimeout(
                f"request waited longer than its queue timeout for model {self.name!r} "
                f"(--default-timeout-us {self.config.default_timeout_us} or the request's timeout); retry later"))
        else:
            self._end(request, None)

    def _prune(self, now: float) -> None:
        for part in self._heap:
            request = part.request
            reason = None if request.dead else self._drop_reason(request, now)
            if reason:
                self._drop(request, reason)
        self._heap = [p for p in self._heap if not p.request.dead]
        heapq.heapify(self._heap)

    # -------------------------------------------------------------------------------------- batches
    def _take_batch(self, now: float, limit: int | None = None, small: int | None = None,
                    exclude: frozenset = frozenset()) -> list[_Part]:
        """Pop parts in fair order up to ``limit`` (max_batch_size) images, skipping those of dead requests and,
        with ``small``, leaving those of requests larger than ``small`` images or of the ``exclude`` clients
        where they are."""
        limit = limit or self.config.max_batch_size
        batch, images, passed = [], 0, []
        while self._heap:
            part = self._heap[0]
            request = part.request
            reason = None if request.dead else self._drop_reason(request, now)
            if request.dead or reason:
                heapq.heappop(self._heap)
                if reason:
                    self._drop(request, reason)
                continue
            if small is not None and (len(request.inputs) > small or request.client in exclude):
                passed.append(heapq.heappop(self._heap))
                continue
            if batch and images + part.size > limit:
                break
            heapq.heappop(self._heap)
            self._order.served(part.tag)
            request.started_ns = request.started_ns or time.perf_counter_ns()
            self._count(request, -part.size)
            batch.append(part)
            images += part.size
            if images >= limit:
                break
        for part in passed:
            heapq.heappush(self._heap, part)
        return batch

    def _start_express(self, loop) -> None:
        """While a batch of several images runs, start the next single-image request of a client with nothing in
        it beside it."""
        if self._running_clients is None or self._express is not None or self._closing:
            return
        batch = self._take_batch(loop.time(), EXPRESS_IMAGES, small=EXPRESS_IMAGES, exclude=self._running_clients)
        if batch:
            self._express = loop.create_task(self._run_express(loop, batch), name=f"express-{self.name}")

    async def _run_express(self, loop, batch: list[_Part]) -> None:
        try:
            await self._compute(loop, batch, self._express_executor)
            self.stats.express_batches += 1
        finally:
            self._express = None
        self._start_express(loop)

    async def _gather(self, loop) -> None:
        """Wait until a full batch is queued or the next part has waited max_queue_delay_us."""
        delay = self.config.max_queue_delay_us / 1e6
        while self._heap and not self._closing and self._queued_images < self.config.max_batch_size:
            remaining = self._heap[0].request.enqueued + delay - loop.time()
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
            while self._heap and self._heap[0].request.dead:
                heapq.heappop(self._heap)
            if not self._heap:
                if self._closing:
                    return
                self._arrived.clear()
                if self._release is not None and self._largest > self._release_above:
                    try:
                        await asyncio.wait_for(self._arrived.wait(), RELEASE_IDLE_S)
                    except asyncio.TimeoutError:
                        await self._release_memory(loop)
                    continue
                await self._arrived.wait()
                continue
            await self._gather(loop)
            batch = self._take_batch(loop.time())
            if batch:
                if sum(part.size for part in batch) > EXPRESS_IMAGES:
                    self._running_clients = frozenset(part.request.client for part in batch)
                    self._start_express(loop)
                try:
                    await self._compute(loop, batch, self._executor)
                finally:
                    self._running_clients = None

    async def _release_memory(self, loop) -> None:
        self._largest = 0
        try:
            await loop.run_in_executor(self._executor, self._release)
        except Exception:  # memory not given back is no reason to stop serving  # noqa: BLE001
            log.exception("giving back model %s's memory failed", self.name)
            return
        self.stats.releases += 1

    async def _compute(self, loop, batch: list[_Part], executor) -> None:
        rows = [part.request.inputs[part.start:part.stop] for part in batch]
        inputs = rows[0] if len(rows) == 1 else np.concatenate(rows)
        started = time.perf_counter_ns()
        self.in_flight += len(inputs)
        try:
            outputs = await loop.run_in_executor(executor, self._run, inputs)
        except Exception as exc:  # an engine failure fails this batch only, never the server
            log.exception("batch of %d for model %s failed", len(inputs), self.name)
            for part in batch:
                if not part.request.dead:
                    self.stats.failed += 1
                    self._end(part.request, exc)
            return
        finally:
            self.in_flight -= len(inputs)
        compute_ns = time.perf_counter_ns() - started
        self._largest = max(self._largest, len(inputs))
        self.stats.batches += 1
        self.stats.images_computed += len(inputs)
        self._on_batch(len(inputs))
        log.debug("batch model=%s images=%d parts=%d ms=%.1f", self.name, len(inputs), len(batch), compute_ns / 1e6)
        offset = 0
        for part in batch:
            request = part.request
            request.outputs[part.index] = outputs[offset:offset + part.size]
            offset += part.size
            request.parts_left -= 1
            request.compute_ns += compute_ns
            if request.parts_left or request.dead:
                continue
            self.stats.completed += 1
            if request.timing is not None:
                t = request.timing
                t.batch_id, t.batch_size, t.compute_ns = self.stats.batches, len(inputs), request.compute_ns
                t.queue_ns = request.started_ns - request.enqueued_ns
            if not request.future.done():  # the caller may have gone while the batch ran
                outs = request.outputs
                request.future.set_result(outs[0] if len(outs) == 1 else self._join(outs))

    async def close(self) -> None:
        """Stop taking requests, finish every queued one, stop the worker."""
        self._closing = True
        self._arrived.set()
        if self._worker is not None:
            await self._worker
        if self._express is not None:
            await asyncio.shield(self._express)
        self._executor.shutdown(wait=True)
        self._express_executor.shutdown(wait=True)
