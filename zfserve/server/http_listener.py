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
3. the ASGI app runs with the whole body; its response is written with a send timeout, so a client that stops
   reading is dropped (:data:`SEND_TIMEOUT_S`).
A refused request whose body was not read is answered, then its connection drains for at most
:data:`LINGER_S` (so the client can read the answer) and closes. At most ``max_connections`` connections are
open: one more closes the connection that has waited longest for a request head, or, when every connection is
busy with a request, is answered 503 at once. After a burst of buffered bodies the allocator's free memory is
returned to the system, as after large decodes.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import re
from dataclasses import dataclass
from urllib.parse import unquote

import h11

from .. import _checks as checks
from .decode import malloc_trim
from .http_body import DEFAULT_MAX_VALUES, HttpError

log = logging.getLogger("zfserve.server")

SEND_TIMEOUT_S = 30.0          # a response write that cannot progress for this long drops the connection
LINGER_S = 2.0                 # after a refusal, unread request bytes are drained this long at most...
LINGER_BYTES = 16 << 20        # ... and this many bytes at most, then the connection closes
READ_AHEAD_BYTES = 1 << 20     # received bytes held before reading from the socket pauses
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


class _Gone(OSError):
    """The client went away, or stopped reading; the connection closes (an OSError, as ASGI apps expect from
    a send to a client that has gone)."""


def _reply_bytes(conn: h11.Connection, status: int, body: bytes, headers: list, head_only: bool) -> bytes:
    """A whole response as bytes, framed by h11 (no body after a HEAD request)."""
    response = h11.Response(status_code=status, headers=headers + [(b"content-length", str(len(body)).encode())],
                            reason=http.HTTPStatus(status).phrase.encode())
    data = conn.send(response)
    if body and not head_only:
        data += conn.send(h11.Data(data=body))
    return data + conn.send(h11.EndOfMessage())


def error_body(error: HttpError) -> bytes:
    body = {"error": error.message}
    if error.field:
        body["field"] = error.field
    return json.dumps(body).encode()


class HttpListener:
    """Serves ``app`` (ASGI 3) on ``sock`` under ``limits``; ``policy`` admits each request head and names the
    headers every response carries (see :class:`~.http_guard.HttpPolicy`)."""

    def __init__(self, app, policy, limits: HttpLimits, budget: ByteBudget, *, ssl_context=None):
        self.app, self.policy, self.limits, self.budget = app, policy, limits, budget
        self.ssl_context = ssl_context
        self.connections: dict[_Connection, None] = {}   # in order of arrival
        self.refused = self.evicted = 0                  # connections turned away at the cap / closed for room
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


class _Connection(asyncio.Protocol):
    """One client connection: the protocol callbacks fill ``pending``; :meth:`_serve` (a task) runs the
    requests one after another."""

    def __init__(self, listener: HttpListener):
        self.listener, self.limits = listener, listener.limits
        self.loop = asyncio.get_running_loop()
        self.transport = None
        self.pending = bytearray()       # received, not yet given to h11
        self.readable = asyncio.Event()
        self.gone = asyncio.Event()      # the client closed its side, or the connection is lost
        self.writable = asyncio.Event()
        self.writable.set()
        self.waiting_since: float | None = self.loop.time()   # waiting for a request head since (None: busy)
        self.discarding = 0              # > 0: lingering after a refusal, bytes still to drop
        self.task = None

    # -------------------------------------------------------------------------------------- transport
    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self.listener.admit_connection(self):
            error = HttpError(503, f"server busy: {self.limits.max_connections} HTTP connections are open, each "
                                   f"handling a request (--http-max-connections); retry shortly", "connection",
                              {"retry-after": "1"})
            headers = self._headers(None, error) + [(b"connection", b"close")]
            transport.write(_raw_reply(503, error_body(error), headers))
            transport.close()
            return
        self.task = self.loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        if self.discarding:   # lingering after a refusal: the bytes are dropped, up to LINGER_BYTES
            self.discarding -= len(data)
            if self.discarding <= 0:
                self.close()
            return
        self.pending += data
        self.readable.set()
        if len(self.pending) > max(READ_AHEAD_BYTES, self.limits.max_header_bytes):
            self.transport.pause_reading()

    def eof_received(self):
        self.gone.set()
        self.readable.set()
        return True    # the half-closed connection may still carry the response

    def connection_lost(self, exc) -> None:
        self.gone.set()
        self.readable.set()
        self.writable.set()
        self.listener.forget(self)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.listener.forget(self)

    # -------------------------------------------------------------------------------------- reading
    async def _wait(self, until: float) -> bool:
        """Wait for more bytes (or the end) until loop time ``until``; False when the time ran out."""
        self.readable.clear()
        if self.transport.is_reading() is False and not self.transport.is_closing():
            self.transport.resume_reading()
        try:
            await asyncio.wait_for(self.readable.wait(), max(0.0, until - self.loop.time()))
            return True
        except asyncio.TimeoutError:
            return False

    def _take_pending(self) -> bytes:
        data = bytes(self.pending)
        self.pending.clear()
        return data

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

    async def _read_body(self, conn: h11.Connection, limit: int, flag: str, reserved: list) -> bytes | None:
        """The body, read through h11 (length or chunked) within ``limit`` and the body timeout; a chunked body
        reserves budget as it arrives (``reserved[0]`` counts it). None when the client left."""
        chunks, size = [], 0
        until = self.loop.time() + self.limits.body_timeout_s
        while not _complete(conn):
            if self.pending:
                conn.receive_data(self._take_pending())
            elif self.gone.is_set() and conn.their_state is h11.SEND_BODY:
                conn.receive_data(b"")
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpError(400, f"body: malformed ({exc})", "body") from None
            if event is h11.NEED_DATA:
                if self.gone.is_set():
                    return None
                if not await self._wait(until):
                    raise HttpError(408, f"body: not received within {self.limits.body_timeout_s:g} s "
                                         f"(--http-body-timeout-s)", "body")
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise HttpError(413, f"body: more than {limit} bytes; at most {limit} are accepted ({flag})",
                                    "body")
                if size > reserved[0]:
                    self._reserve(size - reserved[0])
                    reserved[0] = size
                chunks.append(event.data)
            elif isinstance(event, h11.ConnectionClosed):
                return None
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
                conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
                try:
                    head = await self._read_head(first)
                except HttpError as error:
                    await self._refuse(conn, error, None)
                    return
                if head is None or not await self._request(conn, head):
                    return
                first = False
        except _Gone:
            pass
        except Exception:   # a bug here: logged, the connection closes
            log.exception("HTTP connection failed")
        finally:
            self.close()

    async def _request(self, conn: h11.Connection, head: bytes) -> bool:
        """Handle one request whose head is ``head``; returns whether the connection stays open."""
        conn.receive_data(head)
        try:
            request = conn.next_event()
            if not isinstance(request, h11.Request):
                raise h11.RemoteProtocolError("not a request")
            scope = self._scope(request)
        except h11.RemoteProtocolError as exc:
            return await self._refuse(conn, HttpError(400, f"request: malformed request line or headers ({exc})",
                                                      "request"), None)
        fields = dict(request.headers)
        chunked = b"transfer-encoding" in fields
        if chunked and b"content-length" in fields:   # two framings: refused (request smuggling)
            return await self._refuse(conn, HttpError(400, "headers: Content-Length and Transfer-Encoding "
                                                           "together; send one", "headers"), None)
        length = 0 if chunked else int(fields.get(b"content-length", b"0"))
        if not length and not chunked:
            conn.next_event()   # its EndOfMessage: the request is complete
        verdict = self.listener.policy.admit(scope)
        if isinstance(verdict, HttpError):
            return await self._refuse(conn, verdict, scope)
        limit, flag = verdict
        reserved = [0]
        try:
            if length > limit:
                raise HttpError(413, f"body: {length} bytes; at most {limit} are accepted ({flag})", "body")
            self._reserve(length)
            reserved[0] = length
            if conn.client_is_waiting_for_100_continue:
                await self._write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            body = await self._read_body(conn, limit, flag, reserved)
            if body is None:
                return False
            return await self._run_app(conn, scope, body)
        except HttpError as error:
            return await self._refuse(conn, error, scope)
        finally:
            self.listener.budget.release(reserved[0])

    def _scope(self, request: h11.Request) -> dict:
        target = request.target
        if not target.startswith(b"/"):
            raise h11.RemoteProtocolError("the request target must be a path")
        raw_path, _, query = target.partition(b"?")
        ssl = self.transport.get_extra_info("sslcontext") is not None
        peer, own = self.transport.get_extra_info("peername"), self.transport.get_extra_info("sockname")
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                "http_version": request.http_version.decode(), "method": request.method.decode("ascii"),
                "scheme": "https" if ssl else "http", "path": unquote(raw_path.decode("latin-1")),
                "raw_path": raw_path, "query_string": query, "root_path": "",
                "headers": [(name, value) for name, value in request.headers],   # names in lower case
                "client": tuple(peer[:2]) if peer else None, "server": tuple(own[:2]) if own else None,
                "state": {}}

    def _headers(self, scope: dict | None, error: HttpError | None = None) -> list:
        headers = [(b"content-type", b"application/json")] if error is not None else []
        headers += [(k.encode(), str(v).encode()) for k, v in (error.headers if error else {}).items()]
        return headers + self.listener.policy.headers(scope)

    async def _refuse(self, conn: h11.Connection, error: HttpError, scope: dict | None) -> bool:
        """Answer ``error``. A request whose body was read (or had none) keeps its connection; otherwise the
        connection lingers for the client to read the answer, then closes (returns False)."""
        headers = self._headers(scope, error)
        if not _complete(conn) or error.status in (400, 408, 431):
            headers.append((b"connection", b"close"))
        try:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and conn.their_state is not h11.IDLE:
                head_only = scope is not None and scope["method"] == "HEAD"
                await self._write(_reply_bytes(conn, error.status, error_body(error), headers, head_only))
            else:   # no request parsed (a head over the limits): framed by hand
                await self._write(_raw_reply(error.status, error_body(error), headers))
        except (_Gone, h11.LocalProtocolError):
            return False
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            return True
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

    async def _write(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise _Gone()
        self.transport.write(data)
        if not self.writable.is_set():
            try:
                await asyncio.wait_for(self.writable.wait(), SEND_TIMEOUT_S)
            except asyncio.TimeoutError:
                self.transport.abort()
                raise _Gone() from None
            if self.transport.is_closing():
                raise _Gone()

    async def _run_app(self, conn: h11.Connection, scope: dict, body: bytes) -> bool:
        """Run the ASGI app on one request with its whole body; returns whether the connection stays open."""
        state = {"body": body, "started": False, "done": False}
        finished = asyncio.Event()
        head_only = scope["method"] == "HEAD"

        async def receive():
            if state["body"] is not None:
                message = {"type": "http.request", "body": state["body"], "more_body": False}
                state["body"] = None
                return message
            waiters = [asyncio.ensure_future(self.gone.wait()), asyncio.ensure_future(finished.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                names = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in self.listener.policy.headers(scope) if k not in names]
                status = message["status"]
                state["started"] = True
                await self._write(conn.send(h11.Response(status_code=status, headers=headers,
                                                         reason=http.HTTPStatus(status).phrase.encode())))
            elif message["type"] == "http.response.body":
                data = message.get("body") or b""
                if data and not head_only:
                    await self._write(conn.send(h11.Data(data=data)))
                if not message.get("more_body"):
                    await self._write(conn.send(h11.EndOfMessage()))
                    state["done"] = True
                    finished.set()

        try:
            await self.listener.app(scope, receive, send)
        except Exception as exc:
            if _client_gone(exc):
                return False
            # A bug in a route: logged with its traceback, answered without it.
            log.exception("HTTP %s %s failed", scope["method"], scope["path"])
            if not state["started"]:
                return await self._refuse(conn, HttpError(500, "internal error; see the server log"), scope)
            return False
        finally:
            finished.set()
        if not state["done"] or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        leftover, closed = conn.trailing_data
        self.pending[:0] = leftover
        return not closed


def _complete(conn: h11.Connection) -> bool:
    """Whether the request has been read to its end (MUST_CLOSE: it asked to close the connection after)."""
    return conn.their_state in (h11.DONE, h11.MUST_CLOSE)


def _client_gone(exc: BaseException) -> bool:
    """Whether ``exc`` (or every exception of a group) is a send to a client that has gone."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_client_gone(e) for e in exc.exceptions)
    return isinstance(exc, _Gone)


def _raw_reply(status: int, body: bytes, headers: list) -> bytes:
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode()]
    lines += [k + b": " + v for k, v in headers + [(b"content-length", str(len(body)).encode())]]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


__all__ = ["ByteBudget", "HttpLimits", "HttpListener", "error_body"]
