"""Occlusion on an ONNX model: zfserve vs Captum ``Occlusion`` on the same PyTorch ResNet-18, same run.

Workload: a torchvision-layout ResNet-18 (tests/onnx_models.py) trained on the synthetic shapes
(benchmarks/resnet18_shapes.py: 36 min on 2 cores the first time, cached after), exported to ONNX and imported
(``zfserve.import_onnx``), input 224, window 32, stride 16 = 13 x 13 = 169 positions, fill 0 (the mean), the
target the class predicted on the intact image. A trained network is what makes the int8 question meaningful: a
random one's occlusion maps are flat (the largest drop is below int8's rounding noise). Contenders:
- zfserve fp32: the exact sweep of an ONNX model (every position, ONNX Runtime fp32, the graph split at the end of
  its spatially local beginning: zfserve.engine.occlusion_split), and the same without the split (every copy a full
  forward pass: brute force, batched), to show the split's share;
- zfserve int8: the ONNX Runtime and OpenVINO int8 sweeps of the int8 graph (calibrated on held-out synthetic
  images, which passed the accuracy gate; an ONNX model's last Gemm stays float) at every position, and the int8
  mode the occlusion agreement gate chooses (``zfserve occlusion-gate --precisions int8``: candidates fastest
  first, every position or an approximation, until one agrees with exact on >= 98% of its 100 held-out images,
  seed 4), which is what an audit runs; each is then checked against fp32 on ``--images`` other images (seed 3):
  the per-image location of the largest probability drop, the same window (strict) or a window whose fp32 drop
  ties with the largest within 1e-3 (the gate's own rule);
- Captum: ``Occlusion(softmax(model)).attribute`` with the best ``perturbations_per_eval`` of 16/32/64/169
  (chosen on the first image), ``torch.no_grad()``, the same threads.
Speed: ``--rounds`` rounds over ``--speed-images`` images, each round running every contender in turn (so load
bursts fall on all), medians per contender; ratios = Captum / contender. zfserve's fp32 attribution is checked
against Captum's (1e-5) before any figure is written.

    .venv/bin/python benchmarks/onnx_occlusion.py --out benchmarks/results/cpu-2core-2026-12-06-onnx.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import onnx_models as om  # noqa: E402
import resnet18_shapes  # noqa: E402

WINDOW, STRIDE = 32, 16
PPE = (16, 32, 64, 169)
OUTPUTS = ("probability", "attribution")


def setup(root: Path, threads: int, trained_in: Path):
    from zfserve.engine.occlusion_modes import EXACT_MODE, OcclusionEngines, OcclusionMode
    from zfserve.engine.quantize import Int8Settings, ensure_int8
    from zfserve.export import ensure_onnx
    from zfserve.import_onnx import import_onnx
    from zfserve.weights import read_snapshot
    from zfserve.data import CLASSES
    model, facts = resnet18_shapes.trained(lambda line: print(line, flush=True), trained_in)
    path = om.export(model, root / "resnet18.onnx", 224)
    directory = import_onnx(path, list(CLASSES), root / "resnet18")
    snapshot = read_snapshot(directory)
    t0 = time.perf_counter()
    int8 = ensure_int8(ensure_onnx(snapshot), snapshot.config, Int8Settings(calibration="synthetic"))
    made = time.perf_counter() - t0
    engines = OcclusionEngines(snapshot, threads=threads)
    modes = {"zfserve onnxruntime fp32 (exact)": EXACT_MODE,
             "zfserve onnxruntime int8": OcclusionMode("onnxruntime", "int8"),
             "zfserve openvino int8": OcclusionMode("openvino", "int8")}
    try:
        import openvino  # noqa: F401
    except ImportError:
        modes.pop("zfserve openvino int8")
    return model, facts, snapshot, engines, modes, int8, made


def images(snapshot, n: int, seed: int = 3) -> np.ndarray:
    from zfserve.data import render_images
    from zfserve.preprocess import to_input
    return np.stack([to_input(image, snapshot.config) for image in render_images(seed, range(n))])


def captum(model, x: np.ndarray, target: int, ppe: int) -> np.ndarray:
    from captum.attr import Occlusion
    occlusion = Occlusion(lambda batch: torch.softmax(model(batch), dim=1))
    with torch.no_grad():
        return occlusion.attribute(torch.from_numpy(x)[None], sliding_window_shapes=(3, WINDOW, WINDOW),
                                   strides=(3, STRIDE, STRIDE), baselines=0.0, target=int(target),
                                   perturbations_per_eval=ppe)[0].numpy()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def full_passes(engines):
    """zfserve's fp32 sweep without the graph split (every copy a full forward pass), on the exact sweep's own
    classifier, for the split's gain."""
    from zfserve.engine.occlusion_runtime import RuntimeOcclusionEngine
    exact = engines.runtime_engine("onnxruntime", "fp32")
    return RuntimeOcclusionEngine(exact.classifier, batch_size=exact.batch_size, workers=exact.workers, split=False)


def speed(model, engines, modes, xs, targets, rounds: int, full=None) -> dict:
    """Median seconds per image of every contender, rounds interleaved (``full``: the fp32 engine without the
    split, beside them)."""
    best = {}
    for ppe in PPE:   # Captum's best batching, on the first image
        best[ppe] = timed(lambda: captum(model, xs[0], targets[0], ppe))[0]
    ppe = min(best, key=best.get)
    ours = engines.sweep(xs[0], modes["zfserve onnxruntime fp32 (exact)"], window=WINDOW, stride=STRIDE,
                         target=int(targets[0]), outputs=OUTPUTS)
    theirs = captum(model, xs[0], targets[0], ppe)
    diff = float(np.abs(ours.attribution - theirs.mean(0)).max())
    assert diff <= 1e-5, f"attribution differs from Captum's by {diff}"
    runs = {name: (lambda x, t, mode=mode: engines.sweep(x, mode, window=WINDOW, stride=STRIDE, target=int(t),
                                                           outputs=OUTPUTS)) for name, mode in modes.items()}
    if full is not None:
        runs["zfserve onnxruntime fp32, full passes (no split)"] = \
            lambda x, t: full.sweep(x, WINDOW, STRIDE, target=int(t), outputs=OUTPUTS)
        split_diff = float(np.abs(runs["zfserve onnxruntime fp32, full passes (no split)"](xs[0], targets[0])
                                  .attribution - ours.attribution).max())
        assert split_diff <= 1e-5, f"the split sweep differs from full passes by {split_diff}"
    for run in runs.values():   # warm: sessions built, first-run allocations paid
        run(xs[0], targets[0])
    seconds = {name: [] for name in [*runs, f"captum ppe={ppe}"]}
    for _ in range(rounds):
        for x, target in zip(xs, targets):
            for name, run in runs.items():
                seconds[name].append(timed(lambda: run(x, target))[0])
            seconds[f"captum ppe={ppe}"].append(timed(lambda: captum(model, x, target, ppe))[0])
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    baseline = medians[f"captum ppe={ppe}"]
    return {"captum_ppe_search_s": best, "captum_ppe": ppe, "attribution_max_diff_vs_captum": diff,
            "seconds_per_image": medians, "samples": seconds,
            "split_notes": {f"onnxruntime-{precision}": engines.runtime_engine("onnxruntime", precision)
                            .split_notes.get((WINDOW, STRIDE)) for precision in ("fp32", "int8")},
            "speedup_vs_captum": {name: baseline / value for name, value in medians.items()}}


def agreement(engines, modes, xs, targets) -> dict:
    """Per fast mode: the share of images whose largest-drop window is fp32's (strictly, and allowing windows
    whose fp32 drop ties with the largest within 1e-3); the probability differences at evaluated positions."""
    def measured(r):   # an approximation's largest drop is taken among the positions it evaluated
        return r.probability if r.evaluated is None else np.where(r.evaluated, r.probability, np.inf)
    maps = {name: [measured(engines.sweep(x, mode, window=WINDOW, stride=STRIDE, target=int(t),
                                          outputs=("probability",))) for x, t in zip(xs, targets)]
            for name, mode in modes.items()}
    exact = maps.pop("zfserve onnxruntime fp32 (exact)")
    out = {}
    for name, fast in maps.items():
        strict = [int(np.argmin(e)) == int(np.argmin(f)) for e, f in zip(exact, fast)]
        tied = [e.flat[int(np.argmin(f))] - e.min() <= 1e-3 for e, f in zip(exact, fast)]
        out[name] = {"images": len(exact), "location_agreement": float(np.mean(strict)),
                     "location_agreement_with_ties": float(np.mean(tied)),
                     "max_abs_probability_diff": float(max(np.abs(e - f)[np.isfinite(f)].max()
                                                           for e, f in zip(exact, fast))),
                     "fp32_largest_drop_median": float(np.median([e.max() - e.min() for e in exact]))}
    return out


def gated_int8(snapshot, engines, images: int):
    """(the int8 mode the agreement gate chooses, its record): the gate that audits and the explorer apply
    (``zfserve occlusion-gate --precisions int8``: its default held-out data, synthetic seed 4 with masks, and
    thresholds) at this benchmark's window and stride. Candidates are tried fastest first until one passes: int8
    on ONNX Runtime and OpenVINO, every position or an approximation (drill-down, early stop)."""
    from zfserve.audit.gate import GateSettings, candidates, choose, verdict
    settings = GateSettings(WINDOW, STRIDE, images=images)
    choice = choose(snapshot, settings, engines, modes=candidates(("int8",)),
                    log=lambda line: print(line, flush=True))
    kept = ("images", "location_agreement", "strict_location_agreement", "hit_agreement", "pointing_game",
            "forwards_per_image", "cpu_seconds_per_image", "speedup_vs_exact")
    measured = {name: {"passes": not verdict(figures, settings), "refused_because": verdict(figures, settings),
                       **{k: figures[k] for k in kept}} for name, figures in (choice.table or {}).items()}
    return choice.mode, {"settings": settings.measured_on(), "min_agreement": settings.min_agreement,
                         "chosen": choice.mode.name, "reason": choice.reason, "measured": measured}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100, help="images of the location-agreement check (default 100)")
    p.add_argument("--gate-images", type=int, default=100, help="held-out images of the agreement gate (default "
                   "100, the gate's own default)")
    p.add_argument("--speed-images", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    trained_in = resnet18_shapes.cache_dir()   # the user's cache: the network is worth keeping, the exports not
    with tempfile.TemporaryDirectory(prefix="zfserve-onnx-bench.") as tmp:
        os.environ.setdefault("ZFSERVE_CACHE_DIR", str(Path(tmp) / "cache"))
        model, facts, snapshot, engines, modes, int8, made = setup(Path(tmp), args.threads, trained_in)
        xs = images(snapshot, max(args.images, args.speed_images))     # held out: seed 3
        targets = engines.runtime_engine("onnxruntime", "fp32").classifier.probabilities(xs).argmax(1)
        from zfserve.evaluate import cpu_facts
        from zfserve.export import read_metadata
        accuracy_gate = json.loads(read_metadata(int8)["zfserve.accuracy"])
        chosen, gate = gated_int8(snapshot, engines, args.gate_images)
        if not chosen.exact and chosen not in modes.values():
            modes[f"zfserve {chosen.name} (chosen by the gate)"] = chosen
        result = {"workload": {"model": "ResNet-18 (torchvision layout, tests/onnx_models.py) trained on the "
                                        "synthetic shapes (benchmarks/resnet18_shapes.py), 11 classes",
                               "training": facts, "images": "synthetic, seed 3 (held out)",
                               "input": 224, "window": WINDOW, "stride": STRIDE, "positions": 169,
                               "threads": args.threads, "fill": 0.0, "target": "predicted class"},
                  "machine": {"cpu": cpu_facts(), "cores": os.cpu_count(),
                              "load_average_at_start": os.getloadavg()},
                  "int8": {"seconds_to_make": round(made, 1), "accuracy_gate": accuracy_gate},
                  "occlusion_gate": gate}
        result["speed"] = speed(model, engines, modes, xs[:args.speed_images], targets[:args.speed_images],
                                args.rounds, full_passes(engines))
        print(json.dumps(result["speed"]["speedup_vs_captum"], indent=2), flush=True)
        result["agreement"] = agreement(engines, modes, xs[:args.images], targets[:args.images])
        result["machine"]["load_average_at_end"] = os.getloadavg()
    print(json.dumps({k: result[k] for k in ("agreement", "occlusion_gate")}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
