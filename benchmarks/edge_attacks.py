"""Hostile HTTP clients against a real `zfserve serve --http-port`, each attack from a separate process on a
fresh server, while a probe process classifies one 256 x 256 JPEG over gRPC in a closed loop.

Per attack: the probe's p50 / p99 (and a gRPC health check's p99, every 100 ms), the server's RSS at start, its
peak during the attack and 30 s after (over start), what each attacking connection was answered and how long
the server took to close it, and whether the server's log holds a traceback. The attacks (the ones issue 26
measured, and the limits they meet), after a baseline without one:

- ``idle``         no attack for 20 s
- ``big_header``   one request whose header is 64 MiB, then one of 200 MiB, on a token server (head limit)
- ``slow_headers`` 200 connections sending their headers a byte a second (header timeout)
- ``slow_metrics`` the same against ``--metrics-port`` (the same listener)
- ``slow_bodies``  20 bodies declaring 60 MiB each, trickling in at 1 MiB/s (body budget, body timeout)
- ``big_json``     4 clients posting a 57 MiB JSON tensor in a loop (JSON value limit, before parsing)
- ``json_heavy``   2 clients posting valid 8-image JSON tensors (1.2 M values) in a loop (the parse lane)
- ``malformed``    4 clients posting every malformed body that once was a 500 (a 4xx each, no traceback)
- ``connections``  2000 connections opened at once and left idle (connection cap; a connection the client sees
                   open but the server never accepted, its accept queue being full during the burst, counts as
                   "not_closed": the server's open descriptors after the attack show what it still holds)
- ``fair``         16 gRPC clients sending 64-image Classify requests in a loop (fair batching in images)
- ``reload``       16 gRPC clients classifying 2000 x 2000 JPEGs while the weights change and SIGHUP reloads
                   the model 3 times (every request answered, each by the old or the new version)

    python benchmarks/edge_attacks.py [--attacks big_header,slow_headers] [--rest-s 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import Server, probe  # noqa: E402  (benchmarks/ is not a package)

TOKEN = "edge-attacks-token-0123456789"
MODEL = "zfnet-demo"


# ------------------------------------------------------------------------------------------------ raw HTTP
async def _answer(reader) -> tuple[int | None, float | None]:
    """The status of the first answer (None: none) and when the server closed the connection (loop time)."""
    loop, status, line = asyncio.get_running_loop(), None, b""
    try:
        line = await reader.readline()
        if line.startswith(b"HTTP/1.1 1"):   # 100 Continue: the real answer follows
            await reader.readuntil(b"\r\n\r\n")
            line = await reader.readline()
        status = int(line.split()[1]) if line.startswith(b"HTTP/") else None
        while await reader.read(1 << 16):
            pass
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    return status, loop.time()


async def _connection(port: int, opening: bytes, then, duration: float) -> dict:
    """Send ``opening``, then whatever the ``then(writer)`` coroutine sends, until the server answers and closes
    or ``duration`` passes; returns the status and the seconds until the server closed (None: it did not)."""
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), duration)
    except (OSError, asyncio.TimeoutError) as exc:
        return {"status": f"connect failed ({exc.__class__.__name__})", "closed_s": None}
    started = loop.time()   # the server's clock for this connection starts when it is accepted
    answer = asyncio.ensure_future(_answer(reader))
    try:
        writer.write(opening)
        await writer.drain()
        sending = asyncio.ensure_future(then(writer))
        await asyncio.wait({answer, sending}, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.wait({answer}, timeout=max(0.0, started + duration - loop.time()))
        sending.cancel()
    except (ConnectionError, OSError):
        await asyncio.wait({answer}, timeout=5)
    writer.transport.abort()
    if not answer.done():
        answer.cancel()
        return {"status": None, "closed_s": None}
    status, closed = answer.result()
    return {"status": status, "closed_s": round(closed - started, 2)}


async def _trickle(writer, data: bytes, chunk: int, every_s: float) -> None:
    for start in range(0, len(data), chunk):
        writer.write(data[start:start + chunk])
        await writer.drain()
        await asyncio.sleep(every_s)


async def _stream(writer, total: int, chunk: int = 1 << 20) -> None:
    block = b"a" * chunk
    for _ in range(total // chunk):
        writer.write(block)
        await writer.drain()


def _head(method: str, path: str, *extra: str, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *extra]
    lines += [f"Content-Length: {length}"] if length is not None else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _post(port: int, path: str, body: bytes) -> tuple[int | None, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await _connection(port, _head("POST", path, "Connection: close", length=len(body)) + body,
                               _idle, 120)
    return result["status"], loop.time() - started


async def _idle(writer) -> None:
    await asyncio.sleep(3600)


async def _loop_posts(port: int, path: str, bodies: list[bytes], clients: int, duration: float) -> dict:
    end = asyncio.get_running_loop().time() + duration
    statuses, seconds = Counter(), []

    async def client(i):
        n = i
        while asyncio.get_running_loop().time() < end:
            status, took = await _post(port, path, bodies[n % len(bodies)])
            statuses[str(status)] += 1
            seconds.append(took)
            n += 1
    await asyncio.gather(*(client(i) for i in range(clients)))
    return {"statuses": dict(statuses), "answer_s": _spread(seconds)}


def _spread(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"min": round(min(values), 2), "median": round(float(np.median(values)), 2), "max": round(max(values), 2)}


def _summary(results: list[dict]) -> dict:
    """Statuses, and the seconds from connecting until the server closed (its spread; how many it left open)."""
    connected = [r for r in results if not str(r["status"]).startswith("connect failed")]
    return {"connections": len(results), "statuses": dict(Counter(str(r["status"]) for r in results)),
            "closed_s": _spread(r["closed_s"] for r in connected),
            "not_closed": sum(r["closed_s"] is None for r in connected)}   # see the server's fds: held or not


# ------------------------------------------------------------------------------------------------ attacks
async def idle(t: dict) -> dict:
    """No attack for 20 s: the probe's baseline."""
    await asyncio.sleep(20)
    return {}


async def big_header(t: dict) -> dict:
    """Requests whose header is 64 MiB, then 200 MiB, each streamed as fast as the server takes it, one after
    another for 10 s."""
    rows = {"64_MiB": [], "200_MiB": []}
    opening = b"GET /v2/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
    end = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < end:
        for mib in (64, 200):
            rows[f"{mib}_MiB"].append(await _connection(t["http"], opening, lambda w, n=mib: _stream(w, n << 20), 120))
    return {name: _summary(results) for name, results in rows.items()}


async def slow_headers(t: dict, port_key: str = "http", path: str = "/v2/models/zfnet-demo") -> dict:
    """200 connections, each sending its request line and headers a byte a second."""
    data = _head("GET", path)[:-2] + b"X-Slow: " + b"a" * 200

    async def one():
        return await _connection(t[port_key], data[:1], lambda w: _trickle(w, data[1:], 1, 1.0), 40)
    return _summary(await asyncio.gather(*(one() for _ in range(200))))


async def slow_metrics(t: dict) -> dict:
    return await slow_headers(t, "metrics", "/metrics")


async def slow_bodies(t: dict) -> dict:
    """20 bodies declaring 60 MiB each, trickling in at 1 MiB/s each."""
    declared = 60 << 20
    opening = _head("POST", "/v2/models/zfnet-demo/infer", "Content-Type: application/json", length=declared)
    body = b"[" + b"1," * (declared // 2 - 1) + b"1"   # never finished: the server's timeout ends it

    async def one():
        return await _connection(t["http"], opening, lambda w: _trickle(w, body, 1 << 20, 1.0), 60)
    return _summary(await asyncio.gather(*(one() for _ in range(20))))


def _json_tensor(images: int, values: int | None = None, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    count = values or images * 3 * 224 * 224
    data = ",".join(f"{v:.6f}" for v in rng.uniform(-100, 100, count))
    return (f'{{"inputs": [{{"name": "image", "datatype": "FP32", "shape": [{images}, 3, 224, 224], '
            f'"data": [{data}]}}]}}').encode()


async def big_json(t: dict) -> dict:
    """4 clients posting a 57 MiB JSON tensor (6.3 M values) in a loop for 20 s."""
    body = await asyncio.to_thread(_json_tensor, 42, 6_300_000)
    result = await _loop_posts(t["http"], "/v2/models/zfnet-demo/infer", [body], 4, 20)
    return {"body_mib": round(len(body) / 2 ** 20, 1), **result}


async def json_heavy(t: dict) -> dict:
    """2 clients posting valid 8-image JSON tensors (1.2 M values, ~12 MiB) in a loop for 20 s."""
    body = await asyncio.to_thread(_json_tensor, 8)
    result = await _loop_posts(t["http"], "/v2/models/zfnet-demo/infer", [body], 2, 20)
    return {"body_mib": round(len(body) / 2 ** 20, 1), **result}


MALFORMED = [b'{"parameters": [1], "inputs": []}', b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
             b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [18446744073709551616], "data": [1]}]}',
             b'{"inputs": [{"name": "image", "datatype": "INT64", "shape": [1], "data": [9223372036854775808]}]}',
             b'{"parameters": {"timeout": 9223372036854775808}, "inputs": []}',
             b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [NaN]}]}',
             b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1], "parameters": 7}]}',
             b'{"inputs": [], "outputs": {"name": 1}}', b'{"id": {"a": 1}, "inputs": []}', b"\xff\xfe{}", b"{nope"]


async def malformed(t: dict) -> dict:
    """4 clients posting each malformed body that once was a 500, in a loop for 10 s."""
    return await _loop_posts(t["http"], "/v2/models/zfnet-demo/infer", MALFORMED, 4, 10)


async def connections(t: dict) -> dict:
    """2000 connections opened at once, sending nothing."""
    return _summary(await asyncio.gather(*(_connection(t["http"], b"", _idle, 40) for _ in range(2000))))


def _jpeg(side: int, seed: int) -> bytes:
    from PIL import Image
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(side // 40, 2), max(side // 40, 2), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((side, side), Image.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _grpc_clients(target: str, request_of, clients: int, stop: threading.Event, timeout: float) -> list:
    """``clients`` threads, each sending ``request_of(i, n)`` Classify requests until ``stop``; returns
    (status, seconds, model_version) per request."""
    import grpc

    from zfserve._proto.v1 import zfserve_pb2_grpc as pb_grpc
    out, lock = [], threading.Lock()

    def client(i):
        with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 256 << 20)]) as channel:
            stub, n = pb_grpc.ZFServeStub(channel), 0
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    version, code = stub.Classify(request_of(i, n), timeout=timeout).model_version, "OK"
                except grpc.RpcError as exc:
                    version, code = None, f"{exc.code().name}: {exc.details()[:80]}"
                with lock:
                    out.append((code, time.perf_counter() - started, version))
                n += 1
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    return out, threads


def fair(t: dict) -> dict:
    """16 gRPC clients, each sending 64-image Classify requests in a closed loop for 20 s (10 s deadline)."""
    from zfserve._proto.v1 import zfserve_pb2 as pb
    images = [_jpeg(256, seed) for seed in range(64)]
    request = pb.ClassifyRequest(images=pb.Images(encoded=images))
    stop = threading.Event()
    out, threads = _grpc_clients(t["grpc"], lambda i, n: request, 16, stop, 10.0)
    time.sleep(20)
    stop.set()
    for thread in threads:
        thread.join(60)
    return {"requests": len(out), "statuses": dict(Counter(code.split(":")[0] for code, _, _ in out)),
            "answer_s": _spread(s for _, s, _ in out)}


def reload(t: dict) -> dict:
    """16 gRPC clients classifying 2000 x 2000 JPEGs while the model's weights change and SIGHUP reloads it
    three times, 3 s apart."""
    from zfserve._proto.v1 import zfserve_pb2 as pb
    from zfserve.weights import read_snapshot
    images = [_jpeg(2000, seed) for seed in range(4)]
    stop = threading.Event()
    versions = [read_snapshot(t["model_dir"]).version]
    out, threads = _grpc_clients(t["grpc"], lambda i, n: pb.ClassifyRequest(
        images=pb.Images(encoded=[images[(i + n) % 4]])), 16, stop, 120.0)
    for k in range(3):
        time.sleep(3)
        versions.append(_perturb(t["model_dir"], k))
        os.kill(t["pid"], signal.SIGHUP)
    time.sleep(5)
    stop.set()
    for thread in threads:
        thread.join(180)
    seen = Counter(version for code, _, version in out if code == "OK")
    return {"requests": len(out), "failed": sum(code != "OK" for code, _, _ in out),
            "errors": sorted({code for code, _, _ in out if code != "OK"})[:5], "versions_written": versions,
            "answers_by_version": dict(seen), "only_written_versions": set(seen) <= set(versions)}


def _perturb(model_dir: str, k: int) -> str:
    """New weights in ``model_dir`` (fc8's bias moved a little); returns the new version."""
    from safetensors.numpy import load_file, save_file

    from zfserve.weights import WEIGHTS_FILE, read_snapshot
    path = Path(model_dir) / WEIGHTS_FILE
    tensors = load_file(path)
    bias = next(name for name in tensors if name.endswith("fc8.bias"))
    tensors[bias] = tensors[bias] + np.float32(0.01 * (k + 1))
    save_file(tensors, str(path) + ".new")
    os.replace(str(path) + ".new", path)
    return read_snapshot(model_dir).version


ATTACKS = {
    "idle": (idle, [], "no attack: the baseline"),
    "big_header": (big_header, ["--auth-token-file"], "431 after 16 KiB (--http-max-header-bytes); closed after "
                                                      "at most 2 s of draining"),
    "slow_headers": (slow_headers, [], "408 and closed 10 s after the connection (--http-header-timeout-s)"),
    "slow_metrics": (slow_metrics, [], "the same on --metrics-port"),
    "slow_bodies": (slow_bodies, [], "256 MiB of bodies at once (--http-max-buffered-bytes): 503 beyond; 408 "
                                     "30 s after the head (--http-body-timeout-s)"),
    "big_json": (big_json, [], "413 past 2,097,152 JSON values (--http-max-json-values), counted before parsing"),
    "json_heavy": (json_heavy, [], "parsed on one thread + 8 waiting (503 beyond), in pieces"),
    "malformed": (malformed, [], "a 4xx naming the field, no traceback"),
    "connections": (connections, [], "256 open (--http-max-connections): the longest idle closes for a new one"),
    "fair": (fair, [], "fair queuing in images; 512 images waiting (--max-queue-images)"),
    "reload": (reload, [], "requests keep their runtime; reloads one at a time"),
}


def _attack_main(name: str, targets: dict, results) -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    attack = ATTACKS[name][0]
    result = asyncio.run(attack(targets)) if asyncio.iscoroutinefunction(attack) else attack(targets)
    results.put(("attack", result))


# ------------------------------------------------------------------------------------------------ probes
def probes(target: str, image: str, token: str | None, stop, results) -> None:
    """A closed loop of single-image Classify calls (with ``token`` when given), and a health check every 100 ms
    beside it; (start time, seconds, status) per call of each."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from zfserve._proto.v1 import zfserve_pb2 as pb
    from zfserve._proto.v1 import zfserve_pb2_grpc as pb_grpc
    health_out = []

    def health():
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                started = time.time()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                health_out.append((started, time.time() - started, code))
                time.sleep(0.1)
    checker = threading.Thread(target=health)
    checker.start()
    request = pb.ClassifyRequest(images=pb.Images(encoded=[Path(image).read_bytes()]))
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    out = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ZFServeStub(channel)
        while not stop.is_set():
            started = time.time()
            try:
                stub.Classify(request, timeout=30, metadata=metadata)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            out.append((started, time.time() - started, code))
    checker.join()
    results.put(("probes", (out, health_out)))


def _latency(samples: list, since: float, until: float) -> dict:
    window = [(s, code) for t, s, code in samples if since <= t <= until]
    seconds = np.array([s for s, _ in window]) * 1e3
    if not len(seconds):
        return {"n": 0}
    return {"n": len(window), "p50_ms": round(float(np.percentile(seconds, 50)), 1),
            "p99_ms": round(float(np.percentile(seconds, 99)), 1), "max_ms": round(float(seconds.max()), 1),
            "not_ok": sum(code != "OK" for _, code in window)}


# ------------------------------------------------------------------------------------------------ running
def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expect(results, tag: str, timeout: float):
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        got, value = results.get(timeout=max(1.0, give_up - time.monotonic()))
        if got == tag:
            return value
    raise TimeoutError(tag)


def run_attack(name: str, model: str, rest_s: float, image: Path, serve_args: tuple = ()) -> dict:
    """One attack on a fresh server (``serve_args``: more `zfserve serve` flags); its row of figures."""
    from zfserve.weights import resolve_model_dir
    ctx = mp.get_context("spawn")
    _, extra, limit = ATTACKS[name]
    work = Path(tempfile.mkdtemp(prefix="zf-edge-"))
    metrics_port = _free_port()
    args = ["--http-port", "0", "--metrics-port", str(metrics_port), *serve_args]
    token = TOKEN if "--auth-token-file" in extra else None
    if token:
        (work / "token").write_text(token)
        args += ["--auth-token-file", str(work / "token")]
    if name == "reload":   # a copy of the model whose weights the attack may change
        model = str(shutil.copytree(resolve_model_dir(model), work / "model"))
    log = open(work / "server.log", "w")
    load_before = os.getloadavg()   # the machine's load (other work shares the cores): before and after
    server = Server(model, *args, stderr=log)
    try:
        time.sleep(2.0)
        start_rss, _ = server.read()
        fds_start = _fds(server.proc.pid)
        results, stop = ctx.Queue(), ctx.Event()
        prober = ctx.Process(target=probes, args=(server.target, str(image), token, stop, results))
        prober.start()
        time.sleep(4.0)
        targets = {"http": server.http_port, "metrics": metrics_port, "grpc": server.target, "pid": server.proc.pid,
                   "model_dir": model}
        attack_start, wall_start = time.monotonic(), time.time()
        attacker = ctx.Process(target=_attack_main, args=(name, targets, results))
        attacker.start()
        outcome = _expect(results, "attack", 900)
        attacker.join(60)
        wall_end = time.time()
        fds_after = _fds(server.proc.pid)   # the attack's connections still held by the server: none
        peak = server.peak_rss(attack_start)
        stop.set()
        classify, health = _expect(results, "probes", 120)
        prober.join(60)
        time.sleep(rest_s)
        rest_rss, _ = server.read()
        fds_rest = _fds(server.proc.pid)
    finally:
        server.stop()
        log.close()
    text = (work / "server.log").read_text()
    shutil.rmtree(work, ignore_errors=True)
    return {"attack": name, "limit": limit, "attack_s": round(wall_end - wall_start, 1),
            "load_average": {"before": load_before, "after": os.getloadavg()},
            "probe": _latency(classify, wall_start, wall_end), "health": _latency(health, wall_start, wall_end),
            "start_rss_mb": round(start_rss), "peak_over_start_mb": round(peak - start_rss),
            "rest_over_start_mb": round(rest_rss - start_rss), "rest_s": rest_s,
            "server_fds": {"start": fds_start, "after": fds_after, "rest": fds_rest},
            "tracebacks_in_log": text.count("Traceback"), "first_traceback": _first_traceback(text),
            "outcome": outcome}


def _first_traceback(log: str) -> list[str]:
    """The first traceback in the server's log (its first and last 6 lines), to say what failed."""
    start = log.find("Traceback")
    if start < 0:
        return []
    lines = log[max(0, log.rfind("\n", 0, start - 1) + 1):].splitlines()
    end = next((i for i, line in enumerate(lines[1:], 1) if line and not line.startswith((" ", "Traceback"))), 1)
    block = lines[:end + 1]
    return block if len(block) <= 12 else block[:6] + ["..."] + block[-6:]


def _table(row: dict) -> str:
    p, h = row["probe"], row["health"]
    lines = [f"== {row['attack']} ({row['attack_s']} s): {row['limit']}",
             f"   probe Classify p50 {p.get('p50_ms')} ms, p99 {p.get('p99_ms')} ms, max {p.get('max_ms')} ms "
             f"({p.get('n')} calls, {p.get('not_ok')} not OK); health p99 {h.get('p99_ms')} ms",
             f"   RSS start {row['start_rss_mb']} MB, peak +{row['peak_over_start_mb']} MB, "
             f"{row['rest_s']:g} s later +{row['rest_over_start_mb']} MB; tracebacks in the log: "
             f"{row['tracebacks_in_log']}; server fds {row['server_fds']['start']} at start, "
             f"{row['server_fds']['after']} as the attack ends, {row['server_fds']['rest']} after the rest; "
             f"load average {row['load_average']['before']} before, {row['load_average']['after']} after",
             "   attackers: " + json.dumps(row["outcome"], default=str)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--rest-s", type=float, default=30.0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--serve-args", default="", help="more `zfserve serve` flags for every server, e.g. "
                        "'--max-batch-size 16' (split on spaces)")
    args = parser.parse_args(argv)
    unknown = set(args.attacks.split(",")) - set(ATTACKS)
    if unknown:
        parser.error(f"--attacks: unknown {sorted(unknown)}; accepted: {', '.join(ATTACKS)}")
    folder = Path(tempfile.mkdtemp(prefix="zf-edge-images-"))
    image = folder / "probe.jpg"
    image.write_bytes(_jpeg(256, 99))
    rows = []
    for name in args.attacks.split(","):
        rows.append(run_attack(name, args.model, args.rest_s, image, tuple(args.serve_args.split())))
        print(_table(rows[-1]), flush=True)
        if args.json:   # written after each attack: a long run keeps what it measured
            Path(args.json).write_text(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(),
                                                   "rows": rows}, indent=2, default=str) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
