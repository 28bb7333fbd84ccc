#!/usr/bin/env python
"""perf_analyzer, Triton's own load generator (unmodified), against a plain ``zfserve serve``: a concurrency
sweep of the tensor model (perf_analyzer's synthetic data) and of the bytes model (real JPEGs), each row with the
server-side figures perf_analyzer reads from the statistics extension.

    bash scripts/install_perf_analyzer.sh        # once: .tools/perf_analyzer/perf_analyzer
    python benchmarks/perf_analyzer_sweep.py [--concurrency 1:8] [--model NAME|DIR] [--json OUT]

The commands are the ones a Triton user types (``perf_analyzer -m MODEL -i grpc -u HOST:PORT
--concurrency-range A:B``, plus ``--input-data FILE`` for the bytes model); measurement windows are
perf_analyzer's count windows (``--measurement-request-count``), which stabilise faster than time windows on
a busy host. tests/test_perf_analyzer.py runs the same commands, shorter.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALLED = ROOT / ".tools" / "perf_analyzer" / "perf_analyzer"   # scripts/install_perf_analyzer.sh


def find_perf_analyzer() -> str | None:
    """$ZFSERVE_PERF_ANALYZER, else the one scripts/install_perf_analyzer.sh installed, else PATH's."""
    for candidate in (os.environ.get("ZFSERVE_PERF_ANALYZER"), str(INSTALLED), shutil.which("perf_analyzer")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def start_server(*extra: str, timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    """``zfserve serve --port 0 EXTRA...`` in a child process; returns it and its gRPC target once it is ready
    (with ``--http-port``, ``proc.http_target`` is the HTTP side's)."""
    proc = subprocess.Popen([sys.executable, "-m", "zfserve.cli", "serve", "--port", "0", "--log-level", "warning",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, port, seen = time.monotonic() + timeout_s, None, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.match(r"zfserve: listening on [\d.]+:(\d+)", line)
        if match:
            port = int(match.group(1))
        match = re.match(r"zfserve: http on [\d.]+:(\d+)", line)
        if match:   # with --http-port: the HTTP side's address
            proc.http_target = f"127.0.0.1:{match.group(1)}"
        if line.startswith("zfserve: ready") and port:
            return proc, f"127.0.0.1:{port}"
    proc.kill()
    raise RuntimeError(f"zfserve serve did not start: {''.join(seen)}{proc.stderr.read()}")


def stop_server(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


def _input_data_module():
    spec = importlib.util.spec_from_file_location("perf_analyzer_input", ROOT / "scripts" / "perf_analyzer_input.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_jpegs(count: int = 8, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs of the synthetic set (the embedded model's classes)."""
    from PIL import Image

    from zfserve.data import render_images
    jpegs = []
    for pixels in render_images(seed, range(count)):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    return jpegs


def write_jpeg_input_data(path: Path, count: int = 8, seed: int = 0) -> Path:
    """perf_analyzer --input-data with ``count`` JPEGs of the synthetic set (the embedded model's classes)."""
    path.write_text(json.dumps(_input_data_module().input_data(synthetic_jpegs(count, seed))))
    return path


def write_tensor_input_data(path: Path, images) -> Path:
    """perf_analyzer --input-data sending each preprocessed float32 (3, S, S) image of ``images`` to a model's
    ``image`` input in turn (base64 of the raw little-endian floats)."""
    import base64

    import numpy as np
    data = [{"image": {"b64": base64.b64encode(np.ascontiguousarray(image, dtype="<f4").tobytes()).decode()}}
            for image in images]
    path.write_text(json.dumps({"data": data}))
    return path


def command(binary: str, model: str, target: str, concurrency: str, input_data: Path | None = None,
            request_count: int = 200, stability_percentage: int | None = None, protocol: str = "grpc",
            parameters: dict[str, int] | None = None) -> list[str]:
    """The perf_analyzer command line. ``stability_percentage`` widens perf_analyzer's stability test (default
    10%: three windows within 10% of each other), for runs that check behaviour rather than measure on a busy
    host; ``parameters`` are integer request parameters (an explanation model's settings)."""
    cmd = [binary, "-m", model, "-i", protocol, "-u", target, "--concurrency-range", concurrency,
           "--measurement-mode", "count_windows", "--measurement-request-count", str(request_count)]
    if stability_percentage is not None:
        cmd += ["--stability-percentage", str(stability_percentage)]
    for name, value in (parameters or {}).items():
        cmd += ["--request-parameter", f"{name}:{int(value)}:int"]
    return cmd + (["--input-data", str(input_data)] if input_data else [])


_BLOCK = re.compile(r"Request concurrency: (\d+)\n(.*?)(?=Request concurrency: |Inferences/Second vs\.|\Z)", re.S)
_SERVER = re.compile(r"Avg request latency: (\d+) usec \(overhead (\d+) usec \+ queue (\d+) usec \+ compute input "
                     r"(\d+) usec \+ compute infer (\d+) usec \+ compute output (\d+) usec\)")


def parse(output: str) -> list[dict]:
    """One row per concurrency: client throughput and latencies, and the server's share (statistics)."""
    rows = []
    for concurrency, block in _BLOCK.findall(output):
        def number(label, text=block):
            match = re.search(label + r": ([\d.]+)", text)
            return float(match.group(1)) if match else None
        row = {"concurrency": int(concurrency), "throughput": number("Throughput"),
               "latency_avg_us": number("Avg latency"), "latency_p50_us": number("p50 latency"),
               "latency_p99_us": number("p99 latency"), "server": None}
        server = block.split("Server:", 1)[1] if "Server:" in block else ""
        match = _SERVER.search(server)
        if match:
            keys = ("request_us", "overhead_us", "queue_us", "compute_input_us", "compute_infer_us",
                    "compute_output_us")
            row["server"] = {"inference_count": number("Inference count", server),
                             "execution_count": number("Execution count", server),
                             **{k: int(v) for k, v in zip(keys, match.groups())}}
        rows.append(row)
    return rows


def table(results: dict) -> str:
    lines = ["| concurrency | " + " | ".join(f"{kind} infer/s" for kind in results) + " | "
             + " | ".join(f"{kind} p50 ms" for kind in results) + " |",
             "|---:|" + "---:|" * (2 * len(results))]
    concurrencies = sorted({row["concurrency"] for rows in results.values() for row in rows})
    for c in concurrencies:
        by_kind = [next((r for r in rows if r["concurrency"] == c), None) for rows in results.values()]
        rates = [f"{r['throughput']:.1f}" if r else "-" for r in by_kind]
        p50 = [f"{r['latency_p50_us'] / 1e3:.1f}" if r else "-" for r in by_kind]
        lines.append(f"| {c} | " + " | ".join(rates) + " | " + " | ".join(p50) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1:8", help="perf_analyzer --concurrency-range (default 1:8)")
    parser.add_argument("--model", default=None, help="model name or directory (default: the embedded one)")
    parser.add_argument("--request-count", type=int, default=200, help="requests per measurement window")
    parser.add_argument("--perf-analyzer", default=None, help="the binary (default: see find_perf_analyzer)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    binary = args.perf_analyzer or find_perf_analyzer()
    if not binary:
        print("perf_analyzer not found: run `bash scripts/install_perf_analyzer.sh`", file=sys.stderr)
        return 2
    proc, target = start_server(*(["--model", args.model] if args.model else []))
    try:
        from zfserve.client import Client
        with Client(target, timeout=30) as client:
            name = client.list_models().default_model
        data = write_jpeg_input_data(Path(os.environ.get("TMPDIR", "/tmp")) / f"zfserve-perf-{os.getpid()}.json")
        results, commands = {}, {}
        for kind, model, input_data in (("tensor", name, None), ("jpeg", f"{name}-bytes", data)):
            cmd = command(binary, model, target, args.concurrency, input_data, args.request_count)
            commands[kind] = " ".join(cmd)
            print("$", commands[kind], flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                return 1
            results[kind] = parse(done.stdout)
        data.unlink()
    finally:
        stop_server(proc)
    print(table(results))
    if args.json:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True).stderr.strip()
        Path(args.json).write_text(json.dumps({
            "what": "perf_analyzer concurrency sweep against `zfserve serve` (plain, embedded model)",
            "host": f"{os.cpu_count()} CPU cores", "perf_analyzer": version, "commands": commands,
            "results": results, "table": table(results)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
