"""The figures of the faithfulness section (:mod:`.faithfulness`): example maps with the object and each map's
pointing-game point, the mean deletion / insertion curves, the MPRT curves and the maps at every randomisation
step. Each function draws one PNG and returns its file name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..preprocess import to_display
from . import saliency_metrics as sm
from .figures import hide_ticks, plt as pyplot, save
from .saliency import LABELS, METHODS

COLOURS = {"occlusion": "tab:blue", "deconvnet": "tab:orange", "gradient": "tab:green", "gradcam": "tab:red",
           "random": "tab:gray", "centre": "black"}


def _show(ax, saliency: np.ndarray, *, mask=None, point=True) -> None:
    ax.imshow(sm.scaled_by_max(saliency), cmap="viridis", vmin=0, vmax=1)
    if mask is not None:
        ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=0.8)
    if point:
        y, x = sm.pointing_point(saliency)
        ax.plot([x - 0.5], [y - 0.5], marker="+", color="red", markersize=12, markeredgewidth=2)
    hide_ticks(ax)


def maps_figure(out: Path, model, kept: dict, records: dict, count: int = 3) -> str:
    """Rows: the first ``count`` kept images; columns: the input and each method's map (|map| / max), with the
    object's outline (white) and the map's pointing-game point (red cross, labelled hit or miss)."""
    plt = pyplot()
    indices = list(kept)[:count]
    names = list(model.config.class_names)
    fig, axes = plt.subplots(len(indices), 1 + len(METHODS), figsize=(2.3 * (1 + len(METHODS)), 2.5 * len(indices)),
                             squeeze=False, constrained_layout=True)
    for row, index in enumerate(indices):
        entry = kept[index]
        axes[row, 0].imshow(to_display(entry["x"], model.config))
        axes[row, 0].contour(entry["mask"].astype(float), levels=[0.5], colors="yellow", linewidths=0.8)
        axes[row, 0].set_title(f"image {index}: {names[entry['target']]}", fontsize=8)
        hide_ticks(axes[row, 0])
        for col, method in enumerate(METHODS, 1):
            _show(axes[row, col], entry["maps"][method], mask=entry["mask"])
            hit = records[index]["methods"][method]["hit"]
            axes[row, col].set_title(f"{LABELS[method]}\n{'hit' if hit else 'miss'}", fontsize=7)
    return save(fig, out / "faithfulness-maps.png")


def curves_figure(out: Path, records: list[dict]) -> str:
    """Mean deletion and insertion curves per method over all images, with their AUCs."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    for ax, kind, better in ((axes[0], "deletion", "lower"), (axes[1], "insertion", "higher")):
        for method in METHODS:
            curves = np.array([r["methods"][method][kind] for r in records])
            mean = curves.mean(0)
            fraction = np.linspace(0, 1, len(mean))
            ax.plot(fraction, mean, color=COLOURS[method], ls="--" if method in ("random", "centre") else "-",
                    label=f"{LABELS[method]} (AUC {sm.curve_auc(mean):.3f})")
        ax.set_xlabel(f"fraction of pixels {'removed (mean colour)' if kind == 'deletion' else 'revealed'}")
        ax.set_ylabel("probability of the predicted class")
        ax.set_title(f"{kind}: {better} is better, {len(records)} images")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    return save(fig, out / "faithfulness-curves.png")


def mprt_figure(out: Path, cascade: dict, threshold: float) -> str:
    """Mean Spearman (absolute values) and SSIM against the original model's map at each cascade step."""
    plt = pyplot()
    steps = ["original", *cascade["layers"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    for ax, key, title in ((axes[0], "spearman", "Spearman rank correlation of |map|"),
                           (axes[1], "ssim", "SSIM of |map| / max")):
        for method in METHODS:
            values = [1.0] + [float(np.nanmean(v)) for v in cascade[key][method]]
            ax.plot(range(len(steps)), values, marker="o", color=COLOURS[method],
                    ls="--" if method in ("random", "centre") else "-", label=LABELS[method])
        if key == "spearman":
            ax.axhline(threshold, color="r", ls=":", lw=1, label=f"insensitive above {threshold}")
        ax.set_xticks(range(len(steps)), [s if s == "original" else f"..{s}" for s in steps], rotation=30)
        ax.set_xlabel("layers randomised (cascade from fc8 down to the named layer)")
        ax.set_ylabel(f"{key} vs the original model's map")
        ax.set_title(title)
        ax.set_ylim(-0.2, 1.05)
        ax.legend(fontsize=7)
    return save(fig, out / "faithfulness-mprt.png")


def mprt_maps_figure(out: Path, model, cascade: dict, kept: dict) -> str:
    """One image's map per method (rows) under each step of the cascade (columns)."""
    plt = pyplot()
    examples = cascade["examples"]
    steps = ["original", *cascade["layers"]]
    entry = kept[cascade["example_index"]]
    fig, axes = plt.subplots(len(METHODS), len(steps) + 1, figsize=(1.9 * (len(steps) + 1), 2.0 * len(METHODS)),
                             squeeze=False, constrained_layout=True)
    for row, method in enumerate(METHODS):
        axes[row, 0].imshow(to_display(entry["x"], model.config))
        axes[row, 0].set_title(LABELS[method], fontsize=7)
        hide_ticks(axes[row, 0])
        for col, step in enumerate(steps, 1):
            _show(axes[row, col], examples[step][method], point=False)
            if row == 0:
                axes[row, col].set_title(step if step == "original" else f"random ..{step}", fontsize=8)
    return save(fig, out / "faithfulness-mprt-maps.png")
