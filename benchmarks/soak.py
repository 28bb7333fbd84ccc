"""Soak: honest and hostile traffic against a real `zfserve serve` on loopback, from separate client processes.

For each hostile kind (a 39.9 MP mostly transparent RGBA PNG, a 39.9 MP 16-bit grey PNG, a 32 x 1,250,000 strip),
one run on a fresh server:

1. burst: a probe process classifies one small JPEG in a closed loop (its latency is the figure: p50 / p99),
   while 6 client processes each send one Classify of 8 hostile images with a 3 s deadline;
2. deadline: the same 6 requests again without the probe; the server's CPU time from the moment the deadlines
   pass until it is idle again is what the hostile requests cost after their clients gave up;
3. rest: 30 s idle, then the server's RSS again (memory returned after the burst).

Reported per kind (JSON with --json, and a table): probe p50 / p99 and counts, hostile outcomes per status,
peak RSS over start, RSS 30 s after the burst over start, server CPU-s after the deadlines, and whether every
request sent got exactly one answer.

    python benchmarks/soak.py [--kinds rgba,gray16,strip] [--model zfnet-demo] [--rest-s 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

HOSTILE_CLIENTS = 6
IMAGES_PER_REQUEST = 8
DEADLINE_S = 3.0


# ------------------------------------------------------------------------------------------------ images
def _png(width: int, height: int, colour_type: int, bit_depth: int, row, path: Path) -> None:
    """A valid PNG written row by row through zlib (no full-size array in memory)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    comp = zlib.compressobj(9)
    parts = [comp.compress(b"\x00" + row(y)) for y in range(height)] + [comp.flush()]
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) +
                     chunk(b"IEND", b""))


def make_images(folder: Path) -> dict[str, Path]:
    from PIL import Image
    w, h = 7300, 5470                                  # 39.9 MP, under the 40 MP per-image limit
    paths = {k: folder / f"{k}.png" for k in ("rgba", "gray16", "strip")}
    clear = bytes(w * 4)
    mark = bytearray(clear)
    mark[:400] = b"\xff\x00\x00\xff" * 100
    if not paths["rgba"].exists():
        _png(w, h, 6, 8, lambda y: bytes(mark) if y % 50 == 0 else clear, paths["rgba"])
    if not paths["gray16"].exists():
        ramp = (np.arange(w, dtype=">u2") * 8).tobytes()
        _png(w, h, 0, 16, lambda y: ramp, paths["gray16"])
    if not paths["strip"].exists():
        _png(32, 1_250_000, 2, 8, lambda y: bytes(96), paths["strip"])
    paths["small"] = folder / "small.jpg"
    if not paths["small"].exists():
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(paths["small"], quality=85)
    return paths


# ------------------------------------------------------------------------------------------------ the server
class Server:
    """`zfserve serve` in its own process (``extra``: more flags; ``stderr``: where its log goes); RSS and CPU
    sampled from /proc every 50 ms. ``http_port`` is the HTTP side's port, with ``--http-port``."""

    def __init__(self, model: str, *extra: str, stderr=subprocess.DEVNULL):
        self.proc = subprocess.Popen([sys.executable, "-m", "zfserve.cli", "serve", "--port", "0", "--model", model,
                                      *extra], stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.http_port = None
        for line in self.proc.stdout:
            if line.startswith("zfserve: listening on"):
                self.target = line.split()[-1]
            if line.startswith("zfserve: http on"):
                self.http_port = int(line.split()[-1].rsplit(":", 1)[1])
            if line.startswith("zfserve: ready"):
                break
        self.samples: list[tuple[float, float, float]] = []   # (time, rss MB, cpu s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def read(self) -> tuple[float, float]:
        """(RSS MB, CPU seconds: user + system) now."""
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        with open(f"/proc/{self.proc.pid}/status") as fh:
            rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024
        return rss, cpu

    def _sample(self):
        while not self._stop.is_set():
            rss, cpu = self.read()
            self.samples.append((time.monotonic(), rss, cpu))
            time.sleep(0.05)

    def peak_rss(self, since: float) -> float:
        return max(rss for t, rss, _ in self.samples if t >= since)

    def idle_after(self, since: float, quiet_s: float = 2.0, limit_s: float = 60.0) -> float:
        """Wait until the server's CPU has not grown by more than 0.05 s over ``quiet_s``; its CPU then."""
        give_up = time.monotonic() + limit_s
        while time.monotonic() < give_up:
            time.sleep(quiet_s)
            recent = [cpu for t, _, cpu in self.samples if t >= time.monotonic() - quiet_s]
            if recent and recent[-1] - recent[0] < 0.05 and time.monotonic() - since > quiet_s:
                return recent[-1]
        return self.read()[1]

    def stop(self):
        self._stop.set()
        self.proc.terminate()
        self.proc.wait(60)


# ------------------------------------------------------------------------------------------------ clients
def _client(target: str):
    import grpc

    from zfserve._proto.v1 import zfserve_pb2_grpc as pb_grpc
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 256 << 20),
                                                     ("grpc.max_receive_message_length", 256 << 20)])
    return channel, pb_grpc.ZFServeStub(channel)


def probe(target: str, image: str, stop, results) -> None:
    """Closed loop: one small JPEG per Classify; (latency s, status) per request."""
    import grpc

    from zfserve._proto.v1 import zfserve_pb2 as pb
    channel, stub = _client(target)
    request = pb.ClassifyRequest(images=pb.Images(encoded=[Path(image).read_bytes()]))
    out = []
    while not stop.is_set():
        start = time.perf_counter()
        try:
            stub.Classify(request, timeout=30)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        out.append((time.perf_counter() - start, code))
    channel.close()
    results.put(("probe", out))


def hostile(target: str, image: str, go, results) -> None:
    """One Classify of 8 hostile images with a 3 s deadline; its status."""
    import grpc

    from zfserve._proto.v1 import zfserve_pb2 as pb
    channel, stub = _client(target)
    data = Path(image).read_bytes()
    request = pb.ClassifyRequest(images=pb.Images(encoded=[data] * IMAGES_PER_REQUEST))
    go.wait()
    try:
        stub.Classify(request, timeout=DEADLINE_S)
        code = "OK"
    except grpc.RpcError as exc:
        code = exc.code().name
    channel.close()
    results.put(("hostile", code))


def _burst(ctx, target: str, image: Path, results) -> float:
    """Start the hostile clients together; returns the moment they were released."""
    go = ctx.Event()
    procs = [ctx.Process(target=hostile, args=(target, str(image), go, results)) for _ in range(HOSTILE_CLIENTS)]
    for p in procs:
        p.start()
    time.sleep(3.0)   # the clients have imported grpc and read their bytes
    released = time.monotonic()
    go.set()
    for p in procs:
        p.join(120)
    return released


def run_kind(kind: str, paths: dict, model: str, rest_s: float) -> dict:
    ctx = mp.get_context("spawn")
    server = Server(model)
    try:
        time.sleep(2.0)
        start_rss, _ = server.read()
        results = ctx.Queue()
        stop = ctx.Event()
        prober = ctx.Process(target=probe, args=(server.target, str(paths["small"]), stop, results))
        prober.start()
        time.sleep(3.0)
        burst_start = time.monotonic()
        _burst(ctx, server.target, paths[kind], results)
        time.sleep(2.0)
        stop.set()
        got = [results.get(timeout=60) for _ in range(HOSTILE_CLIENTS + 1)]
        prober.join(60)
        server.idle_after(time.monotonic())
        # Deadline phase, no probe: CPU from the deadlines until idle.
        released = _burst(ctx, server.target, paths[kind], results)
        deadline_at = released + DEADLINE_S
        cpu_at_deadline = next(cpu for t, _, cpu in reversed(server.samples) if t <= deadline_at) \
            if any(t <= deadline_at for t, _, _ in server.samples) else server.read()[1]
        got += [results.get(timeout=60) for _ in range(HOSTILE_CLIENTS)]
        cpu_idle = server.idle_after(deadline_at)
        peak = server.peak_rss(burst_start)
        time.sleep(rest_s)
        rest_rss, _ = server.read()
    finally:
        server.stop()
    latencies = np.array([lat for tag, items in got if tag == "probe" for lat, _ in items])
    probe_codes = [code for tag, items in got if tag == "probe" for _, code in items]
    hostile_codes = [code for tag, code in got if tag == "hostile"]
    return {
        "kind": kind, "probe_requests": len(probe_codes),
        "probe_p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 1),
        "probe_p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 1),
        "probe_status": {c: probe_codes.count(c) for c in sorted(set(probe_codes))},
        "hostile_status": {c: hostile_codes.count(c) for c in sorted(set(hostile_codes))},
        "all_answered": len(hostile_codes) == 2 * HOSTILE_CLIENTS,
        "start_rss_mb": round(start_rss), "peak_over_start_mb": round(peak - start_rss),
        "rest_over_start_mb": round(rest_rss - start_rss), "rest_s": rest_s,
        "cpu_after_deadline_s": round(cpu_idle - cpu_at_deadline, 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default="rgba,gray16,strip")
    parser.add_argument("--model", default="zfnet-demo")
    parser.add_argument("--rest-s", type=float, default=30.0)
    parser.add_argument("--images", default=str(Path(tempfile.gettempdir()) / "zfserve-soak-images"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    folder = Path(args.images)
    folder.mkdir(parents=True, exist_ok=True)
    paths = make_images(folder)
    rows = [run_kind(kind, paths, args.model, args.rest_s) for kind in args.kinds.split(",")]
    print(f"{'kind':<8}{'probe p50':>10}{'p99':>8}{'probes':>8}{'hostile outcomes':>34}{'peak+':>8}"
          f"{'rest+':>8}{'cpu after':>11}{'answered':>10}")
    for r in rows:
        outcomes = ", ".join(f"{k} {v}" for k, v in r["hostile_status"].items())
        print(f"{r['kind']:<8}{r['probe_p50_ms']:>8.1f}ms{r['probe_p99_ms']:>6.1f}ms{r['probe_requests']:>8}"
              f"{outcomes:>34}{r['peak_over_start_mb']:>6}MB{r['rest_over_start_mb']:>6}MB"
              f"{r['cpu_after_deadline_s']:>9.2f}s{str(r['all_answered']):>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(),
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
