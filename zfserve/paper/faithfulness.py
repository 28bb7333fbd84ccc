"""Can the heatmaps be trusted? Six maps side by side (:mod:`.saliency`: occlusion, the deconvnet, the vanilla
gradient, Grad-CAM, a random map and the centre baseline) on held-out images with object masks, scored by the
measures of :mod:`.saliency_metrics` (conventions there):

- the pointing game (15 px, plain hit rate and per-class average, all images and the difficult subset);
- deletion and insertion AUC (the probability of the class predicted on the intact image);
- the model-parameter randomisation test (MPRT, Adebayo et al. 2018): fc8 .. conv1 randomised in cascade, the
  Spearman rank correlation (absolute values) and SSIM between each map and the original model's; a method
  whose Spearman stays >= 0.5 with every layer randomised is flagged insensitive to the model;
- RandomLogit: SSIM between the map of the predicted class and of a random other class.

Every map is computed for the class predicted on the intact image (each image holds one object, so its
evidence belongs on that object whatever the class). ``random`` and ``centre`` ignore the model: the sanity
checks must flag them, which checks the checks. Each image's out-of-distribution score is recorded with its
prediction (when the model is its directory's, whose statistics it uses): a map of an image outside the model's
data explains an answer that means little, and the section says how many there were.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..engine.results import DECONV_INTERPRETATION
from ..errors import InvalidArgumentError
from ..model import ZFNet
from ..preprocess import mask_to_input, to_input
from . import saliency_metrics as sm
from .dataset import AnalysisData, labels_match
from .figures import log, write_csv, write_json, write_section
from .saliency import LABELS, METHODS, MODEL_FREE, SaliencyMaps, cascading_randomisation, mprt_order

TITLE = "Faithfulness: can the heatmaps be trusted? Pointing game, deletion / insertion and sanity checks"
INSENSITIVE_SPEARMAN = 0.5         # MPRT: a map this rank-similar to the original at full randomisation
CLASS_INSENSITIVE_SSIM = 0.5       # RandomLogit: a map this similar for another class ignores the class
DECONV_LABEL = DECONV_INTERPRETATION


def _ood_scorer(model: ZFNet):
    """``f(batch) -> [OodScore]`` from the out-of-distribution statistics of the model's directory, when this
    in-memory model gives that directory's answers (same probabilities on a random batch); else None and why."""
    from ..engine.classifier import Classifier
    from ..weights import read_snapshot
    if getattr(model, "model_dir", None) is None:
        return None, "the model does not come from a model directory (no out-of-distribution statistics)"
    classifier = Classifier(read_snapshot(model.model_dir), warmup=False)
    if classifier.ood_detector is None:
        return None, classifier.ood_note
    x = torch.randn(2, 3, model.input_size, model.input_size, generator=torch.Generator().manual_seed(0)) * 50
    with torch.no_grad():
        reference = torch.softmax(model(x.to(next(model.parameters()).device)), 1).cpu().numpy()
    if not np.abs(classifier.probabilities(x.numpy()) - reference).max() <= 1e-4:
        return None, f"the in-memory model's weights differ from {model.model_dir}'s (no statistics for them)"
    return (lambda batch: classifier.scored(batch).ood), ""


def _predictor(model: ZFNet):
    """``f(batch) -> probabilities``: ONNX Runtime when installed (deletion / insertion are thousands of plain
    forward passes), else PyTorch."""
    try:
        from ..engine.classifier import Classifier
        classifier = Classifier(model, max_batch_size=64)
        return classifier.probabilities
    except ImportError:
        pass

    @torch.no_grad()
    def predict(batch):
        out = [torch.softmax(model(torch.from_numpy(batch[i:i + 32])).double(), 1).numpy()
               for i in range(0, len(batch), 32)]
        return np.concatenate(out)
    return predict


def _item(model, data: AnalysisData, index: int):
    item = data.item(int(index))
    if item.mask is None:
        raise InvalidArgumentError("faithfulness needs object masks (the synthetic set, or a directory with "
                                   "annotations.json)", field="data")
    return to_input(item.image, model.config), mask_to_input(item.mask, model.config), item.label


# ---------------------------------------------------------------------------------------------- localisation
def score_image(maps: dict, x: np.ndarray, mask: np.ndarray, target: int, predict, *, steps: int,
                base: tuple[float, float], tie_seed: int) -> dict:
    """Pointing game, deletion and insertion curves of one image's maps. ``base``: the target's probability on
    the intact image and on the all-mean image (the curves' shared end points)."""
    inputs, out = [], {}
    for method, saliency in maps.items():
        out[method] = sm.pointing_hit(saliency, mask)
        deletion, insertion = sm.perturbed_inputs(x, sm.perturbation_order(saliency, tie_seed), steps)
        inputs += [deletion[1:-1], insertion[1:-1]]
    if steps > 1:
        probs = predict(np.ascontiguousarray(np.concatenate(inputs)))[:, target].astype(np.float64)
        probs = probs.reshape(len(maps), 2, steps - 1)
    else:
        probs = np.zeros((len(maps), 2, 0))
    intact, empty = base
    for k, method in enumerate(maps):
        deletion = np.r_[intact, probs[k, 0], empty]
        insertion = np.r_[empty, probs[k, 1], intact]
        out[method].update(deletion=deletion.tolist(), insertion=insertion.tolist(),
                           deletion_auc=sm.curve_auc(deletion), insertion_auc=sm.curve_auc(insertion))
    return out


def localisation(model: ZFNet, data: AnalysisData, indices, s, *, keep: int = 0, progress=None) -> dict:
    """Pointing game, deletion and insertion of every method on ``indices`` (each image's maps for its predicted
    class). The maps of the first ``keep`` images are returned too (``maps``), for the sanity checks."""
    saliency = SaliencyMaps(model, window=s.window, stride=s.faithfulness_stride, units=s.deconv_units,
                            seed=s.seed)
    return localise(saliency, _predictor(model), _ood_scorer(model), model, labels_match(model, data), data,
                    indices, s, keep=keep, progress=progress)


def localise(saliency, predict, scorer, model, match: bool, data: AnalysisData, indices, s, *, keep: int = 0,
             progress=None) -> dict:
    """:func:`localisation` for any maps (``saliency.maps(x, target, index)``), predictor (``predict(batch)`` ->
    probabilities) and out-of-distribution scorer (``(f(batch) -> verdicts, or None; note)``); ``model`` gives the
    preprocessing (``.config``); ``match``: the data's labels are the model's classes."""
    ood, ood_note = scorer
    size = model.config.input_size
    empty_probs = predict(np.zeros((1, 3, size, size), np.float32))[0].astype(np.float64)
    records, kept = [], {}
    for done, index in enumerate(indices, 1):
        x, mask, label = _item(model, data, index)
        probs = predict(x[None])[0].astype(np.float64)
        target = int(probs.argmax())
        verdict = ood(x[None])[0] if ood is not None else None
        maps = saliency.maps(x, target, index)
        scores = score_image(maps, x, mask, target, predict, steps=s.deletion_steps,
                             base=(probs[target], empty_probs[target]), tie_seed=int(index))
        records.append({"index": int(index), "label": int(label), "target": target,
                        "correct": bool(match and target == label), "probability": float(probs[target]),
                        "difficult": sm.is_difficult(mask), "mask_share": float(mask.mean()),
                        "centre": sm.centre_hit(mask), "methods": scores,
                        "ood_score": None if verdict is None else verdict.score,
                        "out_of_distribution": None if verdict is None else verdict.out_of_distribution})
        if done <= keep:
            kept[int(index)] = {"x": x, "target": target, "maps": maps, "mask": mask}
        if progress is not None:
            progress(done, len(indices))
    return {"images": records, "maps": kept, "ood_note": ood_note}


def pointing_summary(records: list[dict], method: str) -> dict:
    """Hit rates of one method: plain and per-class, on all images and on the difficult subset."""
    hits = np.array([r["methods"][method]["hit"] for r in records], dtype=float)
    classes = np.array([r["label"] for r in records])
    hard = np.array([r["difficult"] for r in records], dtype=bool)
    out = {"hit_rate": float(hits.mean()), "per_class": sm.per_class_accuracy(hits, classes),
           "difficult_hit_rate": float(hits[hard].mean()) if hard.any() else float("nan"),
           "difficult_per_class": sm.per_class_accuracy(hits[hard], classes[hard]) if hard.any()
           else float("nan")}
    return out


# ---------------------------------------------------------------------------------------------- sanity checks
def random_logit(saliency: SaliencyMaps, kept: dict, num_classes: int, seed: int, methods=METHODS) -> dict:
    """Per method, the SSIM between each kept image's map of its predicted class and of a random other class
    (drawn with ``(seed, image index)``)."""
    out = {m: [] for m in methods}
    others = {}
    for index, entry in kept.items():
        rng = np.random.default_rng([seed, 7919, index])
        other = int(rng.choice([c for c in range(num_classes) if c != entry["target"]]))
        others[index] = other
        maps = saliency.maps(entry["x"], other, index)
        for m in methods:
            out[m].append(sm.map_ssim(entry["maps"][m], maps[m], signed=True))
    return {"ssim": out, "other_class": others}


def randomisation_step(kept: dict, maps_of, methods, spearman: dict, ssim: dict) -> dict:
    """One step of a cascading randomisation: each kept image's maps under the randomised model (``maps_of(x,
    target, index)``) against its original maps, the Spearman (absolute values) and SSIM of every method appended
    as one row to ``spearman`` and ``ssim``. Returns the first kept image's maps."""
    rows_r, rows_s = {m: [] for m in methods}, {m: [] for m in methods}
    first_maps = None
    for index, entry in kept.items():
        maps = maps_of(entry["x"], entry["target"], index)
        if first_maps is None:
            first_maps = maps
        for m in methods:
            rows_r[m].append(sm.spearman_abs(entry["maps"][m], maps[m]))
            rows_s[m].append(sm.map_ssim(entry["maps"][m], maps[m]))
    for m in methods:
        spearman[m].append(rows_r[m])
        ssim[m].append(rows_s[m])
    return first_maps


def mprt(model: ZFNet, kept: dict, s, *, progress=None) -> dict:
    """Cascading randomisation fc8 -> the first conv: per step and method, the Spearman (absolute values) and SSIM of each
    kept image's map against the original model's; the maps of the first kept image at every step."""
    spearman = {m: [] for m in METHODS}
    ssim = {m: [] for m in METHODS}
    first = next(iter(kept))
    examples = {"original": kept[first]["maps"]}
    for step, (layer, twin) in enumerate(cascading_randomisation(model, seed=s.seed), 1):
        saliency = SaliencyMaps(twin, window=s.window, stride=s.faithfulness_stride, units=s.deconv_units,
                                seed=s.seed)
        examples[layer] = randomisation_step(kept, saliency.maps, METHODS, spearman, ssim)
        if progress is not None:
            progress(step, len(mprt_order(model)))
    return {"layers": list(mprt_order(model)), "spearman": spearman, "ssim": ssim, "example_index": first,
            "examples": examples}


# ---------------------------------------------------------------------------------------------- the analysis
def faithfulness(model: ZFNet, data: AnalysisData, s, *, progress=log) -> dict:
    """The whole analysis on the first ``s.faithfulness_images`` images (MPRT and RandomLogit on the first
    ``s.sanity_images`` of them): per-image records, the table and the sanity-check curves."""
    model.eval()
    n = min(len(data), s.faithfulness_images)
    keep = min(n, s.sanity_images)
    t0 = time.perf_counter()
    local = localisation(model, data, range(n), s, keep=keep,
                         progress=lambda d, t: progress(f"faithfulness: maps and curves {d}/{t}")
                         if d % 10 == 0 or d == t else None)
    t1 = time.perf_counter()
    base = SaliencyMaps(model, window=s.window, stride=s.faithfulness_stride, units=s.deconv_units, seed=s.seed)
    logit = random_logit(base, local["maps"], model.channels()["fc8"], s.seed)
    cascade = mprt(model, local["maps"], s,
                   progress=lambda d, t: progress(f"faithfulness: randomisation step {d}/{t}"))
    t2 = time.perf_counter()
    table = summary_table(local["images"], cascade, logit)
    return {"data": data.describe(), "n": n, "sanity_n": keep, "table": table, "images": local["images"],
            "out_of_distribution": ood_count(local["images"], local["ood_note"]),
            "mprt": cascade, "random_logit": logit, "maps": local["maps"],
            "settings": {"window": s.window, "stride": s.faithfulness_stride, "fill": "mean (0 in input units)",
                         "occlusion_on": "probability", "deconv_units": s.deconv_units,
                         "deletion_steps": s.deletion_steps, "tolerance_px": sm.POINTING_TOLERANCE,
                         "insensitive_spearman": INSENSITIVE_SPEARMAN, "seed": s.seed,
                         "difficult": {"off_centre_fraction": sm.OFF_CENTRE_FRACTION,
                                       "small_area_fraction": sm.SMALL_AREA_FRACTION}},
            "seconds": {"localisation": round(t1 - t0, 1), "sanity": round(t2 - t1, 1)}}


def summary_table(records: list[dict], cascade: dict, logit: dict, methods=METHODS) -> dict:
    """``{method: row}``: pointing (all, difficult), deletion / insertion AUC, MPRT at full randomisation,
    RandomLogit, the insensitivity flag and the checks the method fails."""
    rows = {}
    for method in methods:
        row = pointing_summary(records, method)
        row.update(deletion_auc=float(np.mean([r["methods"][method]["deletion_auc"] for r in records])),
                   insertion_auc=float(np.mean([r["methods"][method]["insertion_auc"] for r in records])),
                   mprt_spearman=float(np.nanmean(cascade["spearman"][method][-1])),
                   mprt_undefined=int(np.isnan(cascade["spearman"][method][-1]).sum()),
                   mprt_ssim=float(np.nanmean(cascade["ssim"][method][-1])),
                   random_logit_ssim=float(np.nanmean(logit["ssim"][method])))
        row["insensitive_to_model"] = bool(row["mprt_spearman"] >= INSENSITIVE_SPEARMAN)
        row["insensitive_to_class"] = bool(row["random_logit_ssim"] >= CLASS_INSENSITIVE_SSIM)
        rows[method] = row
    centre = rows["centre"]
    random = rows["random"]
    for method, row in rows.items():
        if method in MODEL_FREE:       # the scale the others are read against, not a candidate
            row["failed"] = ["baseline: ignores the model and the class"]
            continue
        failed = []
        if row["insensitive_to_model"]:
            failed.append("MPRT")
        if row["insensitive_to_class"]:
            failed.append("RandomLogit")
        if not row["difficult_hit_rate"] > centre["difficult_hit_rate"]:
            failed.append("pointing (difficult) <= centre baseline")
        if not row["deletion_auc"] < random["deletion_auc"]:
            failed.append("deletion >= random map")
        if not row["insertion_auc"] > random["insertion_auc"]:
            failed.append("insertion <= random map")
        row["failed"] = failed
    return rows


def ood_count(records: list[dict], note: str) -> dict:
    """How many of the images were scored, and flagged out of distribution (or why none was scored)."""
    scored = [r for r in records if r.get("out_of_distribution") is not None]
    return {"scored": len(scored), "flagged": sum(bool(r["out_of_distribution"]) for r in scored),
            "note": "" if scored else note}


def ood_text(counts: dict) -> str:
    if not counts["scored"]:
        return f"not scored ({counts['note']})"
    return (f"{counts['flagged']} of {counts['scored']} images scored out of distribution (unlike the model's data: "
            f"their maps explain answers that mean little)")


# ---------------------------------------------------------------------------------------------- the section
TABLE_HEADER = ("method", "pointing game", "per class", "difficult", "difficult per class", "deletion AUC (lower)",
                "insertion AUC (higher)", "MPRT Spearman, all random", "MPRT SSIM, all random", "RandomLogit SSIM",
                "fails")


def method_label(method: str, row: dict) -> str:
    """The method's name as the table prints it; the deconvnet carries its label when the figures bear it out."""
    if method == "deconvnet" and (row["insensitive_to_class"] or row["insensitive_to_model"]):
        return f"{LABELS[method]}: {DECONV_LABEL}"
    return LABELS.get(method, method)


def table_rows(table: dict) -> list[list]:
    pct = lambda v: "n/a" if np.isnan(v) else f"{v:.1%}"  # noqa: E731
    return [[method_label(m, r), pct(r["hit_rate"]), pct(r["per_class"]), pct(r["difficult_hit_rate"]),
             pct(r["difficult_per_class"]), f"{r['deletion_auc']:.3f}", f"{r['insertion_auc']:.3f}",
             f"{r['mprt_spearman']:.3f}" + (" (insensitive)" if r["insensitive_to_model"] else ""),
             f"{r['mprt_ssim']:.3f}", f"{r['random_logit_ssim']:.3f}", "; ".join(r["failed"]) or "none"]
            for m, r in table.items()]


def verdict(table: dict) -> str:
    """Which method the numbers back, in one paragraph built from the table."""
    model_free = set(MODEL_FREE)
    label = lambda m: LABELS.get(m, m)  # noqa: E731
    insensitive = [label(m) for m, r in table.items() if r["insensitive_to_model"]]
    passing = [m for m, r in table.items() if not r["failed"] and m not in model_free]
    ranked = sorted((m for m in table if m not in model_free),
                    key=lambda m: (len(table[m]["failed"]), -table[m]["difficult_per_class"],
                                   table[m]["deletion_auc"]))
    best = ranked[0]
    text = (f"Flagged insensitive to the model (MPRT Spearman >= {INSENSITIVE_SPEARMAN} with every layer "
            f"randomised): {', '.join(insensitive) or 'none'}. ")
    if passing:
        text += f"Passing every check: {', '.join(label(m) for m in passing)}. "
    text += (f"Best supported: {label(best)} (difficult-subset pointing {table[best]['difficult_per_class']:.1%} "
             f"per class vs the centre baseline's {table['centre']['difficult_per_class']:.1%}; deletion AUC "
             f"{table[best]['deletion_auc']:.3f} vs the random map's {table['random']['deletion_auc']:.3f}; "
             f"fails: {'; '.join(table[best]['failed']) or 'none'}).")
    if "deconvnet" not in table:     # an ONNX model: no deconvnet map
        return text
    deconv = table["deconvnet"]
    text += (f" The deconvnet map (RandomLogit SSIM {deconv['random_logit_ssim']:.2f}, MPRT Spearman "
             f"{deconv['mprt_spearman']:.2f}) is "
             + (f"labelled {DECONV_LABEL}." if deconv["insensitive_to_class"] or deconv["insensitive_to_model"]
                else "not shown class-insensitive here."))
    return text


def _write_data(out: Path, result: dict) -> list[str]:
    table, cascade = result["table"], result["mprt"]
    doc = {k: v for k, v in result.items() if k not in ("maps",)}
    doc["mprt"] = {k: v for k, v in cascade.items() if k != "examples"}
    doc["verdict"] = verdict(table)
    files = [write_json(out / "faithfulness.json", doc),
             write_csv(out / "faithfulness.csv", TABLE_HEADER, table_rows(table))]
    rows = [(r["index"], r["label"], r["target"], int(r["difficult"]), int(r["centre"]["hit"]), m,
             int(r["methods"][m]["hit"]), round(r["methods"][m]["distance"], 2),
             round(r["methods"][m]["deletion_auc"], 5), round(r["methods"][m]["insertion_auc"], 5))
            for r in result["images"] for m in METHODS]
    header = ("image", "label", "target", "difficult", "centre_hit", "method", "hit", "distance", "deletion_auc",
              "insertion_auc")
    files.append(write_csv(out / "faithfulness-images.csv", header, rows))
    rows = [(m, layer, float(np.nanmean(cascade["spearman"][m][k])), float(np.nanmean(cascade["ssim"][m][k])))
            for m in METHODS for k, layer in enumerate(cascade["layers"])]
    files.append(write_csv(out / "faithfulness-mprt.csv", ("method", "randomised_down_to", "spearman", "ssim"),
                           rows))
    return files


def section(model, data, out: Path, s) -> Path:
    from . import faithfulness_figures as ff
    if not data.has_masks:
        raise InvalidArgumentError("faithfulness report needs object masks: use --data synthetic or a directory "
                                   "written by `zfserve data synth`", field="data")
    result = faithfulness(model, data, s)
    table = result["table"]
    json_file, csv_file, images_csv, mprt_csv = _write_data(out, result)
    records = {r["index"]: r for r in result["images"]}
    st = result["settings"]
    figures = [
        {"file": ff.maps_figure(out, model, result["maps"], records), "data": [csv_file, images_csv, json_file],
         "table": {"header": list(TABLE_HEADER), "rows": table_rows(table)},
         "caption": (
             f"Each method's map (|map| / max) for the predicted class, the object outlined, the map's maximum "
             f"marked (a hit within {st['tolerance_px']} px of the object). Table: {result['n']} held-out images "
             f"({result['data']}); 'difficult' = object centroid >= {st['difficult']['off_centre_fraction']:.0%} of "
             f"the side from the centre or mask < {st['difficult']['small_area_fraction']:.0%} of the image "
             f"({sum(r['difficult'] for r in result['images'])} images); per class = mean of per-class hit rates; "
             f"deletion / insertion: {st['deletion_steps']} steps, mean-colour fill, probability of the predicted "
             f"class; MPRT and RandomLogit on the first {result['sanity_n']} images. Occlusion: {st['window']} px "
             f"grey (mean) square, stride {st['stride']}, probability drop. Out of distribution: "
             f"{ood_text(result['out_of_distribution'])}. Verdict: {verdict(table)}")},
        {"file": ff.curves_figure(out, result["images"]), "data": [images_csv], "caption": (
            "Mean deletion (left) and insertion (right) curves: the probability of the class predicted on the "
            "intact image as pixels are removed (replaced by the mean colour) or revealed on a mean-colour image "
            "in the order of each map; the random map and the centre baseline give the scale.")},
        {"file": ff.mprt_figure(out, result["mprt"], INSENSITIVE_SPEARMAN), "data": [mprt_csv], "caption": (
            f"Model-parameter randomisation test (cascading, fc8 down to conv1; each layer's weights and biases "
            f"redrawn from a normal with the trained tensor's mean and std): mean similarity to the original "
            f"model's map over {result['sanity_n']} images. A method whose Spearman stays >= {INSENSITIVE_SPEARMAN} "
            f"with every layer random is insensitive to the model; the random map and the centre baseline ignore "
            f"the model by design and must sit at 1 (their lines overlap).")},
        {"file": ff.mprt_maps_figure(out, model, result["mprt"], result["maps"]), "data": [mprt_csv], "caption": (
            f"Image {result['mprt']['example_index']}: each method's map (rows) for the original model and after "
            f"each randomisation step (columns: layers randomised from fc8 down to the named one). Maps that look "
            f"the same with the model destroyed show the image, not the model's decision.")},
    ]
    metrics = {"n": result["n"], "sanity_n": result["sanity_n"], "table": table, "verdict": verdict(table),
               "out_of_distribution": result["out_of_distribution"], "seconds": result["seconds"]}
    return write_section(out, "faithfulness", TITLE, figures, metrics)


def summary(metrics: dict) -> list[tuple[str, str, str]]:
    table = metrics.get("table")
    if not table:
        return []
    occ, centre, random = table["occlusion"], table["centre"], table["random"]
    insensitive = [LABELS[m] for m, r in table.items() if r["insensitive_to_model"]]
    return [("faithfulness: occlusion pointing game vs centre baseline (same images, per class)",
             f"{occ['per_class']:.1%} vs {centre['per_class']:.1%} of {metrics['n']} images",
             "occlusion well above the centre baseline"),
            ("faithfulness: the same on the difficult subset (off-centre or small objects)",
             f"{occ['difficult_per_class']:.1%} vs {centre['difficult_per_class']:.1%}",
             "occlusion well above the centre baseline"),
            ("faithfulness: occlusion deletion / insertion AUC vs the random map",
             f"{occ['deletion_auc']:.3f} / {occ['insertion_auc']:.3f} vs {random['deletion_auc']:.3f} / "
             f"{random['insertion_auc']:.3f}", "deletion lower, insertion higher"),
            ("faithfulness: methods insensitive to the model (MPRT Spearman >= 0.5, all layers random)",
             ", ".join(insensitive) or "none", "only the model-free random map and centre baseline"),
            *([("faithfulness: images outside the model's data (out-of-distribution score above its threshold)",
                ood_text(metrics["out_of_distribution"]), "few on held-out data (about 5% by the threshold's "
                                                           "design)")] if "out_of_distribution" in metrics else [])]
