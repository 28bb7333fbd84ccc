"""What every RPC handler shares: error -> status mapping, metrics, one structured log line per request, and
the client's deadline."""

from __future__ import annotations

import asyncio
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


class _Call:
    """One RPC's bookkeeping: the active count, its status and latency in the metrics, typed errors turned into
    gRPC statuses so a handler never crashes the server."""

    def __init__(self, servicer, rpc: str, context):
        self.servicer, self.rpc, self.context = servicer, rpc, context
        self.started = time.perf_counter()
        servicer.state.active_rpcs += 1

    def ok(self) -> None:
        _finish(self.servicer, self.rpc, grpc.StatusCode.OK, self.started, self.context)

    def failed(self, exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
        """The status ``exc`` is answered with; None for what must propagate as it is (a cancellation, the
        end of a stream the client closed)."""
        if isinstance(exc, asyncio.CancelledError):
            _finish(self.servicer, self.rpc, grpc.StatusCode.CANCELLED, self.started, self.context)
            return None
        if not isinstance(exc, Exception):
            return None
        code, message = to_status(exc)
        _finish(self.servicer, self.rpc, code, self.started, self.context, message)
        return code, message

    def end(self) -> None:
        self.servicer.state.release(self.context)   # the runtimes the call held (see AppState.serving)
        self.servicer.state.active_rpcs -= 1


# The abort comes after the except block and without the request: gRPC keeps an aborted call's exception in a
# reference cycle until a collection, and with it every frame of its traceback; so that exception has neither
# the handler's exception as its context nor the request (an upload of megabytes) in a frame.
def unary(rpc: str):
    """Wrap an ``async def handler(self, request, context)`` in an RPC's bookkeeping (:class:`_Call`)."""
    def wrap(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            call = _Call(self, rpc, context)
            try:
                result = await fn(self, request, context)
            except BaseException as exc:
                if (failure := call.failed(exc)) is None:
                    raise
            else:
                call.ok()
                return result
            finally:
                call.end()
            del request
            await context.abort(*failure)
        return handler
    return wrap


def server_stream(rpc: str):
    """Wrap an async-generator handler the same way."""
    def wrap(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            call, failure = _Call(self, rpc, context), None
            try:
                async for item in fn(self, request, context):
                    yield item
            except BaseException as exc:
                if (failure := call.failed(exc)) is None:
                    raise
            else:
                call.ok()
            finally:
                call.end()
            if failure is not None:
                del request
                await context.abort(*failure)
        return handler
    return wrap
