"""The model's layer-1 filters as a grid, with the filter statistics Fig. 6 compares (:func:`filter_stats`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..render import filter_grid
from .figures import hide_ticks, plt as pyplot, save, write_json, write_section

TITLE = "Layer-1 filters"


def filter_stats(weight: np.ndarray, probe_acts: np.ndarray | None = None) -> dict:
    """Layer-1 filter statistics for Fig. 6: per-filter RMS, how much one filter dominates (max RMS / median
    RMS), the share of spectral energy above half the Nyquist frequency (high frequencies) and, given the
    filters' activations on probe images (N, K, H, W), the share of dead filters (never positive)."""
    w = np.asarray(weight, dtype=np.float64)
    rms = np.sqrt((w ** 2).mean(axis=(1, 2, 3)))
    k = w.shape[-1]
    spectrum = np.abs(np.fft.fft2(w - w.mean(axis=(2, 3), keepdims=True), s=(32, 32))) ** 2
    freq = np.abs(np.fft.fftfreq(32))
    high = (np.maximum(freq[:, None], freq[None, :]) > 0.25)   # above half of Nyquist (0.5 cycles/px)
    total = spectrum.sum(axis=(1, 2, 3))
    hf = spectrum[..., high].sum(axis=(1, 2)) / np.where(total > 0, total, 1.0)
    out = {"kernel": int(k), "rms": rms.tolist(), "dominance": float(rms.max() / np.median(rms)),
           "high_frequency_share": float(hf.mean())}
    if probe_acts is not None:
        alive = (np.asarray(probe_acts) > 0).any(axis=(0, 2, 3))
        out["dead_share"] = float(1.0 - alive.mean())
    return out


def section(model, data, out: Path, s) -> Path:
    plt = pyplot()
    first = model.conv_layers[0]
    weight = getattr(model, first).weight.detach().cpu()
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(filter_grid(weight, scale=4))
    ax.set_title(f"{model.config.name}: {weight.shape[0]} {first} filters ({weight.shape[2]}x{weight.shape[3]})")
    ax.set_xlabel("filter (row-major)")
    hide_ticks(ax)
    png = save(fig, out / "filters.png")
    stats = filter_stats(weight.numpy())
    write_json(out / "filters.json", stats)
    caption = ("The model's layer-1 filters, each contrast-stretched on its own around grey = 0. Trained filters "
               "should look like oriented edges and colour blobs; noise means untrained, and one filter much "
               "brighter than the rest is the dominance that RMS clipping prevents (dominance in filters.json).")
    return write_section(out, "filters", TITLE, [{"file": png, "data": ["filters.json"], "caption": caption}],
                         {"dominance": stats["dominance"], "high_frequency_share": stats["high_frequency_share"]})


def summary(metrics: dict) -> list[tuple[str, str, str]]:
    return []
