"""The paper's training recipe (ZFNet v3 §3): SGD lr 1e-2, momentum 0.9, mini-batch 128, dropout 0.5,
N(0, 0.01^2) weights and zero biases, RMS filter clipping (radius 0.1) after every update, per-pixel mean
image, random 224 crops of the 256 images with horizontal flips, learning rate /10 when validation plateaus.

Determinism: the sample order, crop offsets and flips of epoch ``e`` come from a generator seeded with
``(seed, e)`` and dropout from the global generator re-seeded at each epoch start, so a run resumed from an
epoch checkpoint continues bit-identically (on CPU). Checkpoints are safetensors + JSON, never pickle.
Crop offsets are drawn per sample (not per batch position), so a DDP run with dropout 0 computes the same
updates as one process with the same global batch.

DDP: launch with ``torchrun --nproc_per_node N -m zfserve.cli train ...``; gloo on CPU, nccl on CUDA. Each
rank takes every N-th sample of the epoch's order and ``batch_size / N`` per step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, PreprocessConfig, TrainConfig
from .errors import InvalidArgumentError
from .model import CONV_LAYERS, ZFNet, build
from .weights import MEAN_IMAGE_TENSOR, save_model

# The paper's feature-evolution epochs (Fig. 4), out of its 70-epoch run.
PAPER_EVOLUTION_EPOCHS = (1, 2, 5, 10, 20, 30, 40, 64)
PAPER_EPOCHS = 64
CHECKPOINT_DIR = "checkpoint"
SNAPSHOT_DIR = "snapshots"


# ---------------------------------------------------------------------------------------------- helpers
def scaled_evolution_epochs(epochs: int) -> list[int]:
    """The paper's evolution epochs (1, 2, 5, 10, 20, 30, 40, 64 of ~70) scaled to a run of ``epochs``."""
    return sorted({max(1, min(epochs, round(e * epochs / PAPER_EPOCHS))) for e in PAPER_EVOLUTION_EPOCHS})


def init_weights(model: ZFNet, scheme: str, generator: torch.Generator, input_rms: float | None = None) -> None:
    """``paper``: every weight N(0, 0.01^2), biases 0.

    ``scaled`` (a documented deviation for short runs): conv1 weights N(0, s^2) with s = 1 / (sqrt(fan_in) *
    input_rms), so conv1's outputs start with unit RMS on the mean-subtracted raw-pixel input; conv2..fc7 He's
    fan-in scaling N(0, 2 / fan_in), which keeps that scale through the ReLUs; fc8 keeps N(0, 0.01^2) (small
    initial logits); biases 0. With 0.01 everywhere the signal shrinks ~2-4x per layer (logits start near 1e-3)
    and plain SGD sits on a plateau far longer than a short run lasts. Filter clipping still applies.
    """
    model.reset_parameters(generator)
    if scheme == "paper":
        return
    if input_rms is None or input_rms <= 0:
        raise InvalidArgumentError("init 'scaled' needs the RMS of the mean-subtracted input", field="init")
    with torch.no_grad():
        for name in CONV_LAYERS + ("fc6", "fc7"):
            weight = getattr(model, name).weight
            fan_in = weight[0].numel()
            std = 1.0 / (math.sqrt(fan_in) * input_rms) if name == "conv1" else math.sqrt(2.0 / fan_in)
            weight.normal_(0.0, std, generator=generator)


def conv1_lr_factor(cfg: "TrainConfig", input_rms: float) -> float:
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


def input_rms(images: np.ndarray, mean: np.ndarray, n: int = 256) -> float:
    """RMS of the mean-subtracted pixels of the first ``n`` images (raw pixel units)."""
    x = np.asarray(images[:n], dtype=np.float32).transpose(0, 3, 1, 2) - mean
    return float(np.sqrt(np.mean(x * x)))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device={name!r}: no CUDA device available; accepted: cpu, auto", field="device")
    return torch.device(name)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, S, S, 3) -> (N, size, size, 3) by area averaging (only for small test configurations)."""
    if images.shape[1] == size:
        return images
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for start in range(0, len(images), 256):
        x = torch.from_numpy(np.array(images[start:start + 256])).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="area")
        out[start:start + 256] = x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return out


def load_data(cfg: TrainConfig, log=None):
    """(train_images, train_labels, val_images, val_labels, class_names); images uint8 (N, R, R, 3)."""
    from .data import CLASSES, image_folder_arrays, synthetic_arrays
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
    return _resize_images(tr, cfg.resize), trl, _resize_images(va, cfg.resize), val, classes


def mean_image(images: np.ndarray) -> np.ndarray:
    """The per-pixel mean (3, R, R) float32 of uint8 (N, R, R, 3) images, accumulated in float64."""
    total = np.zeros(images.shape[1:], dtype=np.float64)
    for start in range(0, len(images), 512):
        total += np.asarray(images[start:start + 512], dtype=np.float64).sum(axis=0)
    return (total / len(images)).transpose(2, 0, 1).astype(np.float32)


def _state_to_tensors(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """Optimizer state (momentum buffers; Adam's moments and step) keyed ``<param name>/<state key>``."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    out[f"{names[id(p)]}/{key}"] = value.detach().cpu().contiguous()
    return out


def _tensors_to_state(optimizer: torch.optim.Optimizer, model: nn.Module, tensors: dict) -> None:
    for name, p in model.named_parameters():
        for full, value in tensors.items():
            prefix, _, key = full.rpartition("/")
            if prefix == name:
                device = p.device if value.dim() else "cpu"    # Adam keeps its step count on the CPU
                optimizer.state[p][key] = value.to(device).clone()


def _atomic_write_tensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _hardware(device: torch.device) -> str:
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


class _Progress:
    """One status line on stderr: redrawn in place on a terminal, a line every ``every`` steps otherwise.

    ``due`` says whether this step shows a line, so the caller only pays for the numbers (on CUDA, a device
    sync) when they are printed."""

    def __init__(self, enabled: bool, every: int = 10, tty_every: int = 1):
        self.enabled, self.tty = enabled, sys.stderr.isatty()
        self.every = tty_every if self.tty else every

    def due(self, step: int, last: bool) -> bool:
        return self.enabled and (last or step % self.every == 0)

    def show(self, text: str, last: bool) -> None:
        if self.tty:
            sys.stderr.write("\r" + text + ("\n" if last else ""))
            sys.stderr.flush()
        else:
            print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- batches
def _crop_batch(images, indices: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
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


# Side range (pixels) of the squares --erase cuts out, around the occluders of the occlusion analysis (48).
ERASE_SIDES = (16, 64)


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


def centre_inputs(images: np.ndarray, config: ModelConfig) -> np.ndarray:
    """uint8 (N, R, R, 3) -> float32 (N, 3, crop, crop) through ``zfserve.preprocess.to_input`` (one definition)."""
    from .preprocess import to_input
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


# ---------------------------------------------------------------------------------------------- training-only structure
class TrainingNet(nn.Module):
    """ZFNet plus structure that exists only while training and folds away exactly when the model is saved
    (``--batchnorm``, ``--tied-fc6``; documented deviations that make short runs learn, see the README).

    * ``batchnorm``: a BatchNorm2d after each conv, before its ReLU. In eval mode BN is affine per channel, so
      :meth:`export` folds it into the conv: ``w' = w * g / s``, ``b' = (b - mu) * g / s + beta`` with
      ``s = sqrt(running_var + eps)``.
    * ``tied_fc6``: fc6 sees the mean of pool5 over its positions, i.e. one weight per (unit, channel) shared
      by all 6 x 6 positions, so the classifier need not learn each position separately. :meth:`export`
      writes the full fc6 whose weight for input ``c * P + p`` (flatten order) is ``W[:, c] / P``.

    The exported network is the plain paper ZFNet, equal in eval mode to this one (up to float rounding).
    """

    def __init__(self, model: ZFNet, *, batchnorm: bool, tied_fc6: bool):
        super().__init__()
        self.model = model
        self.bn = nn.ModuleDict({name: nn.BatchNorm2d(getattr(model, name).out_channels)
                                 for name in CONV_LAYERS}) if batchnorm else None
        self.fc6 = nn.Linear(model.conv5.out_channels, model.fc6.out_features) if tied_fc6 else None

    def trained_parameters(self):
        """Everything the optimizer updates: with a tied fc6, the model's own fc6 is only written by export."""
        skip = {id(p) for p in self.model.fc6.parameters()} if self.fc6 is not None else set()
        return [p for p in self.parameters() if id(p) not in skip]

    def _conv(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = getattr(self.model, name)(x)
        return self.bn[name](x) if self.bn is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.norm1(m.pool1(m.relu1(self._conv("conv1", x))))
        x = m.norm2(m.pool2(m.relu2(self._conv("conv2", x))))
        x = m.relu3(self._conv("conv3", x))
        x = m.relu4(self._conv("conv4", x))
        x = m.pool5(m.relu5(self._conv("conv5", x)))
        x = self.fc6(x.mean(dim=(2, 3))) if self.fc6 is not None else m.fc6(torch.flatten(x, 1))
        x = m.drop6(m.relu6(x))
        x = m.drop7(m.relu7(m.fc7(x)))
        return m.fc8(x)

    @torch.no_grad()
    def export(self) -> ZFNet:
        """A plain ZFNet (float32, CPU, eval mode, sharing ``model.config``) with BN and the tied fc6 folded in."""
        out = build(self.model.config)
        out.load_state_dict({k: v.detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()})
        if self.bn is not None:
            for name in CONV_LAYERS:
                conv, bn = getattr(out, name), self.bn[name]
                scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).float().cpu()
                conv.bias.copy_((conv.bias - bn.running_mean.float().cpu()) * scale + bn.bias.float().cpu())
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
        if self.fc6 is not None:
            positions = out.fc6.in_features // out.conv5.out_channels
            out.fc6.weight.copy_(self.fc6.weight.float().cpu().repeat_interleave(positions, dim=1) / positions)
            out.fc6.bias.copy_(self.fc6.bias.float().cpu())
        out.config = self.model.config
        return out.eval()


# Images whose centre crops set the BatchNorm statistics after each epoch (see recalibrate_batchnorm).
BN_CALIBRATION_IMAGES = 1024


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, batches) -> None:
    """Set every BatchNorm's running statistics to the exact average over ``batches`` (float32, no autocast).

    The running averages kept during training trail weights that move at every step (and are accumulated under
    bf16 autocast when ``amp`` is on); at a high learning rate they made eval-mode accuracy 13 points lower than
    batch statistics gave. Recomputing them on the final weights makes the folded model match what was trained.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        return
    was_training = net.training
    net.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None          # cumulative average over the batches
        bn.train()
    for x in batches:
        net(x)
    for bn in norms:
        bn.momentum = 0.1
    net.train(was_training)


def _exported(trainee: nn.Module) -> ZFNet:
    return trainee.export() if isinstance(trainee, TrainingNet) else trainee


# ---------------------------------------------------------------------------------------------- training
def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, log=None) -> dict:
    """Run (or resume) training; returns the final state dict of metrics. Writes ``cfg.out`` as a model dir."""
    cfg.validate()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = _device(cfg.device)
    if distributed:
        import torch.distributed as dist
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
    if cfg.batch_size % world:
        raise InvalidArgumentError(f"batch_size={cfg.batch_size} must be divisible by the number of processes "
                                   f"({world})", field="batch_size")
    say = (log or (lambda msg: print(msg, file=sys.stderr, flush=True))) if rank == 0 else (lambda msg: None)
    out = Path(cfg.out)
    ckpt = out / CHECKPOINT_DIR

    images, labels, val_images, val_labels, classes = load_data(cfg, log=say)
    state = {"epoch": 0, "step": 0, "lr": cfg.lr, "best_val_loss": None, "bad_epochs": 0, "history": [],
             "wall_time_s": 0.0}
    model_config = ModelConfig(name=cfg.name, num_classes=len(classes), fc_width=cfg.fc_width,
                               input_size=cfg.crop, class_names=list(classes),
                               preprocess=PreprocessConfig(resize=cfg.resize, crop=cfg.crop, mean="image"))
    model = build(model_config)
    model.drop6.p = model.drop7.p = cfg.dropout
    # What the optimizer trains: the model itself, or the model inside TrainingNet's fold-away structure.
    trainee = TrainingNet(model, batchnorm=cfg.batchnorm, tied_fc6=cfg.tied_fc6) \
        if cfg.batchnorm or cfg.tied_fc6 else model
    resumed = resume and (ckpt / "state.json").is_file()
    if resumed:
        from .weights import read_tensors
        state = json.loads((ckpt / "state.json").read_text())
        saved = json.loads((ckpt / "train_config.json").read_text())
        for key in ("seed", "batch_size", "crop", "resize", "fc_width", "train_seed", "train_n", "data",
                    "batchnorm", "tied_fc6"):
            if saved.get(key) != getattr(cfg, key):
                raise InvalidArgumentError(f"resume: {key}={getattr(cfg, key)!r} differs from the checkpoint's "
                                           f"{saved.get(key)!r}", field=key)
        if saved.get("lr") != cfg.lr:   # an explicit new --lr on resume replaces the checkpoint's rate
            say(f"resume: lr {state['lr']:g} -> {cfg.lr:g} (--lr differs from the checkpoint's {saved.get('lr')})")
            state["lr"] = cfg.lr
            state.setdefault("lr_overrides", []).append({"after_epoch": state["epoch"], "lr": cfg.lr})
        tensors = read_tensors(ckpt / "model.safetensors")
        model_config.preprocess.mean_image = tensors.pop(MEAN_IMAGE_TENSOR).numpy()
        trainee.load_state_dict(tensors)
        say(f"resumed from {ckpt} after epoch {state['epoch']} (lr {state['lr']:g})")
    else:
        if resume:
            say(f"resume: no checkpoint in {ckpt}; starting fresh")
        model_config.preprocess.mean_image = mean_image(images)
    rms = input_rms(images, model_config.preprocess.mean_image)
    if not resumed:
        init_weights(model, cfg.init, torch.Generator().manual_seed(cfg.seed), rms)
        if cfg.tied_fc6:    # He's fan-in init for the shared weights (fan-in: conv5's channels)
            trainee.fc6.weight.data.normal_(0.0, math.sqrt(2.0 / trainee.fc6.in_features),
                                            generator=torch.Generator().manual_seed(cfg.seed + 1))
            trainee.fc6.bias.data.zero_()
        model.clip_filter_rms_(cfg.clip_radius)
    mean = torch.from_numpy(model_config.preprocess.mean_image).to(device)
    # On CUDA the uint8 training set lives on the GPU (30,000 images are 5.9 GB), so batches are one gather.
    batch_source = torch.from_numpy(np.asarray(images)).to(device) if device.type == "cuda" else images
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # fixed shapes: let cuDNN pick its fastest algorithms once
    trainee.to(device)
    if cfg.channels_last:
        trainee.to(memory_format=torch.channels_last)
    net = trainee
    if distributed:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(trainee, device_ids=[device.index] if device.type == "cuda" else None)
    factor = conv1_lr_factor(cfg, rms)
    groups = [{"params": [model.conv1.weight], "lr_factor": factor},
              {"params": [p for p in (trainee.trained_parameters() if isinstance(trainee, TrainingNet)
                                      else model.parameters()) if p is not model.conv1.weight], "lr_factor": 1.0}]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=state["lr"], momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(groups, lr=state["lr"], betas=(cfg.momentum, 0.999),
                                     weight_decay=cfg.weight_decay)
    if resume and (ckpt / "optimizer.safetensors").is_file() and state["epoch"] > 0:
        from .weights import read_tensors
        _tensors_to_state(optimizer, trainee, read_tensors(ckpt / "optimizer.safetensors"))
    snapshots = [int(e) for e in cfg.snapshot_epochs] or scaled_evolution_epochs(cfg.epochs)
    if rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n", ckpt / "train_config.json")

    per_rank = cfg.batch_size // world
    steps = len(labels) // cfg.batch_size
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    if steps < 1:
        raise InvalidArgumentError(f"batch_size={cfg.batch_size} exceeds the {len(labels)} training images",
                                   field="batch_size")
    # On CUDA the running loss and accuracy stay on the device and are read only when a line is shown.
    bar = _Progress(progress and rank == 0, tty_every=10 if device.type == "cuda" else 1)

    def reduce_sum(values) -> list[float]:
        """Sum ``values`` over the ranks (NCCL needs CUDA tensors, gloo CPU ones)."""
        t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        if distributed:
            torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    say(f"training {len(labels)} images ({len(classes)} classes), {steps} steps/epoch of {cfg.batch_size}, "
        f"{world} process(es) on {device}, init {cfg.init}, lr {state['lr']:g}, snapshots at epochs {snapshots}")

    centre = torch.full((len(labels), 2), (cfg.resize - cfg.crop) // 2)
    no_flip = torch.zeros(len(labels), dtype=torch.bool)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        gen = _epoch_generator(cfg.seed, epoch)
        order = torch.randperm(len(labels), generator=gen)
        offsets = torch.randint(0, cfg.resize - cfg.crop + 1, (len(labels), 2), generator=gen)
        flips = torch.rand(len(labels), generator=gen) < 0.5
        if cfg.erase:   # drawn after the crops, so runs without --erase keep their random stream
            side = torch.randint(ERASE_SIDES[0], ERASE_SIDES[1] + 1, (len(labels),), generator=gen)
            corner = (torch.rand(len(labels), 2, generator=gen) * (cfg.crop - side[:, None] + 1)).long()
            keep = torch.rand(len(labels), generator=gen) < cfg.erase
            boxes = torch.stack([corner[:, 0], corner[:, 1], side * keep], dim=1)
        torch.manual_seed(cfg.seed * 7919 + epoch * 104729 + rank)   # dropout masks
        net.train()
        t0, seen_here = time.time(), 0
        loss_here = torch.zeros((), dtype=torch.float64, device=device)
        correct_here = torch.zeros((), dtype=torch.int64, device=device)
        for step in range(steps):
            batch = order[step * cfg.batch_size:(step + 1) * cfg.batch_size][rank::world]
            x = _crop_batch(batch_source, batch, offsets, flips, mean, cfg.crop)
            if cfg.erase:
                x = erase_squares(x, boxes[batch])
            x = x.contiguous(memory_format=fmt)
            y = torch.from_numpy(labels[batch.numpy()]).to(device)
            lr = state["lr"]
            if cfg.warmup_steps and state["step"] < cfg.warmup_steps:
                lr = lr * (state["step"] + 1) / cfg.warmup_steps
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_factor"]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if cfg.conv1_weight_decay:
                shrink_conv1_(model, lr * cfg.conv1_weight_decay)
            model.clip_filter_rms_(cfg.clip_radius)
            state["step"] += 1
            loss_here += loss.detach().double() * len(y)
            correct_here += (logits.argmax(1) == y).sum()
            seen_here += len(y)
            if bar.due(step + 1, step + 1 == steps):    # rank 0's running numbers; the rate is all ranks'
                rate = seen_here * world / max(time.time() - t0, 1e-9)
                bar.show(f"epoch {epoch}/{cfg.epochs} step {step + 1}/{steps} loss {float(loss_here) / seen_here:.4f} "
                         f"acc {int(correct_here) / seen_here:.3f} lr {lr:.2g} {rate:.1f} img/s", step + 1 == steps)
        loss_sum, correct, seen = reduce_sum([float(loss_here), float(correct_here), seen_here])
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training diverged in epoch {epoch} (loss {loss_sum}); lower --lr")
        if cfg.batchnorm:   # centre crops of this epoch's first images, as the model will see them
            chosen = order[:min(len(order), BN_CALIBRATION_IMAGES)][rank::world]
            recalibrate_batchnorm(trainee, (
                _crop_batch(batch_source, part, centre, no_flip, mean, cfg.crop).contiguous(memory_format=fmt)
                for part in chosen.split(cfg.batch_size)))
        # Validation on every rank's share, summed: the lr decision is identical everywhere.
        logits = predict_logits(trainee, val_images[rank::world], model_config, device=device)
        vy = torch.as_tensor(val_labels[rank::world])
        vstats = reduce_sum([float(F.cross_entropy(logits, vy, reduction="sum")),
                             float((logits.argmax(1) == vy).sum()), len(vy)])
        val_loss, val_acc = vstats[0] / vstats[2], vstats[1] / vstats[2]
        best = state["best_val_loss"]
        if best is None or val_loss < best * (1 - cfg.plateau_threshold):
            state["best_val_loss"], state["bad_epochs"] = val_loss, 0
        else:
            state["bad_epochs"] += 1
            if state["bad_epochs"] >= cfg.plateau_patience and state["lr"] / 10 >= cfg.min_lr:
                state["lr"] /= 10
                state["bad_epochs"] = 0
                say(f"validation plateau: lr -> {state['lr']:g}")
        epoch_time = time.time() - t0
        state["wall_time_s"] += epoch_time
        state["epoch"] = epoch
        state["history"].append({"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                                 "val_loss": val_loss, "val_top1": val_acc, "lr": lr,
                                 "seconds": round(epoch_time, 1), "img_per_s": round(seen / epoch_time, 2)})
        say(f"epoch {epoch}: train loss {loss_sum / seen:.4f} acc {correct / seen:.3f} | val loss {val_loss:.4f} "
            f"top-1 {val_acc:.4f} | {epoch_time:.0f}s")
        # A time budget ends the run after the last epoch that fits (judged by this epoch's length); that epoch
        # is kept as a snapshot too, so the evolution figure ends where training did.
        stop = bool(cfg.max_minutes) and epoch < cfg.epochs and \
            state["wall_time_s"] + epoch_time > cfg.max_minutes * 60
        stop = reduce_sum([float(stop)])[0] > 0     # every rank takes the same decision
        if stop:
            state["stopped"] = f"time budget of {cfg.max_minutes:g} min reached after epoch {epoch} of {cfg.epochs}"
            say(state["stopped"])
        if rank == 0:
            _write_checkpoint(trainee, optimizer, model_config, state, cfg, ckpt, epoch in snapshots or stop, device)
        if distributed:
            torch.distributed.barrier()
        if stop:
            break
    if cfg.evolution and rank == 0:
        say(f"feature evolution -> {write_evolution(out)}")
    if distributed:
        torch.distributed.destroy_process_group()
    return state


def _cpu_float32(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().float().contiguous() for k, v in module.state_dict().items()}


def _write_checkpoint(trainee, optimizer, model_config, state, cfg, ckpt: Path, snapshot: bool, device) -> None:
    """checkpoint/ holds what training resumes from (``trainee``'s full state: BN statistics, a tied fc6); the
    model directory and the snapshots hold the exported plain ZFNet."""
    out = ckpt.parent
    model = _exported(trainee)
    if snapshot:
        (out / SNAPSHOT_DIR).mkdir(parents=True, exist_ok=True)
        _atomic_write_tensors(_cpu_float32(model), out / SNAPSHOT_DIR / f"epoch_{state['epoch']:03d}.safetensors")
    weights = _cpu_float32(trainee)
    _atomic_write_tensors({**weights, MEAN_IMAGE_TENSOR: torch.from_numpy(model_config.preprocess.mean_image)},
                          ckpt / "model.safetensors")
    _atomic_write_tensors(_state_to_tensors(optimizer, trainee), ckpt / "optimizer.safetensors")
    _atomic_write_text(json.dumps(state, indent=2) + "\n", ckpt / "state.json")
    # The model directory itself (weights + config.json) always holds the latest epoch.
    last = state["history"][-1]
    provenance = {
        "source": "zfserve train", "command": cfg.command, "seed": cfg.seed, "init": cfg.init,
        "data": cfg.data if cfg.data != "synthetic" else
        {"kind": "synthetic", "train_seed": cfg.train_seed, "train_n": cfg.train_n, "val_seed": cfg.val_seed,
         "val_n": cfg.val_n},
        "recipe": {k: getattr(cfg, k) for k in ("optimizer", "batch_size", "lr", "momentum", "weight_decay", "dropout",
                                                  "clip_radius", "warmup_steps", "amp", "plateau_patience",
                                                  "batchnorm", "tied_fc6", "erase",
                                                  "conv1_weight_decay")},
        "epochs": state["epoch"], "steps": state["step"], "final": {"val_top1": last["val_top1"],
                                                                    "val_loss": last["val_loss"],
                                                                    "train_loss": last["train_loss"]},
        "wall_time_s": round(state["wall_time_s"], 1), "hardware": _hardware(device),
        **({"stopped": state["stopped"]} if "stopped" in state else {}),
        "torch": torch.__version__,
    }
    model_config.provenance = provenance
    save_model(model, out)   # copies tensors to CPU itself


def load_snapshot(path: Path, config: ModelConfig) -> ZFNet:
    from .weights import read_tensors
    model = build(config)
    model.load_state_dict({k: v.float() for k, v in read_tensors(path).items()})
    return model.eval()


# ---------------------------------------------------------------------------------------------- feature evolution
EVOLUTION_FILE = "evolution.npz"
EVOLUTION_SIZE = 64


def snapshot_paths(run_dir: str | Path) -> dict[int, Path]:
    """The epoch snapshots a run kept: {epoch: path}."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    paths = sorted(folder.glob("epoch_*.safetensors")) if folder.is_dir() else []
    return {int(p.stem.split("_")[1]): p for p in paths}


def _render_projection(projection: np.ndarray, box, size: int) -> np.ndarray:
    """The projection inside the unit's receptive field, grey = 0, scaled by its own peak, as uint8 RGB."""
    from PIL import Image
    x0, y0, x1, y1 = box
    patch = projection[:, y0:y1, x0:x1].transpose(1, 2, 0)
    peak = float(np.abs(patch).max())
    img = np.clip(np.rint(127.5 + 127.5 * (patch / peak if peak > 0 else patch)), 0, 255).astype(np.uint8)
    resample = Image.NEAREST if max(img.shape[:2]) < size // 2 else Image.BILINEAR
    return np.asarray(Image.fromarray(img).resize((size, size), resample))


def evolution_data(snapshots: dict[int, Path], config: ModelConfig, probes: np.ndarray, *,
                   layers=CONV_LAYERS, maps_per_layer: int = 6, seed: int = 0,
                   size: int = EVOLUTION_SIZE) -> dict[str, np.ndarray]:
    """Feature evolution (paper Fig. 4): for a seeded subset of feature maps per layer, at every snapshot
    epoch, the deconv projection of that map's strongest activation over the probe images.

    ``probes`` are network inputs (N, 3, crop, crop). Returns arrays for ``np.savez``: ``renders`` uint8
    (layers, maps, epochs, size, size, 3), ``epochs``, ``layers``, ``maps`` (layers, maps), and per render the
    ``image_index``, ``position`` (y, x) in the layer's map and the ``activation``.
    """
    from .engine.deconv import DeconvEngine
    if not snapshots:
        raise InvalidArgumentError("no snapshots to compute feature evolution from", field="snapshots")
    epochs = sorted(snapshots)
    rng = np.random.default_rng(seed)
    probe_t = torch.from_numpy(np.ascontiguousarray(probes, dtype=np.float32))
    model = build(config)
    widths = {name: getattr(model, name).out_channels for name in CONV_LAYERS}
    maps = np.stack([np.sort(rng.choice(widths[layer], maps_per_layer, replace=False)) for layer in layers])
    shape = (len(layers), maps_per_layer, len(epochs))
    renders = np.zeros(shape + (size, size, 3), dtype=np.uint8)
    image_index = np.zeros(shape, dtype=np.int64)
    position = np.zeros(shape + (2,), dtype=np.int64)
    activation = np.zeros(shape, dtype=np.float32)
    for e, epoch in enumerate(epochs):
        model = load_snapshot(snapshots[epoch], config)
        with torch.no_grad():
            acts = model.trace(probe_t, layers=layers, switches=False).activations
        engine = DeconvEngine(model)
        for li, layer in enumerate(layers):
            a = acts[layer]
            n_img, _, h, w = a.shape
            units, where = [], []
            for mi, channel in enumerate(maps[li]):
                flat = int(a[:, channel].flatten().argmax())   # strongest over all probes and positions
                n, rest = divmod(flat, h * w)
                units.append((n, int(channel), rest // w, rest % w))
                where.append(mi)
            # Forward only the images that hold a chosen unit.
            chosen = sorted({u[0] for u in units})
            remap = {n: i for i, n in enumerate(chosen)}
            projected = engine.project(probe_t[chosen], layer,
                                       units=[(remap[n], c, y, x) for n, c, y, x in units])
            for mi, (unit, proj) in zip(where, zip(units, projected)):
                renders[li, mi, e] = _render_projection(proj.projection, proj.box, size)
                image_index[li, mi, e] = unit[0]
                position[li, mi, e] = unit[2:]
                activation[li, mi, e] = proj.activation
    return {"renders": renders, "epochs": np.asarray(epochs, dtype=np.int64),
            "layers": np.asarray(layers, dtype="U8"), "maps": maps.astype(np.int64),
            "image_index": image_index, "position": position, "activation": activation}


def probe_inputs(config: ModelConfig, *, seed: int, n: int) -> np.ndarray:
    """The fixed probe set: the first ``n`` synthetic images of ``seed`` through the model's preprocessing."""
    from .data import synthetic_arrays
    images, _ = synthetic_arrays(seed, n)
    return centre_inputs(_resize_images(images, config.preprocess.resize), config)


def write_evolution(run_dir: str | Path, model_dir: str | Path | None = None, *, probe_seed: int = 1,
                    probe_n: int = 110, maps_per_layer: int = 6, seed: int = 0) -> Path:
    """Compute feature evolution from a run's snapshots into ``model_dir/evolution.npz`` (default: the run
    directory itself, which is also a model directory). Used after training and by ``--evolution``."""
    from .weights import read_config, read_tensors
    run_dir = Path(run_dir)
    model_dir = Path(model_dir or run_dir)
    config = read_config(run_dir)
    config.preprocess.mean_image = read_tensors(run_dir / CHECKPOINT_DIR / "model.safetensors")[
        MEAN_IMAGE_TENSOR].numpy()
    probes = probe_inputs(config, seed=probe_seed, n=probe_n)
    data = evolution_data(snapshot_paths(run_dir), config, probes, maps_per_layer=maps_per_layer, seed=seed)
    data["probe"] = np.asarray([probe_seed, probe_n], dtype=np.int64)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / EVOLUTION_FILE
    np.savez_compressed(path, **data)
    return path
