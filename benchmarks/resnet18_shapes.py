"""A ResNet-18 (torchvision layout, tests/onnx_models.py) trained on the synthetic shapes, for the ONNX-model
benchmarks: with random weights occlusion maps are flat (the largest drop of a random network's probability is
smaller than int8's rounding noise), so whether int8 finds the same most important window as fp32 can only be
asked of a network that has learnt to look at the object.

Recipe (2 CPU cores: 36 min; cached, so a second run loads it): the synthetic set's training seed (1), random
224 crops of the 256 px images and flips, normalised as the imported model's config says (torchvision's mean and
std); most steps at half resolution (the crop resized to 112 px: a quarter of the work), then a short fine-tune
at the served 224 px so the filters and BatchNorm statistics fit the scale the benchmark uses. AdamW with a
warm-up and a cosine decay per stage. Top-1 on held-out images (seed 3, never trained on) is measured and
returned with the network: 97.2% at 112 px after the first stage (500 images), 94.1% at 224 px at the end (1,000
images; 11 classes, chance 9%). The weights are stored as safetensors in ``onnx-bench`` under zfserve's
cache (``$ZFSERVE_CACHE_DIR``, else ``~/.cache/zfserve``), keyed by the settings below.

    .venv/bin/python benchmarks/resnet18_shapes.py      # train (or load) and print held-out top-1
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import onnx_models as om  # noqa: E402

# Every fact the weights depend on: a change here trains (and caches) a new network.
SETTINGS = {
    "train_seed": 1, "train_n": 16384, "batch": 32, "seed": 0,
    # (input side, steps, peak learning rate): half resolution first, then the served 224.
    "stages": [[112, 1500, 2e-3], [224, 120, 3e-4]],
    "weight_decay": 1e-4, "warmup_steps": 100, "crop": 224, "version": 1,
}
HELD_OUT_SEED = 3


def _key() -> str:
    from zfserve.data import GENERATOR_VERSION
    text = json.dumps({**SETTINGS, "generator": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_dir() -> Path:
    from zfserve.export import cache_root
    return Path(cache_root()) / "onnx-bench"


def _normaliser():
    from zfserve.import_torchvision import TORCHVISION_PREPROCESS as P
    mean = torch.tensor(P["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(P["std"], dtype=torch.float32).view(1, 3, 1, 1)
    scale = float(P["scale"])
    return lambda x: (x.float() * scale - mean) / std


def _batch(images: np.ndarray, rows: np.ndarray, side: int, rng: np.random.Generator, normalise) -> torch.Tensor:
    """Random 224 crops of ``images[rows]`` (uint8 NHWC 256 px), flipped at random, resized to ``side``."""
    crop = SETTINGS["crop"]
    out = np.empty((len(rows), crop, crop, 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        y, x = rng.integers(0, images.shape[1] - crop + 1, size=2)
        patch = images[row, y:y + crop, x:x + crop]
        out[i] = patch[:, ::-1] if rng.random() < 0.5 else patch
    x = normalise(torch.from_numpy(out).permute(0, 3, 1, 2))
    if side != crop:
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)


def centre_inputs(images: np.ndarray, side: int, normalise) -> torch.Tensor:
    """The centre 224 crops of uint8 256 px images, normalised (and resized to ``side``): what the served model
    sees (resize 256 = identity here, centre crop 224)."""
    crop = SETTINGS["crop"]
    o = (images.shape[1] - crop) // 2
    x = normalise(torch.from_numpy(np.ascontiguousarray(images[:, o:o + crop, o:o + crop])).permute(0, 3, 1, 2))
    if side != crop:
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.no_grad()
def top1(model, images: np.ndarray, labels: np.ndarray, side: int = 224, batch: int = 50) -> float:
    normalise = _normaliser()
    model.eval()
    right = 0
    for start in range(0, len(images), batch):
        x = centre_inputs(images[start:start + batch], side, normalise)
        right += int((model(x).argmax(1).numpy() == labels[start:start + batch]).sum())
    return right / len(images)


def train(directory: Path, log=print) -> torch.nn.Module:
    """Train the network of :data:`SETTINGS` (eval mode on return); rendered images are kept in ``directory``
    while it runs."""
    from zfserve.data import NUM_CLASSES, synthetic_arrays
    torch.manual_seed(SETTINGS["seed"])
    model = om.ResNet18(num_classes=NUM_CLASSES).to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    images, labels = synthetic_arrays(SETTINGS["train_seed"], SETTINGS["train_n"], cache_dir=directory,
                                      workers=os.cpu_count() or 1)
    log(f"training images ready in {time.perf_counter() - t0:.0f} s")
    check_images, check_labels = synthetic_arrays(HELD_OUT_SEED, 500, cache_dir=directory)
    normalise = _normaliser()
    rng = np.random.default_rng(SETTINGS["seed"])
    labels_t = torch.from_numpy(np.asarray(labels))
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    for side, steps, peak in SETTINGS["stages"]:
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": SETTINGS["weight_decay"]},
                                 {"params": rest, "weight_decay": 0.0}], lr=peak)
        warm = min(SETTINGS["warmup_steps"], steps // 4)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))))
        order = rng.permutation(len(images))
        cursor, losses, started = 0, [], time.perf_counter()
        model.train()
        for step in range(steps):
            if cursor + SETTINGS["batch"] > len(order):
                order, cursor = rng.permutation(len(images)), 0
            rows = np.sort(order[cursor:cursor + SETTINGS["batch"]])
            cursor += SETTINGS["batch"]
            loss = F.cross_entropy(model(_batch(images, rows, side, rng, normalise)), labels_t[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if (step + 1) % 100 == 0 or step + 1 == steps:
                held = top1(model, check_images, check_labels, side)
                model.train()
                per_step = (time.perf_counter() - started) / (step + 1)
                log(f"side {side} step {step + 1}/{steps}: loss {np.mean(losses[-100:]):.3f}, "
                    f"held-out top-1 {held:.3f} (500 images), {per_step:.2f} s/step")
    return model.eval()


def trained(log=print, directory: Path | None = None) -> tuple[torch.nn.Module, dict]:
    """(the trained network in eval mode, facts about it), from ``directory`` (default :func:`cache_dir`) when
    its settings were trained before. The rendered training images (3.2 GB) are deleted once the weights are
    stored."""
    from safetensors.torch import load_file, save_file
    from zfserve.data import NUM_CLASSES
    directory = Path(directory or cache_dir())
    path = directory / f"resnet18-shapes-{_key()}.safetensors"
    facts_path = path.with_suffix(".json")
    if path.exists() and facts_path.exists():
        model = om.ResNet18(num_classes=NUM_CLASSES)
        model.load_state_dict(load_file(str(path)))
        return model.eval(), json.loads(facts_path.read_text())
    from zfserve.data import synthetic_arrays
    started = time.perf_counter()
    model = train(directory, log)
    seconds = time.perf_counter() - started
    images, labels = synthetic_arrays(HELD_OUT_SEED, 1000, cache_dir=directory)
    facts = {"settings": SETTINGS, "train_seconds": round(seconds, 1), "held_out_seed": HELD_OUT_SEED,
             "held_out_top1_1000": top1(model, images, labels), "classes": NUM_CLASSES}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    facts_path.write_text(json.dumps(facts, indent=2) + "\n")
    for rendered in directory.glob(f"synthetic-v*-s{SETTINGS['train_seed']}-n*.npy"):
        rendered.unlink()
    return model, facts


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    _, found = trained(lambda line: print(line, flush=True))
    print(json.dumps(found, indent=2))
