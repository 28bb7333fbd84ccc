"""The paper's analyses (Zeiler & Fergus 2014, §3-4) as plain functions over a model and a dataset.

- :func:`top_activations` / :func:`top9`: the k strongest activations of feature maps across a dataset (Fig. 2),
  streamed in batches with one bounded min-heap per map, then projected with the deconvnet.
- :func:`invariance`: feature distances and true-class probability under translation, scale, rotation (Fig. 5).
- :func:`correspondence`: the part-occlusion sign-consistency score (Table 1 of the published version).
- :func:`pointing_game` and :func:`deconv_mask_energy`: whether occlusion and deconv point at the object.
- :func:`architecture_runs`: short training runs of a 7x7/2 vs an AlexNet-style 11x11/4 first layer, with and
  without RMS clipping, and the statistics of their layer-1 filters (Fig. 6).
- :func:`load_evolution`: the feature-evolution data (Fig. 4) that ``zfserve train --evolution`` recorded.

Everything returns numpy arrays and JSON-ready dicts; :mod:`zfserve.report` draws them.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..config import IMAGENET_MEAN_RGB
from ..errors import InvalidArgumentError, NotFoundError
from ..model import CONV_LAYERS, LAYER_NAMES, LRN_PARAMS, POOL_GEOMETRY, ZFNet
from ..preprocess import _preprocess_config, decode_image, resize_and_crop, to_input

# The paper's transform ranges (Fig. 5); steps are coarser than the paper's plots to keep CPU runs short.
TRANSLATIONS = tuple(range(-60, 61, 10))                 # vertical, pixels of the 256 image
SCALES = tuple(np.round(np.linspace(1.0, 1.8, 9), 2))
ROTATIONS = tuple(range(0, 360, 30))                     # degrees
TRANSFORMS = ("translation", "scale", "rotation")
IDENTITY = {"translation": 0.0, "scale": 1.0, "rotation": 0.0}     # the amount that leaves an image as it is
PARTS = ("right_eye", "left_eye", "nose")                # the paper's Table 1 rows, plus "random"
POINTING_TOLERANCE = 15                                  # pixels, the pointing game's usual tolerance


# ------------------------------------------------------------------------------------------------- data
@dataclass
class Item:
    """One image of an analysis set: raw uint8 (H, W, 3), label, object mask (bool (H, W)) and part boxes."""

    image: np.ndarray
    label: int
    mask: np.ndarray | None = None
    parts: dict = field(default_factory=dict)


class AnalysisData:
    """An indexable image set with labels and, where known, object masks and face-part boxes.

    ``source``: ``"synthetic"`` (images ``0..n-1`` of synthetic seed ``seed``, rendered on demand) or a
    directory: an ImageFolder tree (``DIR/<class>/<image>``), with masks and parts when it holds the
    ``annotations.json`` that ``zfserve data synth`` writes.
    """

    def __init__(self, source: str = "synthetic", *, seed: int = 3, n: int = 200):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InvalidArgumentError(f"n: {n!r} out of range; accepted: >= 1", field="n")
        self.source, self.seed = str(source), int(seed)
        if self.source == "synthetic":
            from ..data import CLASSES
            if self.seed < 0:
                raise InvalidArgumentError(f"seed: {seed} out of range; accepted: >= 0", field="seed")
            self.classes = list(CLASSES)
            self._files = None
            self.n = int(n)
            return
        root = Path(self.source)
        if not root.is_dir():
            raise NotFoundError(f"data: {root} is not a directory; accepted: 'synthetic' or an ImageFolder "
                                f"directory", field="data")
        annotations = root / "annotations.json"
        if annotations.is_file():
            records = json.loads(annotations.read_text())
            self._files = [(root / r["file"], int(r["label"]), root / r["mask"] if r.get("mask") else None,
                            r.get("parts") or {}) for r in records]
            from ..data import CLASSES
            names = {int(r["label"]): r.get("class") or Path(r["file"]).parent.name for r in records}
            if all(0 <= i < len(CLASSES) and CLASSES[i] == name for i, name in names.items()):
                self.classes = list(CLASSES)   # a `zfserve data synth` dump: the synthetic labels
            else:
                self.classes = [names.get(i, f"class_{i}") for i in range(max(names) + 1)] if names else []
        else:
            from ..data import IMAGE_SUFFIXES
            self.classes = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "masks")
            self._files = [(f, label, None, {}) for label, c in enumerate(self.classes)
                           for f in sorted((root / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self._files:
            raise NotFoundError(f"data: no images under {root}/<class>/", field="data")
        self.n = min(int(n), len(self._files))

    def __len__(self) -> int:
        return self.n

    @property
    def has_masks(self) -> bool:
        return self._files is None or any(f[2] is not None for f in self._files[:self.n])

    def describe(self) -> str:
        return f"synthetic seed {self.seed}, {self.n} images" if self._files is None else \
            f"{self.source}, {self.n} images"

    def item(self, index: int) -> Item:
        if not 0 <= index < self.n:
            raise IndexError(index)
        if self._files is None:
            from ..data import render
            sample = render(self.seed, index)
            return Item(sample.image, sample.label, sample.mask, dict(sample.parts))
        path, label, mask_path, parts = self._files[index]
        image = decode_image(path, field=f"data {path}")
        mask = None
        if mask_path is not None:
            mask = decode_image(mask_path, field=f"data {mask_path}")[..., 0] >= 128
        return Item(image, label, mask, dict(parts))

    def labels(self) -> np.ndarray:
        if self._files is None:
            from ..data import label_of
            return np.array([label_of(i) for i in range(self.n)], dtype=np.int64)
        return np.array([f[1] for f in self._files[:self.n]], dtype=np.int64)

    def inputs(self, indices, config) -> np.ndarray:
        """Network inputs float32 (B, 3, crop, crop) through the model's own preprocessing."""
        return np.stack([to_input(self.item(int(i)).image, config) for i in indices])

    def indices_of(self, label: int) -> list[int]:
        return [i for i, lab in enumerate(self.labels().tolist()) if lab == label]


def input_frame(shape: tuple[int, int], config) -> tuple[float, float, int, int]:
    """How raw-image pixel coordinates map to network-input coordinates under ``resize_and_crop``:
    ``(scale_x, scale_y, left, top)`` with ``x_in = x * scale_x - left``."""
    pre = _preprocess_config(config)
    h, w = shape
    sx = sy = 1.0
    if min(h, w) != pre.resize:
        scale = pre.resize / min(h, w)
        nw, nh = max(pre.resize, round(w * scale)), max(pre.resize, round(h * scale))
        sx, sy, w, h = nw / w, nh / h, nw, nh
    return sx, sy, (w - pre.crop) // 2, (h - pre.crop) // 2


def mask_to_input(mask: np.ndarray, config) -> np.ndarray:
    """An object mask (bool, raw-image frame) -> bool (crop, crop) in the network input's frame."""
    pre = _preprocess_config(config)
    rgb = np.repeat((np.asarray(mask, dtype=np.uint8) * 255)[..., None], 3, axis=2)
    return resize_and_crop(rgb, pre.resize, pre.crop)[..., 0] >= 128


def box_to_input(box, shape: tuple[int, int], config) -> tuple[int, int, int, int]:
    """A box ``[x0, y0, x1, y1]`` in the raw image -> the same box in input pixels, clipped to the crop."""
    pre = _preprocess_config(config)
    sx, sy, left, top = input_frame(shape, config)
    x0, y0, x1, y1 = box
    clip = lambda v: int(min(pre.crop, max(0, v)))  # noqa: E731
    return (clip(math.floor(x0 * sx - left)), clip(math.floor(y0 * sy - top)),
            clip(math.ceil(x1 * sx - left)), clip(math.ceil(y1 * sy - top)))


def labels_match(model: ZFNet, data: AnalysisData) -> bool:
    """Whether the data's class list is the model's (so a label indexes the model's outputs)."""
    return list(model.config.class_names) == list(data.classes)


def _check_layer(layer: str, allowed=LAYER_NAMES) -> None:
    if layer not in allowed:
        raise InvalidArgumentError(f"layer: {layer!r} not accepted; accepted: {', '.join(allowed)}", field="layer")


@torch.no_grad()
def _features(model: ZFNet, x: np.ndarray | torch.Tensor, layers, batch: int = 16) -> dict[str, np.ndarray]:
    """Flattened activations of ``layers`` (N, D) plus ``"prob"`` (N, C) softmax, in eval mode."""
    model.eval()
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    out = {name: [] for name in (*layers, "prob")}
    for start in range(0, len(x), batch):
        trace = model.trace(x[start:start + batch], layers=tuple(layers))
        for name in layers:
            out[name].append(trace.activations[name].flatten(1).double().numpy())
        out["prob"].append(torch.softmax(trace.logits.double(), dim=1).numpy())
    return {name: np.concatenate(v) for name, v in out.items()}


# ------------------------------------------------------------------------------------------------- top-k
@dataclass(frozen=True, order=True)
class TopUnit:
    """One entry of a map's top list: its activation and where (dataset image, position in the map)."""

    activation: float
    image_index: int
    y: int
    x: int


@torch.no_grad()
def top_activations(model: ZFNet, data: AnalysisData, layer, maps=None, *, k: int = 9, batch: int = 16,
                    progress=None) -> dict:
    """For each feature map of ``layer`` (all, or the channels ``maps``), the ``k`` strongest activations
    across ``data``, at most one per image (its strongest position), strongest first: ``{channel: [TopUnit]}``.

    ``layer`` may also be a dict ``{layer: maps}``: then every layer is served by the same single pass over the
    data and the result is ``{layer: {channel: [TopUnit]}}``.

    The dataset is streamed in batches; each map keeps a min-heap of at most ``k`` entries, so memory does not
    grow with the dataset. Ties go to the earlier image, then the first position (row-major).
    """
    several = isinstance(layer, dict)
    wanted = dict(layer) if several else {layer: maps}
    infos = {info.name: info for info in model.layer_info()}
    for name in list(wanted):
        _check_layer(name, CONV_LAYERS + ("pool1", "pool2", "pool5"))
        channels = infos[name].shape[0]
        chosen = list(range(channels)) if wanted[name] is None else [int(c) for c in wanted[name]]
        if not chosen or any(not 0 <= c < channels for c in chosen):
            raise InvalidArgumentError(f"maps: channels of {name} must be in 0..{channels - 1}, got {chosen}",
                                       field="maps")
        wanted[name] = chosen
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(data):
        raise InvalidArgumentError(f"k: {k!r} out of range; accepted 1..{len(data)} (the dataset's images)",
                                   field="k")
    model.eval()
    deepest = max(wanted, key=LAYER_NAMES.index)
    # Heap entries (activation, -image_index, position): the smallest is the one to evict, and among equal
    # activations the later image goes first.
    heaps = {name: [[] for _ in chosen] for name, chosen in wanted.items()}
    widths = {name: infos[name].shape[2] for name in wanted}
    for start in range(0, len(data), batch):
        stop = min(len(data), start + batch)
        x = torch.from_numpy(data.inputs(range(start, stop), model.config))
        trace = model.trace(x, layers=tuple(wanted), stop_after=deepest)
        for name, chosen in wanted.items():
            acts = trace.activations[name][:, torch.tensor(chosen)]
            best, pos = acts.flatten(2).max(dim=2)             # (B, M): first maximum per image and map
            top_val, top_img = best.topk(min(k, stop - start), dim=0)  # only these can enter a heap of size k
            for m, heap in enumerate(heaps[name]):
                for value, row in zip(top_val[:, m].tolist(), top_img[:, m].tolist()):
                    entry = (float(value), -(start + row), int(pos[row, m]))
                    if len(heap) < k:
                        heapq.heappush(heap, entry)
                    elif entry > heap[0]:
                        heapq.heapreplace(heap, entry)
        if progress is not None:
            progress(stop, len(data))
    out = {}
    for name, chosen in wanted.items():
        w = widths[name]
        out[name] = {c: [TopUnit(value, -neg, p // w, p % w) for value, neg, p in sorted(heap, reverse=True)]
                     for c, heap in zip(chosen, heaps[name])}
    return out if several else out[layer]


def top9(model: ZFNet, data: AnalysisData, layer, maps=None, *, k: int = 9, batch: int = 16, progress=None):
    """:func:`top_activations` plus the deconv projection and input patch of each entry (paper Fig. 2).

    Returns ``{channel: [UnitProjection, ...]}`` (strongest first; ``image_index`` is the dataset's), or
    ``{layer: {channel: [...]}}`` when ``layer`` is a dict ``{layer: maps}``.
    """
    from .deconv import DeconvEngine
    several = isinstance(layer, dict)
    wanted = layer if several else {layer: maps}
    tops = top_activations(model, data, dict(wanted), k=k, batch=batch, progress=progress)
    engine = DeconvEngine(model)
    out = {}
    for name, per_map in tops.items():
        images = sorted({u.image_index for units in per_map.values() for u in units})
        local = {n: i for i, n in enumerate(images)}
        units = [(local[u.image_index], c, u.y, u.x) for c, lst in per_map.items() for u in lst]
        projected = engine.project(data.inputs(images, model.config), name, units=units)
        by_key = {(p.image_index, p.channel, p.y, p.x): p for p in projected}
        out[name] = {}
        for c, lst in per_map.items():
            out[name][c] = []
            for u in lst:
                p = by_key[(local[u.image_index], c, u.y, u.x)]
                p.image_index = u.image_index
                out[name][c].append(p)
    return out if several else out[layer]


# ------------------------------------------------------------------------------------------------- invariance
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
               layers=("conv1", "fc7"), batch: int = 16) -> dict:
    """Paper Fig. 5. For each image and transform amount: the Euclidean distance between the feature vectors
    of the original and the transformed image at each of ``layers``, the same distance relative to the
    original's norm, and the probability of the image's true label (its label if the data's classes are the
    model's, else the model's top-1 class on the original).

    Returns ``{kind: {"amounts", "distance": {layer: (N, A)}, "relative": {layer: (N, A)},
    "probability": (N, A)}}`` plus ``"indices"`` and ``"labels"``.
    """
    for layer in layers:
        _check_layer(layer)
    indices = [int(i) for i in indices]
    if not indices:
        raise InvalidArgumentError("indices: give at least one image", field="indices")
    amounts = amounts or {}
    fill = model.config.preprocess.mean_rgb()
    items = [data.item(i) for i in indices]
    originals = np.stack([to_input(it.image, model.config) for it in items])
    base = _features(model, originals, layers, batch)
    if labels_match(model, data):
        targets = np.array([it.label for it in items])
    else:
        targets = base["prob"].argmax(1)
    out = {"indices": indices, "labels": targets.tolist(), "layers": list(layers)}
    for kind in transforms:
        values = list(amounts.get(kind, default_amounts(kind)))
        x = np.stack([to_input(transform_image(it.image, kind, a, fill), model.config)
                      for it in items for a in values])
        feats = _features(model, x, layers, batch)
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


# ------------------------------------------------------------------------------------------------- correspondence
def aligned_face(item: Item, config, margin: float = 1.5) -> tuple[np.ndarray, dict]:
    """A face image cropped around the face and resized to the network input, as the paper's frontal dog
    images are: a square ``margin`` times the face's extent, centred on it (outside the image: mean colour).
    Returns (float32 (3, crop, crop) input, part boxes in input pixels)."""
    pre = _preprocess_config(config)
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
    x = rgb - np.asarray(pre.mean_rgb(), dtype=np.float32).reshape(3, 1, 1)
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


def correspondence(model: ZFNet, data: AnalysisData, indices, *, parts=PARTS, layers=("conv5", "fc7"),
                   seed: int = 0, batch: int = 16) -> dict:
    """Table 1: occlude the same part (or a random region of the same size) in every face image; per layer the
    sign-consistency score of the feature changes over image pairs (lower = more consistent).

    The occluder fills the part's box with the mean (0 in input units). Random regions: per image, a box of
    the mean size of that image's part boxes at a uniformly drawn position (``seed``).
    Returns ``{"rows": {part: {layer: {"mean", "std"}}}, "pairs": {part: {layer: [...]}}, ...}``.
    """
    for layer in layers:
        _check_layer(layer)
    indices = [int(i) for i in indices]
    faces = [aligned_face(data.item(i), model.config) for i in indices]
    x = np.stack([f[0] for f in faces])
    base = _features(model, x, layers, batch)
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
        feats = _features(model, occluded, layers, batch)
        rows[part], pairs[part] = {}, {}
        for layer in layers:
            mean, std, values = hamming_score(base[layer] - feats[layer])
            rows[part][layer] = {"mean": mean, "std": std}
            pairs[part][layer] = values.tolist()
    return {"rows": rows, "pairs": pairs, "boxes": boxes, "indices": indices, "layers": list(layers),
            "inputs": x}


# ------------------------------------------------------------------------------------------------- object localization
def pointing_game(model: ZFNet, data: AnalysisData, indices, *, window: int = 48, stride: int = 16,
                  tolerance: int = POINTING_TOLERANCE, engine=None, progress=None) -> dict:
    """Occlusion pointing game: for each image, the window position where the true class's probability is
    lowest; a hit when its centre lies within ``tolerance`` pixels of the object mask (input frame).

    Targets are the data's labels when its classes are the model's, else the model's top-1 class.
    ``engine``: an :class:`~zfserve.engine.occlusion.OcclusionEngine` of ``model`` to reuse.
    Returns per-image records and the hit rate.
    """
    from .occlusion import OcclusionEngine
    engine = engine or OcclusionEngine(model)
    match = labels_match(model, data)
    size = model.input_size
    grid = np.mgrid[0:size, 0:size]
    records = []
    for done, index in enumerate(indices, 1):
        item = data.item(int(index))
        if item.mask is None:
            raise InvalidArgumentError("pointing game needs object masks (the synthetic set, or a directory "
                                       "with annotations.json)", field="data")
        mask = mask_to_input(item.mask, model.config)
        x = to_input(item.image, model.config)
        result = engine.sweep(x, window=window, stride=stride, target=item.label if match else None,
                              outputs=("probability",))
        r, c = np.unravel_index(int(np.argmin(result.probability)), result.probability.shape)
        y0, x0 = int(result.starts[r]), int(result.starts[c])
        cy, cx = (y0 + min(size, y0 + window)) / 2, (x0 + min(size, x0 + window)) / 2
        if mask.any():
            dist = np.sqrt((grid[0][mask] + 0.5 - cy) ** 2 + (grid[1][mask] + 0.5 - cx) ** 2).min()
        else:
            dist = float("inf")
        records.append({"index": int(index), "target": int(result.target), "point": [cx, cy],
                        "distance": float(dist), "hit": bool(dist <= tolerance),
                        "base_probability": result.base_probability,
                        "min_probability": float(result.probability.min()),
                        "mask_share": float(mask.mean())})
        if progress is not None:
            progress(done, len(indices))
    hits = [r["hit"] for r in records]
    return {"window": window, "stride": stride, "tolerance": tolerance, "labels_match": match,
            "hit_rate": float(np.mean(hits)) if hits else float("nan"), "n": len(records), "images": records}


def deconv_mask_energy(model: ZFNet, data: AnalysisData, indices, *, layer: str = "conv5", batch: int = 16,
                       progress=None) -> dict:
    """For each image the deconv projection of its strongest ``layer`` unit: the share of its energy (sum of
    squares over channels) that falls on the object mask, beside the mask's share of the image's area.
    ``ratio`` = mean energy share / mean area share (1 = no better than spreading evenly)."""
    from .deconv import DeconvEngine
    engine = DeconvEngine(model)
    indices = [int(i) for i in indices]
    energy_share, area_share = [], []
    for start in range(0, len(indices), batch):
        part = indices[start:start + batch]
        items = [data.item(i) for i in part]
        if any(it.mask is None for it in items):
            raise InvalidArgumentError("deconv energy needs object masks (the synthetic set, or a directory "
                                       "with annotations.json)", field="data")
        x = np.stack([to_input(it.image, model.config) for it in items])
        projected = engine.project(x, layer, top_k=1, one_per_map=False)
        for it, proj in zip(items, projected):
            mask = mask_to_input(it.mask, model.config)
            energy = (proj.projection.astype(np.float64) ** 2).sum(axis=0)
            total = energy.sum()
            energy_share.append(float(energy[mask].sum() / total) if total > 0 else 0.0)
            area_share.append(float(mask.mean()))
        if progress is not None:
            progress(min(len(indices), start + batch), len(indices))
    e, a = np.array(energy_share), np.array(area_share)
    return {"layer": layer, "n": len(indices), "energy_share": e.tolist(), "area_share": a.tolist(),
            "mean_energy_share": float(e.mean()), "mean_area_share": float(a.mean()),
            "ratio": float(e.mean() / a.mean()) if a.mean() > 0 else float("nan"),
            "mean_per_image_ratio": float(np.mean(e[a > 0] / a[a > 0])) if (a > 0).any() else float("nan")}


# ------------------------------------------------------------------------------------------------- architecture
ARCH_VARIANTS = {
    # name: (conv1 kernel, stride, padding, conv2 kernel, stride, padding, clip filters)
    "zfnet-7x7s2": (7, 2, 1, 5, 2, 0, True),
    "zfnet-7x7s2-noclip": (7, 2, 1, 5, 2, 0, False),
    "alexnet-11x11s4": (11, 4, 2, 5, 1, 2, True),
}


class FirstLayersNet(nn.Module):
    """The first two blocks of a ZFNet-style network (conv -> ReLU -> max-pool -> LRN, twice), then global
    average pooling and a linear classifier: enough to train layer-1 and layer-2 filters in a short run.
    conv1's geometry is the thing compared (7x7/2 here, 11x11/4 in AlexNet); conv2 follows each paper."""

    def __init__(self, num_classes: int, conv1=(7, 2, 1), conv2=(5, 2, 0), widths=(96, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], *conv1)
        self.conv2 = nn.Conv2d(widths[0], widths[1], *conv2)
        self.pool = nn.MaxPool2d(POOL_GEOMETRY[0], POOL_GEOMETRY[1], ceil_mode=True)
        self.norm = nn.LocalResponseNorm(**LRN_PARAMS)
        self.fc = nn.Linear(widths[1], num_classes)

    def forward(self, x):
        x = self.norm(self.pool(F.relu(self.conv1(x))))
        x = self.norm(self.pool(F.relu(self.conv2(x))))
        return self.fc(x.mean(dim=(2, 3)))

    @torch.no_grad()
    def clip_filter_rms_(self, radius: float = 0.1) -> None:
        for conv in (self.conv1, self.conv2):   # the same rule as ZFNet.clip_filter_rms_
            rms = conv.weight.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
            conv.weight.mul_(torch.where(rms > radius, radius / rms, torch.ones_like(rms)))


def filter_stats(weight: np.ndarray, probe_acts: np.ndarray | None = None) -> dict:
    """Layer-1 filter statistics for Fig. 6: per-filter RMS, how much one filter dominates (max RMS / median
    RMS), the share of spectral energy above half the Nyquist frequency (high frequencies) and, given the
    filters' activations on probe images (N, K, H, W), the share of dead filters (never positive)."""
    w = np.asarray(weight, dtype=np.float64)
    rms = np.sqrt((w ** 2).mean(axis=(1, 2, 3)))
    k = w.shape[-1]
    spectrum = np.abs(np.fft.fft2(w - w.mean(axis=(2, 3), keepdims=True), s=(32, 32))) ** 2
    freq = np.abs(np.fft.fftfreq(32))
    high = (np.maximum(freq[:, None], freq[None, :]) > 0.25)   # above half of Nyquist (0.5 cycles/px)
    total = spectrum.sum(axis=(1, 2, 3))
    hf = spectrum[..., high].sum(axis=(1, 2)) / np.where(total > 0, total, 1.0)
    out = {"kernel": int(k), "rms": rms.tolist(), "dominance": float(rms.max() / np.median(rms)),
           "high_frequency_share": float(hf.mean())}
    if probe_acts is not None:
        alive = (np.asarray(probe_acts) > 0).any(axis=(0, 2, 3))
        out["dead_share"] = float(1.0 - alive.mean())
    return out


def _training_pool(data_seed: int, count: int, scaled: int, cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """``count`` synthetic training images downscaled to ``scaled`` pixels (uint8 NHWC) and their labels, kept
    in ``cache_dir`` so that every variant (and a rerun) trains on the same images without re-rendering."""
    from ..data import label_of, render_images
    labels = np.array([label_of(i) for i in range(count)], dtype=np.int64)
    path = Path(cache_dir) / f"pool-s{data_seed}-n{count}-{scaled}px.npy" if cache_dir else None
    if path is not None and path.is_file():
        return np.load(path, allow_pickle=False), labels
    raw = render_images(data_seed, range(count))
    pool = np.stack([np.asarray(Image.fromarray(im).resize((scaled, scaled), Image.BILINEAR)) for im in raw])
    if path is not None:
        np.save(path, pool, allow_pickle=False)
    return pool, labels


def train_first_layers(variant: str, *, steps: int = 40, batch: int = 16, lr: float = 1e-2, seed: int = 0,
                       data_seed: int = 1, pool: int = 128, scaled: int = 112, size: int = 96,
                       probe_n: int = 32, init: str = "scaled", cache_dir: str | Path | None = None,
                       progress=None) -> dict:
    """A short SGD run (the paper's lr 1e-2, momentum 0.9, raw pixels minus the mean) of
    :class:`FirstLayersNet` on a pool of synthetic training images downscaled to ``scaled`` pixels, random
    ``size`` crops and flips (a CPU budget), then layer-1 filter statistics. ``init``: ``"paper"``
    (N(0, 0.01^2)) or ``"scaled"`` (see below). Returns JSON-ready numbers plus the conv1 and conv2 weights
    (numpy) under ``"weights"``."""
    from ..data import NUM_CLASSES
    if variant not in ARCH_VARIANTS:
        raise InvalidArgumentError(f"variant: {variant!r}; accepted: {', '.join(ARCH_VARIANTS)}", field="variant")
    k1, s1, p1, k2, s2, p2, clip = ARCH_VARIANTS[variant]
    images, labels = _training_pool(data_seed, pool, scaled, cache_dir)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() - torch.tensor(IMAGENET_MEAN_RGB).reshape(1, 3, 1, 1)
    y_all = torch.from_numpy(labels)
    torch.manual_seed(seed)
    net = FirstLayersNet(NUM_CLASSES, (k1, s1, p1), (k2, s2, p2))
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
    if init == "scaled":
        # zfserve.train.init_weights' "scaled" scheme (conv1 outputs of unit RMS on raw-pixel input, He's
        # scaling for conv2): with 0.01 everywhere nothing moves within a short run's few dozen steps.
        from ..train import input_rms
        rms = input_rms(images, np.asarray(IMAGENET_MEAN_RGB, np.float32).reshape(3, 1, 1))
        with torch.no_grad():
            net.conv1.weight.normal_(0.0, 1.0 / (math.sqrt(net.conv1.weight[0].numel()) * rms))
            net.conv2.weight.normal_(0.0, math.sqrt(2.0 / net.conv2.weight[0].numel()))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    rng = np.random.default_rng(seed)
    losses = []
    net.train()
    for step in range(steps):
        rows = torch.from_numpy(rng.integers(0, pool, batch))
        oy, ox = rng.integers(0, scaled - size + 1, 2)
        x = x_all[rows, :, oy:oy + size, ox:ox + size]
        if rng.random() < 0.5:
            x = x.flip(-1)
        loss = F.cross_entropy(net(x), y_all[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if clip:
            net.clip_filter_rms_()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, steps)
    net.eval()
    with torch.no_grad():
        acts = F.relu(net.conv1(x_all[:probe_n, :, :size, :size])).numpy()
    stats = filter_stats(net.conv1.weight.detach().numpy(), acts)
    return {"variant": variant, "conv1": [k1, s1, p1], "conv2": [k2, s2, p2], "clip": clip, "steps": steps,
            "batch": batch, "lr": lr, "pool": pool, "input": size, "init": init, "loss_first": float(np.mean(losses[:5])),
            "loss_last": float(np.mean(losses[-5:])), "stats": stats,
            "weights": {"conv1": net.conv1.weight.detach().numpy(), "conv2": net.conv2.weight.detach().numpy()}}


def architecture_runs(cache_dir: str | Path, *, steps: int = 40, batch: int = 16, pool: int = 128,
                      lr: float = 0.04, variants=tuple(ARCH_VARIANTS), progress=None) -> dict[str, dict]:
    """Run (or read from ``cache_dir``) :func:`train_first_layers` for each variant. Each run is cached as
    ``<variant>.json`` + ``<variant>.safetensors`` and reused when its settings match.

    The default ``lr`` is 4x the paper's so that a 40-step run takes layer-1 filters to the clipping radius
    (at 1e-2 they stay below it and clipping never acts, so with and without would be the same run)."""
    from safetensors.numpy import load_file, save_file
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for variant in variants:
        meta, weights = cache_dir / f"{variant}.json", cache_dir / f"{variant}.safetensors"
        if meta.is_file() and weights.is_file():
            record = json.loads(meta.read_text())
            if (record.get("steps"), record.get("batch"), record.get("pool"), record.get("lr"),
                    record.get("init")) == (steps, batch, pool, lr, "scaled"):
                record["weights"] = load_file(str(weights))
                record["cached"] = True
                out[variant] = record
                continue
        say = (lambda d, t, v=variant: progress(v, d, t)) if progress else None
        record = train_first_layers(variant, steps=steps, batch=batch, pool=pool, lr=lr, cache_dir=cache_dir,
                                    probe_n=min(32, pool), progress=say)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in record["weights"].items()},
                  str(weights))
        meta.write_text(json.dumps({k: v for k, v in record.items() if k != "weights"}, indent=1) + "\n")
        record["cached"] = False
        out[variant] = record
    return out


# ------------------------------------------------------------------------------------------------- evolution
def load_evolution(model: ZFNet) -> dict[str, np.ndarray]:
    """The feature-evolution data (Fig. 4) recorded in the model directory (``evolution.npz``, written by
    ``zfserve train --evolution`` / ``zfserve evolution``)."""
    from ..train import EVOLUTION_FILE
    directory = getattr(model, "model_dir", None)
    if directory is None or not (Path(directory) / EVOLUTION_FILE).is_file():
        where = directory or "the built-in zfnet-paper model (no directory)"
        raise NotFoundError(f"model: no {EVOLUTION_FILE} in {where}; record it with `zfserve train --evolution` "
                            f"or `zfserve evolution --run DIR`", field="model")
    with np.load(Path(directory) / EVOLUTION_FILE, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


__all__ = ["AnalysisData", "Item", "TopUnit", "top_activations", "top9", "transform_image", "invariance",
           "growth_share", "aligned_face", "hamming_score", "correspondence", "pointing_game",
           "deconv_mask_energy", "FirstLayersNet", "filter_stats", "train_first_layers", "architecture_runs",
           "load_evolution", "mask_to_input", "box_to_input", "input_frame", "labels_match", "IDENTITY", "TRANSFORMS"]
