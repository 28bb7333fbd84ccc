"""zfserve's HTTP listener (h11, with its limits) against uvicorn (httptools, the listener it replaced) on the
same Starlette app, each in a process of its own, driven by a client in a third: per request kind, the median
time of each over interleaved rounds of sequential keep-alive requests, and the ratio.

Request kinds: a small GET (``/v2/health/live``'s size), a POST of a 602 KB body (one FP32 image as a binary
tensor) answered with a small JSON, a GET answered with 1 MB.

    python benchmarks/http_listener.py [--rounds 10] [--requests 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path

KINDS = {"small GET": ("GET", "/small", 0), "602 KB POST": ("POST", "/upload", 3 * 224 * 224 * 4),
         "1 MB GET": ("GET", "/large", 0)}


def app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    large = b"x" * (1 << 20)

    async def small(request):
        return Response(b"", 200)

    async def upload(request):
        body = await request.body()
        return JSONResponse({"bytes": len(body)})

    async def big(request):
        return Response(large, media_type="application/octet-stream")
    return Starlette(routes=[Route("/small", small), Route("/upload", upload, methods=["POST"]),
                             Route("/large", big)])


def _socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as zfserve's listening socket
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def _serve(which: str, ports) -> None:
    application = app()
    sock = _socket()
    if which == "ours":
        from zfserve.server.http_guard import HttpPolicy, with_limit
        from zfserve.server.http_listener import ByteBudget, HttpLimits, HttpListener
        for route in application.routes:
            with_limit(route, 1 << 20, "-")
        listener = HttpListener(application, HttpPolicy(None, routes=application.routes), HttpLimits(),
                                ByteBudget(1 << 28))
        await listener.start(sock)
    else:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield
        server = Server(uvicorn.Config(application, log_level="warning", access_log=False, lifespan="off"))
        asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
    ports.put((which, sock.getsockname()[1]))
    await asyncio.Event().wait()


def serve(which: str, ports) -> None:
    """One server (``which``: "ours" or "uvicorn") in this process, until it is terminated."""
    asyncio.run(_serve(which, ports))


def client(ports: dict, rounds: int, requests: int) -> dict:
    """Interleaved rounds: per round and kind, ``requests`` sequential requests on one kept-alive connection to
    each server; the per-request time of each round."""
    times = {name: {kind: [] for kind in KINDS} for name in ports}
    for _ in range(rounds):
        for kind, (method, path, size) in KINDS.items():
            body = os.urandom(size) if size else None
            for name, port in ports.items():
                connection = http.client.HTTPConnection("127.0.0.1", port)
                connection.request(method, path, body=body)    # warm: the connection is open
                connection.getresponse().read()
                started = time.perf_counter()
                for _ in range(requests):
                    connection.request(method, path, body=body)
                    response = connection.getresponse()
                    response.read()
                    assert response.status == 200, (name, kind, response.status)
                times[name][kind].append((time.perf_counter() - started) / requests)
                connection.close()
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    servers = [ctx.Process(target=serve, args=(which, queue), daemon=True) for which in ("ours", "uvicorn")]
    for server in servers:
        server.start()
    try:
        ports = dict(queue.get(timeout=120) for _ in servers)
        times = client(ports, args.rounds, args.requests)
    finally:
        for server in servers:
            server.terminate()
    rows = []
    for kind in KINDS:
        ours, theirs = (statistics.median(times[name][kind]) * 1e6 for name in ("ours", "uvicorn"))
        rows.append({"kind": kind, "ours_us": round(ours, 1), "uvicorn_us": round(theirs, 1),
                     "ours_over_uvicorn": round(ours / theirs, 3)})
        print(f"{kind:<12} ours {ours:8.1f} us   uvicorn {theirs:8.1f} us   ours / uvicorn {ours / theirs:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(),
                                               "rounds": args.rounds, "requests": args.requests, "rows": rows},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
