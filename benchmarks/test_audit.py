"""Corpus audit throughput: the same 200 synthetic images (the embedded model, the default occlusion 48/32),
audited here and on a local Ray instance (two actors, one CPU each, so both use this machine's two cores), in
one run; Ray's overhead as the ratio of the two wall times, and the per-image cost of each stage of the local
run (read + hash + header, decode, classify, occlusion, writing).

    .venv/bin/pytest benchmarks/test_audit.py -q -s
    ZFSERVE_BENCH_AUDIT_N=50 ...            # fewer images
    ZFSERVE_BENCH_RESULTS=benchmarks/results ...   # also write cpu-<cores>core-<date>-audit.json there
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

N = int(os.environ.get("ZFSERVE_BENCH_AUDIT_N", "200"))


def test_audit_local_vs_ray(tmp_path, bench_note):
    import ray

    from zfserve import audit
    results = {}
    local = audit.run(f"synthetic:{N}", tmp_path / "local", quiet=True)
    results["local"] = {"wall_s": local["wall_s"], "images_per_s": local["images_per_second"],
                        "per_image_ms": {k: 1e3 * v / N for k, v in local["seconds"].items()}}
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, num_cpus=2, logging_level="ERROR")
    started = time.perf_counter() - t0
    try:
        on_ray = audit.run(f"synthetic:{N}", tmp_path / "ray", ray=True, workers=2, quiet=True)
    finally:
        ray.shutdown()
    results["ray"] = {"wall_s": on_ray["wall_s"], "images_per_s": on_ray["images_per_second"],
                      "ray_init_s": round(started, 2)}
    results["ray_over_local_wall"] = on_ray["wall_s"] / local["wall_s"]
    for name in ("accuracy", "pointing_game"):
        assert local[name] == on_ray[name], name   # the same rows, so the same figures
    bench_note(f"audit of synthetic:{N} (embedded model, occlusion 48/32): local {results['local']['images_per_s']:.2f}"
               f" images/s, Ray (2 actors x 1 CPU) {results['ray']['images_per_s']:.2f} images/s; Ray wall / local "
               f"wall = {results['ray_over_local_wall']:.2f} (ray.init {started:.1f} s, not counted)")
    per_image = results["local"]["per_image_ms"]
    bench_note("  local per image: " + ", ".join(f"{k} {v:.1f} ms" for k, v in per_image.items()))
    bench_note(f"  accuracy {local['accuracy']:.3f}, pointing game {local['pointing_game']['hit_rate']:.3f} "
               f"({local['pointing_game']['images']} images), flags {local['flags']}")
    out = os.environ.get("ZFSERVE_BENCH_RESULTS")
    if out:
        path = Path(out) / f"cpu-{os.cpu_count()}core-{time.strftime('%Y-%m-%d')}-audit.json"
        path.write_text(json.dumps({"what": __doc__.split("\n\n")[0], "n": N, "load_average": os.getloadavg()[0],
                                    "results": results, "local_summary": local}, indent=2) + "\n")
