"""The dynamic batcher's semantics (Triton's): grouping, limits, overload, timeouts, deadlines, cancellation,
draining. The engine here is a plain function that records what it was given (row i of the output is the sum
of input row i), gated by an event so the tests can hold it busy."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from zfserve.server.batcher import (BatcherConfig, DeadlineExpired, DynamicBatcher, QueueFull, QueueTimeout,
                                    ShuttingDown)


class Engine:
    def __init__(self):
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.gate.wait(10)
        self.batches.append(x.copy())
        if self.fail:
            raise RuntimeError("engine failed")
        return x.reshape(len(x), -1).sum(axis=1, keepdims=True)

    @property
    def sizes(self):
        return [len(b) for b in self.batches]


def _rows(rng, n):
    return rng.normal(size=(n, 2, 3)).astype(np.float32)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _started(engine, config):
    b = DynamicBatcher(engine, config)
    b.start()
    return b


def test_concurrent_requests_share_a_batch_and_get_their_own_rows(np_rng):
    engine = Engine()
    inputs = [_rows(np_rng, n) for n in (1, 2, 1, 3)]

    async def main():
        b = await _started(engine, BatcherConfig(max_batch_size=16, max_queue_delay_us=200_000))
        outs = await asyncio.gather(*(b.submit(x) for x in inputs))
        await b.close()
        return outs

    outs = _run(main())
    assert engine.sizes == [7]
    for x, out in zip(inputs, outs):
        np.testing.assert_allclose(out[:, 0], x.reshape(len(x), -1).sum(1), rtol=1e-6)


def test_batches_respect_max_batch_size_in_arrival_order(np_rng):
    engine = Engine()
    engine.gate.clear()
    inputs = [_rows(np_rng, 1) for _ in range(10)]

    async def main():
        b = await _started(engine, BatcherConfig(max_batch_size=4, max_queue_delay_us=0))
        tasks = [asyncio.ensure_future(b.submit(x)) for x in inputs]
        await asyncio.sleep(0.05)
        engine.gate.set()
        outs = await asyncio.gather(*tasks)
        await b.close()
        return outs

    outs = _run(main())
    assert max(engine.sizes) <= 4 and sum(engine.sizes) == 10
    np.testing.assert_array_equal(np.concatenate(engine.batches), np.concatenate(inputs))  # arrival order
    for x, out in zip(inputs, outs):
        assert out[0, 0] == pytest.approx(float(x.sum()), rel=1e-5)


def test_a_request_larger_than_max_batch_is_split_and_comes_back_in_order(np_rng):
    engine = Engine()
    big, small = _rows(np_rng, 9), _rows(np_rng, 1)

    async def main():
        b = await _started(engine, BatcherConfig(max_batch_size=4, max_queue_delay_us=50_000))
        outs = await asyncio.gather(b.submit(small, client="a"), b.submit(big, client="b"))
        await b.close()
        return outs

    outs = _run(main())
    assert max(engine.sizes) <= 4 and sum(engine.sizes) == 10
    np.testing.assert_allclose(outs[1][:, 0], big.reshape(9, -1).sum(1), rtol=1e-5)   # rows in order
    assert outs[0].shape == (1, 1)


def test_a_split_request_of_scored_batches_is_joined_row_for_row(np_rng):
    """The server's engine returns ScoredBatch (probabilities + each image's out-of-distribution verdict): the
    parts of a split request come back joined in order, verdicts beside their rows."""
    from zfserve.engine.results import OodScore, ScoredBatch
    engine = Engine()

    def scored(x):
        sums = engine(x)
        return ScoredBatch(sums, [OodScore(float(v), 0.0, bool(v > 0)) for v in sums[:, 0]])

    big = _rows(np_rng, 7)

    async def main():
        b = DynamicBatcher(scored, BatcherConfig(max_batch_size=3, max_queue_delay_us=1000),
                           join=ScoredBatch.concatenate)
        b.start()
        out = await b.submit(big)
        await b.close()
        return out

    out = _run(main())
    want = big.reshape(7, -1).sum(1)
    assert engine.sizes == [3, 3, 1]
    np.testing.assert_allclose(out.probabilities[:, 0], want, rtol=1e-5)
    assert [v.score for v in out.ood] == pytest.approx(want.tolist(), rel=1e-5)
    assert [v.out_of_distribution for v in out.ood] == [bool(v > 0) for v in want]


def test_a_small_caller_is_served_next_behind_large_requests(np_rng):
    """Fair queuing in images: 3 clients queue 64-image requests (parts of 8); a two-image request from a
    fourth client, arriving last, goes into the first batch after the one already running. (A single image does
    not even wait for that batch: the next test.)"""
    engine = Engine()
    engine.gate.clear()
    probe = _rows(np_rng, 2)

    async def main():
        b = await _started(engine, BatcherConfig(max_batch_size=8, max_queue_delay_us=0))
        running = asyncio.ensure_future(b.submit(_rows(np_rng, 8), client="first"))
        await asyncio.sleep(0.05)   # in the engine
        hogs = [asyncio.ensure_future(b.submit(_rows(np_rng, 64), client=f"hog{i}")) for i in range(3)]
        await asyncio.sleep(0.01)
        probing = asyncio.ensure_future(b.submit(probe, client="probe"))
        await asyncio.sleep(0.01)
        engine.gate.set()
        await asyncio.gather(running, probing, *hogs)
        await b.close()

    _run(main())
    assert sum(engine.sizes) == 8 + 3 * 64 + 2
    position = next(i for i, batch in enumerate(engine.batches) if any(np.array_equal(r, probe[0]) for r in batch))
    assert position == 1, engine.sizes


class LargeGate(Engine):
    """Holds batches of more than one image at the gate; single images pass."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 1:
            self.batches.append(x.copy())
            return x.reshape(len(x), -1).sum(axis=1, keepdims=True)
        return super().__call__(x)


def test_single_images_run_beside_a_batch_of_a_larger_request(np_rng):
    """The express lane: while a batch holding part of a 64-image request runs (held here), single-image
    requests of two other clients are answered one by one, each with its own rows; the large request then
    completes in full and in order."""
    engine = LargeGate()
    engine.gate.clear()
    big, singles = _rows(np_rng, 64), [_rows(np_rng, 1) for _ in range(4)]

    async def main():
        b = await _started(engine, BatcherConfig(max_batch_size=8, max_queue_delay_us=0))
        hog = asyncio.ensure_future(b.submit(big, client="hog"))
        await asyncio.sleep(0.05)                    # its first part is in the (held) engine
        outs = await asyncio.gather(*(b.submit(x, client=f"c{i % 2}") for i, x in enumerate(singles)))
        assert not hog.done() and engine.sizes == [1, 1, 1, 1]
        engine.gate.set()
        out = await hog
        await b.close()
        return outs, out, b.stats

    outs, out, stats = _run(main())
    for x, got in zip(singles, outs):
        assert got[0, 0] == pytest.approx(float(x.sum()), rel=1e-5)
    np.testing.assert_allclose(out[:, 0], big.reshape(64, -1).sum(1), rtol=1e-5)
    assert stats.express_batches == 4 and stats.completed == 5 and sum(engine.sizes) == 68


def test_express_lane_passes_other_clients_batch_never_ones_own(np_rng):
    """Behind a running batch of four clients' single images (held), a fifth client's single image runs beside
    it; a second image of a client in that batch waits for it (a client's requests keep their order)."""
    engine = LargeGate()
    engine.gate.clear()

    async def main():
        b = await _started(engine, BatcherConfig(max_batch_size=8, max_queue_delay_us=50_000))
        first = [asyncio.ensure_future(b.submit(_rows(np_rng, 1), client=c)) for c in "abcd"]
        await asyncio.sleep(0.2)                     # one batch of 4, held
        other = await b.submit(_rows(np_rng, 1), client="e")
        own = asyncio.ensure_future(b.submit(_rows(np_rng, 1), client="a"))
        await asyncio.sleep(0.1)
        assert engine.sizes == [1] and not own.done() and not any(f.done() for f in first)
        engine.gate.set()
        await asyncio.gather(own, *first)
        await b.close()
        return other, b.stats

    other, stats = _run(main())
    assert other.shape == (1, 1) and engine.sizes == [1, 4, 1] and stats.express_batches == 1


def test_memory_is_released_once_idle_after_a_large_batch(np_rng, monkeypatch):
    """``release`` runs in the batch thread once the batcher has been idle RELEASE_IDLE_S after a batch of more
    than ``release_above`` images, once per burst; never after small batches only."""
    import zfserve.server.batcher as batcher
    monkeypatch.setattr(batcher, "RELEASE_IDLE_S", 0.05)
    engine, threads = Engine(), []

    async def main():
        b = DynamicBatcher(engine, BatcherConfig(max_batch_size=8, max_queue_delay_us=0),
                           release=lambda: threads.append(threading.current_thread().name), release_above=4)
        b.start()
        await b.submit(_rows(np_rng, 2))
        await asyncio.sleep(0.2)
        small_only = list(threads)
        await asyncio.gather(b.submit(_rows(np_rng, 8)), b.submit(_rows(np_rng, 8)))
        await asyncio.sleep(0.2)
        out = await b.submit(_rows(np_rng, 1))      # served as usual after the release
        await asyncio.sleep(0.2)
        await b.close()
        return small_only, out, b.stats

    small_only, out, stats = _run(main())
    assert small_only == [] and len(threads) == 1 and threads[0].startswith("batch-")
    assert stats.releases == 1 and out.shape == (1, 1)


def test_a_full_image_queue_sheds_the_largest_client_for_a_small_one(np_rng):
    engine = Engine()
    engine.gate.clear()

    async def main():
        b = await _started(engine, BatcherConfig(max_batch_size=8, max_queue_delay_us=0, max_queue_images=16))
        running = asyncio.ensure_future(b.submit(_rows(np_rng, 8), client="hog"))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(b.submit(_rows(np_rng, 8), client="hog")) for _ in range(2)]
        await asyncio.sleep(0.01)   # 16 images waiting: the queue is full
        with pytest.raises(QueueFull, match="--max-queue-images 16"):
            await b.submit(_rows(np_rng, 8), client="hog")          # the hog itself: refused
        small = asyncio.ensure_future(b.submit(_rows(np_rng, 1), client="small"))
        await asyncio.sleep(0.01)
        assert queued[1].done() and not queued[0].done()            # the hog's newest request made room
        with pytest.raises(QueueFull, match="shed"):
            await queued[1]
        engine.gate.set()
        await asyncio.gather(running, queued[0], small)
        await b.close()
        return b.stats

    stats = _run(main())
    assert stats.shed == 1 and stats.rejected_full == 1 and stats.completed == 3 and stats.submitted == 5


def test_full_queue_rejects_at_once_and_counts_add_up(np_rng):
    engine = Engine()
    engine.gate.clear()

    async def main():
        b = await _started(engine, BatcherConfig(max_batch_size=1, max_queue_delay_us=0, max_queue_size=3))
        first = asyncio.ensure_future(b.submit(_rows(np_rng, 1)))
        await asyncio.sleep(0.05)          # the first is in the engine; three may wait
        waiting = [asyncio.ensure_future(b.submit(_rows(np_rng, 1))) for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="queue full"):
            await b.submit(_rows(np_rng, 1))
        engine.gate.set()
        await asyncio.gather(first, *waiting)
        await b.close()
        return b.stats

    stats = _run(main())
    assert stats.submitted == 5 and stats.completed == 4 and stats.rejected_full == 1
    assert engine.sizes == [1, 1, 1, 1]


def test_queue_timeout_rejects_without_computing(np_rng):
    engine = Engine()
    engine.gate.clear()

    async def main():
        b = await _started(engine, BatcherConfig(max_batch_size=1, max_queue_delay_us=0,
                                                       default_timeout_us=10_000_000))
        first = asyncio.ensure_future(b.submit(_rows(np_rng, 1)))
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(b.submit(_rows(np_rng, 1), timeout_us=20_000))  # lowers the default
        await asyncio.sleep(0.1)
        engine.gate.set()
        await first
        with pytest.raises(QueueTimeout):
            await late
        await b.close()
        return b.stats

    stats = _run(main())
    assert engine.sizes == [1] and stats.dropped_timeout == 1


def test_expired_deadline_and_cancelled_requests_never_take_a_slot(np_rng):
    engine = Engine()
    engine.gate.clear()
    expired_input, cancelled_input = _rows(np_rng, 1), _rows(np_rng, 1)

    async def main():
        loop = asyncio.get_running_loop()
        b = await _started(engine, BatcherConfig(max_batch_size=8, max_queue_delay_us=0))
        first = asyncio.ensure_future(b.submit(_rows(np_rng, 1)))
        await asyncio.sleep(0.05)
        expiring = asyncio.ensure_future(b.submit(expired_input, deadline=loop.time() + 0.02))
        leaving = asyncio.ensure_future(b.submit(cancelled_input))
        kept = asyncio.ensure_future(b.submit(_rows(np_rng, 1)))
        await asyncio.sleep(0.05)
        leaving.cancel()                   # the client went away
        with pytest.raises(DeadlineExpired):
            await b.submit(_rows(np_rng, 1), deadline=loop.time() - 1)
        engine.gate.set()
        await first
        await kept
        with pytest.raises(DeadlineExpired):
            await expiring
        await b.close()
        return b.stats

    stats = _run(main())
    assert engine.sizes == [1, 1]
    computed = np.concatenate(engine.batches)
    for dropped in (expired_input, cancelled_input):
        assert not any(np.array_equal(row, dropped[0]) for row in computed)
    assert stats.dropped_deadline == 2 and stats.dropped_cancelled == 1


def test_close_finishes_queued_work_then_refuses(np_rng):
    engine = Engine()
    engine.gate.clear()

    async def main():
        b = await _started(engine, BatcherConfig(max_batch_size=2, max_queue_delay_us=0))
        tasks = [asyncio.ensure_future(b.submit(_rows(np_rng, 1))) for _ in range(5)]
        await asyncio.sleep(0.02)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0.02)
        with pytest.raises(ShuttingDown):
            await b.submit(_rows(np_rng, 1))
        engine.gate.set()
        await closing
        return [t.result() for t in tasks]

    outs = _run(main())
    assert len(outs) == 5 and sum(engine.sizes) == 5


def test_engine_failure_fails_that_batch_only(np_rng):
    engine = Engine()

    async def main():
        b = await _started(engine, BatcherConfig(max_batch_size=4, max_queue_delay_us=0))
        engine.fail = True
        with pytest.raises(RuntimeError, match="engine failed"):
            await b.submit(_rows(np_rng, 2))
        engine.fail = False
        out = await b.submit(_rows(np_rng, 1))
        await b.close()
        return out, b.stats

    out, stats = _run(main())
    assert out.shape == (1, 1) and stats.failed == 1 and stats.completed == 1
