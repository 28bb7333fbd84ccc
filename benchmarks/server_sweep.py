#!/usr/bin/env python
"""Closed-loop concurrency sweep of the gRPC server, batching on vs off, against the engine's offline speed.

    python benchmarks/server_sweep.py [--model NAME|DIR] [--concurrency 1,2,4,8,16,32,64] [--window-s 4]
                                      [--device cpu|cuda] [--json OUT]

Method (perf_analyzer's, shortened to keep the run to a few minutes):
1. Offline: the classifier engine alone, in this process, batch 16 (median of several calls) -> images/s.
2. For each mode, a server process (``zfserve serve``): "on" = the default dynamic batcher
   (--max-batch-size 8 on CPU, 32 with --device cuda; --max-queue-delay-us 5000), "off" = --max-batch-size 1
   (every request alone).
3. Clients are separate processes (up to 8; each runs several concurrent closed-loop requesters on grpc.aio:
   send one preprocessed image as a raw float32 tensor, wait for the answer, send the next). For each
   concurrency c: a warm-up, then a measurement window; throughput = answers completed inside the window /
   window; latency percentiles over those answers. Both scale with c so that a window always spans several
   full rounds of c requests at the engine's speed (warm-up >= 1.5, window >= 3 rounds): with a fixed short
   window, large batches would complete only once or twice inside it and the rate would be mostly
   quantization. Every request must succeed (errors are counted and reported).
4. The offline figure is measured before and after the server runs; the larger one is the reference (the
   host is shared, so this is the conservative choice for the ratio).
Commands and results between this script and its client processes are JSON lines on stdin/stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

MAX_CLIENT_PROCESSES = 8
DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
MODES = {"on": [], "off": ["--max-batch-size", "1", "--max-queue-delay-us", "0"]}


# ------------------------------------------------------------------------------------------------ client side
async def _closed_loop(target: str, requesters: int, warmup_s: float, window_s: float, size: int, seed: int):
    import grpc

    from zfserve._proto.v1 import zfserve_pb2 as pb
    from zfserve._proto.v1 import zfserve_pb2_grpc as pb_grpc
    from zfserve.wire import array_to_tensor

    x = np.random.default_rng(seed).normal(0, 50, (1, 3, size, size)).astype(np.float32)
    request = pb.ClassifyRequest(images=pb.Images(tensor=array_to_tensor(x)), top_k=1)
    latencies, errors = [], []
    start = time.perf_counter() + warmup_s
    end = start + window_s
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.ZFServeStub(ch)

        async def requester():
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    await stub.Classify(request, timeout=120)
                except grpc.aio.AioRpcError as exc:
                    errors.append(exc.code().name)
                    continue
                t1 = time.perf_counter()
                if start <= t1 <= end:
                    latencies.append(t1 - t0)

        await asyncio.gather(*(requester() for _ in range(requesters)))
    return {"latencies": latencies, "errors": errors}


def client_main(target: str, size: int, seed: int) -> None:
    """A client process: one JSON command per stdin line, one JSON result per stdout line."""
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "stop":
            return
        result = asyncio.run(_closed_loop(target, cmd["requesters"], cmd["warmup_s"], cmd["window_s"], size,
                                          seed))
        print(json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ driver side
def offline_throughput(model: str | None, device: str, batch: int = 16, rounds: int = 5) -> float:
    from zfserve.engine.classifier import Classifier
    clf = Classifier(model, device=device, max_batch_size=64)
    x = np.random.default_rng(0).normal(0, 50, (batch, 3, clf.input_size, clf.input_size)).astype(np.float32)
    clf.probabilities(x)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        clf.probabilities(x)
        times.append(time.perf_counter() - t0)
    del clf
    return batch / float(np.median(times))


def start_server(model: str | None, device: str, extra: list[str]):
    cmd = [sys.executable, "-m", "zfserve.cli", "serve", "--port", "0", "--device", device,
           "--max-images-per-request", "64", "--log-level", "warning", *extra]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = None
    for line in proc.stdout:
        match = re.match(r"zfserve: listening on [\d.]+:(\d+)", line)
        if match:
            port = int(match.group(1))
        if line.startswith("zfserve: ready"):
            return proc, f"127.0.0.1:{port}"
    raise RuntimeError(f"server failed to start: {proc.stderr.read()}")


def start_clients(target: str, count: int, size: int):
    return [subprocess.Popen([sys.executable, __file__, "client", "--target", target, "--size", str(size),
                              "--seed", str(i)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for i in range(count)]


def measure(clients, concurrency: int, warmup_s: float, window_s: float) -> dict:
    used = clients[:min(concurrency, len(clients))]
    shares = [concurrency // len(used) + (1 if i < concurrency % len(used) else 0) for i in range(len(used))]
    for proc, share in zip(used, shares):
        proc.stdin.write(json.dumps({"op": "run", "requesters": share, "warmup_s": warmup_s,
                                     "window_s": window_s}) + "\n")
        proc.stdin.flush()
    latencies, errors = [], []
    for proc in used:
        result = json.loads(proc.stdout.readline())
        latencies += result["latencies"]
        errors += result["errors"]
    lat = np.asarray(latencies) * 1e3
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
    return {"concurrency": concurrency, "window_s": window_s, "throughput": len(lat) / window_s,
            "p50_ms": pct(50), "p90_ms": pct(90),
            "p99_ms": pct(99), "answers": int(len(lat)), "errors": len(errors)}


def sweep(model: str | None = None, concurrency=DEFAULT_CONCURRENCY, warmup_s: float = 1.5,
          window_s: float = 4.0, device: str = "cpu", log=print) -> dict:
    offline_before = offline_throughput(model, device)
    log(f"offline engine throughput, batch 16: {offline_before:.1f} images/s")
    results = {"offline_before_images_per_s": offline_before, "window_s": window_s, "modes": {},
               "load_average": os.getloadavg()[0], "cores": len(os.sched_getaffinity(0))}
    for mode, extra in MODES.items():
        server, target = start_server(model, device, extra)
        clients = start_clients(target, MAX_CLIENT_PROCESSES, 224)
        rows = []
        try:
            for c in concurrency:
                rounds = c / offline_before  # seconds for one round of c requests at the engine's speed
                row = measure(clients, c, max(warmup_s, 1.5 * rounds), max(window_s, 3 * rounds))
                rows.append(row)
                log(f"batching {mode:>3} concurrency {c:>2}: {row['throughput']:7.1f} infer/s  p50 "
                    f"{row['p50_ms']:7.1f} ms  p90 {row['p90_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                    f"errors {row['errors']}")
        finally:
            for proc in clients:
                proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
                proc.stdin.close()
                proc.wait(30)
            server.terminate()
            server.communicate(timeout=120)
        results["modes"][mode] = rows
    offline_after = offline_throughput(model, device)
    offline = max(offline_before, offline_after)
    log(f"offline engine throughput, batch 16, after: {offline_after:.1f} images/s (reference: {offline:.1f})")
    results["offline_after_images_per_s"] = offline_after
    results["offline_batch16_images_per_s"] = offline
    on16 = next(r for r in results["modes"]["on"] if r["concurrency"] == 16) if 16 in concurrency else None
    off16 = next(r for r in results["modes"]["off"] if r["concurrency"] == 16) if 16 in concurrency else None
    if on16 and off16:
        results["acceptance"] = {
            "on16_over_offline16": on16["throughput"] / offline,
            "on16_over_off16": on16["throughput"] / max(off16["throughput"], 1e-9),
        }
        a = results["acceptance"]
        log(f"concurrency 16: batching on = {a['on16_over_offline16']:.0%} of offline batch-16 throughput "
            f"(goal >= 70%), {a['on16_over_off16']:.2f}x batching off (goal > 1)")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role")
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--size", type=int, default=224)
    c.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)))
    parser.add_argument("--window-s", type=float, default=4.0)
    parser.add_argument("--warmup-s", type=float, default=1.5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.role == "client":
        client_main(args.target, args.size, args.seed)
        return 0
    results = sweep(args.model, tuple(int(v) for v in args.concurrency.split(",")), args.warmup_s, args.window_s,
                    args.device)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
