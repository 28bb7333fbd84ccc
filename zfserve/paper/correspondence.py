"""Correspondence analysis (Table 1 of the published version): occlude the same face part (or a random region
of the same size) in every aligned face image, and score how consistently the feature vectors change."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import _checks as checks
from ..data import CLASSES
from ..errors import InvalidArgumentError
from ..model import ZFNet, build
from ..preprocess import preprocess_config, to_display
from .dataset import AnalysisData, Item, features
from .figures import hide_ticks, plt as pyplot, save, write_csv, write_json, write_section

TITLE = "Correspondence analysis (Table 1)"
PARTS = ("right_eye", "left_eye", "nose")                # the paper's Table 1 rows, plus "random"


def aligned_face(item: Item, config, margin: float = 1.5) -> tuple[np.ndarray, dict]:
    """A face image cropped around the face and resized to the network input, as the paper's frontal dog
    images are: a square ``margin`` times the face's extent, centred on it (outside the image: mean colour).
    Returns (float32 (3, crop, crop) input, part boxes in input pixels)."""
    pre = preprocess_config(config)
    if item.mask is None or not item.mask.any() or not item.parts:
        raise InvalidArgumentError("correspondence needs face images with masks and part boxes "
                                   "(the synthetic set, or a directory with annotations.json)", field="data")
    ys, xs = np.nonzero(item.mask)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    side = margin * max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())
    x0, y0 = cx - side / 2, cy - side / 2
    scale = pre.crop / side
    fill = tuple(int(round(v)) for v in pre.mean_rgb())
    pil = Image.fromarray(item.image).transform((pre.crop, pre.crop), Image.AFFINE,
                                                (1 / scale, 0, x0, 0, 1 / scale, y0),
                                                resample=Image.BILINEAR, fillcolor=fill)
    rgb = np.asarray(pil).transpose(2, 0, 1).astype(np.float32)
    x = pre.normalize(rgb, channel_mean=True)
    boxes = {}
    for name, (bx0, by0, bx1, by1) in item.parts.items():
        boxes[name] = tuple(int(np.clip(v, 0, pre.crop)) for v in
                            (math.floor((bx0 - x0) * scale), math.floor((by0 - y0) * scale),
                             math.ceil((bx1 - x0) * scale), math.ceil((by1 - y0) * scale)))
    return x, boxes


def hamming_score(eps: np.ndarray) -> tuple[float, float, np.ndarray]:
    """The paper's consistency score for rows ``eps`` (N, D): for every pair i < j the Hamming distance between
    sign(eps_i) and sign(eps_j), normalized by D. Returns (mean, std, the pair values)."""
    signs = np.sign(np.asarray(eps))
    n = len(signs)
    if n < 2:
        raise InvalidArgumentError("correspondence needs at least 2 images", field="n")
    values = np.array([(signs[i] != signs[j]).mean() for i in range(n) for j in range(i + 1, n)])
    return float(values.mean()), float(values.std()), values


def correspondence(model: ZFNet, data: AnalysisData, indices, *, parts=PARTS, layers=None,
                   seed: int = 0, batch: int = 16) -> dict:
    """Table 1: occlude the same part (or a random region of the same size) in every face image; per layer the
    sign-consistency score of the feature changes over image pairs (lower = more consistent).

    The occluder fills the part's box with the mean (0 in input units). Random regions: per image, a box of
    the mean size of that image's part boxes at a uniformly drawn position (``seed``).
    Returns ``{"rows": {part: {layer: {"mean", "std"}}}, "pairs": {part: {layer: [...]}}, ...}``.
    """
    layers = (model.last_conv, "fc7") if layers is None else layers   # the paper's Table 1: conv5 and fc7
    for layer in layers:
        checks.layer(layer, model.layer_names)
    indices = [int(i) for i in indices]
    faces = [aligned_face(data.item(i), model.config) for i in indices]
    x = np.stack([f[0] for f in faces])
    base = features(model, x, layers, batch)
    rng = np.random.default_rng(seed)
    size = x.shape[-1]
    rows, pairs, boxes = {}, {}, {}
    for part in (*parts, "random"):
        occluded = x.copy()
        boxes[part] = []
        for i, (_, part_boxes) in enumerate(faces):
            if part == "random":
                sizes = np.array([(b[2] - b[0], b[3] - b[1]) for b in part_boxes.values()], dtype=float)
                bw, bh = np.maximum(1, np.rint(sizes.mean(axis=0))).astype(int)
                bx, by = int(rng.integers(0, size - bw + 1)), int(rng.integers(0, size - bh + 1))
                box = (bx, by, bx + bw, by + bh)
            else:
                if part not in part_boxes:
                    raise InvalidArgumentError(f"parts: {part!r} is not annotated; annotated: "
                                               f"{sorted(part_boxes)}", field="parts")
                box = part_boxes[part]
            occluded[i, :, box[1]:box[3], box[0]:box[2]] = 0.0
            boxes[part].append(list(box))
        feats = features(model, occluded, layers, batch)
        rows[part], pairs[part] = {}, {}
        for layer in layers:
            mean, std, values = hamming_score(base[layer] - feats[layer])
            rows[part][layer] = {"mean": mean, "std": std}
            pairs[part][layer] = values.tolist()
    return {"rows": rows, "pairs": pairs, "boxes": boxes, "indices": indices, "layers": list(layers),
            "inputs": x}


def section(model, data, out: Path, s) -> Path:
    plt = pyplot()
    if "face" not in data.classes:
        raise InvalidArgumentError("correspondence needs face images: use --data synthetic or a directory with "
                                   "a 'face' class and annotations.json", field="data")
    if data.source == "synthetic":   # faces are every 11th synthetic image: look past --n if needed
        data = AnalysisData("synthetic", seed=data.seed, n=max(len(data), len(CLASSES) * s.correspondence_images))
    faces = data.indices_of(data.classes.index("face"))[:s.correspondence_images]
    if len(faces) < 2:
        raise InvalidArgumentError(f"correspondence needs at least 2 face images; --n {len(data)} gives "
                                   f"{len(faces)} (every {len(CLASSES)}th synthetic image is a face)", field="n")
    result = correspondence(model, data, faces, seed=s.seed)
    # Control: the same architecture at its initialization. Aligned faces put each part at nearly the same
    # place, so even random filters change consistently there; a trained model should beat this baseline.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = build(model.config).eval()
    control = correspondence(untrained, data, faces, seed=s.seed)
    layers = result["layers"]
    rows = [(part, *[f"{result['rows'][part][l]['mean']:.4f}" for l in layers],
             *[f"{result['rows'][part][l]['std']:.4f}" for l in layers]) for part in result["rows"]]
    write_csv(out / "correspondence.csv", ("occluded", *[f"{l}_mean" for l in layers],
                                           *[f"{l}_std" for l in layers]), rows)
    write_json(out / "correspondence.json", {k: v for k, v in result.items() if k != "inputs"}
               | {"untrained_control": control["rows"]})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.3]})
    parts = list(result["rows"])
    width = 0.8 / len(layers)
    for i, layer in enumerate(layers):
        axes[0].bar(np.arange(len(parts)) + i * width, [result["rows"][p][layer]["mean"] for p in parts], width,
                    yerr=[result["rows"][p][layer]["std"] for p in parts], capsize=3, label=layer)
    axes[0].set_xticks(np.arange(len(parts)) + width * (len(layers) - 1) / 2, parts)
    axes[0].set_xlabel("occluded region")
    axes[0].set_ylabel("normalized Hamming distance of sign(eps), mean +- std over pairs")
    for i, layer in enumerate(layers):
        axes[0].plot(np.arange(len(parts)) + i * width, [control["rows"][p][layer]["mean"] for p in parts], "kx",
                     markersize=9, zorder=3, label="untrained control" if i == 0 else None)
    axes[0].legend()
    shown = []
    for j in range(min(5, len(faces))):
        img = to_display(result["inputs"][j], model.config).copy()
        for part, colour in zip(parts, ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))):
            x0, y0, x1, y1 = result["boxes"][part][j]
            img[y0:y1, [x0, max(x0, x1 - 1)]] = colour
            img[[y0, max(y0, y1 - 1)], x0:x1] = colour
        shown.append(img)
    axes[1].imshow(np.concatenate(shown, axis=1))
    axes[1].set_xlabel("aligned face images; boxes: right eye (red), left eye (green), nose (blue), "
                       "random (yellow)", fontsize=8)
    hide_ticks(axes[1])
    png = save(fig, out / "correspondence.png")
    table = {part: {layer: result["rows"][part][layer] for layer in layers} for part in parts}
    conv = layers[0]
    metrics = {"table": table, "untrained_control": control["rows"], "images": len(faces),
               f"parts_below_random_{conv}": all(table[p][conv]["mean"] < table["random"][conv]["mean"]
                                                 for p in parts if p != "random")}
    caption = (f"{len(faces)} face images, cropped around the face (as the paper's frontal dog images). The same "
               f"part, or a random region of the same size, is filled with the mean in each; eps is the change of "
               f"the {' / '.join(layers)} feature vector. Bars: the normalized Hamming distance between sign(eps) "
               f"of two images, mean +- std over all pairs. Lower than 'random' means occluding that part changes "
               f"the representation the same way in every image: the model corresponds the part implicitly. "
               f"Crosses: the same architecture untrained (a control: aligned parts sit at nearly the same place in "
               f"every image, which alone makes the changes agree).")
    return write_section(out, "correspondence", TITLE,
                         [{"file": png, "data": ["correspondence.json", "correspondence.csv"], "caption": caption,
                           "table": {"header": ["occluded", *[f"{l} (mean +- std)" for l in layers],
                                                *[f"{l} untrained" for l in layers]],
                                     "rows": [[p, *[f"{table[p][l]['mean']:.3f} +- {table[p][l]['std']:.3f}"
                                               for l in layers],
                                               *[f"{control['rows'][p][l]['mean']:.3f}" for l in layers]]
                                              for p in parts]}}], metrics)


def summary(metrics: dict) -> list[tuple[str, str, str]]:
    if "table" not in metrics:
        return []
    layer = next(iter(metrics["table"]["random"]))
    parts = ", ".join(f"{p} {v[layer]['mean']:.3f}" for p, v in metrics["table"].items() if p != "random")
    return [(f"correspondence at {layer}: parts vs random region",
             f"{parts}; random {metrics['table']['random'][layer]['mean']:.3f}", "every part < random")]
