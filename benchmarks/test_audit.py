"""Corpus audit throughput and agreement: the same 200 synthetic images (seed 3, the embedded model, the default
occlusion 48/32), in one run:
- the default audit (occlusion in the fastest mode that passed the agreement gate; the gate is measured first
  when missing, untimed), 3 times one after another: images per second and seconds per stage;
- the exact audit (``exact=True``) once, and the default audit's rows against it: per-image pointing-game hit and
  each flag agreeing, and the pointing game of both;
- the default audit on a local Ray instance, two actors of one CPU each (processes, where the local run overlaps
  threads), for the threads-vs-processes comparison (``ray.init`` not counted).

    .venv/bin/pytest benchmarks/test_audit.py -q -s
    ZFSERVE_BENCH_AUDIT_N=50 ...            # fewer images
    ZFSERVE_BENCH_RESULTS=benchmarks/results ...   # also write cpu-<cores>core-<date>-audit.json there
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

N = int(os.environ.get("ZFSERVE_BENCH_AUDIT_N", "200"))
RUNS = 3


def _rows(out: Path) -> dict:
    import pyarrow.parquet as pq
    return {r["path"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}


def agreement(fast: dict, exact: dict) -> dict:
    """Per-image agreement of two audits' rows (same inputs): pointing-game hit and each flag."""
    from zfserve.audit.gallery import FLAGS
    paths = sorted(exact)
    masked = [p for p in paths if exact[p]["pointing_hit"] is not None]
    same = lambda key, ps: sum(fast[p][key] == exact[p][key] for p in ps) / len(ps)  # noqa: E731
    return {"images": len(paths), "with_masks": len(masked), "pointing_hit": same("pointing_hit", masked),
            "flags": {flag: same(flag, paths) for flag in FLAGS},
            "pointing_game": {"exact": 100 * sum(exact[p]["pointing_hit"] for p in masked) / len(masked),
                              "fast": 100 * sum(fast[p]["pointing_hit"] for p in masked) / len(masked)}}


def test_audit_modes_threads_and_processes(tmp_path, bench_note):
    import ray

    from zfserve import audit
    results = {"n": N}
    gate_lines = []
    started = time.perf_counter()
    first = audit.run(f"synthetic:{N}", tmp_path / "run0", quiet=True, log=gate_lines.append)
    results["first_run_with_gate_s"] = round(time.perf_counter() - started, 1)
    runs = [audit.run(f"synthetic:{N}", tmp_path / f"run{i}", quiet=True) for i in range(1, RUNS + 1)]
    mode = runs[0]["occlusion_mode"]
    results["default"] = {
        "mode": mode["mode"], "note": mode["note"], "gate": mode["gate"],
        "images_per_s": [r["images_per_second"] for r in runs],
        "median_images_per_s": statistics.median(r["images_per_second"] for r in runs),
        "wall_s": [r["wall_s"] for r in runs], "setup_s": [r["setup_s"] for r in runs],
        "per_image_ms": [{k: round(1e3 * v / N, 2) for k, v in r["seconds"].items()} for r in runs]}
    exact = audit.run(f"synthetic:{N}", tmp_path / "exact", quiet=True, exact=True)
    results["exact"] = {"images_per_s": exact["images_per_second"], "wall_s": exact["wall_s"],
                        "per_image_ms": {k: round(1e3 * v / N, 2) for k, v in exact["seconds"].items()}}
    results["agreement"] = agreement(_rows(tmp_path / "run1"), _rows(tmp_path / "exact"))
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, num_cpus=2, logging_level="ERROR")
    ray_init = time.perf_counter() - t0
    try:
        on_ray = audit.run(f"synthetic:{N}", tmp_path / "ray", ray=True, workers=2, quiet=True)
    finally:
        ray.shutdown()
    results["ray"] = {"images_per_s": on_ray["images_per_second"], "wall_s": on_ray["wall_s"],
                      "ray_init_s": round(ray_init, 2), "mode": on_ray["occlusion_mode"]["mode"]}
    assert on_ray["pointing_game"] == runs[0]["pointing_game"]      # the same engines, so the same rows
    d, a = results["default"], results["agreement"]
    bench_note(f"audit of synthetic:{N} (embedded model, occlusion 48/32), default mode {d['mode']}: "
               f"{', '.join(f'{v:.2f}' for v in d['images_per_s'])} images/s (median {d['median_images_per_s']:.2f}); "
               f"exact {results['exact']['images_per_s']:.2f} images/s; Ray 2 actors x 1 CPU "
               f"{results['ray']['images_per_s']:.2f} images/s (ray.init {ray_init:.1f} s, not counted)")
    bench_note(f"  first run, gate included: {results['first_run_with_gate_s']} s ({first['images_per_second']:.2f} "
               f"images/s); per image, run 1: " + ", ".join(f"{k} {v:.1f} ms" for k, v in d["per_image_ms"][0].items()))
    bench_note(f"  agreement with exact on {a['images']} images: pointing hit {a['pointing_hit']:.1%}, flags "
               + ", ".join(f"{k} {v:.1%}" for k, v in a["flags"].items())
               + f"; pointing game {a['pointing_game']['fast']:.1f}% vs exact {a['pointing_game']['exact']:.1f}%")
    out = os.environ.get("ZFSERVE_BENCH_RESULTS")
    if out:
        path = Path(out) / f"cpu-{os.cpu_count()}core-{time.strftime('%Y-%m-%d')}-audit.json"
        path.write_text(json.dumps({"what": __doc__.split("\n\n")[0], "load_average": os.getloadavg()[0],
                                    "results": results, "default_summary": runs[0]}, indent=2) + "\n")
