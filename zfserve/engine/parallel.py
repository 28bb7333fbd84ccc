"""``ordered_map``: run a function over items on a few threads, results in order, with only a few in flight.

The occlusion engines use it to keep both cores of a small machine busy with independent single-threaded
forward passes (ONNX Runtime and OpenVINO release the GIL while they compute) instead of one pass split over
both cores by intra-op threads, which synchronizes per operator; bounded, so the results held at once (conv5
maps of a tile batch, say) stay few."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """``fn(item)`` for each item, in order; with ``workers`` > 1 on that many threads, at most ``2 * workers``
    submitted ahead of the one consumed."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="zfserve-occlusion") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


__all__ = ["ordered_map"]
