"""Turn a ``zfserve train`` run into the embedded ``zfnet-demo`` model directory.

    python scripts/package_demo.py RUN_DIR DEST [--eval-seed 3] [--eval-n 1000] [--device cuda]
    python scripts/package_demo.py --ood-only DEST      # fit DEST's out-of-distribution statistics again

Writes DEST/weights.safetensors in float16 (recorded in config.json; fc width 512 keeps it under 20 MB),
config.json with the run's provenance (command, seeds, epochs, history, wall time, hardware) plus the held-out
evaluation, evolution.npz (when the run recorded it), filters.png (the conv1 filters, Fig. 6 style) and
eval.json, and the out-of-distribution statistics (ood.safetensors + ood.json, zfserve.engine.ood_fit: fitted on
synthetic seed 5, which neither training nor the evaluations use). The evaluation and the fit run on DEST's float16
weights, i.e. on what ships.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from zfserve.engine import ood, ood_fit
from zfserve.evaluate import evaluate
from zfserve.render import write_filter_grid
from zfserve.weights import load_model, read_snapshot, save_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", help="the training run directory (zfserve train --out)")
    p.add_argument("dest", help="the model directory to write, e.g. zfserve/models/zfnet-demo")
    p.add_argument("--ood-only", action="store_true", help="only fit DEST's out-of-distribution statistics again")
    p.add_argument("--eval-seed", type=int, default=3, help="held-out synthetic seed (training uses 1, 2)")
    p.add_argument("--eval-n", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1, help="processes rendering the evaluation images")
    p.add_argument("--note", action="append", default=[], help="a line of provenance to keep (repeatable), "
                   "e.g. how an interrupted run was resumed")
    args = p.parse_args(argv)
    if args.ood_only:
        return fit_ood(Path(args.dest))
    if args.run is None:
        p.error("RUN is required (or --ood-only)")
    run, dest = Path(args.run), Path(args.dest)
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    model = load_model(run)
    provenance = dict(model.config.provenance)
    provenance.pop("directory", None)
    provenance["history"] = state["history"]
    if args.note:
        provenance["notes"] = args.note
    provenance["weights_dtype"] = "float16 (trained in float32 with bf16 autocast where amp says so)"
    model.config.provenance = provenance
    model.config.name = "zfnet-demo"
    dest.mkdir(parents=True, exist_ok=True)
    save_model(model, dest, dtype=torch.float16)
    if (run / "evolution.npz").is_file():
        shutil.copy(run / "evolution.npz", dest / "evolution.npz")
    shipped = load_model(dest, device=args.device)
    report = evaluate(shipped, "synthetic", seed=args.eval_seed, n=args.eval_n, device=args.device,
                      workers=args.workers)
    (dest / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    provenance["held_out_eval"] = {k: report[k] for k in ("data", "n", "top1", "top5", "per_class")}
    model.config.provenance = provenance
    save_model(model, dest, dtype=torch.float16)    # config.json now carries the evaluation too
    write_filter_grid(shipped, dest / "filters.png", scale=4)
    fit_ood(dest)
    for path in sorted(dest.iterdir()):
        print(f"{path.name:24s} {path.stat().st_size:>10,d} bytes")
    print(f"held-out top-1 {report['top1']:.4f} top-5 {report['top5']:.4f} on {report['data']} (n={report['n']})")
    return 0


def fit_ood(dest: Path) -> int:
    """Fit the out-of-distribution statistics of the model in ``dest`` on its default held-out images and write
    them there (beside the weights they are keyed to)."""
    snapshot = read_snapshot(dest)
    detector = ood_fit.fit(snapshot, log=print)
    ood.save(detector, dest, snapshot.sha256, ood.preprocess_hash(snapshot.config))
    print(f"out-of-distribution statistics: {detector.method}, threshold {detector.threshold:.4f} at "
          f"{detector.acceptance:.0%} acceptance ({detector.record['data']}; {detector.record['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
