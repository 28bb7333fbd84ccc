"""What every section of the report shares: matplotlib (imported on first use), the figure, JSON and CSV
writers, the ``section-<name>.json`` record the HTML page is built from, the log line, and which feature maps
a figure shows. Light: :mod:`.report` (and with it the CLI's parser) imports it without torch."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import ZFServeError


def log(message: str) -> None:
    print(f"[report {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def plt():
    """matplotlib.pyplot on the Agg backend; a clear error when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ZFServeError("report: matplotlib is not installed; install it with pip install 'zfserve[report]'",
                           field="report") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def save(fig, path: Path) -> str:
    """Write a figure as PNG and close it; returns the file name (what the section record links)."""
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt().close(fig)
    return path.name


def jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data, indent=1, default=jsonable) + "\n")
    return path.name


def write_csv(path: Path, header, rows) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path.name


def write_section(out: Path, name: str, title: str, figures: list[dict], metrics: dict | None = None,
                  note: str = "") -> Path:
    """``section-<name>.json``. ``figures``: dicts with ``file`` (PNG), ``caption`` (how to read it), ``data``
    (files beside it) and optionally ``table`` (``header``, ``rows``)."""
    path = out / f"section-{name}.json"
    write_json(path, {"name": name, "title": title, "figures": figures, "metrics": metrics or {}, "note": note})
    return path


def maps_for(model, layer: str, count: int, seed: int) -> list[int]:
    """The feature maps a figure shows: ``count`` channels of ``layer`` drawn with ``(seed, layer)``."""
    channels = model.channels()[layer]
    rng = np.random.default_rng([seed, model.layer_names.index(layer)])
    return sorted(rng.choice(channels, min(count, channels), replace=False).tolist())


def hide_ticks(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
