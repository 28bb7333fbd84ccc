"""Paper Fig. 6 (architecture selection, layer 1): short training runs of the first two blocks with ZFNet's
7x7 stride-2 conv1 (with and without RMS filter clipping) and AlexNet's 11x11 stride 4, and the statistics of
the layer-1 filters they learn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .. import _checks as checks
from ..config import IMAGENET_MEAN_RGB
from ..data import NUM_CLASSES, label_of, render_images
from ..architecture import ZFNET_LRN
from ..model import clip_filter_rms_, paper_init_
from ..render import filter_grid
from ..train.recipe import init_scaled_, input_rms
from .figures import hide_ticks, log, plt as pyplot, save, write_csv, write_json, write_section
from .filters import filter_stats

TITLE = "Architecture selection: layer 1 (Fig. 6)"
# The comparison is ZFNet's own design question (its 7x7/2 layer 1 against AlexNet's 11x11/4).
ARCHITECTURES = ("zfnet",)
ONLY_NOTE = "the layer-1 comparison (7x7/2 vs 11x11/4) is ZFNet's architecture selection, made for ZFNet only"
ARCH_VARIANTS = {
    # name: (conv1 kernel, stride, padding, conv2 kernel, stride, padding, clip filters)
    "zfnet-7x7s2": (7, 2, 1, 5, 2, 0, True),
    "zfnet-7x7s2-noclip": (7, 2, 1, 5, 2, 0, False),
    "alexnet-11x11s4": (11, 4, 2, 5, 1, 2, True),
}


class FirstLayersNet(nn.Module):
    """The first two blocks of a ZFNet-style network (conv -> ReLU -> max-pool -> LRN, twice), then global
    average pooling and a linear classifier: enough to train layer-1 and layer-2 filters in a short run.
    conv1's geometry is the thing compared (7x7/2 here, 11x11/4 in AlexNet); conv2 follows each paper."""

    def __init__(self, num_classes: int, conv1=(7, 2, 1), conv2=(5, 2, 0), widths=(96, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], *conv1)
        self.conv2 = nn.Conv2d(widths[0], widths[1], *conv2)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)   # ZFNet's pools and LRN
        self.norm = nn.LocalResponseNorm(*ZFNET_LRN)
        self.fc = nn.Linear(widths[1], num_classes)

    def forward(self, x):
        x = self.norm(self.pool(F.relu(self.conv1(x))))
        x = self.norm(self.pool(F.relu(self.conv2(x))))
        return self.fc(x.mean(dim=(2, 3)))

    def clip_filter_rms_(self, radius: float = 0.1) -> None:
        clip_filter_rms_((self.conv1, self.conv2), radius)   # the paper's rule, as ZFNet's


def _training_pool(data_seed: int, count: int, scaled: int, cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """``count`` synthetic training images downscaled to ``scaled`` pixels (uint8 NHWC) and their labels, kept
    in ``cache_dir`` so that every variant (and a rerun) trains on the same images without re-rendering."""
    labels = np.array([label_of(i) for i in range(count)], dtype=np.int64)
    path = Path(cache_dir) / f"pool-s{data_seed}-n{count}-{scaled}px.npy" if cache_dir else None
    if path is not None and path.is_file():
        return np.load(path, allow_pickle=False), labels
    raw = render_images(data_seed, range(count))
    pool = np.stack([np.asarray(Image.fromarray(im).resize((scaled, scaled), Image.BILINEAR)) for im in raw])
    if path is not None:
        np.save(path, pool, allow_pickle=False)
    return pool, labels


def train_first_layers(variant: str, *, steps: int = 40, batch: int = 16, lr: float = 1e-2, seed: int = 0,
                       data_seed: int = 1, pool: int = 128, scaled: int = 112, size: int = 96,
                       probe_n: int = 32, init: str = "scaled", cache_dir: str | Path | None = None,
                       progress=None) -> dict:
    """A short SGD run (the paper's lr 1e-2, momentum 0.9, raw pixels minus the mean) of
    :class:`FirstLayersNet` on a pool of synthetic training images downscaled to ``scaled`` pixels, random
    ``size`` crops and flips (a CPU budget), then layer-1 filter statistics. ``init``: ``"paper"``
    (N(0, 0.01^2)) or ``"scaled"`` (see below). Returns JSON-ready numbers plus the conv1 and conv2 weights
    (numpy) under ``"weights"``."""
    checks.choice(variant, "variant", tuple(ARCH_VARIANTS))
    k1, s1, p1, k2, s2, p2, clip = ARCH_VARIANTS[variant]
    images, labels = _training_pool(data_seed, pool, scaled, cache_dir)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() - torch.tensor(IMAGENET_MEAN_RGB).reshape(1, 3, 1, 1)
    y_all = torch.from_numpy(labels)
    torch.manual_seed(seed)
    net = FirstLayersNet(NUM_CLASSES, (k1, s1, p1), (k2, s2, p2))
    paper_init_(net)
    if init == "scaled":
        # Training's "scaled" scheme (conv1 outputs of unit RMS on raw-pixel input, He's scaling for conv2):
        # with 0.01 everywhere nothing moves within a short run's few dozen steps.
        init_scaled_(net.conv1, [net.conv2], input_rms(images, np.asarray(IMAGENET_MEAN_RGB, np.float32)
                                                       .reshape(3, 1, 1)))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    rng = np.random.default_rng(seed)
    losses = []
    net.train()
    for step in range(steps):
        rows = torch.from_numpy(rng.integers(0, pool, batch))
        oy, ox = rng.integers(0, scaled - size + 1, 2)
        x = x_all[rows, :, oy:oy + size, ox:ox + size]
        if rng.random() < 0.5:
            x = x.flip(-1)
        loss = F.cross_entropy(net(x), y_all[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if clip:
            net.clip_filter_rms_()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, steps)
    net.eval()
    with torch.no_grad():
        acts = F.relu(net.conv1(x_all[:probe_n, :, :size, :size])).numpy()
    stats = filter_stats(net.conv1.weight.detach().numpy(), acts)
    return {"variant": variant, "conv1": [k1, s1, p1], "conv2": [k2, s2, p2], "clip": clip, "steps": steps,
            "batch": batch, "lr": lr, "pool": pool, "input": size, "init": init,
            "loss_first": float(np.mean(losses[:5])), "loss_last": float(np.mean(losses[-5:])), "stats": stats,
            "weights": {"conv1": net.conv1.weight.detach().numpy(), "conv2": net.conv2.weight.detach().numpy()}}


def architecture_runs(cache_dir: str | Path, *, steps: int = 40, batch: int = 16, pool: int = 128,
                      lr: float = 0.04, variants=tuple(ARCH_VARIANTS), progress=None) -> dict[str, dict]:
    """Run (or read from ``cache_dir``) :func:`train_first_layers` for each variant. Each run is cached as
    ``<variant>.json`` + ``<variant>.safetensors`` and reused when its settings match.

    The default ``lr`` is 4x the paper's so that a 40-step run takes layer-1 filters to the clipping radius
    (at 1e-2 they stay below it and clipping never acts, so with and without would be the same run)."""
    from safetensors.numpy import load_file, save_file
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for variant in variants:
        meta, weights = cache_dir / f"{variant}.json", cache_dir / f"{variant}.safetensors"
        if meta.is_file() and weights.is_file():
            record = json.loads(meta.read_text())
            if (record.get("steps"), record.get("batch"), record.get("pool"), record.get("lr"),
                    record.get("init")) == (steps, batch, pool, lr, "scaled"):
                record["weights"] = load_file(str(weights))
                record["cached"] = True
                out[variant] = record
                continue
        say = (lambda d, t, v=variant: progress(v, d, t)) if progress else None
        record = train_first_layers(variant, steps=steps, batch=batch, pool=pool, lr=lr, cache_dir=cache_dir,
                                    probe_n=min(32, pool), progress=say)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in record["weights"].items()},
                  str(weights))
        meta.write_text(json.dumps({k: v for k, v in record.items() if k != "weights"}, indent=1) + "\n")
        record["cached"] = False
        out[variant] = record
    return out


def section(model, data, out: Path, s) -> Path:
    plt = pyplot()
    cache = out / "architecture-cache"
    runs = architecture_runs(cache, steps=s.arch_steps, batch=s.arch_batch, pool=s.arch_pool, lr=s.arch_lr,
                             progress=lambda v, d, t: log(f"architecture {v}: step {d}/{t}") if d % 10 == 0
                             or d == t else None)
    names = list(runs)
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(5 * len(names) + 5, 5), squeeze=False,
                             constrained_layout=True)
    for ax, name in zip(axes[0], names):
        ax.imshow(filter_grid(runs[name]["weights"]["conv1"], scale=3))
        st = runs[name]["stats"]
        ax.set_title(f"{name}\nconv1 filters after {runs[name]['steps']} steps", fontsize=9)
        ax.set_xlabel(f"dominance {st['dominance']:.2f}, dead {st['dead_share']:.0%}, "
                      f"high-freq {st['high_frequency_share']:.2f}", fontsize=8)
        hide_ticks(ax)
    ax = axes[0, -1]
    measures = ("dominance", "dead_share", "high_frequency_share")
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(np.arange(len(measures)) + i * width, [runs[name]["stats"][m] for m in measures], width, label=name)
    ax.set_xticks(np.arange(len(measures)) + width * (len(names) - 1) / 2,
                  ["dominance\n(max/median RMS)", "dead share", "high-frequency\nshare"])
    ax.set_ylabel("value")
    ax.set_xlabel("layer-1 filter statistic")
    ax.legend(fontsize=8)
    png = save(fig, out / "architecture.png")
    record = {name: {k: v for k, v in runs[name].items() if k not in ("weights", "cached")} for name in names}
    write_json(out / "architecture.json", record)
    write_csv(out / "architecture.csv", ("variant", "conv1", "clip", "steps", "loss_first", "loss_last") + measures,
              [(n, "x".join(map(str, record[n]["conv1"])), record[n]["clip"], record[n]["steps"],
                record[n]["loss_first"], record[n]["loss_last"], *[record[n]["stats"][m] for m in measures])
               for n in names])
    first = runs[names[0]]
    caption = (f"Layer-1 filters of three short training runs ({first['steps']} SGD steps of {first['batch']} "
               f"images, lr {first['lr']:g}, momentum 0.9) of the first two layers on the synthetic set "
               "(same data, seed and recipe; grey = 0, each filter scaled on its own): ZFNet's 7x7 stride-2 "
               "conv1 with RMS clipping, the same without clipping, and AlexNet's 11x11 stride 4. Dominance is "
               "the largest filter RMS over the median (one filter taking over shows as a large value, the "
               "paper's no-clipping failure); dead is the share of filters never active on probe images; "
               "high-freq is the share of filter energy above half the Nyquist frequency. The runs are tiny "
               "(CPU budget), so they show early-training tendencies, not the paper's converged filters; they are "
               "cached under architecture-cache/.")
    return write_section(out, "architecture", TITLE,
                         [{"file": png, "data": ["architecture.json", "architecture.csv"], "caption": caption}],
                         {name: record[name]["stats"] | {"loss_last": record[name]["loss_last"]} for name in names})


def summary(metrics: dict) -> list[tuple[str, str, str]]:
    if "zfnet-7x7s2" not in metrics or "zfnet-7x7s2-noclip" not in metrics:
        return []
    return [("layer-1 dominance (max / median filter RMS), clipped vs not",
             f"{metrics['zfnet-7x7s2']['dominance']:.2f} vs {metrics['zfnet-7x7s2-noclip']['dominance']:.2f}",
             "without clipping one filter dominates (larger value)")]
