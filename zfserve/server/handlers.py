"""What every RPC handler shares: error -> status mapping, metrics, one structured log line per request, and
the client's deadline."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

import grpc

from .status import to_status

log = logging.getLogger("zfserve.server")


def deadline_of(context) -> tuple[float | None, float | None]:
    """The client's deadline as (loop time, time.monotonic()), or (None, None) when it set none."""
    remaining = context.time_remaining()
    if remaining is None:
        return None, None
    return asyncio.get_running_loop().time() + remaining, time.monotonic() + remaining


def peer_of(context) -> str:
    """The call's peer (gRPC's ``ipv4:ADDRESS:PORT``: one per connection), or "?"."""
    try:
        return context.peer() or "?"
    except Exception:  # peer() is informational only
        return "?"


def _finish(servicer, rpc: str, code: grpc.StatusCode, started: float, context, detail: str = "") -> None:
    seconds = time.perf_counter() - started
    servicer.metrics.record(rpc, code.name, seconds)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("rpc=%s code=%s ms=%.2f peer=%s%s", rpc, code.name, seconds * 1e3, peer_of(context),
                  f" detail={detail!r}" if detail else "")


@contextlib.asynccontextmanager
async def _accounted(servicer, rpc: str, context):
    """One RPC's bookkeeping: the active count, its status and latency in the metrics, typed errors turned into
    gRPC statuses (``context.abort``) so a handler never crashes the server."""
    started = time.perf_counter()
    servicer.state.active_rpcs += 1
    try:
        yield
    except asyncio.CancelledError:
        _finish(servicer, rpc, grpc.StatusCode.CANCELLED, started, context)
        raise
    except Exception as exc:
        code, message = to_status(exc)
        _finish(servicer, rpc, code, started, context, message)
        await context.abort(code, message)
    else:
        _finish(servicer, rpc, grpc.StatusCode.OK, started, context)
    finally:
        servicer.state.release(context)   # the runtimes the call held (see AppState.serving)
        servicer.state.active_rpcs -= 1


def unary(rpc: str):
    """Wrap an ``async def handler(self, request, context)`` in :func:`_accounted`."""
    def wrap(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            async with _accounted(self, rpc, context):
                return await fn(self, request, context)
        return handler
    return wrap


def server_stream(rpc: str):
    """Wrap an async-generator handler the same way."""
    def wrap(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            async with _accounted(self, rpc, context):
                async for item in fn(self, request, context):
                    yield item
        return handler
    return wrap
