#!/usr/bin/env python
"""Heatmaps per second through the Open Inference Protocol's explanation model (``NAME-occlusion``) against
zfserve.v1's own OcclusionSweep, on one plain ``zfserve serve`` (the embedded model, default settings), the same
image and the same sweep (the default window 32 and stride 8: 625 positions; the per-pixel attribution map, the
only one NAME-occlusion computes).

    bash scripts/install_perf_analyzer.sh        # once
    python benchmarks/oip_explain.py [--rounds 5] [--json benchmarks/results/cpu-2core-...-oip-explain.json]

1. One process, alternating: a sequential OIP ModelInfer (tritonclient.grpc) and a zfserve.v1 OcclusionSweep
   (zfserve.client, ``outputs=["attribution"]``), ``--rounds`` each; medians of the seconds per heatmap, and their
   ratio (the goal: OIP >= 0.9 of OcclusionSweep's heatmaps/s).
2. perf_analyzer (unmodified) on NAME-occlusion at concurrency 1, 2 and 4 (one run each), the image as a tensor
   input data file; its throughput is heatmaps/s (one image per request). A concurrency whose windows never agree
   within ``--stability-percentage`` (a busy host) is recorded with perf_analyzer's message instead of a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_analyzer_sweep as sweep  # noqa: E402


def alternate(target: str, image, rounds: int) -> dict:
    import numpy as np
    import tritonclient.grpc as tc

    from zfserve.client import Client
    triton = tc.InferenceServerClient(target)
    inp = tc.InferInput("image", [1, *image.shape], "FP32")
    inp.set_data_from_numpy(image[None].astype(np.float32))
    seconds = {"oip": [], "zfserve_v1": []}
    with Client(target, timeout=600) as client:
        for i in range(rounds + 1):   # the first round warms both paths up and is not counted
            for kind in ("oip", "zfserve_v1") if i % 2 == 0 else ("zfserve_v1", "oip"):
                start = time.perf_counter()
                if kind == "oip":
                    heatmap = triton.infer("zfnet-demo-occlusion", [inp]).as_numpy("heatmap")[0]
                else:
                    attribution = client.occlude(image, model="zfnet-demo", outputs=["attribution"]).attribution
                if i:
                    seconds[kind].append(time.perf_counter() - start)
    triton.close()
    assert np.abs(heatmap - attribution).max() <= 1e-5   # the same map
    medians = {kind: statistics.median(values) for kind, values in seconds.items()}
    return {"seconds": seconds, "median_s": medians,
            "heatmaps_per_s": {kind: 1 / s for kind, s in medians.items()},
            "ratio_oip_to_zfserve_v1": medians["zfserve_v1"] / medians["oip"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="sequential calls of each kind (after one warm-up)")
    parser.add_argument("--request-count", type=int, default=6, help="perf_analyzer requests per window")
    parser.add_argument("--stability-percentage", type=int, default=50, help="perf_analyzer's stability band")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    binary = sweep.find_perf_analyzer()
    if not binary:
        print("perf_analyzer not found: run `bash scripts/install_perf_analyzer.sh`", file=sys.stderr)
        return 2
    from zfserve.preprocess import load_images
    from zfserve.weights import read_snapshot
    image = load_images(sweep.synthetic_jpegs(1), read_snapshot("zfnet-demo").config)[0]
    data = sweep.write_tensor_input_data(Path(os.environ.get("TMPDIR", "/tmp")) / f"zfserve-oipx-{os.getpid()}.json",
                                         [image])
    proc, target = sweep.start_server()
    try:
        before = alternate(target, image, args.rounds)
        print(json.dumps(before["median_s"]), flush=True)
        rows, commands = [], []
        for concurrency in (1, 2, 4):
            cmd = sweep.command(binary, "zfnet-demo-occlusion", target, f"{concurrency}:{concurrency}", data,
                                args.request_count, args.stability_percentage)
            commands.append(" ".join(cmd))
            print("$", commands[-1], flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:   # e.g. no stable measurement on a busy host: said, not hidden
                rows.append({"concurrency": concurrency, "throughput": None, "error": done.stdout[-400:].strip()})
                print(rows[-1]["error"], file=sys.stderr, flush=True)
                continue
            rows += sweep.parse(done.stdout)
            print(json.dumps(rows[-1]), flush=True)
        after = alternate(target, image, args.rounds)
    finally:
        sweep.stop_server(proc)
        data.unlink()
    baseline = statistics.median([1 / s for s in before["seconds"]["zfserve_v1"] + after["seconds"]["zfserve_v1"]])
    oip = statistics.median([1 / s for s in before["seconds"]["oip"] + after["seconds"]["oip"]])
    result = {
        "what": "NAME-occlusion (OIP, tritonclient.grpc and perf_analyzer) vs zfserve.v1 OcclusionSweep, plain "
                "`zfserve serve` (embedded zfnet-demo, default settings: --heavy-workers 1, --heavy-threads 1), "
                "window 32 stride 8 (625 positions), attribution map, one synthetic 224x224 image",
        "host": f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end (shared host)",
        "sequential_alternating": {"before_perf_analyzer": before, "after_perf_analyzer": after,
                                   "heatmaps_per_s_median": {"oip": oip, "zfserve_v1": baseline},
                                   "ratio_oip_to_zfserve_v1": oip / baseline},
        "perf_analyzer": {"commands": commands, "rows": rows,
                          "heatmaps_per_s": {str(r["concurrency"]): r["throughput"] for r in rows},
                          "ratio_to_zfserve_v1": {str(r["concurrency"]): r["throughput"] / baseline
                                                  for r in rows if r["throughput"]}},
    }
    print(json.dumps({"sequential": result["sequential_alternating"]["heatmaps_per_s_median"],
                      "ratio": oip / baseline, "perf_analyzer": result["perf_analyzer"]["heatmaps_per_s"]}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
