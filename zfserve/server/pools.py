"""Bounded pools for the work that runs beside classification: decoding uploaded images, and the long
computations (deconv projections, occlusion sweeps).

Why one kind of work cannot starve another:
- each kind runs on its own small thread pool, never on the batcher's thread or the event loop, so the
  classification batch loop keeps forming and sending batches while a sweep or a large decode runs;
- PyTorch's intra-op threads in the server process are capped (``--heavy-threads``, default 1): on a 2-core
  host a sweep can take at most one core, ONNX Runtime's classification session keeps the other;
- admission is bounded (workers + a queue): one more request is rejected at once with UNAVAILABLE instead of
  piling up;
- the queue is fair, counted in work (:mod:`.fair`; a decode's work is its pixels): a job starts when a worker
  is free, in fair order between clients, so one client's large jobs do not hold a small one of another's
  behind them;
- a job checks (its ``Job.check``, also called by its progress reports) whether its client has gone or its
  deadline has passed, and stops there; a request that expires or is cancelled while waiting never starts;
- a background pool (``background=True``: large decodes, REST body parsing) runs its threads at a lower OS
  priority (:data:`BACKGROUND_NICE` more), so when the cores are short the engine's threads and the event loop,
  which a single-image request needs, go first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import os
import sys
import threading
import time
from typing import Callable

from ..errors import ZFServeError
from .batcher import DeadlineExpired
from .fair import FairOrder
from .status import Cancelled, Unavailable


BACKGROUND_NICE = 10    # added to a background pool's threads' nice value: CFS gives them about a tenth of a core
#                         against one of normal priority


def _lower_priority(step: int) -> None:
    """Lower the calling thread's OS priority by ``step`` nice levels (Linux, where nice is per thread)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + step))
    except OSError:   # not permitted here (a sandbox): the pool still works, at normal priority
        pass


class Aborted(Exception):
    """Raised inside a running computation (from its progress callback) to stop it."""


class Job:
    """What a pooled job sees: ``check()`` and a progress reporter, both of which stop it when it must stop."""

    def __init__(self, deadline_mono: float | None, on_progress: Callable[[int, int], None] | None):
        self.cancelled = threading.Event()
        self.deadline_mono = deadline_mono
        self.on_progress = on_progress
        self.expired = False

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Aborted("cancelled")
        if self.deadline_mono is not None and time.monotonic() >= self.deadline_mono:
            self.expired = True
            raise Aborted("deadline")

    def progress(self, done: int, total: int) -> None:
        self.check()
        if self.on_progress is not None:
            self.on_progress(int(done), int(total))


class BoundedPool:
    """``workers`` threads and room for ``queue_size`` more requests; ``what`` and ``flags`` name the work and
    the two options in the overload message (so the client knows which knob is full)."""

    def __init__(self, workers: int = 1, queue_size: int = 4, on_admitted: Callable[[int], None] | None = None,
                 *, name: str = "heavy", what: str = "deconv/occlusion requests",
                 flags: tuple[str, str] = ("--heavy-workers", "--heavy-queue-size"),
                 after: Callable[[], None] | None = None, background: bool = False):
        self.workers = workers
        self.queue_size = queue_size
        self.what, self.flags = what, flags
        self._after = after or (lambda: None)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix=name, initializer=_lower_priority if background else None,
            initargs=(BACKGROUND_NICE,) if background else ())
        self._order = FairOrder()
        self._waiting: list[tuple[float, int, asyncio.Future]] = []   # (tag, arrival, its turn) per queued job
        self._seq = self._running = 0
        self._admitted = 0
        self._on_admitted = on_admitted or (lambda n: None)
        self.completed = 0
        self.aborted = 0

    @property
    def admitted(self) -> int:
        return self._admitted

    def _release(self) -> None:
        self._admitted -= 1
        self._on_admitted(self._admitted)

    def _dispatch(self) -> None:
        """Give free workers to the waiting jobs with the smallest tags."""
        while self._running < self.workers and self._waiting:
            tag, _, turn = heapq.heappop(self._waiting)
            if turn.cancelled():
                continue
            self._running += 1
            self._order.served(tag)
            turn.set_result(None)

    def _finished(self) -> None:
        self._running -= 1
        self._release()
        self._dispatch()

    async def run(self, fn: Callable[[Job], object], *, deadline_mono: float | None = None,
                  on_progress: Callable[[int, int], None] | None = None, client: str = "", work: float = 1.0):
        """Run ``fn(job)`` on the pool, its turn in fair order among ``client``'s and others' jobs (``work``:
        its size, e.g. pixels); raises Unavailable when full, DeadlineExpired, Cancelled."""
        limit = self.workers + self.queue_size
        if self._admitted >= limit:
            raise Unavailable(f"busy: {self._admitted} {self.what} admitted ({self.flags[0]} {self.workers} + "
                              f"{self.flags[1]} {self.queue_size}); retry later")
        job = Job(deadline_mono, on_progress)
        if deadline_mono is not None and time.monotonic() >= deadline_mono:
            raise DeadlineExpired("deadline expired before the computation started")
        loop = asyncio.get_running_loop()
        self._admitted += 1
        self._on_admitted(self._admitted)
        turn = loop.create_future()
        heapq.heappush(self._waiting, (self._order.tag(client, work), self._seq, turn))
        self._seq += 1
        self._dispatch()
        try:
            await turn
        except asyncio.CancelledError:   # the client went away while waiting: never started
            self.aborted += 1
            if turn.done() and not turn.cancelled():   # its turn had just come: the next job's now
                self._running -= 1
            self._release()
            self._dispatch()
            raise

        def call():
            job.check()  # expired or cancelled while waiting: never started
            try:
                return fn(job)
            except (Aborted, ZFServeError) as exc:
                # An expected stop carries no traceback out: the frames of the stopped work (a half-decoded
                # 40 MP image, say) would stay alive with the exception as long as its future does.
                raise exc.with_traceback(None)
            finally:
                self._after()

        future = self._executor.submit(call)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._finished))
        waiting = asyncio.wrap_future(future)
        # The futures hold the job's exception, whose traceback holds this frame: without them in its locals, no
        # reference cycle keeps the exception, and the request's data in its frames, alive until a collection.
        del future
        try:
            result = await waiting
        except asyncio.CancelledError:
            job.cancelled.set()   # the client has gone: stop the computation at its next check
            self.aborted += 1
            raise
        except Aborted:
            self.aborted += 1
            if job.expired:
                raise DeadlineExpired("deadline exceeded; the computation was stopped") from None
            raise Cancelled("cancelled") from None
        finally:
            del waiting
        self.completed += 1
        return result

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
