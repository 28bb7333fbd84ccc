"""Out-of-distribution scores for the embedded model, side by side, and the cost of the one zfserve serves.

    .venv/bin/python benchmarks/ood_methods.py --out benchmarks/results/cpu-2core-DATE-ood.json

In-distribution (ID): the synthetic set. Every method is fitted on seed 5's images 0..2199 and normalised /
thresholded on its images 2200..4399 (what ``zfserve.engine.ood_fit`` uses for zfnet-demo), and tested on 2,000
images of seed 3, which nothing was fitted on. Out of distribution: random square crops of the pictures that ship
inside scikit-image, scikit-learn and matplotlib (far), and synthetic scenes around ten shapes the model never saw
(near; ``zfserve.data.probes``). Per method: AUROC (ID vs each OOD set) and the share of each OOD set accepted at
the threshold that accepts 95% of the threshold images (FPR at 95% TPR), and the ID acceptance on the test seed.

1. **The table**: every candidate scored from one PyTorch pass per image (all layers at once): MSP, energy, max
   logit, Mahalanobis per layer (class means + a tied covariance; Lee et al. 2018) on fc6/fc7/logits and on
   per-channel statistics of conv/pool layers, their combination over layers, KNN on L2-normalised fc6/fc7 (Sun
   et al. 2022), ViM (Wang et al. 2022), Gram-matrix deviations (Sastry & Oore 2020), input statistics, and
   combinations of detectors (each normalised by its median and 95% quantile on the threshold images, summed).
2. **What is served**: ``Classifier("zfnet-demo")`` (the features from the same graph, the statistics committed
   beside the model, each precision's own threshold) on the same images: the acceptance figures, per photo and
   per shape; top-1 and ID acceptance on the 2,000 held-out images, in fp32 and int8 on ONNX Runtime, bf16 and
   int8 on OpenVINO. ``--served-only`` measures this part alone and replaces the ``served`` rows of ``--out``
   (an earlier run's file), keeping its table and latency.
3. **Cost**: classification latency at batch 1 and 32 with the score on (``Classifier.scored``) vs off (the graph
   exported without the feature outputs, probabilities only), in one process on the same inputs, medians of
   alternating rounds, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import logsumexp, softmax
from scipy.stats import rankdata

from zfserve.data import render_images
from zfserve.data.probes import novel_images, photo_crops, photos
from zfserve.engine import ood
from zfserve.engine.ood_features import channel_stats
from zfserve.preprocess import to_input
from zfserve.weights import read_snapshot

MODEL = "zfnet-demo"
FIT_SEED, FIT_N, THRESHOLD_N = 5, 2200, 2200
TEST_SEED, TEST_N = 3, 2000
PHOTO_SEED, PHOTO_N = 0, 1000
NOVEL_SEED, NOVEL_N = 7, 660
ACCEPTANCE = 0.95
SPATIAL = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5")
GRAM_LAYERS = ("conv1", "conv2")
SETS = ("threshold", "test", "photo", "novel")


# ---------------------------------------------------------------------------------------------------- data
SERVED = (("fp32", "onnxruntime"), ("int8", "onnxruntime"), ("bf16", "openvino"), ("int8", "openvino"))


def image_sets(fitting: bool = True) -> dict:
    """uint8 (N, 256, 256, 3) per set, with labels (ID) or names (OOD); without ``fitting``, no fit and threshold
    sets (what is served reads its committed statistics)."""
    fit = render_images(FIT_SEED, range(FIT_N if fitting else 0))
    threshold = render_images(FIT_SEED, range(FIT_N, FIT_N + (THRESHOLD_N if fitting else 0)))
    test = render_images(TEST_SEED, range(TEST_N))
    crops, photo_names = photo_crops(photos(), PHOTO_N, PHOTO_SEED)
    novel, shape_names = novel_images(NOVEL_SEED, NOVEL_N)
    labels = lambda n, start=0: np.arange(start, start + n) % 11   # noqa: E731  label = index % classes
    return {"fit": (fit, labels(FIT_N)), "threshold": (threshold, labels(THRESHOLD_N, FIT_N)),
            "test": (test, labels(TEST_N)), "photo": (crops, np.array(photo_names)),
            "novel": (novel, np.array(shape_names))}


def torch_features(model, images: np.ndarray, config) -> dict:
    """Every candidate's features from one PyTorch pass per batch."""
    out: dict[str, list] = {}
    with torch.inference_mode():
        for start in range(0, len(images), 32):
            x = torch.from_numpy(np.stack([to_input(img, config) for img in images[start:start + 32]]))
            trace = model.trace(x, layers=(*SPATIAL, "fc6", "fc7", "fc8"))
            a = trace.activations
            found = {"logits": trace.logits, "fc7": a["fc7"], "fc6": a["fc6"],
                     "input_stats": channel_stats(x)}
            for name in SPATIAL:
                found[f"{name}_stats"] = channel_stats(a[name])
                found[f"{name}_mean"] = a[name].mean(dim=(2, 3))
            for name in GRAM_LAYERS:   # first-order Gram matrix, upper triangle (Sastry & Oore's p = 1)
                f = a[name].flatten(2)
                gram = f @ f.transpose(1, 2) / f.shape[2]
                rows, cols = torch.triu_indices(gram.shape[1], gram.shape[1])
                found[f"{name}_gram"] = gram[:, rows, cols]
            for key, value in found.items():
                out.setdefault(key, []).append(value.float().numpy())
    return {key: np.concatenate(value) for key, value in out.items()}


# ---------------------------------------------------------------------------------------------------- metrics
def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """P(an OOD score > an ID score), ties counted half (higher score = more out of distribution): the
    Mann-Whitney statistic from average ranks."""
    ranks = rankdata(np.concatenate([id_scores, ood_scores]))
    n, m = len(id_scores), len(ood_scores)
    return float((ranks[n:].sum() - m * (m + 1) / 2) / (n * m))


def evaluate(scores: dict) -> dict:
    """AUROC and acceptance at the threshold images' 95% quantile, per OOD set; ID acceptance on the test seed."""
    threshold = np.quantile(scores["threshold"], ACCEPTANCE)
    return {"photo_auroc": auroc(scores["test"], scores["photo"]),
            "photo_accepted": float(np.mean(scores["photo"] <= threshold)),
            "novel_auroc": auroc(scores["test"], scores["novel"]),
            "novel_accepted": float(np.mean(scores["novel"] <= threshold)),
            "id_accepted": float(np.mean(scores["test"] <= threshold))}


# ---------------------------------------------------------------------------------------------------- methods
def mahalanobis(fit: np.ndarray, labels=None, shrinkage: float = ood.SHRINKAGE):
    """score(x): the smallest squared Mahalanobis distance to a class mean (one mean without labels), tied
    covariance."""
    classes = np.unique(labels) if labels is not None else np.array([0])
    which = np.searchsorted(classes, labels) if labels is not None else np.zeros(len(fit), int)
    means = np.stack([fit[which == i].mean(axis=0) for i in range(len(classes))]).astype(np.float64)
    centred = fit - means[which]
    covariance = centred.T @ centred / len(fit)
    covariance += shrinkage * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    precision = np.linalg.inv(covariance)
    return lambda x: np.min([np.einsum("ij,jk,ik->i", x - m, precision, x - m) for m in means], axis=0)


def gram_deviation(fit: np.ndarray):
    """Sastry & Oore's deviation of one layer: how far each Gram entry lies outside its [min, max] on the fitted
    images, relative to that bound, summed."""
    low, high = fit.min(axis=0), fit.max(axis=0)
    return lambda x: (np.maximum(low - x, 0) / (np.abs(low) + 1e-6) +
                      np.maximum(x - high, 0) / (np.abs(high) + 1e-6)).sum(axis=1)


def normalised_sum(parts: list[dict]) -> dict:
    """Each detector's scores as (s - median) / (q95 - median) on the threshold images, summed (what zfserve
    serves; ``zfserve.engine.ood.calibrate``)."""
    out = {key: 0.0 for key in parts[0]}
    for part in parts:
        centre = np.median(part["threshold"])
        scale = max(np.quantile(part["threshold"], ACCEPTANCE) - centre, 1e-12)
        for key in out:
            out[key] = out[key] + (part[key] - centre) / scale
    return out


def candidate_scores(f: dict, head) -> dict:
    """name -> {set: scores} for every candidate method, fitted on f["fit"]."""
    fit, labels = f["fit"], f["fit"]["labels"]
    table = {}

    def add(name, score):
        table[name] = {key: np.asarray(score(f[key]), np.float64) for key in SETS}

    add("MSP (max softmax probability)", lambda d: -softmax(d["logits"], axis=1).max(axis=1))
    add("energy (logsumexp of logits)", lambda d: -logsumexp(d["logits"], axis=1))
    add("max logit", lambda d: -d["logits"].max(axis=1))
    for key in ("fc7", "fc6", "logits", "conv4_mean", "conv5_mean", *(f"{n}_stats" for n in SPATIAL)):
        score = mahalanobis(fit[key], labels)
        add(f"Mahalanobis {key}, class means + tied covariance", lambda d, s=score, k=key: s(d[k]))
    table["Mahalanobis combined: fc7 + conv1..conv5 stats, normalised sum"] = normalised_sum(
        [table[f"Mahalanobis {k}, class means + tied covariance"]
         for k in ("fc7", "conv1_stats", "conv2_stats", "conv3_stats", "conv4_stats", "conv5_stats")])
    for key in ("fc7", "fc6"):
        for k in (1, 10, 50):
            knn = ood.Knn.fit(key, fit, k)
            add(f"KNN k={k}, normalised {key}", knn.score)
    vim = ood.Vim.fit("fc7", "logits", fit, *head)
    add("ViM fc7 (256 principal dims) + energy", vim.score)
    for name in GRAM_LAYERS:
        add(f"Gram deviations {name}", lambda d, s=gram_deviation(fit[f"{name}_gram"]), n=name: s(d[f"{n}_gram"]))
    add("Gaussian input statistics (pixel mean, std per channel)", ood.Gaussian.fit("input_stats", fit).score)
    low = ood.Gaussian.fit("conv2_stats", fit)
    add("Gaussian conv2 channel stats", low.score)
    knn = table["KNN k=1, normalised fc7"]
    vim_s, low_s = table["ViM fc7 (256 principal dims) + energy"], table["Gaussian conv2 channel stats"]
    table["KNN fc7 + Gaussian conv2 stats"] = normalised_sum([knn, low_s])
    table["ViM + KNN fc7"] = normalised_sum([vim_s, knn])
    table["ViM + KNN fc7 + Gaussian conv2 stats (served)"] = normalised_sum([vim_s, knn, low_s])
    table["ViM + KNN fc7 + Gram conv1 + conv2"] = normalised_sum(
        [vim_s, knn, table["Gram deviations conv1"], table["Gram deviations conv2"]])
    return table


# ---------------------------------------------------------------------------------------------------- served
def served_scores(images: dict, precision: str, engine: str = "onnxruntime") -> tuple[dict, dict, object]:
    """The served classifier's scores and top-1 per set (its graph, its committed statistics), and its detector."""
    from zfserve.engine.classifier import Classifier
    classifier = Classifier(MODEL, precision=precision, engine=engine, warmup=False)
    if classifier.ood_detector is None:
        raise SystemExit(f"{MODEL}: {classifier.ood_note}")
    scores, top1 = {}, {}
    for key in ("test", "photo", "novel"):
        data = images[key][0]
        parts = [classifier.scored(np.stack([to_input(img, classifier.config) for img in data[i:i + 32]]))
                 for i in range(0, len(data), 32)]
        scores[key] = np.array([v.score for p in parts for v in p.ood])
        top1[key] = np.concatenate([p.probabilities.argmax(axis=1) for p in parts])
    return scores, top1, classifier.ood_detector


def served_report(images: dict, precision: str, engine: str = "onnxruntime") -> dict:
    scores, top1, found = served_scores(images, precision, engine)
    threshold = found.threshold     # the precision's own (fp32's for fp32)
    tested = scores["test"]
    report = {"precision": precision, "engine": engine, "threshold": threshold,
              "threshold_precision": found.describe()["threshold_precision"],
              "fp32_threshold": found.record.get("fp32_threshold", threshold),
              "accepted_at_fp32_threshold": float(np.mean(tested <= found.record.get("fp32_threshold", threshold))),
              "method": found.method,
              "test_top1": float(np.mean(top1["test"] == images["test"][1])),
              "test_accepted": float(np.mean(tested <= threshold)), "test_images": len(tested),
              "photo_auroc": auroc(tested, scores["photo"]), "photo_accepted": float(np.mean(scores["photo"] <= threshold)),
              "novel_auroc": auroc(tested, scores["novel"]), "novel_accepted": float(np.mean(scores["novel"] <= threshold))}
    for key, field in (("photo", "per_photo_accepted"), ("novel", "per_shape_accepted")):
        names = images[key][1]
        report[field] = {str(name): f"{int(np.sum(scores[key][names == name] <= threshold))}/"
                                    f"{int(np.sum(names == name))}" for name in np.unique(names)}
    return report


# ---------------------------------------------------------------------------------------------------- cost
def latency(rounds: int) -> dict:
    """Median seconds per call at batch 1 and 32: the graph without the feature outputs (probabilities only) vs
    the served classifier with the score, alternating, same inputs."""
    import tempfile

    from zfserve.engine.classifier import Classifier
    from zfserve.export import INPUT_NAME, PROBABILITIES, export_onnx, ort_session
    snapshot = read_snapshot(MODEL)
    scored = Classifier(snapshot)
    with tempfile.TemporaryDirectory() as tmp:
        plain = ort_session(export_onnx(snapshot.model(), Path(tmp) / "plain.onnx", weights_sha256=snapshot.sha256),
                            threads=scored.threads)
    out = {}
    for batch in (1, 32):
        x = (np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)) * 50).astype(np.float32)
        calls = {"off": lambda: plain.run([PROBABILITIES], {INPUT_NAME: x}), "on": lambda: scored.scored(x),
                 "on_probabilities_only": lambda: scored.probabilities(x)}
        times = {name: [] for name in calls}
        for _ in range(2):
            for call in calls.values():
                call()
        for _ in range(rounds if batch == 1 else max(3, rounds // 4)):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
        medians = {name: float(np.median(t)) for name, t in times.items()}
        out[f"batch_{batch}"] = {**{f"{k}_s": v for k, v in medians.items()}, "ratio_on_off": medians["on"] / medians["off"],
                                 "rounds": len(times["on"])}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="results JSON (default: print only)")
    p.add_argument("--rounds", type=int, default=40, help="timed rounds at batch 1 (a quarter at batch 32)")
    p.add_argument("--served-only", action="store_true",
                   help="measure what is served only, per precision, and replace the served rows of --out")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    if args.served_only:
        return served_only(args.out, started)
    images = image_sets()
    snapshot = read_snapshot(MODEL)
    model = snapshot.model()
    from zfserve.engine.ood_features import head
    features = {}
    for key, (data, labels) in images.items():
        features[key] = torch_features(model, data, snapshot.config)
        features[key]["labels"] = labels
    table = {name: evaluate(scores) for name, scores in candidate_scores(features, tuple(a.numpy() for a in head(model))).items()}
    for name, row in sorted(table.items(), key=lambda kv: -kv[1]["photo_auroc"]):
        print(f"{name:64s} photos AUROC {row['photo_auroc']:.4f} accepted {row['photo_accepted']:6.1%} | novel "
              f"AUROC {row['novel_auroc']:.4f} accepted {row['novel_accepted']:6.1%} | ID {row['id_accepted']:.1%}")
    served = served_rows(images)
    cost = latency(args.rounds)
    print("latency: " + json.dumps(cost))
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "model": MODEL, "data": {"fit": f"synthetic seed {FIT_SEED} images 0..{FIT_N - 1}",
                                       "threshold": f"synthetic seed {FIT_SEED} images {FIT_N}..{FIT_N + THRESHOLD_N - 1}",
                                       "test": f"synthetic seed {TEST_SEED}, {TEST_N} images",
                                       "photo": f"{PHOTO_N} crops (seed {PHOTO_SEED}) of {len(np.unique(images['photo'][1]))} pictures",
                                       "novel": f"{NOVEL_N} scenes of 10 unseen shapes (seed {NOVEL_SEED})"},
              "acceptance": ACCEPTANCE, "table": table, "served": served, "latency": cost,
              "seconds": round(time.perf_counter() - started, 1)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def served_rows(images: dict) -> dict:
    """One row per served precision and engine (``int8`` and ``int8-openvino``, ...)."""
    served = {}
    for precision, engine in SERVED:
        default_engine = "openvino" if precision == "bf16" else "onnxruntime"   # the one engine bf16 runs on
        key = precision if engine == default_engine else f"{precision}-{engine}"
        served[key] = served_report(images, precision, engine)
        print(f"served {key}: " + json.dumps({k: v for k, v in served[key].items() if not k.startswith("per_")}))
    return served


def served_only(out: str | None, started: float) -> int:
    """Measure what is served, per precision, and replace the ``served`` rows of ``out`` (an earlier full run)."""
    served = served_rows(image_sets(fitting=False))
    if out:
        result = json.loads(Path(out).read_text()) if Path(out).is_file() else {}
        result["served"] = served
        result["served_seconds"] = round(time.perf_counter() - started, 1)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
