"""The measures of whether a saliency map points at what the model used, each with its convention written down.
Plain numpy on (H, W) maps, so that every one can be checked on hand-built cases and against ``quantus``.

- **Pointing game** (TorchRay's benchmark): the map's point is the mean position of its maximal pixels (pixel
  centres at ``i + 0.5``; ties, as in the flat cells of an occlusion map, are averaged); a hit when that point
  lies within ``tolerance`` (15) pixels of a mask pixel's centre. Accuracy is hits / images per class, then the
  mean over the classes present (:func:`per_class_accuracy`), beside the plain hit rate.
- **Difficult subset** (:func:`is_difficult`): objects the centre prior does not find for free — the mask's
  centroid lies at least a quarter of the side (56 px of 224) from the image centre, or the mask covers less than
  5% of the image. (VOC07's "difficult" set of TorchRay is small or off-centre objects too; its exact rule,
  small objects with distractor classes, needs several objects per image.)
- **Deletion / insertion** (RISE, Petsiuk et al. 2018): pixels are ranked by the map (largest first; ties in a
  fixed random order, so a flat region is not removed top row first); at step k of ``steps`` the first
  ``round(k * P / steps)`` pixels are replaced by the mean colour (0 in network-input units, all three channels)
  for deletion, or revealed on an all-mean image for insertion; the curve is the probability of the class
  predicted on the intact image; the AUC is the trapezoid over the removed fraction 0..1 (deletion: lower is
  better; insertion: higher).
- **Similarity of two maps** (the sanity checks of Adebayo et al. 2018, with ``quantus``' conventions): Spearman
  rank correlation of the absolute values (average ranks for ties, as ``scipy.stats.spearmanr``) and SSIM of the
  maps divided by their largest absolute value (absolute values for the MPRT, signed for RandomLogit, as quantus'
  ``MPRT`` and ``RandomLogit`` defaults), with data range max - min over both maps and
  ``skimage.metrics.structural_similarity``'s defaults (7x7 uniform window, K1 0.01, K2 0.03, sample covariance,
  the mean over the windows that fit).
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError

POINTING_TOLERANCE = 15            # pixels (TorchRay)
OFF_CENTRE_FRACTION = 0.25         # of the side: a mask centroid this far from the centre is off-centre
SMALL_AREA_FRACTION = 0.05         # of the image: a mask smaller than this is small
SSIM_WINDOW = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _map(values, field: str = "saliency") -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise InvalidArgumentError(f"{field}: expected a 2-D (H, W) map, got shape {a.shape}", field=field)
    if not np.isfinite(a).all():
        raise InvalidArgumentError(f"{field}: holds NaN or infinite values", field=field)
    return a


def _mask(mask, shape, field: str = "mask") -> np.ndarray:
    m = np.asarray(mask, dtype=bool)
    if m.shape != tuple(shape):
        raise InvalidArgumentError(f"{field}: expected shape {tuple(shape)} (the map's), got {m.shape}", field=field)
    return m


# ---------------------------------------------------------------------------------------------- pointing game
def pointing_point(saliency) -> tuple[float, float]:
    """(y, x) in pixels of the map's maximum: the mean of the maximal pixels' centres."""
    a = _map(saliency)
    rows, cols = np.nonzero(a == a.max())
    return float(rows.mean() + 0.5), float(cols.mean() + 0.5)


def point_distance(point, mask) -> float:
    """Euclidean distance from ``point`` (y, x) to the nearest mask pixel centre (inf for an empty mask)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise InvalidArgumentError(f"mask: expected a 2-D (H, W) mask, got shape {m.shape}", field="mask")
    rows, cols = np.nonzero(m)
    if not len(rows):
        return float("inf")
    y, x = point
    return float(np.sqrt((rows + 0.5 - y) ** 2 + (cols + 0.5 - x) ** 2).min())


def pointing_hit(saliency, mask, tolerance: float = POINTING_TOLERANCE) -> dict:
    """The pointing game on one map: its point, the distance to the object and whether that is a hit."""
    a = _map(saliency)
    if not tolerance >= 0:
        raise InvalidArgumentError(f"tolerance: {tolerance!r} out of range; accepted >= 0 (pixels)",
                                   field="tolerance")
    point = pointing_point(a)
    distance = point_distance(point, _mask(mask, a.shape))
    return {"point": [point[0], point[1]], "distance": distance, "hit": bool(distance <= tolerance)}


def centre_hit(mask, tolerance: float = POINTING_TOLERANCE) -> dict:
    """The centre baseline: it always points at the exact image centre."""
    m = np.asarray(mask, dtype=bool)
    point = (m.shape[0] / 2, m.shape[1] / 2)
    distance = point_distance(point, m)
    return {"point": [point[0], point[1]], "distance": distance, "hit": bool(distance <= tolerance)}


def per_class_accuracy(hits, classes) -> float:
    """TorchRay's pointing accuracy: hits / images within each class, then the mean over the classes present."""
    hits, classes = np.asarray(hits, dtype=np.float64), np.asarray(classes)
    if hits.shape != classes.shape:
        raise InvalidArgumentError(f"classes: expected one per hit ({hits.shape}), got {classes.shape}",
                                   field="classes")
    if not hits.size:
        return float("nan")
    return float(np.mean([hits[classes == c].mean() for c in np.unique(classes)]))


def is_difficult(mask) -> bool:
    """Whether an object is off-centre (centroid at least OFF_CENTRE_FRACTION of the side from the centre) or
    small (under SMALL_AREA_FRACTION of the image). An empty mask counts as difficult."""
    m = np.asarray(mask, dtype=bool)
    rows, cols = np.nonzero(m)
    if not len(rows):
        return True
    h, w = m.shape
    off = np.hypot(rows.mean() + 0.5 - h / 2, cols.mean() + 0.5 - w / 2) >= OFF_CENTRE_FRACTION * min(h, w)
    return bool(off or m.mean() < SMALL_AREA_FRACTION)


# ---------------------------------------------------------------------------------------------- deletion
def perturbation_order(saliency, tie_seed: int = 0) -> np.ndarray:
    """Flat pixel indices, largest map value first; equal values in a random order fixed by ``tie_seed``."""
    a = _map(saliency).reshape(-1)
    tiebreak = np.random.default_rng(tie_seed).permutation(a.size)
    return np.lexsort((tiebreak, -a))


def step_counts(pixels: int, steps: int) -> np.ndarray:
    """Pixels removed (or revealed) after each step 0..steps: ``round(k * pixels / steps)``."""
    if int(steps) != steps or steps < 1:
        raise InvalidArgumentError(f"steps: {steps!r} out of range; accepted >= 1", field="steps")
    return np.rint(np.arange(int(steps) + 1) * pixels / steps).astype(np.int64)


def perturbed_inputs(x: np.ndarray, order: np.ndarray, steps: int, fill: float = 0.0) -> tuple[np.ndarray,
                                                                                               np.ndarray]:
    """The deletion and insertion inputs of one image (3, H, W) for one pixel order: two float32
    (steps + 1, 3, H, W) stacks, step 0 first (deletion starts intact, insertion all ``fill``)."""
    x = np.asarray(x, dtype=np.float32)
    _, h, w = x.shape
    counts = step_counts(h * w, steps)
    rank = np.empty(h * w, dtype=np.int64)
    rank[order] = np.arange(h * w)
    rank = rank.reshape(h, w)
    gone = rank[None] < counts[:, None, None]                  # (steps + 1, H, W): pixels taken at each step
    deletion = np.where(gone[:, None], np.float32(fill), x[None])
    insertion = np.where(gone[:, None], x[None], np.float32(fill))
    return deletion.astype(np.float32), insertion.astype(np.float32)


def curve_auc(curve) -> float:
    """Area under a curve sampled at equal steps over the fraction 0..1 (trapezoid rule)."""
    c = np.asarray(curve, dtype=np.float64)
    if c.ndim != 1 or c.size < 2:
        raise InvalidArgumentError(f"curve: expected at least 2 points, got shape {c.shape}", field="curve")
    return float(((c[1:] + c[:-1]) / 2).sum() / (c.size - 1))


# ---------------------------------------------------------------------------------------------- similarity
def ranks(values) -> np.ndarray:
    """1-based ranks of a flat array, ties given the mean of their ranks."""
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], a.size]
    mean_rank = (starts + ends + 1) / 2                      # mean of the 1-based ranks starts+1 .. ends
    out = np.empty(a.size)
    out[order] = np.repeat(mean_rank, ends - starts)
    return out


def spearman(a, b) -> float:
    """Spearman rank correlation of two equally shaped arrays (nan when one is constant)."""
    ra, rb = ranks(a), ranks(b)
    if ra.size != rb.size:
        raise InvalidArgumentError(f"maps: sizes differ ({ra.size} vs {rb.size})", field="maps")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def spearman_abs(a, b) -> float:
    """The MPRT's rank similarity: Spearman correlation of the absolute values. A constant map keeps no ranking,
    so against a varying map it scores 0 (scipy gives nan), and two constant maps score 1."""
    a, b = np.abs(np.asarray(a, dtype=np.float64)), np.abs(np.asarray(b, dtype=np.float64))
    flat_a, flat_b = a.min() == a.max(), b.min() == b.max()
    if flat_a or flat_b:
        return 1.0 if flat_a and flat_b else 0.0
    return spearman(a, b)


def _box_means(a: np.ndarray, size: int) -> np.ndarray:
    """Means over every size x size window that fits inside ``a`` (the 'valid' box filter)."""
    table = np.zeros((a.shape[0] + 1, a.shape[1] + 1))
    table[1:, 1:] = a.cumsum(0).cumsum(1)
    sums = table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]
    return sums / size ** 2


def ssim(a, b, data_range: float, window: int = SSIM_WINDOW) -> float:
    """Mean structural similarity of two (H, W) arrays with skimage's default conventions (see the module)."""
    x, y = _map(a, "a"), _map(b, "b")
    if x.shape != y.shape:
        raise InvalidArgumentError(f"b: shape {y.shape} differs from a's {x.shape}", field="b")
    if min(x.shape) < window:
        raise InvalidArgumentError(f"a: {x.shape} is smaller than the {window}x{window} window", field="a")
    if not data_range > 0:
        raise InvalidArgumentError(f"data_range: {data_range!r} out of range; accepted > 0", field="data_range")
    cov_norm = window ** 2 / (window ** 2 - 1)
    ux, uy = _box_means(x, window), _box_means(y, window)
    vx = cov_norm * (_box_means(x * x, window) - ux * ux)
    vy = cov_norm * (_box_means(y * y, window) - uy * uy)
    vxy = cov_norm * (_box_means(x * y, window) - ux * uy)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def scaled_by_max(values, signed: bool = False) -> np.ndarray:
    """The map divided by its largest absolute value (``quantus``' ``normalise_by_max``), as absolute values
    unless ``signed``; all zeros for an all-zero map."""
    a = _map(values)
    a = a if signed else np.abs(a)
    peak = np.abs(a).max()
    return a / peak if peak > 0 else np.zeros_like(a)


def map_ssim(a, b, signed: bool = False) -> float:
    """The sanity checks' structural similarity: SSIM of the two maps :func:`scaled_by_max` (absolute values for
    the MPRT, signed for RandomLogit), the data range being max - min over both (``quantus.similarity_func.ssim``);
    two all-zero maps are identical (1)."""
    x, y = scaled_by_max(a, signed), scaled_by_max(b, signed)
    both = np.concatenate([x.reshape(-1), y.reshape(-1)])
    data_range = float(both.max() - both.min())
    return ssim(x, y, data_range=data_range) if data_range > 0 else 1.0
