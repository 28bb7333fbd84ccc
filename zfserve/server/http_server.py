"""Serving the HTTP side (:mod:`.http`'s routes: :mod:`.rest`, :mod:`.kserve_v1` and :mod:`.explorer_api`) and
``/metrics``: the Starlette app, and :class:`~.http_listener.HttpListener` on the gRPC server's event loop for each
port (``zfserve serve --http-port`` / ``--metrics-port``), under one :class:`~.http_guard.HttpPolicy` each and one
shared :class:`~.http_listener.ByteBudget`.

Why a listener of our own rather than uvicorn: uvicorn (0.55, httptools) has no limit on a request head's size
or header count and no timeout while a head or a body arrives (a 64 MiB header took 5-12 s of parsing and was
answered 200; 200 connections sending a byte a second stayed open), and no way to check the token or the Host
before the body is read. h11 does the parsing here. Per request the listener costs a little more than uvicorn on
the same app, each in its own process (``benchmarks/http_listener.py``, 2 shared cores: +46 us on a small GET,
+82 us on a 602 KB POST, +53 us on a 1 MB GET), against the ~25 ms of one classification.
"""

from __future__ import annotations

import json
import logging

from .http_guard import HttpPolicy

log = logging.getLogger("zfserve.server")


def build_app(state, oip, zfserve, max_body_bytes: int, parse_pool=None):
    """The Starlette app: OIP REST and KServe v1 (``oip``: the InferenceServicer), the page's API and files
    (``zfserve``: the ZFServeServicer); ``parse_pool`` parses REST infer bodies off the event loop."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware

    from .explorer_api import explorer_routes
    from .kserve_v1 import kserve_v1_routes
    from .rest import oip_routes
    max_json_values = state.options.http.max_json_values
    routes = oip_routes(oip, max_body_bytes, parse_pool, max_json_values) + \
        kserve_v1_routes(oip, max_body_bytes, parse_pool, max_json_values) + \
        explorer_routes(state, zfserve, max_body_bytes)
    return Starlette(routes=routes, middleware=[Middleware(_Guard)])


def is_page(path: str) -> bool:
    """The explorer page and its files (their Content-Security-Policy lets the page run)."""
    return path == "/" or path.startswith("/explorer/")


def protected(path: str) -> bool:
    """The routes that need the token (the page's own files are public: it asks for the token itself)."""
    return path.startswith(("/v1/", "/v2", "/api/"))


class _Guard:
    """ASGI middleware: any error that escapes a route is a JSON 500 without a traceback (the traceback goes to
    the log)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = []

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                started.append(True)
            await send(message)
        try:
            await self.app(scope, receive, tracking_send)
        except OSError:   # the client has gone (a send failed): nothing to answer
            raise
        except Exception:   # a bug: logged with its traceback, answered without it
            log.exception("HTTP %s %s failed", scope.get("method"), scope.get("path"))
            if not started:
                await _send_json(send, 500, {"error": "internal error; see the server log"})


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _listen(host: str, port: int, flag: str = "--http-port"):
    """A listening TCP socket, or the one-line error the gRPC port gives."""
    import socket
    from ..errors import InvalidArgumentError
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: without it a response's headers and body, two writes, wait out the
        # client's delayed ACK (40 ms on Linux) between them.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        raise InvalidArgumentError(f"--host/{flag}: cannot listen on {host}:{port}: {exc.strerror or exc} "
                                   f"(another server on that port?); choose another {flag}",
                                   field=flag[2:].replace("-", "_")) from None
    sock.setblocking(False)
    return sock


def _tls(options):
    """The HTTP side's TLS context: the gRPC side's certificate, key and client CA."""
    import ssl
    if not options.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(options.tls_cert, options.tls_key)
    if options.tls_client_ca:
        context.load_verify_locations(options.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start_http(server, token: bytes | None):
    """Start the HTTP side of ``server`` (a bound ZFServer) on its loop: returns its listener and port. TLS,
    mutual TLS and the token are the gRPC side's."""
    from .http_listener import HttpListener
    o = server.options
    sock = _listen(o.host, o.http_port)
    app = build_app(server.state, server.oip_servicer, server.zfserve_servicer, o.max_message_bytes,
                    server.http_parse)
    policy = HttpPolicy(token, _hosts(o), routes=app.routes, protected=protected, page=is_page)
    listener = HttpListener(app, policy, o.http, server.http_budget, ssl_context=_tls(o))
    await listener.start(sock)
    return listener, sock.getsockname()[1]


async def start_metrics(server, token: bytes | None):
    """Serve ``/metrics`` (GET and HEAD) on ``--metrics-port`` under the same listener, limits and Host check
    as the HTTP side (the token, when set, on every path); returns the listener and its port."""
    from .http_listener import HttpListener
    o = server.options
    sock = _listen(o.host, o.metrics_port, "--metrics-port")
    policy = HttpPolicy(token, _hosts(o))
    listener = HttpListener(server.metrics.asgi_app(), policy, o.http, server.http_budget, ssl_context=None)
    await listener.start(sock)
    return listener, sock.getsockname()[1]


def _hosts(options) -> tuple[str, ...]:
    """The allowed Host names: ``--allowed-hosts``, and ``--host`` when it is a name."""
    return tuple(options.http.allowed_hosts) + (options.host,)


__all__ = ["build_app", "is_page", "protected", "start_http", "start_metrics"]
