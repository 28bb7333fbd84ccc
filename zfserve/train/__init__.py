"""The paper's training recipe (ZFNet v3 §3): SGD lr 1e-2, momentum 0.9, mini-batch 128, dropout 0.5,
N(0, 0.01^2) weights and zero biases, RMS filter clipping (radius 0.1) after every update, per-pixel mean
image, random 224 crops of the 256 images with horizontal flips, learning rate /10 when validation plateaus.

:func:`train` is setup (devices, data, model, optimizer, state) -> epochs (steps, BatchNorm statistics,
validation, the schedule, a checkpoint) -> end. Its pieces: :mod:`.recipe` (init, data, batches, optimizer),
:mod:`.trainee` (training-only structure folded away when saved), :mod:`.checkpoint` (what is written and
resumed from). Feature evolution (Fig. 4) from the epoch snapshots is :mod:`zfserve.paper.evolution`.

Determinism: everything random about epoch ``e`` comes from a generator seeded with ``(seed, e)`` and dropout
from the global generator re-seeded at each epoch start, so a run resumed from an epoch checkpoint continues
bit-identically (on CPU).

DDP: launch with ``torchrun --nproc_per_node N -m zfserve.cli train ...``; gloo on CPU, nccl on CUDA. Each
rank takes every N-th sample of the epoch's order and ``batch_size / N`` per step.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import _checks as checks
from ..config import TrainConfig
from ..errors import InvalidArgumentError
from ..evaluate import predict_logits
from ..model import build
from . import checkpoint
from .recipe import (conv1_lr_factor, crop_batch, epoch_draws, erase_squares, he_normal_, init_weights, input_rms,
                     load_data, mean_image, model_config_for, optimizer_for, scaled_evolution_epochs, shrink_conv1_)
from .trainee import BN_CALIBRATION_IMAGES, TrainingNet, recalibrate_batchnorm, trained_parameters

__all__ = ["TrainConfig", "train"]


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


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, log=None) -> dict:
    """Run (or resume from ``cfg.out/checkpoint``) training; writes ``cfg.out`` as a model directory after
    every epoch and returns the final state (epoch, step, lr, history, wall time)."""
    cfg.validate()
    run = _Run(cfg, progress=progress, log=log)
    run.setup(resume)
    for epoch in range(run.state["epoch"] + 1, cfg.epochs + 1):
        if run.epoch(epoch):
            break
    if run.distributed:
        torch.distributed.destroy_process_group()
    return run.state


class _Run:
    """One call of :func:`train`: what its phases share (devices and ranks, data, model, optimizer, state)."""

    def __init__(self, cfg: TrainConfig, *, progress: bool, log):
        self.cfg = cfg
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = checks.device(cfg.device, allow_auto=True)
        self.rank, self.world = 0, 1
        if self.distributed:
            import torch.distributed as dist
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
                torch.cuda.set_device(self.device)
        if cfg.batch_size % self.world:
            raise InvalidArgumentError(f"batch_size={cfg.batch_size} must be divisible by the number of processes "
                                       f"({self.world})", field="batch_size")
        print_line = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.say = print_line if self.rank == 0 else (lambda msg: None)
        self.ckpt = Path(cfg.out) / checkpoint.CHECKPOINT_DIR
        # On CUDA the running loss and accuracy stay on the device and are read only when a line is shown.
        self.bar = _Progress(progress and self.rank == 0, tty_every=10 if self.device.type == "cuda" else 1)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def reduce_sum(self, values) -> list[float]:
        """Sum ``values`` over the ranks (NCCL needs CUDA tensors, gloo CPU ones)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.distributed:
            torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, resume: bool) -> None:
        cfg = self.cfg
        self.images, self.labels, self.val_images, self.val_labels, classes = load_data(cfg, log=self.say)
        self.state = checkpoint.new_state(cfg)
        self.model_config = model_config_for(cfg, classes)
        model = self.model = build(self.model_config)
        model.drop6.p = model.drop7.p = cfg.dropout
        # What the optimizer trains: the model itself, or the model inside TrainingNet's fold-away structure.
        self.trainee = TrainingNet(model, batchnorm=cfg.batchnorm, tied_fc6=cfg.tied_fc6) \
            if cfg.batchnorm or cfg.tied_fc6 else model
        resumed = resume and (self.ckpt / "state.json").is_file()
        if resumed:
            self.state = checkpoint.restore(self.ckpt, cfg, self.trainee, self.model_config, self.say)
        else:
            if resume:
                self.say(f"resume: no checkpoint in {self.ckpt}; starting fresh")
            self.model_config.preprocess.mean_image = mean_image(self.images)
        rms = input_rms(self.images, self.model_config.preprocess.mean_image)
        if not resumed:
            self._initialize(rms)
        self._place()
        self.optimizer = optimizer_for(cfg, model, trained_parameters(self.trainee), conv1_lr_factor(cfg, rms),
                                       self.state["lr"])
        if resumed and self.state["epoch"] > 0:
            checkpoint.restore_optimizer(self.ckpt, self.optimizer, self.trainee)
        self.snapshots = [int(e) for e in cfg.snapshot_epochs] or scaled_evolution_epochs(cfg.epochs)
        if self.rank == 0:
            checkpoint.write_train_config(cfg, self.ckpt)
        self.steps = len(self.labels) // cfg.batch_size
        if cfg.max_steps_per_epoch:
            self.steps = min(self.steps, cfg.max_steps_per_epoch)
        if self.steps < 1:
            raise InvalidArgumentError(f"batch_size={cfg.batch_size} exceeds the {len(self.labels)} training "
                                       f"images", field="batch_size")
        self.say(f"training {len(self.labels)} images ({len(classes)} classes), {self.steps} steps/epoch of "
                 f"{cfg.batch_size}, {self.world} process(es) on {self.device}, init {cfg.init}, lr "
                 f"{self.state['lr']:g}, snapshots at epochs {self.snapshots}")

    def _initialize(self, rms: float) -> None:
        cfg = self.cfg
        init_weights(self.model, cfg.init, torch.Generator().manual_seed(cfg.seed), rms)
        if cfg.tied_fc6:    # the shared weights (fan-in: conv5's channels), with their own generator
            he_normal_(self.trainee.fc6, torch.Generator().manual_seed(cfg.seed + 1))
            self.trainee.fc6.bias.data.zero_()
        self.model.clip_filter_rms_(cfg.clip_radius)

    def _place(self) -> None:
        """The mean image, the training set and the trainee on the training device (DDP-wrapped if need be)."""
        device = self.device
        self.mean = torch.from_numpy(self.model_config.preprocess.mean_image).to(device)
        # On CUDA the uint8 training set lives on the GPU (30,000 images are 5.9 GB), so batches are one gather.
        self.batch_source = torch.from_numpy(np.asarray(self.images)).to(device) if device.type == "cuda" \
            else self.images
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True   # fixed shapes: let cuDNN pick its fastest algorithms once
        self.trainee.to(device)
        if self.cfg.channels_last:
            self.trainee.to(memory_format=torch.channels_last)
        self.net = self.trainee
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel
            self.net = DistributedDataParallel(self.trainee,
                                               device_ids=[device.index] if device.type == "cuda" else None)

    # ------------------------------------------------------------------------------------------ epochs
    def epoch(self, epoch: int) -> bool:
        """Train one epoch, validate, step the schedule, write the checkpoint; True when the run must stop."""
        cfg, state = self.cfg, self.state
        draws = epoch_draws(cfg, epoch, len(self.labels))
        torch.manual_seed(cfg.seed * 7919 + epoch * 104729 + self.rank)   # dropout masks
        t0 = time.time()
        loss_sum, correct, seen, lr = self._steps(epoch, draws, t0)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training diverged in epoch {epoch} (loss {loss_sum}); lower --lr")
        if cfg.batchnorm:
            self._recalibrate(draws["order"])
        val_loss, val_acc = self._validate()
        self._schedule(val_loss)
        epoch_time = time.time() - t0
        state["wall_time_s"] += epoch_time
        state["epoch"] = epoch
        state["history"].append({"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                                 "val_loss": val_loss, "val_top1": val_acc, "lr": lr,
                                 "seconds": round(epoch_time, 1), "img_per_s": round(seen / epoch_time, 2)})
        self.say(f"epoch {epoch}: train loss {loss_sum / seen:.4f} acc {correct / seen:.3f} | val loss "
                 f"{val_loss:.4f} top-1 {val_acc:.4f} | {epoch_time:.0f}s")
        stop = self._out_of_time(epoch, epoch_time)
        if self.rank == 0:
            checkpoint.write_checkpoint(self.trainee, self.optimizer, self.model_config, state, cfg, self.ckpt,
                                        epoch in self.snapshots or stop, self.device)
        if self.distributed:
            torch.distributed.barrier()
        return stop

    def _steps(self, epoch: int, draws: dict, t0: float) -> tuple[float, float, float, float]:
        """The epoch's optimizer steps: (loss sum, correct, images) over all ranks, and the last step's lr."""
        cfg, device, state = self.cfg, self.device, self.state
        self.net.train()
        seen_here = 0
        loss_here = torch.zeros((), dtype=torch.float64, device=device)
        correct_here = torch.zeros((), dtype=torch.int64, device=device)
        for step in range(self.steps):
            batch = draws["order"][step * cfg.batch_size:(step + 1) * cfg.batch_size][self.rank::self.world]
            x = crop_batch(self.batch_source, batch, draws["offsets"], draws["flips"], self.mean, cfg.crop)
            if cfg.erase:
                x = erase_squares(x, draws["boxes"][batch])
            x = x.contiguous(memory_format=self.memory_format)
            y = torch.from_numpy(self.labels[batch.numpy()]).to(device)
            lr = state["lr"]
            if cfg.warmup_steps and state["step"] < cfg.warmup_steps:
                lr = lr * (state["step"] + 1) / cfg.warmup_steps
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_factor"]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                logits = self.net(x)
            loss = F.cross_entropy(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if cfg.conv1_weight_decay:
                shrink_conv1_(self.model, lr * cfg.conv1_weight_decay)
            self.model.clip_filter_rms_(cfg.clip_radius)
            state["step"] += 1
            loss_here += loss.detach().double() * len(y)
            correct_here += (logits.argmax(1) == y).sum()
            seen_here += len(y)
            if self.bar.due(step + 1, step + 1 == self.steps):  # rank 0's running numbers; the rate is all ranks'
                rate = seen_here * self.world / max(time.time() - t0, 1e-9)
                self.bar.show(f"epoch {epoch}/{cfg.epochs} step {step + 1}/{self.steps} loss "
                              f"{float(loss_here) / seen_here:.4f} acc {int(correct_here) / seen_here:.3f} lr "
                              f"{lr:.2g} {rate:.1f} img/s", step + 1 == self.steps)
        loss_sum, correct, seen = self.reduce_sum([float(loss_here), float(correct_here), seen_here])
        return loss_sum, correct, seen, lr

    def _recalibrate(self, order: torch.Tensor) -> None:
        """BatchNorm statistics from centre crops of this epoch's first images, as the model will see them."""
        cfg, n = self.cfg, len(self.labels)
        centre = torch.full((n, 2), (cfg.resize - cfg.crop) // 2)
        no_flip = torch.zeros(n, dtype=torch.bool)
        chosen = order[:min(len(order), BN_CALIBRATION_IMAGES)][self.rank::self.world]
        recalibrate_batchnorm(self.trainee, (
            crop_batch(self.batch_source, part, centre, no_flip, self.mean, cfg.crop)
            .contiguous(memory_format=self.memory_format) for part in chosen.split(cfg.batch_size)))

    def _validate(self) -> tuple[float, float]:
        """(loss, top-1) on every rank's share of the validation set, summed: the lr decision is the same
        everywhere."""
        logits = predict_logits(self.trainee, self.val_images[self.rank::self.world], self.model_config,
                                device=self.device)
        vy = torch.as_tensor(self.val_labels[self.rank::self.world])
        loss, right, count = self.reduce_sum([float(F.cross_entropy(logits, vy, reduction="sum")),
                                              float((logits.argmax(1) == vy).sum()), len(vy)])
        return loss / count, right / count

    def _schedule(self, val_loss: float) -> None:
        """The paper's schedule: lr /10 after ``plateau_patience`` epochs without relative improvement."""
        cfg, state = self.cfg, self.state
        best = state["best_val_loss"]
        if best is None or val_loss < best * (1 - cfg.plateau_threshold):
            state["best_val_loss"], state["bad_epochs"] = val_loss, 0
            return
        state["bad_epochs"] += 1
        if state["bad_epochs"] >= cfg.plateau_patience and state["lr"] / 10 >= cfg.min_lr:
            state["lr"] /= 10
            state["bad_epochs"] = 0
            self.say(f"validation plateau: lr -> {state['lr']:g}")

    def _out_of_time(self, epoch: int, epoch_time: float) -> bool:
        """A time budget ends the run after the last epoch that fits (judged by this epoch's length); that
        epoch is kept as a snapshot too, so the evolution figure ends where training did."""
        cfg, state = self.cfg, self.state
        stop = bool(cfg.max_minutes) and epoch < cfg.epochs and \
            state["wall_time_s"] + epoch_time > cfg.max_minutes * 60
        stop = self.reduce_sum([float(stop)])[0] > 0     # every rank takes the same decision
        if stop:
            state["stopped"] = f"time budget of {cfg.max_minutes:g} min reached after epoch {epoch} of {cfg.epochs}"
            self.say(state["stopped"])
        return stop
