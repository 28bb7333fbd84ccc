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
             device: str = "cpu", workers: int = 1, precision: str | None = None, engine: str | None = None,
             source=None) -> dict:
    """top-1, top-5 and per-class top-1 of ``model`` (a ZFNet with its config) on ``data``.

    With ``precision`` or ``engine``, the figures are those of the :class:`~zfserve.engine.classifier.Classifier`
    running that way (built from ``source``, the model's name, directory or Snapshot, when given; int8 is made
    on first use), and ``reference`` holds eager fp32's top-1/top-5 with the top-1 agreement between the two."""
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
    if precision is None and engine is None:
        report = accuracy_report(logits, labels, classes)
    else:
        report = _precision_report(source if source is not None else model, logits, images, labels, classes,
                                   config, batch, precision, engine)
    report.update({"model": config.name, "data": data if data != "synthetic" else f"synthetic seed {seed}",
                   "data_seconds": round(generated - started, 1),
                   "eval_seconds": round(time.time() - generated, 1),
                   "hardware": hardware(device)})
    return report


def _precision_report(source, reference_logits: torch.Tensor, images: np.ndarray, labels: np.ndarray,
                      classes: list[str], config: ModelConfig, batch: int, precision, engine) -> dict:
    """The accuracy report of a Classifier run at ``precision`` on ``engine``, with eager fp32 as reference."""
    from .engine.classifier import Classifier
    from .engine.quantize import agreement_report
    classifier = Classifier(source, precision=precision, engine=engine, max_batch_size=batch)
    probabilities = np.concatenate([classifier.probabilities(centre_inputs(images[i:i + batch], config))
                                    for i in range(0, len(images), batch)])
    # log-probabilities stand in for logits: top-k, loss and per-class figures are the same functions of them
    report = accuracy_report(torch.from_numpy(np.log(np.maximum(probabilities, 1e-30))), labels, classes)
    compared = agreement_report(torch.softmax(reference_logits, dim=1).numpy(), probabilities,
                                np.asarray(labels))
    report.update(precision=classifier.precision, engine=classifier.engine, reference={
        "precision": "fp32", "engine": "eager PyTorch", "top1": compared["reference_top1"],
        "top5": compared["reference_top5"]}, agreement=compared["agreement"],
        top1_drop_pt=compared["top1_drop_pt"], max_abs_probability_diff=compared["max_abs_probability_diff"],
        mean_abs_probability_diff=compared["mean_abs_probability_diff"])
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


# The CPU's vector extensions that decide fp32, bf16 and int8 speed (recorded beside CPU benchmark figures).
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
                "amx_int8")


def cpu_facts() -> dict:
    """The CPU's model name and which of :data:`VECTOR_FLAGS` it has (from /proc/cpuinfo where there is one)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():   # the first processor's fields
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return {"model": fields.get("model name") or platform.processor() or platform.machine(),
            "flags": sorted(set(fields.get("flags", "").split()) & set(VECTOR_FLAGS))}


def hardware(device: torch.device | str = "cpu") -> str:
    """What ran the work: the GPU's name, or the CPU model and the torch threads used."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_facts()['model']}, {torch.get_num_threads()} threads"
