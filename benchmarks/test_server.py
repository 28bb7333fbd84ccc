"""The server under a closed-loop concurrency sweep (1..64 gRPC clients in separate processes), dynamic
batching on vs off, against the classifier engine's offline batch-16 throughput measured in the same run.
The work is done by ``benchmarks/server_sweep.py`` (runnable on its own, e.g. on a GPU host with
``--device cuda``); this wraps it so ``pytest benchmarks/`` runs it and prints the table and ratios.

    .venv/bin/pytest benchmarks/test_server.py -q -s

Acceptance (2-core CPU host): at concurrency 16, batching on >= 70% of the offline batch-16 throughput and
faster than batching off. Results also go to ``benchmarks/results/server-sweep-<host>.json`` when
ZFSERVE_BENCH_RESULTS is set to a directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _sweep_module():
    spec = importlib.util.spec_from_file_location("server_sweep", HERE / "server_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_server_concurrency_sweep(bench_note):
    sweep = _sweep_module()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    window = float(os.environ.get("ZFSERVE_BENCH_WINDOW_S", "4"))
    results = sweep.sweep(os.environ.get("ZFSERVE_BENCH_MODEL") or None, device=device, window_s=window)
    offline = results["offline_batch16_images_per_s"]
    bench_note(f"server sweep ({device}): offline engine batch 16 = {offline:.1f} images/s (max of "
               f"{results['offline_before_images_per_s']:.1f} before, {results['offline_after_images_per_s']:.1f} "
               f"after; load average {results['load_average']:.1f})")
    for mode, rows in results["modes"].items():
        for row in rows:
            bench_note(f"  batching {mode:>3} c={row['concurrency']:>2}: {row['throughput']:7.1f} infer/s, p50 "
                       f"{row['p50_ms']:.1f} / p90 {row['p90_ms']:.1f} / p99 {row['p99_ms']:.1f} ms, "
                       f"errors {row['errors']}")
    acceptance = results.get("acceptance")
    if acceptance:
        bench_note(f"  c=16: batching on / offline batch 16 = {acceptance['on16_over_offline16']:.2f} (goal >= 0.70); "
                   f"on / off = {acceptance['on16_over_off16']:.2f}x (goal > 1)")
    out_dir = os.environ.get("ZFSERVE_BENCH_RESULTS")
    if out_dir:
        path = Path(out_dir) / f"server-sweep-{device}-{platform.node()}.json"
        path.write_text(json.dumps(results, indent=2))
    assert all(row["errors"] == 0 for rows in results["modes"].values() for row in rows), \
        "requests failed during the sweep"
