"""Paper Fig. 5: how feature vectors and the true class's probability change under vertical translation,
scale and rotation of the input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .. import _checks as checks
from ..errors import InvalidArgumentError
from ..model import ZFNet
from ..preprocess import to_input
from .dataset import AnalysisData, features, labels_match
from .figures import plt as pyplot, save, write_csv, write_json, write_section

TITLE = "Invariance to translation, scale and rotation (Fig. 5)"
# The paper's transform ranges (Fig. 5); steps are coarser than the paper's plots to keep CPU runs short.
TRANSLATIONS = tuple(range(-60, 61, 10))                 # vertical, pixels of the 256 image
SCALES = tuple(np.round(np.linspace(1.0, 1.8, 9), 2))
ROTATIONS = tuple(range(0, 360, 30))                     # degrees
TRANSFORMS = ("translation", "scale", "rotation")
IDENTITY = {"translation": 0.0, "scale": 1.0, "rotation": 0.0}     # the amount that leaves an image as it is


def transform_image(image: np.ndarray, kind: str, amount: float, fill) -> np.ndarray:
    """uint8 (H, W, 3) under one of the paper's transforms, same size, exposed pixels set to ``fill`` (RGB).

    ``translation``: vertical shift by ``amount`` pixels (positive = down); ``scale``: zoom about the centre by
    ``amount`` (>= 1 crops in); ``rotation``: ``amount`` degrees counter-clockwise about the centre.
    """
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    fill = tuple(int(round(v)) for v in fill)
    if kind == "translation":
        # affine maps output (x, y) to input (x, y - dy)
        return np.asarray(pil.transform((w, h), Image.AFFINE, (1, 0, 0, 0, 1, -float(amount)),
                                        resample=Image.BILINEAR, fillcolor=fill))
    if kind == "scale":
        if amount <= 0:
            raise InvalidArgumentError(f"scale: {amount} must be > 0", field="scale")
        s = float(amount)
        cx, cy = w / 2, h / 2
        return np.asarray(pil.transform((w, h), Image.AFFINE, (1 / s, 0, cx - cx / s, 0, 1 / s, cy - cy / s),
                                        resample=Image.BILINEAR, fillcolor=fill))
    if kind == "rotation":
        return np.asarray(pil.rotate(float(amount), resample=Image.BILINEAR, fillcolor=fill))
    raise InvalidArgumentError(f"transform: {kind!r}; accepted: {', '.join(TRANSFORMS)}", field="transform")


def default_amounts(kind: str) -> tuple:
    return {"translation": TRANSLATIONS, "scale": SCALES, "rotation": ROTATIONS}[kind]


def invariance(model: ZFNet, data: AnalysisData, indices, *, transforms=TRANSFORMS, amounts=None,
               layers=None, batch: int = 16) -> dict:
    """Paper Fig. 5. For each image and transform amount: the Euclidean distance between the feature vectors
    of the original and the transformed image at each of ``layers``, the same distance relative to the
    original's norm, and the probability of the image's true label (its label if the data's classes are the
    model's, else the model's top-1 class on the original).

    Returns ``{kind: {"amounts", "distance": {layer: (N, A)}, "relative": {layer: (N, A)},
    "probability": (N, A)}}`` plus ``"indices"`` and ``"labels"``.
    """
    layers = (model.conv_layers[0], "fc7") if layers is None else layers   # the paper's: conv1 and fc7
    for layer in layers:
        checks.layer(layer, model.layer_names)
    indices = [int(i) for i in indices]
    if not indices:
        raise InvalidArgumentError("indices: give at least one image", field="indices")
    amounts = amounts or {}
    fill = model.config.preprocess.mean_rgb()
    items = [data.item(i) for i in indices]
    originals = np.stack([to_input(it.image, model.config) for it in items])
    base = features(model, originals, layers, batch)
    if labels_match(model, data):
        targets = np.array([it.label for it in items])
    else:
        targets = base["prob"].argmax(1)
    out = {"indices": indices, "labels": targets.tolist(), "layers": list(layers)}
    for kind in transforms:
        values = list(amounts.get(kind, default_amounts(kind)))
        x = np.stack([to_input(transform_image(it.image, kind, a, fill), model.config)
                      for it in items for a in values])
        feats = features(model, x, layers, batch)
        n, a = len(items), len(values)
        result = {"amounts": [float(v) for v in values], "distance": {}, "relative": {}}
        for layer in layers:
            f = feats[layer].reshape(n, a, -1)
            d = np.linalg.norm(f - base[layer][:, None, :], axis=2)
            norm = np.linalg.norm(base[layer], axis=1)[:, None]
            result["distance"][layer] = d
            result["relative"][layer] = d / np.where(norm > 0, norm, 1.0)
        result["probability"] = feats["prob"].reshape(n, a, -1)[np.arange(n), :, targets]
        out[kind] = result
    return out


def growth_share(distance: np.ndarray, amounts, identity: float) -> float:
    """How early a distance curve reaches its scale: mean over the amounts other than ``identity`` of
    d / max(d), averaged over images (1 = jumps to its maximum at once; a linear rise from 0 gives about 0.5).
    Lower = grows more slowly relative to its own scale."""
    d = np.asarray(distance, dtype=np.float64)
    moved = np.abs(np.asarray(amounts, dtype=np.float64) - identity) > 1e-9
    peak = d.max(axis=1, keepdims=True)
    share = np.where(peak > 0, d / np.where(peak > 0, peak, 1.0), 0.0)
    return float(share[:, moved].mean())


def section(model, data, out: Path, s) -> Path:
    plt = pyplot()
    indices = list(range(min(s.invariance_images, len(data))))
    result = invariance(model, data, indices, amounts=s.amounts, batch=s.batch)
    low, high = result["layers"]
    fig, axes = plt.subplots(3, 3, figsize=(13, 10), squeeze=False, constrained_layout=True)
    units = {"translation": "vertical translation (pixels)", "scale": "scale factor", "rotation":
             "rotation (degrees)"}
    rows, metrics = [], {}
    for col, kind in enumerate(TRANSFORMS):
        r = result[kind]
        amounts = r["amounts"]
        for row, (what, values) in enumerate(((f"{low} distance", r["distance"][low]),
                                              (f"{high} distance", r["distance"][high]),
                                              ("P(true class)", r["probability"]))):
            ax = axes[row, col]
            for i, index in enumerate(indices):
                ax.plot(amounts, values[i], marker=".", label=f"image {index}")
            ax.set_xlabel(units[kind])
            ax.set_ylabel(what if what.startswith("P") else f"Euclidean {what}")
            if row == 0:
                ax.set_title(kind)
        axes[0, 0].legend(fontsize=7)
        share = {layer: growth_share(r["distance"][layer], amounts, IDENTITY[kind]) for layer in (low, high)}
        metrics[kind] = {"growth_share": share,
                         "mean_relative_distance": {layer: float(r["relative"][layer].mean()) for layer in (low, high)}}
        for i, index in enumerate(indices):
            for a, amount in enumerate(amounts):
                rows.append((kind, amount, index, float(r["distance"][low][i, a]), float(r["distance"][high][i, a]),
                             float(r["relative"][low][i, a]), float(r["relative"][high][i, a]),
                             float(r["probability"][i, a])))
    fig.suptitle("Invariance: feature distance to the untransformed image and true-class probability")
    png = save(fig, out / "invariance.png")
    write_csv(out / "invariance.csv", ("transform", "amount", "image", f"{low}_distance", f"{high}_distance",
                                       f"{low}_relative", f"{high}_relative", "p_true"), rows)
    metrics["translation_layer7_grows_slower"] = bool(metrics["translation"]["growth_share"][high]
                                                      < metrics["translation"]["growth_share"][low])
    metrics["images"] = indices
    metrics["targets"] = result["labels"]
    write_json(out / "invariance.json", metrics)
    caption = (f"Columns: vertical translation, scale, rotation of {len(indices)} images (one line each). Top "
               f"row: Euclidean distance between the {low} feature vectors of the transformed and original image; "
               f"middle: the same at {high}; bottom: probability of the true class. {low} changes at once and a "
               f"lot; {high} should change gradually (quasi-linearly for translation and scale); a flat "
               f"probability means the output is invariant to that transform. growth_share in invariance.json is "
               f"the mean of d / max(d) over non-identity amounts (lower = grows more slowly).")
    return write_section(out, "invariance", TITLE,
                         [{"file": png, "data": ["invariance.json", "invariance.csv"], "caption": caption}], metrics)


def summary(metrics: dict) -> list[tuple[str, str, str]]:
    if "translation" not in metrics:
        return []
    share = metrics["translation"]["growth_share"]
    low, high = list(share)
    return [(f"translation: growth share of the distance, {low} vs {high}",
             f"{share[low]:.3f} vs {share[high]:.3f}", f"{high} < {low} (grows more slowly)")]
