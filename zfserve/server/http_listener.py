"""The HTTP/1.1 listener of ``--http-port`` and ``--metrics-port``: an ASGI server on the gRPC server's event loop
that applies every limit before the work it bounds (h11 parses; this module decides how much it may see).

Per connection:
1. a request head is found in the received bytes before anything parses it: more than ``max_header_bytes``
   without its blank line, or more than ``max_headers`` lines, is a 431; it must arrive within
   ``header_timeout_s`` of the connection (or of its first byte, on a kept-alive connection, which may idle
   ``keepalive_timeout_s`` between requests); late, a 408;
2. the head goes to the policy (:class:`~.http_guard.HttpPolicy`: Host, token, origin, the route's body limit)
   before a byte of the body is read; a declared length over the route's limit is a 413, and one the shared
   :class:`ByteBudget` cannot hold (``max_buffered_bytes`` over every connection and both listeners) a 503
   with Retry-After; only then is ``100 Continue`` sent and the body read, which must end within
   ``body_timeout_s`` (else 408);
3. the ASGI app runs with the whole body (:class:`~.http_exchange.Exchange`); its response is written with a
   send timeout, so a client that stops reading is dropped (:data:`SEND_TIMEOUT_S`).
A refused request whose body was not read is answered, then its connection drains for at most
:data:`LINGER_S` (so the client can read the answer rather than a reset) and closes; a 408 closes at once.
At most ``max_connections`` connections are open: one more closes the connection that has waited longest for
a request head, or, when every connection is busy with a request, is answered 503 at once. Bodies are read
into buffers of their own (large ones memory-mapped and unmapped off the loop), and after a burst the
allocator's free memory is returned to the system, as after large decodes.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import re
from dataclasses import dataclass

import h11

from .. import _checks as checks
from .decode import malloc_trim
from .http_body import DEFAULT_MAX_VALUES, HttpError
from .http_exchange import ClientGone, Exchange, client_gone, error_body, keeps_alive, reply, scope_of, tokens

log = logging.getLogger("zfserve.server")

SEND_TIMEOUT_S = 30.0          # a response write that cannot progress for this long drops the connection
LINGER_S = 2.0                 # after a refusal, unread request bytes are drained this long at most...
LINGER_BYTES = 16 << 20        # ... and this many bytes at most, then the connection closes
READ_AHEAD_BYTES = 1 << 20     # received bytes held before reading from the socket pauses
SCRATCH_BYTES = 1 << 16        # read size outside bodies
READ_BYTES = 1 << 18           # read size inside bodies (asyncio's own)
MAP_BODY_BYTES = 1 << 20       # a body larger than this is received into an anonymous memory map
TRIM_AFTER_BYTES = 16 << 20    # a burst of buffered bodies this large is followed by malloc_trim
_HEAD_END = re.compile(rb"\n\r?\n")


@dataclass
class HttpLimits:
    """The HTTP side's limits (``zfserve serve --http-*``; README "Limits and hardening")."""

    max_header_bytes: int = 16 << 10
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 5.0
    max_connections: int = 256
    max_buffered_bytes: int = 256 << 20
    max_json_values: int = DEFAULT_MAX_VALUES
    allowed_hosts: tuple[str, ...] = ()       # names beyond localhost and IP addresses ("*": any)

    def validate(self) -> None:
        for name, low, high in (("max_header_bytes", 1 << 10, 1 << 24), ("max_headers", 8, 10_000),
                                ("max_connections", 1, 1_000_000), ("max_buffered_bytes", 1 << 20, 1 << 40),
                                ("max_json_values", 1, 1 << 31)):
            checks.integer(getattr(self, name), name, low, high, label="--http-" + name.replace("_", "-"))
        for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= 3600):
                raise checks.InvalidArgumentError(f"--http-{name.replace('_', '-')}: {value!r}; accepted 0 < "
                                                  f"seconds <= 3600", field=name)


class ByteBudget:
    """Request body bytes being received or handled, over every connection; ``reserve`` says whether ``n``
    more fit. When it falls back to zero after a burst, free heap memory goes back to the system."""

    def __init__(self, limit: int):
        self.limit, self.used, self._burst = limit, 0, 0

    def reserve(self, n: int) -> bool:
        if n and self.used + n > self.limit:
            return False
        self.used += n
        self._burst = max(self._burst, self.used)
        return True

    def release(self, n: int) -> None:
        self.used -= n
        if self.used == 0 and self._burst >= TRIM_AFTER_BYTES:
            self._burst = 0
            asyncio.get_running_loop().run_in_executor(None, malloc_trim)


class HttpListener:
    """Serves ``app`` (ASGI 3) on ``sock`` under ``limits``; ``policy`` admits each request head and names the
    headers every response carries (see :class:`~.http_guard.HttpPolicy`)."""

    def __init__(self, app, policy, limits: HttpLimits, budget: ByteBudget, *, ssl_context=None):
        self.app, self.policy, self.limits, self.budget = app, policy, limits, budget
        self.ssl_context = ssl_context
        self.connections: dict[_Connection, None] = {}   # in order of arrival
        self.refused = self.evicted = 0                  # connections turned away at the cap / closed for room
        # Where every connection reads outside bodies: one buffer serves all, since each read is copied out
        # in the same callback that made it.
        self.scratch = memoryview(bytearray(SCRATCH_BYTES))
        self._server: asyncio.AbstractServer | None = None

    async def start(self, sock) -> None:
        loop = asyncio.get_running_loop()
        extra = {"ssl_handshake_timeout": self.limits.header_timeout_s} if self.ssl_context else {}
        self._server = await loop.create_server(lambda: _Connection(self), sock=sock, ssl=self.ssl_context,
                                                **extra)

    def admit_connection(self, conn: "_Connection") -> bool:
        """Room for ``conn``: at the cap, the connection that has waited longest for a request head closes."""
        if len(self.connections) >= self.limits.max_connections:
            idle = [c for c in self.connections if c.waiting_since is not None]
            if not idle:
                self.refused += 1
                return False
            min(idle, key=lambda c: c.waiting_since).close()
            self.evicted += 1
        self.connections[conn] = None
        return True

    def forget(self, conn: "_Connection") -> None:
        self.connections.pop(conn, None)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop listening; close idle connections at once and busy ones when their response is done (at most
        ``grace`` seconds)."""
        if self._server is None:
            return
        self._server.close()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + grace
        while self.connections and loop.time() < give_up:
            for conn in list(self.connections):
                if conn.waiting_since is not None:
                    conn.close()
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.close()
        self._server = None


class _Connection(asyncio.BufferedProtocol):
    """One client connection. The transport reads into the buffer :meth:`get_buffer` gives: a Content-Length
    body straight into its own buffer (no copy, no join; a large one is an anonymous memory map, whose pages
    are taken as the bytes arrive and returned to the system when it is dropped), anything else into a scratch
    buffer appended to ``pending``. :meth:`_serve`, a task, runs the requests one after another."""

    def __init__(self, listener: HttpListener):
        self.listener, self.limits = listener, listener.limits
        self.loop = asyncio.get_running_loop()
        self.transport = None
        self.pending = bytearray()       # received bytes not yet taken (heads, chunked bodies, what follows)
        self.body_view: memoryview | None = None   # the Content-Length body being received...
        self.body_filled = 0                       # ... and how many of its bytes have come
        self.gone = asyncio.Event()      # the client closed its side, or the connection is lost
        self.writable = asyncio.Event()
        self.writable.set()
        self.waiting_since: float | None = self.loop.time()   # waiting for a request head since (None: busy)
        self.discarding = 0              # > 0: lingering after a refusal, bytes still to drop
        self._waiter: asyncio.Future | None = None
        self.task = None

    # -------------------------------------------------------------------------------------- transport
    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self.listener.admit_connection(self):
            error = HttpError(503, f"server busy: {self.limits.max_connections} HTTP connections are open, each "
                                   f"handling a request (--http-max-connections); retry shortly", "connection",
                              {"retry-after": "1"})
            transport.write(reply(503, error_body(error), self._headers(None, error) + [(b"connection", b"close")]))
            transport.close()
            return
        self.task = self.loop.create_task(self._serve())

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.body_view is not None and not self.discarding:   # at most the rest of the body (what follows
            # waits), a read size at a time: each read is a short call on the event loop
            return self.body_view[self.body_filled:self.body_filled + READ_BYTES]
        return self.listener.scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self.discarding:   # lingering after a refusal: the bytes are dropped, up to LINGER_BYTES
            self.discarding -= nbytes
            if self.discarding <= 0:
                self.close()
            return
        if self.body_view is not None:
            self.body_filled += nbytes
        else:
            self.pending += self.listener.scratch[:nbytes]
            if len(self.pending) > max(READ_AHEAD_BYTES, self.limits.max_header_bytes):
                self.transport.pause_reading()
        self._wake()

    def eof_received(self):
        self.gone.set()
        self._wake()
        return True    # the half-closed connection may still carry the response

    def connection_lost(self, exc) -> None:
        self.gone.set()
        self.writable.set()
        self._wake()
        self.listener.forget(self)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.listener.forget(self)

    # -------------------------------------------------------------------------------------- waiting, writing
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    async def _wait(self, until: float) -> bool:
        """Wait for more bytes (or the end) until loop time ``until``; False when the time ran out."""
        if not self.transport.is_closing() and not self.transport.is_reading():
            self.transport.resume_reading()
        waiter = self._waiter = self.loop.create_future()
        timer = self.loop.call_at(until, lambda: waiter.done() or waiter.set_result(False))
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def _write(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise ClientGone()
        self.transport.write(data)
        if not self.writable.is_set():
            try:
                await asyncio.wait_for(self.writable.wait(), SEND_TIMEOUT_S)
            except asyncio.TimeoutError:
                self.transport.abort()
                raise ClientGone() from None
            if self.transport.is_closing():
                raise ClientGone()

    def _headers(self, scope: dict | None, error: HttpError | None = None) -> list:
        headers = [(b"content-type", b"application/json")] if error is not None else []
        headers += [(k.encode(), str(v).encode()) for k, v in (error.headers if error else {}).items()]
        return headers + self.listener.policy.headers(scope)

    # -------------------------------------------------------------------------------------- reading
    async def _read_head(self, first: bool) -> bytes | None:
        """The next request head (through its blank line), within the head limits; None when the client leaves
        or stays idle. Raises HttpError (431 / 408) for a head over a limit or too slow."""
        limits = self.limits
        self.waiting_since = now = self.loop.time()
        idle_until = now + (limits.header_timeout_s if first else limits.keepalive_timeout_s)
        head_until, scanned = (idle_until if first else None), 0
        while True:
            while self.pending[:2] == b"\r\n" or self.pending[:1] == b"\n":   # blank lines between requests
                del self.pending[:2 if self.pending[:1] == b"\r" else 1]
            if self.pending:
                if head_until is None:
                    head_until = self.loop.time() + limits.header_timeout_s
                end = _HEAD_END.search(self.pending, max(0, scanned - 2))
                if end is not None and end.end() <= limits.max_header_bytes:
                    head = bytes(self.pending[:end.end()])
                    del self.pending[:end.end()]
                    if head.count(b"\n") - 2 > limits.max_headers:
                        raise HttpError(431, f"headers: more than {limits.max_headers} header lines "
                                             f"(--http-max-headers)", "headers")
                    self.waiting_since = None
                    return head
                if end is not None or len(self.pending) > limits.max_header_bytes:
                    raise HttpError(431, f"headers: the request line and headers exceed {limits.max_header_bytes} "
                                         f"bytes (--http-max-header-bytes)", "headers")
                scanned = len(self.pending)
            if self.gone.is_set():
                return None
            if not await self._wait(head_until or idle_until):
                if self.pending:
                    raise HttpError(408, f"headers: not received within {limits.header_timeout_s:g} s "
                                         f"(--http-header-timeout-s)", "headers")
                return None

    def _timed_out(self) -> HttpError:
        return HttpError(408, f"body: not received within {self.limits.body_timeout_s:g} s (--http-body-timeout-s)",
                         "body")

    async def _read_length(self, length: int):
        """A body of ``length`` bytes (its reservation already made), read into its own buffer as it arrives: a
        bytearray up to :data:`MAP_BODY_BYTES`, beyond it an anonymous memory map (bytes-like either way: what
        reads bodies takes both, and copies what it keeps). None when the client left."""
        until = self.loop.time() + self.limits.body_timeout_s
        buffer = mmap.mmap(-1, length) if length > MAP_BODY_BYTES else bytearray(length)
        self.body_view = memoryview(buffer)
        self.body_filled = len(self.pending[:length])
        self.body_view[:self.body_filled] = self.pending[:length]   # what came with the head
        del self.pending[:length]
        try:
            while self.body_filled < length:
                if self.gone.is_set():
                    _unmap(buffer)
                    return None
                if not await self._wait(until):
                    _unmap(buffer)
                    raise self._timed_out()
        finally:
            self.body_view.release()
            self.body_view = None
        return buffer

    async def _read_chunked(self, conn: h11.Connection, limit: int, flag: str, reserved: list) -> bytes | None:
        """A chunked body, through h11, within ``limit``; it reserves budget as it arrives (``reserved[0]``
        counts it). Bytes after it go back to ``pending``. None when the client left."""
        chunks, size = [], 0
        until = self.loop.time() + self.limits.body_timeout_s
        while conn.their_state is h11.SEND_BODY:
            if self.pending:
                conn.receive_data(bytes(self.pending))
                self.pending.clear()
            elif self.gone.is_set():
                conn.receive_data(b"")
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpError(400, f"body: malformed chunked encoding ({exc})", "body") from None
            if event is h11.NEED_DATA:
                if self.gone.is_set():
                    return None
                if not await self._wait(until):
                    raise self._timed_out()
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise HttpError(413, f"body: more than {limit} bytes; at most {limit} are accepted ({flag})",
                                    "body")
                self._reserve(len(event.data))
                reserved[0] += len(event.data)
                chunks.append(event.data)
            elif isinstance(event, h11.ConnectionClosed):
                return None
        self.pending[:0] = conn.trailing_data[0]
        return b"".join(chunks)

    def _reserve(self, n: int) -> None:
        if not self.listener.budget.reserve(n):
            raise HttpError(503, f"server busy: {self.listener.budget.used} bytes of request bodies are being "
                                 f"received (--http-max-buffered-bytes {self.limits.max_buffered_bytes}); retry "
                                 f"shortly", "body", {"retry-after": "1"})

    # -------------------------------------------------------------------------------------- requests
    async def _serve(self) -> None:
        first = True
        try:
            while not self.gone.is_set() or self.pending:
                try:
                    head = await self._read_head(first)
                except HttpError as error:
                    await self._refuse(error, None, body_read=False)
                    return
                if head is None or not await self._request(head):
                    return
                first = False
        except ClientGone:
            pass
        except Exception:   # a bug here: logged, the connection closes
            log.exception("HTTP connection failed")
        finally:
            self.close()

    async def _request(self, head: bytes) -> bool:
        """Handle one request whose head is ``head``; returns whether the connection stays open."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        conn.receive_data(head)
        try:
            request = conn.next_event()
            if not isinstance(request, h11.Request):
                raise h11.RemoteProtocolError("not a request")
            scope = scope_of(request, self.transport)
        except (h11.RemoteProtocolError, ValueError) as exc:
            return await self._refuse(HttpError(400, f"request: malformed request line or headers ({exc})",
                                                "request"), None, body_read=False)
        fields = dict(request.headers)
        chunked = b"transfer-encoding" in fields
        if chunked and b"content-length" in fields:   # two framings: refused (request smuggling)
            return await self._refuse(HttpError(400, "headers: Content-Length and Transfer-Encoding together; "
                                                     "send one", "headers"), scope, body_read=False)
        length = 0 if chunked else int(fields.get(b"content-length", b"0"))
        verdict = self.listener.policy.admit(scope)
        if isinstance(verdict, HttpError):
            return await self._refuse(verdict, scope, body_read=not (length or chunked))
        limit, flag = verdict
        reserved = [0]
        try:
            if length > limit:
                raise HttpError(413, f"body: {length} bytes; at most {limit} are accepted ({flag})", "body")
            self._reserve(length)
            reserved[0] = length
            if (length or chunked) and b"100-continue" in tokens(scope["headers"], b"expect"):
                await self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await (self._read_chunked(conn, limit, flag, reserved) if chunked else self._read_length(length))
            if body is None:
                return False
            exchange = Exchange(scope, body, self._write, self.gone, self.listener.policy.headers(scope))
            mapped, body = (body if isinstance(body, mmap.mmap) else None), None
            try:
                return await self._run_app(exchange)
            finally:
                _unmap(mapped)
        except HttpError as error:
            return await self._refuse(error, scope, body_read=False)
        finally:
            self.listener.budget.release(reserved[0])

    async def _run_app(self, exchange: Exchange) -> bool:
        scope = exchange.scope
        try:
            keep = await exchange.run(self.listener.app)
            if exchange.started:
                return keep
            log.error("HTTP %s %s: the app ended without an answer", scope["method"], scope["path"])
        except Exception as exc:
            if client_gone(exc):
                return False
            # A bug in a route: logged with its traceback, answered without it.
            log.exception("HTTP %s %s failed", scope["method"], scope["path"])
        if not exchange.started:
            await self._refuse(HttpError(500, "internal error; see the server log"), scope, body_read=True)
        return False

    async def _refuse(self, error: HttpError, scope: dict | None, *, body_read: bool) -> bool:
        """Answer ``error``. A request whose body was read (or had none) may keep its connection; otherwise the
        connection lingers for the client to read the answer, then closes (returns False)."""
        keep = body_read and scope is not None and keeps_alive(scope) and error.status not in (400, 408, 431, 500)
        headers = self._headers(scope, error) + ([] if keep else [(b"connection", b"close")])
        head_only = scope is not None and scope["method"] == "HEAD"
        try:
            await self._write(reply(error.status, error_body(error), headers, head_only))
        except ClientGone:
            return False
        if keep:
            return True
        if not body_read and error.status != 408:   # a slow client has nothing more to send that matters
            await self._linger()
        return False

    async def _linger(self) -> None:
        self.discarding = LINGER_BYTES
        self.pending.clear()
        if not self.transport.is_closing():
            self.transport.resume_reading()
        try:
            await asyncio.wait_for(self.gone.wait(), LINGER_S)
        except asyncio.TimeoutError:
            pass


def _unmap(buffer) -> None:
    """Return a body's memory map to the system from a worker thread: unmapping tens of MiB takes ~15 ms, which
    the event loop does not wait for (munmap runs without the GIL). A map still used elsewhere is left to its
    last reference."""
    def close():
        try:
            buffer.close()
        except BufferError:
            pass
    if isinstance(buffer, mmap.mmap):
        asyncio.get_running_loop().run_in_executor(None, close)


__all__ = ["ByteBudget", "HttpLimits", "HttpListener"]
