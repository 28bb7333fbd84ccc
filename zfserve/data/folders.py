"""Images on disk: the one scanner of ImageFolder trees (``root/<class>/<image>``) and of the
``annotations.json`` that ``zfserve data synth`` writes beside them (object masks and face-part boxes).

Every image is read through ``zfserve.preprocess``'s safe decoder, the same path inference uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import NotFoundError
from .synthetic import CLASSES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
ANNOTATIONS_FILE = "annotations.json"
MASKS_DIR = "masks"          # where `zfserve data synth` puts the masks; never a class


@dataclass(frozen=True)
class Entry:
    """One image of a folder: its file, label, and (from annotations.json) its mask file and part boxes."""

    path: Path
    label: int
    mask: Path | None = None
    parts: dict = field(default_factory=dict)


def _root(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"data: {root} is not a directory; accepted: 'synthetic' or an ImageFolder directory "
                            f"(root/<class>/<image files>)", field="data")
    return root


def folder_entries(root) -> tuple[list[Entry], list[str]]:
    """The ImageFolder walk: class folders sorted by name (``masks/`` excepted), each one's JPEG/PNG/WebP files
    sorted; label = the class folder's index. Returns (entries, class names)."""
    root = _root(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != MASKS_DIR)
    entries = [Entry(f, label) for label, c in enumerate(classes) for f in sorted((root / c).iterdir())
               if f.suffix.lower() in IMAGE_SUFFIXES]
    if not entries:
        raise NotFoundError(f"data: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}/<class>/", field="data")
    return entries, classes


def annotated_entries(root) -> tuple[list[Entry], list[str]]:
    """The images listed in ``root/annotations.json`` (records ``{file, label, class, mask, parts}``, paths
    relative to ``root``), in its order. Class names: the synthetic set's when the labels are its labels,
    otherwise each label's recorded class (or folder) name."""
    root = _root(root)
    records = json.loads((root / ANNOTATIONS_FILE).read_text())
    entries = [Entry(root / r["file"], int(r["label"]), root / r["mask"] if r.get("mask") else None,
                     r.get("parts") or {}) for r in records]
    names = {int(r["label"]): r.get("class") or Path(r["file"]).parent.name for r in records}
    if all(0 <= i < len(CLASSES) and CLASSES[i] == name for i, name in names.items()):
        classes = list(CLASSES)   # a `zfserve data synth` dump: the synthetic labels
    else:
        classes = [names.get(i, f"class_{i}") for i in range(max(names) + 1)] if names else []
    if not entries:
        raise NotFoundError(f"data: {root / ANNOTATIONS_FILE} lists no images", field="data")
    return entries, classes


def scan(root) -> tuple[list[Entry], list[str]]:
    """:func:`annotated_entries` when ``root`` holds annotations.json, else :func:`folder_entries`."""
    return annotated_entries(root) if (_root(root) / ANNOTATIONS_FILE).is_file() else folder_entries(root)


def read_mask(path) -> np.ndarray:
    """An object mask file (a PNG, object >= 128) as bool (H, W), through the safe decoder."""
    from ..preprocess import decode_image
    return decode_image(path, field=f"data {path}")[..., 0] >= 128


def image_folder_arrays(root, *, resize: int = 256, limit: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An ImageFolder tree (:func:`folder_entries`) as uint8 (N, resize, resize, 3), labels, class names.

    Each file goes through the safe decoder and resize-short-side + centre crop to ``resize`` (the paper's
    256 stage).
    """
    from ..preprocess import decode_image, resize_and_crop
    entries, classes = folder_entries(root)
    if limit is not None:
        entries = entries[:limit]
    images = np.empty((len(entries), resize, resize, 3), dtype=np.uint8)
    for row, entry in enumerate(entries):
        images[row] = resize_and_crop(decode_image(entry.path, field=f"data {entry.path}"), resize, resize)
    return images, np.array([e.label for e in entries], dtype=np.int64), classes


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, S, S, 3) -> (N, size, size, 3) by area averaging (small test configurations train on
    downscaled sets); unchanged when already ``size``."""
    import torch
    import torch.nn.functional as F
    if images.shape[1] == size:
        return images
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for start in range(0, len(images), 256):
        x = torch.from_numpy(np.array(images[start:start + 256])).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="area")
        out[start:start + 256] = x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return out
