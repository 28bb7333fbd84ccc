"""HTTP (REST, JSON and binary tensors) against gRPC, ModelInfer on one server in one run, measured with
perf_analyzer at concurrency 1, 4 and 8 (throughput, p50 and p99 latency); and the explorer page's waits, on
its API: from an upload to the predictions, and to a finished default occlusion map (window 32, stride 8:
625 positions).

    bash scripts/install_perf_analyzer.sh && .venv/bin/pytest benchmarks/test_http.py -q -s
    ZFSERVE_BENCH_RESULTS=benchmarks/results ...   # also write cpu-<cores>core-<date>-http.json there
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CONCURRENCY = (1, 4, 8)
# perf_analyzer's flags per way of calling ModelInfer (binary tensors are its HTTP default).
WAYS = {"grpc": ["-i", "grpc"], "http binary": ["-i", "http"],
        "http json": ["-i", "http", "--input-tensor-format", "json", "--output-tensor-format", "json"]}


def _sweep():
    spec = importlib.util.spec_from_file_location("perf_analyzer_sweep", HERE / "perf_analyzer_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _page_timings(http_target: str, repeats: int = 5) -> dict:
    import io

    import httpx
    from PIL import Image

    from zfserve.data import render
    buf = io.BytesIO()
    Image.fromarray(render(3, 0).image).save(buf, format="JPEG", quality=90)
    upload_to_top5, upload_to_map = [], []
    with httpx.Client(base_url=f"http://{http_target}", timeout=600) as web:
        for i in range(repeats):
            data = buf.getvalue() + bytes([i])   # a new image each time (JPEG ignores trailing bytes)
            t0 = time.perf_counter()
            image = web.post("/api/v1/images", content=data).json()["id"]
            assert web.post("/api/v1/classify", json={"image": image}).status_code == 200
            upload_to_top5.append(time.perf_counter() - t0)
            with web.stream("POST", "/api/v1/occlusion", json={"image": image}) as r:
                last = [line for line in r.iter_lines() if line][-1]
            assert "result" in json.loads(last)
            upload_to_map.append(time.perf_counter() - t0)
    return {"upload_to_predictions_ms": 1e3 * statistics.median(upload_to_top5),
            "upload_to_occlusion_map_ms": 1e3 * statistics.median(upload_to_map), "repeats": repeats}


def test_http_vs_grpc(bench_note):
    sweep = _sweep()
    binary = sweep.find_perf_analyzer()
    if binary is None:
        pytest.skip("perf_analyzer not installed (bash scripts/install_perf_analyzer.sh)")
    proc, target = sweep.start_server("--http-port", "0")
    results = {}
    try:
        for way, flags in WAYS.items():
            address = target if flags[1] == "grpc" else proc.http_target
            for c in CONCURRENCY:
                cmd = sweep.command(binary, "zfnet-demo", address, f"{c}:{c}", request_count=150,
                                    stability_percentage=25)
                cmd[cmd.index("-i"):cmd.index("-i") + 2] = flags
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
                (row,) = sweep.parse(done.stdout)
                results.setdefault(way, []).append(row)
        page = _page_timings(proc.http_target)
    finally:
        sweep.stop_server(proc)
    lines = ["| concurrency | " + " | ".join(f"{w} infer/s (p50 / p99 ms)" for w in WAYS) + " |",
             "|---:|" + "---:|" * len(WAYS)]
    for i, c in enumerate(CONCURRENCY):
        cells = [f"{r[i]['throughput']:.1f} ({r[i]['latency_p50_us'] / 1e3:.1f} / {r[i]['latency_p99_us'] / 1e3:.1f})"
                 for r in results.values()]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    for line in lines:
        bench_note(line)
    for i, c in enumerate(CONCURRENCY):
        grpc_rate = results["grpc"][i]["throughput"]
        bench_note(f"  c={c}: http binary / grpc = {results['http binary'][i]['throughput'] / grpc_rate:.2f}, "
                   f"http json / grpc = {results['http json'][i]['throughput'] / grpc_rate:.2f}")
    bench_note(f"  page: upload -> top-5 {page['upload_to_predictions_ms']:.0f} ms, upload -> occlusion map "
               f"(32/8, 625 positions) {page['upload_to_occlusion_map_ms']:.0f} ms (medians of {page['repeats']})")
    out = os.environ.get("ZFSERVE_BENCH_RESULTS")
    if out:
        path = Path(out) / f"cpu-{os.cpu_count()}core-{time.strftime('%Y-%m-%d')}-http.json"
        path.write_text(json.dumps({"what": __doc__.split("\n\n")[0], "load_average": os.getloadavg()[0],
                                    "perf_analyzer": results, "page": page, "table": "\n".join(lines)}, indent=2)
                        + "\n")
