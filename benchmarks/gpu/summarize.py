"""Turn a GPU run's $OUT folder into a markdown summary (stdout) and one results JSON named by card and date.

    python benchmarks/gpu/summarize.py OUT_DIR

Reads ``kernels.jsonl`` (one line per kernel benchmark case, plus the card's ceilings) and the
pytest-benchmark ``bench-*.json`` files of the rest of the suite. Writes ``OUT_DIR/<card>-<date>.json``,
the file to commit under ``benchmarks/results/``.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path

# Acceptance lines of issue 4: (kernel, batch, dtype, baseline, minimum speedup).
ACCEPTANCE = [("conv1_relu_pool", 256, "fp16", "eager", 3.0), ("unpool_sum_relu", 256, "fp16", "max_unpool2d", 2.0)]
FLOOR_GOAL = 1.5  # within 1.5x of the floor


def _kernel_records(out: Path):
    path = out / "kernels.jsonl"
    if not path.exists():
        return {}, []
    ceilings, cases = {}, []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kernel") == "ceilings":
            ceilings = record
        else:
            cases.append(record)
    return ceilings, cases


def _suite_records(out: Path):
    rows = []
    for path in sorted(out.glob("bench-*.json")):
        data = json.loads(path.read_text())
        for bench in data.get("benchmarks", []):
            extra = {k: v for k, v in bench.get("extra_info", {}).items() if isinstance(v, (int, float, str))}
            rows.append({"file": path.name, "name": bench["fullname"], "median_s": bench["stats"]["median"],
                         "extra_info": extra})
    return rows


def main(out_dir: str) -> int:
    out = Path(out_dir)
    ceilings, cases = _kernel_records(out)
    suite = _suite_records(out)
    card = ceilings.get("device", "unknown-gpu")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "gpu"

    lines = [f"# GPU run on {card}, {date}", ""]
    if ceilings:
        lines.append(f"Measured ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, matmul fp16 "
                     f"{ceilings['matmul_fp16_TFLOPs']:.0f} / tf32 {ceilings['matmul_tf32_TFLOPs']:.0f} / fp32 "
                     f"{ceilings['matmul_fp32_TFLOPs']:.0f} TFLOP/s")
        lines.append("")
    if cases:
        lines += ["| kernel | batch | dtype | baseline | ours us | baseline us | speedup | GB/s | TFLOP/s | floor us "
                  "| x floor |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in sorted(cases, key=lambda c: (c["kernel"], c["baseline"], c["dtype"], c["batch"])):
            lines.append(f"| {c['kernel']} | {c['batch']} | {c['dtype']} | {c['baseline']} | {c['ours_us']:.1f} | "
                         f"{c['baseline_us']:.1f} | {c['speedup']:.2f} | {c['ours_GBps']:.0f} | "
                         f"{c['ours_TFLOPs']:.1f} | {c['floor_us']:.1f} | {c['x_floor']:.2f} |")
        lines.append("")
        for kernel, batch, dtype, baseline, need in ACCEPTANCE:
            hit = [c for c in cases if (c["kernel"], c["batch"], c["dtype"], c["baseline"]) ==
                   (kernel, batch, dtype, baseline)]
            if not hit:
                lines.append(f"- {kernel} b{batch} {dtype} vs {baseline}: NOT MEASURED")
                continue
            c = hit[0]
            verdict = "met" if c["speedup"] >= need else "NOT met"
            floor = "within" if c["x_floor"] <= FLOOR_GOAL else "outside"
            lines.append(f"- {kernel} b{batch} {dtype} vs {baseline}: {c['speedup']:.2f}x (goal >= {need}x: "
                         f"{verdict}); {c['x_floor']:.2f}x the floor ({floor} the {FLOOR_GOAL}x goal)")
        lines.append("")
    if suite:
        lines += ["| benchmark | median ms | extra |", "|---|---|---|"]
        for row in suite:
            extra = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in row["extra_info"].items())
            lines.append(f"| {row['name']} | {row['median_s'] * 1e3:.3f} | {extra} |")
    print("\n".join(lines))

    results = {"card": card, "date": date, "ceilings": ceilings, "kernels": cases, "suite": suite}
    (out / f"{slug}-{date}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gpu-out"))
