"""The paper's training recipe (ZFNet v3 §3) as pieces: initialization, the data of a run, batches (random
crops, flips, Cutout), the optimizer and the feature-evolution epochs. :func:`zfserve.train.train` runs them
(and steps the learning-rate schedule).

Determinism: the sample order, crop offsets, flips and Cutout squares of epoch ``e`` come from a generator
seeded with ``(seed, e)`` (:func:`epoch_generator`); crop offsets are drawn per sample (not per batch
position), so a DDP run with dropout 0 computes the same updates as one process with the same global batch.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn

from ..config import ModelConfig, PreprocessConfig, TrainConfig
from ..errors import InvalidArgumentError
from ..model import ZFNet

# The paper's feature-evolution epochs (Fig. 4), out of its 70-epoch run.
PAPER_EVOLUTION_EPOCHS = (1, 2, 5, 10, 20, 30, 40, 64)
PAPER_EPOCHS = 64
# Side range (pixels) of the squares --erase cuts out, around the occluders of the occlusion analysis (48).
ERASE_SIDES = (16, 64)


def scaled_evolution_epochs(epochs: int) -> list[int]:
    """The paper's evolution epochs (1, 2, 5, 10, 20, 30, 40, 64 of ~70) scaled to a run of ``epochs``."""
    return sorted({max(1, min(epochs, round(e * epochs / PAPER_EPOCHS))) for e in PAPER_EVOLUTION_EPOCHS})


# ---------------------------------------------------------------------------------------------- init
def input_rms(images: np.ndarray, mean: np.ndarray, n: int = 256) -> float:
    """RMS of the mean-subtracted pixels of the first ``n`` uint8 (N, R, R, 3) images (raw pixel units)."""
    x = np.asarray(images[:n], dtype=np.float32).transpose(0, 3, 1, 2) - mean
    return float(np.sqrt(np.mean(x * x)))


@torch.no_grad()
def he_normal_(layer: nn.Module, generator: torch.Generator | None = None) -> None:
    """He's fan-in init of ``layer``'s weight, N(0, 2 / fan_in): it keeps the signal's scale through ReLUs."""
    layer.weight.normal_(0.0, math.sqrt(2.0 / layer.weight[0].numel()), generator=generator)


@torch.no_grad()
def init_scaled_(conv1: nn.Module, later: Iterable[nn.Module], rms: float,
                 generator: torch.Generator | None = None) -> None:
    """The "scaled" init (a documented deviation for short runs): conv1's weights N(0, s^2) with
    s = 1 / (sqrt(fan_in) * rms), so its outputs start with unit RMS on mean-subtracted raw pixels of RMS
    ``rms``; every layer in ``later`` :func:`he_normal_`, which keeps that scale through the ReLUs. Biases
    are left alone. Weights are drawn in order, conv1 first, from ``generator`` (default:
    the global one)."""
    conv1.weight.normal_(0.0, 1.0 / (math.sqrt(conv1.weight[0].numel()) * rms), generator=generator)
    for layer in later:
        he_normal_(layer, generator)


def init_weights(model: ZFNet, scheme: str, generator: torch.Generator, input_rms: float | None = None) -> None:
    """``paper``: every weight N(0, 0.01^2), biases 0.

    ``scaled``: :func:`init_scaled_` for conv1 .. fc7, fc8 keeps N(0, 0.01^2) (small initial logits), biases 0.
    With 0.01 everywhere the signal shrinks ~2-4x per layer (logits start near 1e-3) and plain SGD sits on a
    plateau far longer than a short run lasts. Filter clipping still applies.
    """
    model.reset_parameters(generator)
    if scheme == "paper":
        return
    if input_rms is None or input_rms <= 0:
        raise InvalidArgumentError("init 'scaled' needs the RMS of the mean-subtracted input", field="init")
    init_scaled_(model.conv1, [getattr(model, name) for name in model.conv_layers[1:] + ("fc6", "fc7")], input_rms,
                 generator)


def conv1_lr_factor(cfg: TrainConfig, input_rms: float) -> float:
    """conv1's learning-rate multiplier. ``paper`` init: 1 (the paper trains every layer alike).

    ``scaled`` init trains conv1 as if the input had unit RMS: with raw-pixel inputs of RMS r, conv1's weight
    gradients are r times, and its weights 1/r times, those of the unit-input network, so plain SGD needs
    lr / r^2 and Adam (whose steps ignore the gradient's scale) lr / r for conv1 to move at the same relative
    rate as the other layers. Without it Adam changes conv1's tiny weights by ~10% per step (noise filters)
    and SGD diverges.
    """
    if cfg.init != "scaled":
        return 1.0
    return 1.0 / input_rms ** 2 if cfg.optimizer == "sgd" else 1.0 / input_rms


@torch.no_grad()
def shrink_conv1_(model: ZFNet, fraction: float) -> None:
    """Decoupled (AdamW-style) weight decay of conv1 alone: ``w *= 1 - fraction``, fraction = lr x decay.

    Why conv1: with BatchNorm after it (``--batchnorm``) conv1's output is invariant to the scale of its
    weights, so the decay leaves the function alone and only changes *what the filters are made of*. The
    gradient keeps adding the structure the task needs (smooth colour and edge detectors), while the random
    init, which a short run never outgrows (after 1,248 Adam steps conv1 was still 0.97 cosine-similar to
    it, and rendered as noise), fades as (1 - fraction)^steps. Other layers are left to ``weight_decay``.
    """
    model.conv1.weight.mul_(1.0 - fraction)


def optimizer_for(cfg: TrainConfig, model: ZFNet, parameters, conv1_factor: float, lr: float):
    """SGD (the paper) or Adam over ``parameters``; conv1's weight in its own group with ``lr_factor``
    ``conv1_factor`` (see :func:`conv1_lr_factor`), the rest at factor 1."""
    groups = [{"params": [model.conv1.weight], "lr_factor": conv1_factor},
              {"params": [p for p in parameters if p is not model.conv1.weight], "lr_factor": 1.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


# ---------------------------------------------------------------------------------------------- data
def load_data(cfg: TrainConfig, log=None):
    """(train_images, train_labels, val_images, val_labels, class_names); images uint8 (N, R, R, 3)."""
    from ..data import CLASSES, image_folder_arrays, resize_images, synthetic_arrays
    if cfg.data == "synthetic":
        tr, trl = synthetic_arrays(cfg.train_seed, cfg.train_n, cache_dir=cfg.cache_dir, workers=cfg.workers,
                                   log=log)
        va, val = synthetic_arrays(cfg.val_seed, cfg.val_n, cache_dir=cfg.cache_dir, workers=cfg.workers)
        classes = list(CLASSES)
    else:
        tr, trl, classes = image_folder_arrays(cfg.data, resize=256)
        if cfg.val_data:
            va, val, val_classes = image_folder_arrays(cfg.val_data, resize=256)
            if val_classes != classes:
                raise InvalidArgumentError(f"val_data classes {val_classes} differ from data classes {classes}",
                                           field="val_data")
        else:  # a fixed 10% split (every 10th image) keeps the class balance of the folder
            held = np.arange(len(trl)) % 10 == 9
            va, val, tr, trl = tr[held], trl[held], tr[~held], trl[~held]
    return resize_images(tr, cfg.resize), trl, resize_images(va, cfg.resize), val, classes


def mean_image(images: np.ndarray) -> np.ndarray:
    """The per-pixel mean (3, R, R) float32 of uint8 (N, R, R, 3) images, accumulated in float64."""
    total = np.zeros(images.shape[1:], dtype=np.float64)
    for start in range(0, len(images), 512):
        total += np.asarray(images[start:start + 512], dtype=np.float64).sum(axis=0)
    return (total / len(images)).transpose(2, 0, 1).astype(np.float32)


def model_config_for(cfg: TrainConfig, classes) -> ModelConfig:
    """The config of the model a run trains (the per-pixel mean image is filled in once known)."""
    return ModelConfig(name=cfg.name, num_classes=len(classes), fc_width=cfg.fc_width, input_size=cfg.crop,
                       class_names=list(classes), preprocess=PreprocessConfig(resize=cfg.resize, crop=cfg.crop,
                                                                              mean="image"))


# ---------------------------------------------------------------------------------------------- batches
def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_draws(cfg: TrainConfig, epoch: int, n: int) -> dict:
    """Everything random about epoch ``epoch`` of ``n`` images, in a fixed order: the sample ``order``, crop
    ``offsets`` (n, 2), ``flips`` and, with ``cfg.erase``, Cutout ``boxes`` (n, 3) of (y0, x0, side) with
    side 0 for untouched samples (drawn after the crops, so runs without --erase keep their random stream)."""
    gen = epoch_generator(cfg.seed, epoch)
    draws = {"order": torch.randperm(n, generator=gen),
             "offsets": torch.randint(0, cfg.resize - cfg.crop + 1, (n, 2), generator=gen),
             "flips": torch.rand(n, generator=gen) < 0.5, "boxes": None}
    if cfg.erase:
        side = torch.randint(ERASE_SIDES[0], ERASE_SIDES[1] + 1, (n,), generator=gen)
        corner = (torch.rand(n, 2, generator=gen) * (cfg.crop - side[:, None] + 1)).long()
        keep = torch.rand(n, generator=gen) < cfg.erase
        draws["boxes"] = torch.stack([corner[:, 0], corner[:, 1], side * keep], dim=1)
    return draws


def crop_batch(images, indices: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
               mean: torch.Tensor, crop: int) -> torch.Tensor:
    """Random crops on ``mean``'s device: subtract the per-pixel mean image, cut each sample's crop, maybe flip it.

    ``images`` is uint8 (N, R, R, 3): a numpy array (possibly memory-mapped; only the batch's rows are read) or
    a torch tensor already on the training device (CUDA keeps the whole set there, so no per-step copies).
    One gather for the whole batch: row indices ``ys`` and column indices ``xs`` (reversed for a flipped
    sample) pick each crop out of its image and out of the mean image, so the values equal
    ``(image - mean)[..., oy:oy + crop, ox:ox + crop]`` (flipped) exactly. Returns float32 (B, 3, crop, crop)
    in channels-last memory order.
    """
    device = mean.device
    if torch.is_tensor(images):
        rows = images[indices.to(images.device)].to(device)
    else:
        rows = torch.from_numpy(np.asarray(images[indices.numpy()])).to(device)
    offsets, flips = offsets[indices].to(device), flips[indices].to(device)
    base = torch.arange(crop, device=device)
    ys = (offsets[:, 0:1] + base)[:, :, None]                                            # (B, crop, 1)
    xs = (offsets[:, 1:2] + torch.where(flips[:, None], crop - 1 - base, base))[:, None, :]  # (B, 1, crop)
    batch = torch.arange(len(rows), device=device)[:, None, None]
    patches = rows[batch, ys, xs].float() - mean.permute(1, 2, 0)[ys, xs]               # (B, crop, crop, 3)
    return patches.permute(0, 3, 1, 2)


def erase_squares(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Cutout: set ``x[i, :, y0:y0 + s, x0:x0 + s]`` to 0 (the mean, after mean subtraction) for each row
    ``(y0, x0, s)`` of ``boxes`` (B, 3); ``s = 0`` leaves that sample alone. The occlusion analysis puts the
    same mean-filled squares on images; a network trained without them can read such a square as an object
    (the synthetic set has a 'square' class), so occluding background alone moves its prediction."""
    crop = x.shape[-1]
    grid = torch.arange(crop, device=x.device)
    y0, x0, side = (boxes[:, i:i + 1].to(x.device) for i in range(3))
    rows = (grid >= y0) & (grid < y0 + side)                                     # (B, crop)
    cols = (grid >= x0) & (grid < x0 + side)
    return x.masked_fill((rows[:, :, None] & cols[:, None, :])[:, None], 0.0)
