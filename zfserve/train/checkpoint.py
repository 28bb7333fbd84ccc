"""What a run writes and resumes from, all safetensors + JSON (never pickle), written atomically:

- ``OUT/checkpoint/``: the trainee's full state (BN statistics, a tied fc6) with the mean image, the optimizer
  state, ``state.json`` (epoch, step, lr, plateau counters, history) and ``train_config.json``;
- ``OUT/snapshots/epoch_NNN.safetensors``: the exported plain ZFNet at the feature-evolution epochs;
- ``OUT`` itself: a model directory (weights + config.json with provenance) holding the latest epoch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..config import ModelConfig, TrainConfig
from ..errors import InvalidArgumentError
from ..evaluate import hardware
from ..model import ZFNet, build
from ..weights import MEAN_IMAGE_TENSOR, read_tensors, save_model
from .trainee import exported

CHECKPOINT_DIR = "checkpoint"
SNAPSHOT_DIR = "snapshots"
# Settings a resumed run must share with its checkpoint (anything else may change, e.g. --epochs, --lr).
RESUME_FIXED = ("seed", "batch_size", "crop", "resize", "fc_width", "train_seed", "train_n", "data",
                "batchnorm", "tied_fc6")
# The recipe fields recorded in the model's provenance.
RECIPE_FIELDS = ("optimizer", "batch_size", "lr", "momentum", "weight_decay", "dropout", "clip_radius",
                 "warmup_steps", "amp", "plateau_patience", "batchnorm", "tied_fc6", "erase", "conv1_weight_decay")


def new_state(cfg: TrainConfig) -> dict:
    """The state of a run before its first epoch."""
    return {"epoch": 0, "step": 0, "lr": cfg.lr, "best_val_loss": None, "bad_epochs": 0, "history": [],
            "wall_time_s": 0.0}


def state_to_tensors(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """Optimizer state (momentum buffers; Adam's moments and step) keyed ``<param name>/<state key>``."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    out[f"{names[id(p)]}/{key}"] = value.detach().cpu().contiguous()
    return out


def tensors_to_state(optimizer: torch.optim.Optimizer, model: nn.Module, tensors: dict) -> None:
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


def _cpu_float32(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().float().contiguous() for k, v in module.state_dict().items()}


def write_train_config(cfg: TrainConfig, ckpt: Path) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n", ckpt / "train_config.json")


def restore(ckpt: Path, cfg: TrainConfig, trainee: nn.Module, model_config: ModelConfig, say) -> dict:
    """Resume: the checkpoint's state, its weights into ``trainee`` and its mean image into ``model_config``.
    An explicit new ``--lr`` (one that differs from the checkpoint's) replaces the current rate."""
    state = json.loads((ckpt / "state.json").read_text())
    saved = json.loads((ckpt / "train_config.json").read_text())
    for key in RESUME_FIXED:
        if saved.get(key) != getattr(cfg, key):
            raise InvalidArgumentError(f"resume: {key}={getattr(cfg, key)!r} differs from the checkpoint's "
                                       f"{saved.get(key)!r}", field=key)
    if saved.get("lr") != cfg.lr:
        say(f"resume: lr {state['lr']:g} -> {cfg.lr:g} (--lr differs from the checkpoint's {saved.get('lr')})")
        state["lr"] = cfg.lr
        state.setdefault("lr_overrides", []).append({"after_epoch": state["epoch"], "lr": cfg.lr})
    tensors = read_tensors(ckpt / "model.safetensors")
    model_config.preprocess.mean_image = tensors.pop(MEAN_IMAGE_TENSOR).numpy()
    trainee.load_state_dict(tensors)
    say(f"resumed from {ckpt} after epoch {state['epoch']} (lr {state['lr']:g})")
    return state


def restore_optimizer(ckpt: Path, optimizer, trainee: nn.Module) -> None:
    if (ckpt / "optimizer.safetensors").is_file():
        tensors_to_state(optimizer, trainee, read_tensors(ckpt / "optimizer.safetensors"))


def provenance(cfg: TrainConfig, state: dict, device: torch.device) -> dict:
    """What config.json records about the run that made the weights."""
    last = state["history"][-1]
    return {
        "source": "zfserve train", "command": cfg.command, "seed": cfg.seed, "init": cfg.init,
        "data": cfg.data if cfg.data != "synthetic" else
        {"kind": "synthetic", "train_seed": cfg.train_seed, "train_n": cfg.train_n, "val_seed": cfg.val_seed,
         "val_n": cfg.val_n},
        "recipe": {k: getattr(cfg, k) for k in RECIPE_FIELDS},
        "epochs": state["epoch"], "steps": state["step"],
        "final": {"val_top1": last["val_top1"], "val_loss": last["val_loss"], "train_loss": last["train_loss"]},
        "wall_time_s": round(state["wall_time_s"], 1), "hardware": hardware(device),
        **({"stopped": state["stopped"]} if "stopped" in state else {}),
        "torch": torch.__version__,
    }


def write_checkpoint(trainee, optimizer, model_config: ModelConfig, state: dict, cfg: TrainConfig, ckpt: Path,
                     snapshot: bool, device) -> None:
    """checkpoint/ holds what training resumes from (``trainee``'s full state: BN statistics, a tied fc6); the
    model directory and the snapshots hold the exported plain ZFNet."""
    out = ckpt.parent
    model = exported(trainee)
    if snapshot:
        (out / SNAPSHOT_DIR).mkdir(parents=True, exist_ok=True)
        _atomic_write_tensors(_cpu_float32(model), out / SNAPSHOT_DIR / f"epoch_{state['epoch']:03d}.safetensors")
    weights = _cpu_float32(trainee)
    _atomic_write_tensors({**weights, MEAN_IMAGE_TENSOR: torch.from_numpy(model_config.preprocess.mean_image)},
                          ckpt / "model.safetensors")
    _atomic_write_tensors(state_to_tensors(optimizer, trainee), ckpt / "optimizer.safetensors")
    _atomic_write_text(json.dumps(state, indent=2) + "\n", ckpt / "state.json")
    # The model directory itself (weights + config.json) always holds the latest epoch.
    model_config.provenance = provenance(cfg, state, device)
    save_model(model, out)   # copies tensors to CPU itself


def snapshot_paths(run_dir: str | Path) -> dict[int, Path]:
    """The epoch snapshots a run kept: {epoch: path}."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    paths = sorted(folder.glob("epoch_*.safetensors")) if folder.is_dir() else []
    return {int(p.stem.split("_")[1]): p for p in paths}


def load_snapshot(path: Path, config: ModelConfig) -> ZFNet:
    """One epoch snapshot as a ZFNet (float32, eval mode) of ``config``."""
    model = build(config)
    model.load_state_dict({k: v.float() for k, v in read_tensors(path).items()})
    return model.eval()


def run_config(run_dir: str | Path) -> ModelConfig:
    """A run directory's model config with the mean image of its checkpoint (the epochs' common frame)."""
    from ..weights import read_config
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    config.preprocess.mean_image = read_tensors(run_dir / CHECKPOINT_DIR / "model.safetensors")[
        MEAN_IMAGE_TENSOR].numpy()
    return config
