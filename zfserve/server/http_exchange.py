"""One HTTP/1.1 request and its answer on a :class:`~.http_listener.HttpListener` connection: the ASGI scope,
the app's ``receive`` and ``send``, and the response's framing (Content-Length as the app gives it, else chunked;
nothing after the headers for HEAD; whether the connection stays open, by the request's version and
``Connection`` header). Responses are framed here rather than by h11, which parses requests: one write for a
small response instead of three, and no second validation of headers the app built."""

from __future__ import annotations

import asyncio
import http
import json
from urllib.parse import unquote

from .http_body import HttpError

_PHRASES = {status.value: status.phrase.encode() for status in http.HTTPStatus}
COALESCE_BYTES = 1 << 16        # a response body up to this size goes out in the same write as the headers


class ClientGone(OSError):
    """The client went away or stopped reading (an OSError, as ASGI apps expect from a send to a client that
    has gone)."""


def client_gone(exc: BaseException) -> bool:
    """Whether ``exc`` (or every exception of a group) is a send to a client that has gone."""
    if isinstance(exc, BaseExceptionGroup):
        return all(client_gone(e) for e in exc.exceptions)
    return isinstance(exc, ClientGone)


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status, b""))


def head_bytes(status: int, headers: list) -> bytes:
    return status_line(status) + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"


def error_body(error: HttpError) -> bytes:
    body = {"error": error.message}
    if error.field:
        body["field"] = error.field
    return json.dumps(body).encode()


def reply(status: int, body: bytes, headers: list, head_only: bool = False) -> bytes:
    """A whole response with a Content-Length (no body after a HEAD request)."""
    head = head_bytes(status, headers + [(b"content-length", b"%d" % len(body))])
    return head if head_only else head + body


def tokens(headers: list, name: bytes) -> set[bytes]:
    """The comma-separated tokens of every ``name`` header, in lower case."""
    return {token.strip().lower() for key, value in headers if key == name for token in value.split(b",")}


def scope_of(request, transport) -> dict:
    """The ASGI scope of an h11 request; its target must be a path."""
    raw_path, _, query = request.target.partition(b"?")
    if not raw_path.startswith(b"/"):
        raise ValueError("the request target must be a path")
    peer, own = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode(), "method": request.method.decode("ascii"),
            "scheme": "https" if transport.get_extra_info("sslcontext") is not None else "http",
            "path": unquote(raw_path.decode("latin-1")), "raw_path": raw_path, "query_string": query,
            "root_path": "", "headers": [(name, value) for name, value in request.headers],   # names lower case
            "client": tuple(peer[:2]) if peer else None, "server": tuple(own[:2]) if own else None, "state": {}}


def keeps_alive(scope: dict) -> bool:
    """Whether the client asks to keep the connection open after this request (HTTP/1.1 unless it says close;
    HTTP/1.0 only when it says keep-alive)."""
    connection = tokens(scope["headers"], b"connection")
    if scope["http_version"] == "1.1":
        return b"close" not in connection
    return b"keep-alive" in connection


class Exchange:
    """Runs the ASGI app on one request whose whole ``body`` has been read; :meth:`run` returns whether the
    connection may carry another request. ``write(data)`` (a coroutine) sends bytes, raising ClientGone;
    ``gone`` is set when the client has left; ``extra`` are the headers every answer carries."""

    def __init__(self, scope: dict, body: bytes, write, gone: asyncio.Event, extra: list):
        self.scope, self.write, self.gone, self.extra = scope, write, gone, extra
        self.body: bytes | None = body
        self.head_only = scope["method"] == "HEAD"
        self.keep = keeps_alive(scope)
        self.pending_head: bytes | None = None
        self.chunked = self.started = self.done = False
        self.finished = asyncio.Event()

    async def receive(self) -> dict:
        if self.body is not None:
            message = {"type": "http.request", "body": self.body, "more_body": False}
            self.body = None
            return message
        waiters = [asyncio.ensure_future(self.gone.wait()), asyncio.ensure_future(self.finished.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self._start(message["status"], list(message.get("headers") or []))
        elif message["type"] == "http.response.body":
            await self._body(message.get("body") or b"", bool(message.get("more_body")))

    def _start(self, status: int, headers: list) -> None:
        names = {name.lower() for name, _ in headers}
        if b"close" in tokens(headers, b"connection"):
            self.keep = False
        if b"content-length" not in names and not self.head_only:
            if self.scope["http_version"] == "1.1":
                self.chunked = True
                headers.append((b"transfer-encoding", b"chunked"))
            else:   # HTTP/1.0 without a length: the end of the connection ends the body
                self.keep = False
        if not self.keep and b"connection" not in names:
            headers.append((b"connection", b"close"))
        elif self.keep and self.scope["http_version"] == "1.0":
            headers.append((b"connection", b"keep-alive"))
        headers += [(name, value) for name, value in self.extra if name not in names]
        self.pending_head = head_bytes(status, headers)
        self.started = True

    async def _body(self, data: bytes, more: bool) -> None:
        parts = [self.pending_head] if self.pending_head else []
        self.pending_head = None
        if data and not self.head_only:
            parts += [b"%x\r\n" % len(data), data, b"\r\n"] if self.chunked else [data]
        if not more:
            if self.chunked and not self.head_only:
                parts.append(b"0\r\n\r\n")
            self.done = True
        if sum(len(p) for p in parts) <= COALESCE_BYTES:
            await self.write(b"".join(parts))
        else:
            for part in parts:
                await self.write(part)
        if self.done:
            self.finished.set()

    async def run(self, app) -> bool:
        try:
            await app(self.scope, self.receive, self.send)
        finally:
            self.finished.set()
        return self.done and self.keep


__all__ = ["ClientGone", "Exchange", "client_gone", "error_body", "keeps_alive", "reply", "scope_of", "tokens"]
