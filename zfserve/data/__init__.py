"""Training and evaluation data: the synthetic set (images + object/part masks, :mod:`.synthetic`) and
ImageFolder directories (:mod:`.folders`).

Every source yields uint8 256x256 RGB images (the paper's resize-256 / centre-crop-256 stage, done by
``zfserve.preprocess``) and integer labels; training takes random 224 crops of these, evaluation the centre.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import _checks as checks
from .folders import (ANNOTATIONS_FILE, IMAGE_SUFFIXES, MASKS_DIR, Entry, image_folder_arrays, read_mask,
                      resize_images, scan)
from .synthetic import (CLASSES, GENERATOR_VERSION, NUM_CLASSES, PART_NAMES, SIZE, Sample, label_of, render,
                        render_images)

__all__ = ["CLASSES", "GENERATOR_VERSION", "NUM_CLASSES", "PART_NAMES", "SIZE", "Sample", "label_of", "render",
           "render_images", "SyntheticDataset", "synthetic_arrays", "write_synthetic",
           "ANNOTATIONS_FILE", "IMAGE_SUFFIXES", "MASKS_DIR", "Entry", "image_folder_arrays", "read_mask",
           "resize_images", "scan"]


class SyntheticDataset(torch.utils.data.Dataset):
    """Streams ``render(seed, i)`` for i in ``range(n)`` without touching disk: (uint8 HWC tensor, label)."""

    def __init__(self, seed: int, n: int):
        checks.integer(n, "n", 1)
        self.seed, self.n = seed, n
        self.classes = list(CLASSES)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(index)
        sample = render(self.seed, index)
        return torch.from_numpy(sample.image), sample.label


def _render_chunk(args) -> np.ndarray:
    seed, start, stop = args
    return render_images(seed, range(start, stop))


def synthetic_arrays(seed: int, n: int, *, cache_dir: str | Path | None = None, workers: int = 1,
                     log=None) -> tuple[np.ndarray, np.ndarray]:
    """All ``n`` images of the synthetic set ``seed`` as uint8 (n, 256, 256, 3), plus labels.

    With ``cache_dir`` the images are kept as ``synthetic-v{GENERATOR_VERSION}-s{seed}-n{n}.npy`` there
    (memory-mapped on reuse), so a resumed run does not pay for generation again.
    """
    checks.integer(n, "n", 1)
    labels = np.array([label_of(i) for i in range(n)], dtype=np.int64)
    stem = f"synthetic-v{GENERATOR_VERSION}-s{seed}"
    path = Path(cache_dir) / f"{stem}-n{n}.npy" if cache_dir else None
    if path is not None:
        # Sample i depends only on (seed, i): any cached set of the same seed with >= n images holds ours.
        for cached in sorted(Path(cache_dir).glob(f"{stem}-n*.npy")):
            have = cached.stem.rpartition("-n")[2]
            if have.isdigit() and int(have) >= n:
                return np.load(cached, mmap_mode="r", allow_pickle=False)[:n], labels
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    chunk = 256
    jobs = [(seed, start, min(n, start + chunk)) for start in range(0, n, chunk)]
    done = 0
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for (_, start, stop), block in zip(jobs, pool.map(_render_chunk, jobs)):
                images[start:stop] = block
                done += stop - start
                if log:
                    log(f"synthetic seed {seed}: {done}/{n} images")
    else:
        for job in jobs:
            images[job[1]:job[2]] = _render_chunk(job)
            done += job[2] - job[1]
            if log:
                log(f"synthetic seed {seed}: {done}/{n} images")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, images, allow_pickle=False)
        os.replace(tmp, path)
    return images, labels


def write_synthetic(out: str | Path, n: int, seed: int) -> Path:
    """Write ``n`` samples as an ImageFolder tree + mask PNGs (0/255) + ``annotations.json``.

``annotations.json`` is a list of ``{file, label, class, mask, parts}``; paths are relative to ``out``.
"""
    out = Path(out)
    checks.integer(n, "n", 1)
    for name in CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    (out / MASKS_DIR).mkdir(parents=True, exist_ok=True)
    annotations = []
    for index in range(n):
        sample = render(seed, index)
        stem = f"{seed}_{index:06d}.png"
        image_file = f"{sample.class_name}/{stem}"
        mask_file = f"{MASKS_DIR}/{stem}"
        Image.fromarray(sample.image).save(out / image_file)
        Image.fromarray(sample.mask.astype(np.uint8) * 255).save(out / mask_file)
        annotations.append({"file": image_file, "label": sample.label, "class": sample.class_name,
                            "mask": mask_file, "parts": sample.parts})
    (out / ANNOTATIONS_FILE).write_text(json.dumps(annotations, indent=1) + "\n")
    return out
