"""Images outside the synthetic set's world, to measure an out-of-distribution score with
(``benchmarks/ood_methods.py`` and the tests):

- **photos**: the photographs and pictures that ship inside installed Python packages (scikit-image's data,
  scikit-learn's sample images, matplotlib's sample data; whichever are installed), and random square crops of
  them (far out of distribution);
- **novel shapes**: scenes drawn exactly as the synthetic set's (background, clutter, texture, pose, blur, noise)
  around shapes none of its classes has (near out of distribution).

Nothing is downloaded: a package that is not installed contributes nothing.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from .synthetic import SIZE, _ellipse, _regular, render_novel

# Package -> folder (relative to the package) holding its sample pictures.
PHOTO_PACKAGES = {"skimage": "data", "sklearn": "datasets/images", "matplotlib": "mpl-data/sample_data"}
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")
MIN_PHOTO_SIDE = 128
MIN_CROP_SIDE = 64
CROP_SHARE = (0.25, 1.0)    # a crop's side, as a share of the picture's short side


def photo_files() -> list[Path]:
    """The sample pictures of the installed packages of :data:`PHOTO_PACKAGES`, sorted by package, then name."""
    files = []
    for package, folder in PHOTO_PACKAGES.items():
        try:
            root = Path(importlib.import_module(package).__file__).parent / folder
        except ImportError:
            continue
        files += sorted(p for p in root.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    return files


def photos(min_side: int = MIN_PHOTO_SIDE) -> list[tuple[str, np.ndarray]]:
    """(file name, uint8 RGB array) of each sample picture at least ``min_side`` pixels on its short side that
    the decoder reads (zfserve's own, as every path uses)."""
    from ..errors import ZFServeError
    from ..preprocess import decode_image
    out = []
    for path in photo_files():
        try:
            rgb = decode_image(path.read_bytes(), field=path.name)
        except ZFServeError:
            continue
        if min(rgb.shape[:2]) >= min_side:
            out.append((path.name, rgb))
    return out


def photo_crops(pictures: list[tuple[str, np.ndarray]], n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` random square crops (a random picture, side 25-100% of its short side, random place), each resized to
    the synthetic set's 256 x 256: uint8 (n, 256, 256, 3) and the picture each came from."""
    from ..preprocess import resize_and_crop
    if not pictures:
        raise ValueError("no pictures: install scikit-image, scikit-learn or matplotlib (the dev extra has them)")
    rng = np.random.default_rng(seed)
    images, names = np.empty((n, SIZE, SIZE, 3), np.uint8), []
    for i in range(n):
        name, rgb = pictures[int(rng.integers(len(pictures)))]
        h, w = rgb.shape[:2]
        side = max(min(MIN_CROP_SIDE, h, w), int(rng.uniform(*CROP_SHARE) * min(h, w)))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        images[i] = resize_and_crop(np.ascontiguousarray(rgb[y:y + side, x:x + side]), SIZE, SIZE)
        names.append(name)
    return images, names


# ---------------------------------------------------------------------------------------------------- shapes
def _heart(rng):
    t = np.linspace(0, 2 * np.pi, 80, endpoint=False)
    x, y = 16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return [(np.stack([x, y], 1) / 17, 1)]


def _l_shape(rng):
    w = 2 * rng.uniform(0.3, 0.45)
    return [(np.array([[-1, -1], [-1 + w, -1], [-1 + w, 1 - w], [1, 1 - w], [1, 1], [-1, 1]]) * 0.9, 1)]


def _t_shape(rng):
    w = rng.uniform(0.18, 0.28)
    return [(np.array([[-1, -1], [1, -1], [1, -1 + 2 * w], [w, -1 + 2 * w], [w, 1], [-w, 1], [-w, -1 + 2 * w],
                       [-1, -1 + 2 * w]]) * 0.9, 1)]


def _lightning(rng):
    return [(np.array([[-0.3, -1], [0.5, -1], [0.05, -0.15], [0.55, -0.15], [-0.4, 1], [-0.05, 0.1],
                       [-0.55, 0.1]]), 1)]


def _clover(rng):
    return [(_ellipse(0.45, 0.45, dx, dy), 1) for dx, dy in ((0.45, 0), (-0.45, 0), (0, 0.45), (0, -0.45))]


def _pentagon(rng):
    return [(_regular(5, 1.0, -np.pi / 2), 1)]


def _dumbbell(rng):
    return [(_ellipse(0.4, 0.4, -0.6, 0), 1), (_ellipse(0.4, 0.4, 0.6, 0), 1),
            (np.array([[-0.6, -0.12], [0.6, -0.12], [0.6, 0.12], [-0.6, 0.12]]), 1)]


def _letter_e(rng):
    return [(np.array([[-0.7, -1], [0.7, -1], [0.7, -0.65], [-0.3, -0.65], [-0.3, -0.18], [0.5, -0.18], [0.5, 0.18],
                       [-0.3, 0.18], [-0.3, 0.65], [0.7, 0.65], [0.7, 1], [-0.7, 1]]), 1)]


def _zigzag(rng):
    top = np.array([[-1, -0.1], [-0.5, -0.6], [0, -0.1], [0.5, -0.6], [1, -0.1]])
    return [(np.vstack([top, top[::-1] + np.array([0, 0.4])]), 1)]


def _semicircle(rng):
    t = np.linspace(0, np.pi, 40)
    return [(np.stack([np.cos(t), 0.4 - np.sin(t)], 1), 1)]


# Shapes none of the synthetic classes has (polygons in the unit frame, as synthetic._shape draws them).
NOVEL_SHAPES = {"heart": _heart, "l_shape": _l_shape, "t_shape": _t_shape, "lightning": _lightning,
                "clover": _clover, "pentagon": _pentagon, "dumbbell": _dumbbell, "letter_e": _letter_e,
                "zigzag": _zigzag, "semicircle": _semicircle}


def novel_images(seed: int, n: int, shapes: dict | None = None) -> tuple[np.ndarray, list[str]]:
    """``n`` scenes cycling through ``shapes`` (name -> polygons(rng); default :data:`NOVEL_SHAPES`): uint8
    (n, 256, 256, 3) and each one's shape name."""
    shapes = shapes or NOVEL_SHAPES
    names = list(shapes)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        images[i] = render_novel(seed, i, shapes[names[i % len(names)]])
    return images, [names[i % len(names)] for i in range(n)]


__all__ = ["NOVEL_SHAPES", "PHOTO_PACKAGES", "novel_images", "photo_crops", "photo_files", "photos"]
