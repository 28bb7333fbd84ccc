"""The HTTP side under hostile clients, over raw sockets against a real server: every limit of the listener
(head size and lines, head / body / keep-alive timeouts, the connection cap, the shared body budget, a declared
body over the route's limit), the token and the Host / Origin checks made before a byte of the body is read,
``100 Continue`` only for an admitted request, HEAD where GET exists, the security headers, and /metrics on the
same listener. Timeouts are short here (1 s) so the slow clients cost the suite little."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from zfserve.server import BackgroundServer, ServerOptions
from zfserve.server.http_listener import LINGER_S, HttpLimits

TOKEN = "limits-test-token-0123456789"
LIMITS = dict(max_header_bytes=4096, max_headers=20, header_timeout_s=1.0, body_timeout_s=1.0,
              keepalive_timeout_s=0.5, max_connections=6, max_buffered_bytes=3 << 20)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spread_model):
    """A narrow model: these tests are about the listener, not the network."""
    from zfserve.weights import save_model
    narrow = spread_model(seed=5, widths=(16, 32, 32, 32, 32), num_classes=4)
    return save_model(narrow, tmp_path_factory.mktemp("limits") / "tiny", name="tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    options = ServerOptions(port=0, http_port=0, metrics_port=0, model=str(model_dir), max_message_bytes=2 << 20,
                            http=HttpLimits(**LIMITS, allowed_hosts=("zfserve.example",)))
    with BackgroundServer(options) as s:
        yield s


@pytest.fixture(scope="module")
def guarded(model_dir, tmp_path_factory):
    token = tmp_path_factory.mktemp("t") / "token"
    token.write_text(TOKEN)
    options = ServerOptions(port=0, http_port=0, metrics_port=0, model=str(model_dir), auth_token_file=str(token),
                            http=HttpLimits(**LIMITS))
    with BackgroundServer(options) as s:
        yield s


class Raw:
    """One raw connection: send bytes, read what the server answers, see when it closes."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.started = time.monotonic()

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:   # the server closed it
            return False

    def answer(self, timeout: float = 10) -> tuple[int, dict, bytes]:
        """The status, headers and body of the next response."""
        self.sock.settimeout(timeout)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            assert chunk, f"closed without an answer after {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            body += self.sock.recv(65536)
        return int(lines[0].split()[1]), headers, body

    def closed_within(self, seconds: float) -> bool:
        """Whether the server closes the connection within ``seconds`` (reading and dropping what it sends)."""
        self.sock.settimeout(seconds)
        give_up = time.monotonic() + seconds
        try:
            while time.monotonic() < give_up:
                if not self.sock.recv(65536):
                    return True
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
        return False

    def close(self):
        self.sock.close()


def _head(method: str, path: str, port: int, *extra: str, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *extra]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _port(s) -> int:
    return s.server.http_port


# ------------------------------------------------------------------------------------------------ the head
def test_a_head_over_the_size_limit_is_431_and_the_connection_closes(server):
    raw = Raw(_port(server))
    raw.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 3000)
    assert raw.send(b"b" * 3000)   # past 4096 bytes, no end of the head yet
    status, headers, body = raw.answer()
    assert status == 431 and b"--http-max-header-bytes" in body and headers["connection"] == "close"
    assert headers["x-content-type-options"] == "nosniff" and "frame-ancestors 'none'" in \
        headers["content-security-policy"]
    # A client streaming more header bytes meanwhile is drained briefly, then closed.
    for _ in range(20):
        raw.send(b"c" * 65536)
    assert raw.closed_within(LINGER_S + 3)


def test_too_many_header_lines_is_431(server):
    raw = Raw(_port(server))
    raw.send(_head("GET", "/v2/health/live", 0, *(f"X-{i}: {i}" for i in range(25))))
    status, _, body = raw.answer()
    assert status == 431 and b"more than 20 header lines (--http-max-headers)" in body


def test_a_slow_head_is_408_within_the_header_timeout(server):
    raw = Raw(_port(server))
    started = time.monotonic()
    for byte in b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n":   # a byte every 0.1 s: slowloris
        if not raw.send(bytes([byte])):
            break
        time.sleep(0.1)
    status, _, body = raw.answer()
    assert status == 408 and b"--http-header-timeout-s" in body
    assert raw.closed_within(1)   # at once: a slow client has nothing more to say that matters
    assert 0.9 < time.monotonic() - started < 2.5


def test_an_idle_connection_closes_after_the_keepalive_timeout(server):
    raw = Raw(_port(server))
    raw.send(_head("GET", "/v2/health/live", 0))
    assert raw.answer()[0] == 200
    started = time.monotonic()
    assert raw.closed_within(3) and time.monotonic() - started < 1.5   # keep-alive 0.5 s
    never_spoke = Raw(_port(server))
    assert never_spoke.closed_within(3) and time.monotonic() - never_spoke.started < 2   # header timeout 1 s


# ------------------------------------------------------------------------------------------------ the body
def test_a_slow_body_is_408_within_the_body_timeout(server):
    raw = Raw(_port(server))
    raw.send(_head("POST", "/v2/models/tiny/infer", 0, length=1000) + b"{")
    started = time.monotonic()
    status, _, body = raw.answer()
    assert status == 408 and b"--http-body-timeout-s" in body and 0.9 < time.monotonic() - started < 3
    assert raw.closed_within(1)


def test_a_declared_body_over_the_routes_limit_is_413_unread(server):
    for path, limit, flag in (("/v2/models/tiny/infer", 2 << 20, b"--max-message-bytes"),
                              ("/api/v1/classify", 1 << 16, b"the limit of routes without uploads")):
        raw = Raw(_port(server))
        raw.send(_head("POST", path, 0, "Content-Type: application/json", length=limit + 1))   # no body sent
        status, headers, body = raw.answer(timeout=5)
        assert status == 413 and f"body: {limit + 1} bytes; at most {limit}".encode() in body and flag in body
        assert headers["connection"] == "close"


def test_bodies_share_one_budget_and_the_excess_is_503_with_retry_after(server):
    first = Raw(_port(server))
    first.send(_head("POST", "/v2/models/tiny/infer", 0, length=2 << 20) + b"{" * 100)   # 2 MiB reserved
    time.sleep(0.1)
    second = Raw(_port(server))
    second.send(_head("POST", "/v2/models/tiny/infer", 0, length=(1 << 20) + 1))       # 1 MiB more: over 3 MiB
    status, headers, body = second.answer()
    assert status == 503 and headers["retry-after"] == "1" and b"--http-max-buffered-bytes" in body
    first.close()
    time.sleep(0.2)   # the first connection's reservation is released
    third = Raw(_port(server))
    body = b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [' + b"0," * (1 << 19) + b"0]}]}"
    third.send(_head("POST", "/v2/models/tiny/infer", 0, length=len(body)) + body)   # 1 MiB: room again
    status, _, answer = third.answer()
    assert status == 400 and b"inputs[0].data: 524289 values for shape [1]" in answer   # read and parsed


# ------------------------------------------------------------------------------------------------ connections
def test_at_the_connection_cap_the_longest_idle_connection_makes_room(server):
    idle = [Raw(_port(server)) for _ in range(6)]
    time.sleep(0.1)
    with httpx.Client(base_url=f"http://127.0.0.1:{_port(server)}") as web:
        assert web.get("/v2/health/live").status_code == 200
    assert idle[0].closed_within(1)


def test_at_the_cap_with_every_connection_busy_one_more_is_503_at_once(server):
    busy = []
    for _ in range(6):   # each in the middle of a body
        raw = Raw(_port(server))
        raw.send(_head("POST", "/v2/models/tiny/infer", 0, length=100) + b"{")
        busy.append(raw)
    time.sleep(0.2)
    late = Raw(_port(server))
    status, headers, body = late.answer(timeout=1)
    assert status == 503 and b"--http-max-connections" in body and headers["retry-after"] == "1"
    for raw in busy:
        raw.close()


# ------------------------------------------------------------------------------------------------ admission
def test_the_token_is_checked_before_the_body_and_100_continue_only_after(guarded):
    port = _port(guarded)
    raw = Raw(port)
    raw.send(_head("POST", "/v2/models/tiny/infer", 0, "Expect: 100-continue", length=1 << 20))
    status, headers, body = raw.answer(timeout=5)   # at once, with no byte of the body sent
    assert status == 401 and headers["www-authenticate"] == "Bearer" and b"authorization: missing" in body
    raw = Raw(port)
    raw.send(_head("POST", "/v2/models/tiny/infer", 0, "Expect: 100-continue", f"Authorization: Bearer {TOKEN}",
                   length=2))
    assert raw.answer(timeout=5)[0] == 100
    raw.send(b"{}")
    status, _, body = raw.answer()
    assert status == 400 and b"inputs" in body
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as web:
        for path in ("/v2/health/live", "/v2/health/ready"):   # health is exempt, as over gRPC
            assert web.get(path).status_code == 200
        r = web.get("/v2", headers=[("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer other-000000")])
        assert r.status_code == 401 and "2 values; send exactly one" in r.json()["error"]
        assert web.get("/v2", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        metrics = f"http://127.0.0.1:{guarded.server.metrics_port}/metrics"
        assert web.get(metrics).status_code == 401
        assert web.get(metrics, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_host_names_other_than_addresses_localhost_and_the_allowed_are_refused(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{_port(server)}") as web:
        for host, status in (("rebound.example", 403), ("rebound.example:80", 403), ("localhost", 200),
                             ("app.localhost:8000", 200), ("[::1]:8000", 200), ("10.1.2.3:8000", 200),
                             ("zfserve.example", 200), ("ZFSERVE.example.", 200)):
            r = web.get("/v2/health/ready", headers={"Host": host})
            assert r.status_code == status, (host, r.text)
        r = web.get("/", headers={"Host": "rebound.example"})
        assert r.status_code == 403 and "--allowed-hosts rebound.example" in r.json()["error"]
        metrics = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        assert web.get(metrics, headers={"Host": "rebound.example"}).status_code == 403


def test_cross_site_requests_that_change_state_are_refused(server):
    port = _port(server)
    own = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=own) as web:
        def classify(**headers):
            return web.post("/api/v1/classify", content=b'{"image": "0"}', headers=headers)
        r = classify(**{"Content-Type": "application/json", "Origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["field"] == "origin"
        assert classify(**{"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}).status_code == 403
        assert classify(**{"Content-Type": "application/json", "Origin": "null"}).status_code == 403
        for simple in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            r = classify(**{"Content-Type": simple})
            assert r.status_code == 415 and r.json()["field"] == "content-type", simple
        r = web.post("/api/v1/images", content=b"\xff\xd8", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415   # an upload a form could send
        # The page's own requests, and clients that send no content type, pass (404: no such image).
        assert classify(**{"Content-Type": "application/json", "Origin": own,
                           "Sec-Fetch-Site": "same-origin"}).status_code == 404
        assert classify().status_code == 404
        # A header a page cannot send without asking first lifts the content-type rule.
        r = web.post("/v2/models/tiny/infer", content=b"{}", headers={"Content-Type": "text/plain",
                                                                      "Inference-Header-Content-Length": "2"})
        assert r.status_code == 400 and "inputs" in r.json()["error"]
        assert web.get("/v2/health/live", headers={"Origin": "http://evil.example"}).status_code == 200


def test_head_where_get_exists_and_the_security_headers(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{_port(server)}") as web:
        for path in ("/", "/v2", "/v2/health/live", "/api/v1/models", "/explorer/app.js", "/v2/models/tiny"):
            got, head = web.get(path), web.head(path)
            assert head.status_code == got.status_code == 200 and head.content == b"", path
            assert head.headers.get("content-length") == got.headers.get("content-length"), path
            for response in (got, head):
                assert response.headers["x-content-type-options"] == "nosniff"
                assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
                assert response.headers["x-frame-options"] == "DENY"
        assert "script-src 'self'" in web.get("/").headers["content-security-policy"]
        assert web.get("/v2").headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
        metrics = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        head = web.head(metrics)
        assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
        assert web.post(metrics).status_code == 405 and web.get(metrics.replace("/metrics", "/x")).status_code == 404


def test_an_app_that_fails_or_answers_nothing_is_a_500_without_traceback():
    """The listener's own guard (beside the app's): a route that raises before answering, or ends without an
    answer, gets a JSON 500; the traceback goes to the log only."""
    import asyncio
    import json

    from zfserve.server.http_guard import HttpPolicy
    from zfserve.server.http_listener import ByteBudget, HttpListener

    async def app(scope, receive, send):
        if scope["path"] == "/raises":
            raise RuntimeError("a bug")

    async def scenario():
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.setblocking(False)
        listener = HttpListener(app, HttpPolicy(None), HttpLimits(**LIMITS), ByteBudget(1 << 20))
        await listener.start(sock)
        answers = []
        for path in ("/raises", "/silent"):
            reader, writer = await asyncio.open_connection(*sock.getsockname())
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            answers.append(await asyncio.wait_for(reader.read(), 10))
            writer.close()
        await listener.stop()
        return answers

    for answer in asyncio.run(scenario()):
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 500 ") and json.loads(body) == {"error": "internal error; see the server log"}
        assert b"Traceback" not in answer
