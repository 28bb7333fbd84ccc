"""Accuracy of a model on the synthetic set (any seed, typically a held-out one) or an ImageFolder tree, and the
helpers training's validation shares: centre-crop logits, accuracy reports, what hardware ran it.

Images go through the model's own preprocessing (``zfserve.preprocess.to_input``: resize 256, centre crop,
mean subtraction), the same path inference uses.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks as checks
from .config import ModelConfig
from .errors import InvalidArgumentError
from .preprocess import to_input


def evaluate(model, data: str = "synthetic", *, seed: int = 3, n: int = 1000, batch: int = 64,
             device: str = "cpu", workers: int = 1) -> dict:
    """top-1, top-5 and per-class top-1 of ``model`` (a ZFNet with its config) on ``data``."""
    from .data import CLASSES, image_folder_arrays, resize_images, synthetic_arrays
    config = model.config
    checks.integer(n, "n", 1)
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
    images = resize_images(images, config.preprocess.resize)
    generated = time.time()
    logits = predict_logits(model, images, config, batch=batch, device=device)
    report = accuracy_report(logits, labels, classes)
    report.update({"model": config.name, "data": data if data != "synthetic" else f"synthetic seed {seed}",
                   "data_seconds": round(generated - started, 1),
                   "eval_seconds": round(time.time() - generated, 1),
                   "hardware": hardware(device)})
    return report


def centre_inputs(images: np.ndarray, config: ModelConfig) -> np.ndarray:
    """uint8 (N, R, R, 3) -> float32 (N, 3, crop, crop) through ``zfserve.preprocess.to_input`` (one definition)."""
    return np.stack([to_input(np.asarray(img), config) for img in images])


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, config: ModelConfig, batch: int = 64,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits (N, C) for uint8 (N, R, R, 3) images, centre crop, in eval mode."""
    was_training = model.training
    model.eval()
    outs = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(centre_inputs(images[start:start + batch], config)).to(device)
        outs.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy_report(logits: torch.Tensor, labels: np.ndarray, class_names: list[str]) -> dict:
    """top-1, top-5 (top-k with k = min(5, C)), mean cross-entropy and per-class top-1."""
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    top1 = topk[:, 0] == labels_t
    hit_k = (topk == labels_t[:, None]).any(dim=1)
    per_class = {name: float(top1[labels_t == c].float().mean())
                 for c, name in enumerate(class_names) if bool((labels_t == c).any())}
    return {"n": int(len(labels_t)), "top1": float(top1.float().mean()), "top5": float(hit_k.float().mean()),
            "top5_k": k, "loss": float(F.cross_entropy(logits, labels_t)), "per_class": per_class}


def hardware(device: torch.device | str = "cpu") -> str:
    """What ran the work: the GPU's name, or the CPU model and the torch threads used."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"
