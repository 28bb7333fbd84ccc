"""Serving the HTTP side (:mod:`.http`'s routes: :mod:`.rest` and :mod:`.explorer_api`): the Starlette app with
its auth guard, and uvicorn embedded on the gRPC server's event loop and socket (``zfserve serve --http-port``)."""

from __future__ import annotations

import contextlib
import json
import logging

from .auth import authorized

log = logging.getLogger("zfserve.server")


def build_app(state, oip, zfserve, token: bytes | None, max_body_bytes: int):
    """The Starlette app: OIP REST (``oip``: the InferenceServicer), the page's API and files (``zfserve``: the
    ZFServeServicer). ``token``: the bearer token every /v2 and /api route needs (None: no auth)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware

    from .explorer_api import explorer_routes
    from .rest import oip_routes
    routes = oip_routes(oip, max_body_bytes) + explorer_routes(state, zfserve, max_body_bytes)
    return Starlette(routes=routes, middleware=[Middleware(_Guard, token=token)])


class _Guard:
    """ASGI middleware: the bearer token on /v2 and /api (the page's static files are public), and any error
    that escapes a route as a JSON 500 without a traceback (the traceback goes to the log)."""

    def __init__(self, app, token: bytes | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.token is not None and path.startswith(("/v2", "/api/")):
            header = dict(scope.get("headers") or []).get(b"authorization")
            if not authorized(header, self.token):
                reason = "missing" if header is None else "wrong token or scheme"
                return await _send_json(send, 401, {"error": f"authorization: {reason}; send 'Authorization: Bearer "
                                                             f"<token>'", "field": "authorization"},
                                        {"www-authenticate": "Bearer"})
        started = []

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                started.append(True)
            await send(message)
        try:
            await self.app(scope, receive, tracking_send)
        except Exception:   # a bug: logged with its traceback, answered without it
            log.exception("HTTP %s %s failed", scope.get("method"), path)
            if not started:
                await _send_json(send, 500, {"error": "internal error; see the server log"})


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _listen(host: str, port: int):
    """A listening TCP socket, or the one-line error the gRPC port gives (uvicorn would log its own lines)."""
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
        raise InvalidArgumentError(f"--host/--http-port: cannot listen on {host}:{port}: {exc.strerror or exc} "
                                   f"(another server on that port?); choose another --http-port",
                                   field="http_port") from None
    sock.setblocking(False)
    return sock


def start_http(server, token: bytes | None) -> tuple["EmbeddedUvicorn", int]:
    """Start the HTTP side of ``server`` (a bound ZFServer) on its loop: returns it and its port. TLS, mutual
    TLS and the token are the gRPC side's."""
    import asyncio
    import ssl
    o = server.options
    sock = _listen(o.host, o.http_port)
    tls = {}
    if o.tls_cert:
        tls = {"ssl_certfile": o.tls_cert, "ssl_keyfile": o.tls_key}
        if o.tls_client_ca:
            tls.update(ssl_ca_certs=o.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    app = build_app(server.state, server.oip_servicer, server.zfserve_servicer, token, o.max_message_bytes)
    http = EmbeddedUvicorn(app, sock, tls)
    http.start(asyncio.get_running_loop())
    return http, sock.getsockname()[1]


class EmbeddedUvicorn:
    """uvicorn on the caller's event loop and socket, leaving signals to the gRPC server's life cycle."""

    def __init__(self, app, sock, ssl_options: dict):
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):   # SIGTERM / SIGINT / SIGHUP belong to zfserve.server.app.serve
                yield

        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, **ssl_options)
        self.server = _Server(config)
        self.sock = sock
        self.task = None

    def start(self, loop) -> None:
        self.task = loop.create_task(self.server.serve(sockets=[self.sock]), name="zfserve-http")

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        await self.task
        self.task = None


__all__ = ["EmbeddedUvicorn", "build_app", "start_http"]
