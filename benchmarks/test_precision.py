"""Classification precision and engines, one run: ONNX Runtime fp32 (the baseline) and int8, OpenVINO fp32, bf16
and int8, eager PyTorch fp32 (and bf16 autocast, for reference), batch 1, 8 and 32, 2 threads each, the same
held-out synthetic images for all. Medians and ratios to ONNX Runtime fp32.

    .venv/bin/pytest benchmarks/test_precision.py -q -s

The figures go to ``$ZFSERVE_PRECISION_JSON`` when set, else to ``$ZFSERVE_BENCH_RESULTS/cpu-<N>core-<date>-
precision.json`` when that directory is set.

Models: the embedded ``zfnet-demo`` (the acceptance figures: int8 as shipped, the default calibration) and
``zfnet-paper``'s shapes (fc 4096, 1000 classes; speed only: it is untrained, so its int8 file is calibrated on 64
synthetic images with the accuracy gate off). Timing is interleaved so that load from other processes on a shared
machine falls on every contender alike: each round runs every contender at every batch (untimed calls until its
weights are back in the caches, then timed calls); the medians are over rounds. Not timed: every contender must
agree with eager fp32 on the benchmark images (int8 within the documented 0.1, bf16 within 0.05), and the accuracy
test measures top-1, agreement and probability differences on 2,000 held-out images. The tuning test times each
step of the int8 recipe (untuned QDQ, + LRN as straight-line fits, + conv1 as SpaceToDepth) against ONNX Runtime
fp32, with one calibration (min-max, 64 images) for all, so only the graph differs. The occlusion test compares the
incremental fp32 occlusion engine with the naive sweep through the int8 classifier (does int8 help occlusion?).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import torch

from zfserve.engine.classifier import Classifier
from zfserve.engine.quantize import Int8Settings, agreement_report, ensure_int8
from zfserve.evaluate import cpu_facts
from zfserve.export import ensure_onnx
from zfserve.weights import read_snapshot

openvino = pytest.importorskip("openvino")

THREADS = 2
BATCHES = (1, 8, 32)
ROUNDS = int(os.environ.get("ZFSERVE_PRECISION_ROUNDS", "7"))
CALLS = {1: 12, 8: 3, 32: 1}            # timed calls per contender, batch and round
# Untimed calls before each contender's timed ones. The first calls after another engine ran pay for its
# weights having evicted this one's from the caches: ORT int8 at batch 1 measured 3.4 ms back to back, 3.8-4.5
# ms as the median of 12 calls after one warm-up behind ORT fp32, 3.6 ms after three. A server runs one
# model's session back to back, so the steady state is the figure; three calls reach it (batch 32 calls are
# long enough that one does).
WARMUP = {1: 3, 8: 2, 32: 1}
ENGINES = [("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "bf16"),
           ("openvino", "int8")]
BASELINE = "onnxruntime fp32"
PAPER_INT8 = Int8Settings(calibration_images=64, accuracy_images=64, max_accuracy_drop=100)
ACCURACY_IMAGES = 2000
RESULTS: dict = {}


def _images(config, n: int, seed: int = 4) -> np.ndarray:
    from zfserve.data import synthetic_arrays
    from zfserve.evaluate import centre_inputs
    return centre_inputs(synthetic_arrays(seed, n)[0], config)


def _contenders(name: str):
    """name -> (probabilities function, eager model): every engine of one model, built once."""
    snapshot = read_snapshot(name)
    if name == "zfnet-paper":   # speed only: calibrate on a few images, the untrained model's gate is moot
        ensure_int8(ensure_onnx(snapshot), snapshot.config, PAPER_INT8)
    runs = {}
    for engine, precision in ENGINES:
        clf = Classifier(snapshot, engine=engine, precision=precision, threads=THREADS, max_batch_size=64)
        runs[f"{engine} {precision}"] = clf.probabilities
    model = snapshot.model()

    def eager(x, bf16=False):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return torch.softmax(model(torch.from_numpy(x)).float(), dim=1).numpy()
    runs["eager fp32"] = eager
    runs["eager bf16"] = lambda x: eager(x, bf16=True)
    return runs, snapshot


def _interleaved(runs: dict, x: np.ndarray) -> dict:
    times = defaultdict(list)
    for _ in range(ROUNDS):
        for batch in BATCHES:
            for name, run in runs.items():
                for _ in range(WARMUP[batch]):
                    run(x[:batch])
                for _ in range(CALLS[batch]):
                    start = time.perf_counter()
                    run(x[:batch])
                    times[(name, batch)].append(time.perf_counter() - start)
    return {key: float(np.median(value)) for key, value in times.items()}


def _machine() -> dict:
    import onnxruntime
    cpu = cpu_facts()
    return {"cpu": cpu["model"], "usable_cores": len(os.sched_getaffinity(0)), "threads": THREADS,
            "flags": cpu["flags"],
            "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__, "torch": torch.__version__}


@pytest.mark.parametrize("name", ["zfnet-demo", "zfnet-paper"])
def test_precision_speed(name, bench_note):
    torch.set_num_threads(THREADS)
    runs, snapshot = _contenders(name)
    x = _images(snapshot.config, max(BATCHES))
    reference = runs["eager fp32"](x)
    for contender, run in runs.items():   # not timed: every contender computes the same thing
        atol = {"int8": 0.1, "bf16": 0.05}.get(contender.split()[-1], 1e-5)
        np.testing.assert_allclose(run(x), reference, atol=atol, rtol=0, err_msg=contender)
    load_before = os.getloadavg()[0]
    medians = _interleaved(runs, x)
    result = {"load_average": [load_before, os.getloadavg()[0]], "rounds": ROUNDS, "batches": {}}
    bench_note(f"{name}: {ROUNDS} interleaved rounds, {THREADS} threads, load average {load_before:.1f} -> "
               f"{os.getloadavg()[0]:.1f}")
    for batch in BATCHES:
        base = medians[(BASELINE, batch)]
        row = {contender: {"ms": 1e3 * medians[(contender, batch)], "speedup": base / medians[(contender, batch)]}
               for contender in runs}
        result["batches"][str(batch)] = row
        bench_note(f"  batch {batch:>2}: " + ", ".join(f"{c} {v['ms']:.1f} ms ({v['speedup']:.2f}x)"
                                                       for c, v in row.items()))
    RESULTS.setdefault("speed", {})[name] = result


def test_int8_and_bf16_accuracy(bench_note):
    """top-1, top-5, agreement with fp32 and probability differences on 2,000 held-out images (synthetic seed 3,
    the README's evaluation seed: neither the training, validation nor calibration images)."""
    from zfserve.data import synthetic_arrays
    from zfserve.evaluate import centre_inputs
    snapshot = read_snapshot("zfnet-demo")
    images, labels = synthetic_arrays(3, ACCURACY_IMAGES, workers=THREADS)
    clfs = {f"{e} {p}": Classifier(snapshot, engine=e, precision=p, threads=THREADS) for e, p in ENGINES}
    probabilities = defaultdict(list)
    for start in range(0, len(images), 50):
        x = centre_inputs(images[start:start + 50], snapshot.config)
        for name, clf in clfs.items():
            probabilities[name].append(clf.probabilities(x))
    reference = np.concatenate(probabilities.pop(BASELINE))
    rows = {}
    for name, parts in probabilities.items():
        report = agreement_report(reference, np.concatenate(parts), labels)
        rows[name] = report
        bench_note(f"accuracy on {ACCURACY_IMAGES} held-out images, {name} vs {BASELINE}: top-1 "
                   f"{100 * report['reference_top1']:.2f}% -> {100 * report['top1']:.2f}% "
                   f"({report['top1_drop_pt']:+.2f} pt drop), agreement {100 * report['agreement']:.2f}%, "
                   f"|dp| max {report['max_abs_probability_diff']:.4f}, mean {report['mean_abs_probability_diff']:.1e}")
    RESULTS["accuracy"] = {"data": f"synthetic seed 3, {ACCURACY_IMAGES} images", "reference": BASELINE, **rows}


TUNING_STEPS = {"untuned QDQ": (), "+ LRN fits": ("lrn",), "+ LRN fits + conv1 SpaceToDepth": ("lrn", "space_to_depth")}


def test_int8_tuning_steps(tmp_path, bench_note):
    """Each tuning step of the int8 graph, ONNX Runtime, 2 threads, against ONNX Runtime fp32 in the same rounds."""
    from zfserve.engine.quantize import held_out_data, quantize_int8
    from zfserve.export import ort_session
    snapshot = read_snapshot("zfnet-demo")
    fp32 = ensure_onnx(snapshot)
    settings = Int8Settings(calibration_images=64, accuracy_images=64, method="minmax", max_accuracy_drop=100)
    data = held_out_data(settings, snapshot.config)
    sessions = {"onnxruntime fp32": ort_session(fp32.read_bytes(), threads=THREADS)}
    for step, rewrites in TUNING_STEPS.items():
        path = tmp_path / f"{len(sessions)}.onnx"
        quantize_int8(fp32, path, snapshot.config, settings, data=data, rewrites=rewrites)
        sessions[step] = ort_session(path.read_bytes(), threads=THREADS)
    runs = {name: (lambda s: lambda x: s.run(["probabilities"], {"image": x})[0])(session)
            for name, session in sessions.items()}
    x = _images(snapshot.config, max(BATCHES))
    medians = _interleaved(runs, x)
    result = {}
    for batch in BATCHES:
        base = medians[(BASELINE, batch)]
        result[str(batch)] = {name: {"ms": 1e3 * medians[(name, batch)], "speedup": base / medians[(name, batch)]}
                              for name in runs}
        bench_note(f"int8 tuning, zfnet-demo, batch {batch:>2}: " + ", ".join(
            f"{name} {v['ms']:.2f} ms ({v['speedup']:.2f}x)" for name, v in result[str(batch)].items()))
    RESULTS["tuning"] = {"calibration": "minmax, 64 synthetic seed-5 images", "batches": result}


def test_occlusion_incremental_fp32_vs_naive_int8(bench_note):
    """Occlusion's question: the incremental fp32 engine (tiles of the changed region) against every occluded
    image through the int8 classifier (window 32, stride 8: 625 positions, the embedded model)."""
    from zfserve.engine.occlusion import OcclusionEngine
    from zfserve.engine.results import window_starts
    torch.set_num_threads(THREADS)
    snapshot = read_snapshot("zfnet-demo")
    image = _images(snapshot.config, 1)[0]
    engine = OcclusionEngine(snapshot.model())     # its ONNX Runtime stages use every core (2 here)
    int8 = Classifier(snapshot, precision="int8", threads=THREADS, max_batch_size=32)
    starts = window_starts(224, 32, 8)

    def naive():
        grid = [(y, x) for y in starts for x in starts]
        out = np.empty(len(grid), np.float32)
        for i in range(0, len(grid), 32):
            copies = np.repeat(image[None], len(grid[i:i + 32]), axis=0)
            for j, (y, x) in enumerate(grid[i:i + 32]):
                copies[j, :, y:y + 32, x:x + 32] = 0.0
            out[i:i + len(copies)] = int8.probabilities(copies).max(1)
        return out
    engine.sweep(image, 32, 8)
    naive()
    times = defaultdict(list)
    for _ in range(3):
        for label, run in (("incremental fp32", lambda: engine.sweep(image, 32, 8)), ("naive int8", naive)):
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    medians = {k: float(np.median(v)) for k, v in times.items()}
    bench_note(f"occlusion, zfnet-demo, 625 positions: incremental fp32 {medians['incremental fp32']:.2f} s, "
               f"naive int8 {medians['naive int8']:.2f} s")
    RESULTS["occlusion_s"] = medians


def test_write_results(bench_note):
    if not RESULTS.get("speed"):
        pytest.skip("run with test_precision_speed")
    RESULTS["machine"] = _machine()
    RESULTS["date"] = date.today().isoformat()
    path = os.environ.get("ZFSERVE_PRECISION_JSON")
    if not path and os.environ.get("ZFSERVE_BENCH_RESULTS"):
        path = str(Path(os.environ["ZFSERVE_BENCH_RESULTS"]) /
                   f"cpu-{len(os.sched_getaffinity(0))}core-{RESULTS['date']}-precision.json")
    if path:
        Path(path).write_text(json.dumps(RESULTS, indent=1) + "\n")
        bench_note(f"results: {path}")
