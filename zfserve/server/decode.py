"""Decoding the images of a request: a budgeted, bounded, cancellable stage in front of the engines.

1. The headers of all the request's images are read first (no pixel is decoded); a request whose images hold
   more than ``--max-request-pixels`` pixels in total is refused (INVALID_ARGUMENT, naming the count and the
   limit) before any work. Format, size and frame limits of each image are checked there too.
2. Two lanes, each a :class:`~zfserve.server.pools.BoundedPool` with its own admission, chosen by the work a
   request brings: requests whose images hold at most :data:`SMALL_REQUEST_PIXELS` in all (a phone photo is
   more; a few thumbnails or crops are not) decode on the small lane, others on the large lane
   (``--decode-workers`` threads, ``--decode-queue-size`` waiting). One big upload, or one request of 64 small
   images, never queues a small request behind it; a full lane answers UNAVAILABLE at once. The large lane's
   threads run at a lower OS priority (a background pool), so they do not slow small requests' work either.
3. The request's deadline and its cancellation are checked between images and between the steps of each
   decode (``zfserve.preprocess.decode_image``'s ``check``): after a client's deadline, at most the step in
   progress finishes. Large images are decoded at a working size (see :mod:`zfserve.preprocess`), never as
   full-size float arrays.
4. After each large-lane job the allocator returns free memory to the system (glibc ``malloc_trim``), so
   the server's RSS falls back after a burst of large uploads instead of staying at its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Sequence

import numpy as np

from ..errors import InvalidArgumentError
from ..preprocess import load_images, read_header
from .pools import BoundedPool

# A request whose images hold at most this many pixels in all decodes on the small lane: 4 MP, e.g. one
# 2000 x 2000 photo or 61 images of 256 x 256.
SMALL_REQUEST_PIXELS = 4_000_000
DEFAULT_MAX_REQUEST_PIXELS = 400_000_000     # ten images of the 40 MP per-image limit
SMALL_LANE_WORKERS = 1
SMALL_LANE_QUEUE = 64


def _load_malloc_trim():
    """glibc's ``malloc_trim(0)`` (returns free heap pages to the system), or a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    return lambda: trim(0)


malloc_trim = _load_malloc_trim()


class DecodeStage:
    """``decode(encoded, config, ...)``: the request's encoded images -> preprocessed float32 (N, 3, S, S)."""

    def __init__(self, *, max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS, workers: int = 1,
                 queue_size: int = 2, on_admitted=None):
        self.max_request_pixels = max_request_pixels
        self.small = BoundedPool(SMALL_LANE_WORKERS, SMALL_LANE_QUEUE, name="decode-small",
                                 what="small requests decoding", flags=("(small lane)", "queue"))
        self.large = BoundedPool(workers, queue_size, on_admitted, name="decode-large",
                                 what="large requests (over 4 MP in all) decoding",
                                 flags=("--decode-workers", "--decode-queue-size"), after=malloc_trim,
                                 background=True)

    async def decode(self, encoded: Sequence[bytes], config, *, field: str, deadline_mono: float | None = None,
                     client: str = "") -> np.ndarray:
        """``client`` (the caller's connection) takes its turn on a lane fairly, by pixels, with the others'."""
        items = list(encoded)

        def scan(job):
            headers = []
            for i, data in enumerate(items):
                job.check()
                headers.append(read_header(data, field=f"{field}[{i}]"))
            return headers

        headers = await self.small.run(scan, deadline_mono=deadline_mono, client=client,
                                       work=sum(len(data) for data in items) / 16)   # bytes read ~ pixels / 16
        total = sum(h.pixels for h in headers)
        if total > self.max_request_pixels:
            raise InvalidArgumentError(f"{field}: {len(items)} images of {total} pixels in all; at most "
                                       f"{self.max_request_pixels} pixels per request are accepted "
                                       f"(--max-request-pixels)", field=field)
        lane = self.large if total > SMALL_REQUEST_PIXELS else self.small
        return await lane.run(lambda job: load_images(items, config, field=field, check=job.check),
                              deadline_mono=deadline_mono, client=client, work=total)

    def shutdown(self) -> None:
        self.small.shutdown()
        self.large.shutdown()
