"""Accuracy of a model on the synthetic set (any seed, typically a held-out one) or an ImageFolder tree.

Images go through the model's own preprocessing (``zfserve.preprocess.to_input``: resize 256, centre crop,
mean subtraction), the same path inference uses.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .errors import InvalidArgumentError
from .train import _hardware, _resize_images, accuracy_report, predict_logits


def evaluate(model, data: str = "synthetic", *, seed: int = 3, n: int = 1000, batch: int = 64,
             device: str = "cpu", workers: int = 1) -> dict:
    """top-1, top-5 and per-class top-1 of ``model`` (a ZFNet with its config) on ``data``."""
    from .data import CLASSES, image_folder_arrays, synthetic_arrays
    config = model.config
    if n < 1:
        raise InvalidArgumentError(f"n={n} is out of range; accepted: >= 1", field="n")
    started = time.time()
    if data == "synthetic":
        images, labels = synthetic_arrays(seed, n, workers=workers)
        classes = list(CLASSES)
    else:
        images, labels, classes = image_folder_arrays(data, resize=config.preprocess.resize, limit=None)
        if n < len(labels):   # an evenly spaced subset keeps every class
            keep = np.linspace(0, len(labels) - 1, n).round().astype(int)
            images, labels = images[keep], labels[keep]
    names = list(config.class_names)
    if classes != names:
        # ImageFolder sorts class folders by name; map each folder to the model's class of that name.
        missing = sorted(set(classes) - set(names))
        if missing:
            raise InvalidArgumentError(f"data: class folders {missing} are not classes of the model "
                                       f"(accepted: {names})", field="data")
        labels = np.asarray([names.index(classes[label]) for label in labels], dtype=np.int64)
        classes = names
    images = _resize_images(images, config.preprocess.resize)
    generated = time.time()
    logits = predict_logits(model, images, config, batch=batch, device=device)
    report = accuracy_report(logits, labels, classes)
    report.update({"model": config.name, "data": data if data != "synthetic" else f"synthetic seed {seed}",
                   "data_seconds": round(generated - started, 1),
                   "eval_seconds": round(time.time() - generated, 1),
                   "hardware": _hardware(torch.device(device))})
    return report


def filter_grid(weight: torch.Tensor, scale: int = 4, pad: int = 1) -> np.ndarray:
    """conv1 weights (K, 3, k, k) -> uint8 RGB grid image; each filter contrast-stretched on its own around 0
    (grey = 0), as the paper's Fig. 5/6 panels show them."""
    w = weight.detach().float().cpu().numpy()
    if w.ndim != 4 or w.shape[1] != 3:
        raise InvalidArgumentError(f"filter grid needs RGB filters (K, 3, k, k), got {tuple(w.shape)}",
                                   field="layer")
    count, _, k, _ = w.shape
    cols = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / cols))
    cell = k * scale + pad
    grid = np.full((rows * cell + pad, cols * cell + pad, 3), 255, dtype=np.uint8)
    for i in range(count):
        f = w[i].transpose(1, 2, 0)
        peak = np.abs(f).max()
        tile = 127.5 + 127.5 * (f / peak if peak > 0 else f)
        tile = np.clip(np.rint(tile), 0, 255).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
        r, c = divmod(i, cols)
        grid[pad + r * cell: pad + r * cell + k * scale, pad + c * cell: pad + c * cell + k * scale] = tile
    return grid


def write_filter_grid(model, path, scale: int = 4) -> str:
    """Write ``model``'s conv1 filters as a PNG grid; returns the path."""
    from pathlib import Path

    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(filter_grid(model.conv1.weight, scale=scale)).save(path)
    return str(path)
