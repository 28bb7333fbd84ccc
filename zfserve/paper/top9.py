"""Paper Fig. 2: the top-9 activations of feature maps across a data set, each projected back to pixels with
the deconvnet beside the input patch under its receptive field.

:func:`top_activations` streams the data in batches with one bounded min-heap per map (memory does not grow
with the data set); :func:`top9` adds the projections.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import _checks as checks
from ..engine.deconv import DeconvEngine
from ..engine.results import DECONV_INTERPRETATION
from ..errors import InvalidArgumentError
from ..model import ZFNet
from ..render import grid, patch_to_rgb, signed_to_rgb
from .dataset import AnalysisData
from .figures import hide_ticks, maps_for, plt as pyplot, save, write_json, write_section

TITLE = "Top-9 activations per feature map (Fig. 2)"


@dataclass(frozen=True, order=True)
class TopUnit:
    """One entry of a map's top list: its activation and where (dataset image, position in the map)."""

    activation: float
    image_index: int
    y: int
    x: int


@torch.no_grad()
def top_activations(model: ZFNet, data: AnalysisData, layer, maps=None, *, k: int = 9, batch: int = 16,
                    progress=None) -> dict:
    """For each feature map of ``layer`` (all, or the channels ``maps``), the ``k`` strongest activations
    across ``data``, at most one per image (its strongest position), strongest first: ``{channel: [TopUnit]}``.

    ``layer`` may also be a dict ``{layer: maps}``: then every layer is served by the same single pass over the
    data and the result is ``{layer: {channel: [TopUnit]}}``.

    The dataset is streamed in batches; each map keeps a min-heap of at most ``k`` entries, so memory does not
    grow with the dataset. Ties go to the earlier image, then the first position (row-major).
    """
    several = isinstance(layer, dict)
    wanted = dict(layer) if several else {layer: maps}
    infos = {info.name: info for info in model.layer_info()}
    for name in list(wanted):
        checks.layer(name, model.spatial_layers)
        channels = infos[name].shape[0]
        chosen = list(range(channels)) if wanted[name] is None else list(wanted[name])
        if not chosen:
            raise InvalidArgumentError(f"maps: no channels of {name}; give at least one", field="maps")
        wanted[name] = [checks.integer(c, "maps", 0, channels - 1, what=f"the maps of {name}") for c in chosen]
    checks.integer(k, "k", 1, len(data), what="the dataset's images")
    model.eval()
    deepest = max(wanted, key=model.layer_names.index)
    # Heap entries (activation, -image_index, position): the smallest is the one to evict, and among equal
    # activations the later image goes first.
    heaps = {name: [[] for _ in chosen] for name, chosen in wanted.items()}
    widths = {name: infos[name].shape[2] for name in wanted}
    for start in range(0, len(data), batch):
        stop = min(len(data), start + batch)
        x = torch.from_numpy(data.inputs(range(start, stop), model.config))
        trace = model.trace(x, layers=tuple(wanted), stop_after=deepest)
        for name, chosen in wanted.items():
            acts = trace.activations[name][:, torch.tensor(chosen)]
            best, pos = acts.flatten(2).max(dim=2)             # (B, M): first maximum per image and map
            top_val, top_img = best.topk(min(k, stop - start), dim=0)  # only these can enter a heap of size k
            for m, heap in enumerate(heaps[name]):
                for value, row in zip(top_val[:, m].tolist(), top_img[:, m].tolist()):
                    entry = (float(value), -(start + row), int(pos[row, m]))
                    if len(heap) < k:
                        heapq.heappush(heap, entry)
                    elif entry > heap[0]:
                        heapq.heapreplace(heap, entry)
        if progress is not None:
            progress(stop, len(data))
    out = {}
    for name, chosen in wanted.items():
        w = widths[name]
        out[name] = {c: [TopUnit(value, -neg, p // w, p % w) for value, neg, p in sorted(heap, reverse=True)]
                     for c, heap in zip(chosen, heaps[name])}
    return out if several else out[layer]


def top9(model: ZFNet, data: AnalysisData, layer, maps=None, *, k: int = 9, batch: int = 16, progress=None):
    """:func:`top_activations` plus the deconv projection and input patch of each entry (paper Fig. 2).

    Returns ``{channel: [UnitProjection, ...]}`` (strongest first; ``image_index`` is the dataset's), or
    ``{layer: {channel: [...]}}`` when ``layer`` is a dict ``{layer: maps}``.
    """
    several = isinstance(layer, dict)
    wanted = layer if several else {layer: maps}
    tops = top_activations(model, data, dict(wanted), k=k, batch=batch, progress=progress)
    engine = DeconvEngine(model)
    out = {}
    for name, per_map in tops.items():
        images = sorted({u.image_index for units in per_map.values() for u in units})
        local = {n: i for i, n in enumerate(images)}
        units = [(local[u.image_index], c, u.y, u.x) for c, lst in per_map.items() for u in lst]
        projected = engine.project(data.inputs(images, model.config), name, units=units)
        by_key = {(p.image_index, p.channel, p.y, p.x): p for p in projected}
        out[name] = {}
        for c, lst in per_map.items():
            out[name][c] = []
            for u in lst:
                p = by_key[(local[u.image_index], c, u.y, u.x)]
                p.image_index = u.image_index
                out[name][c].append(p)
    return out if several else out[layer]


def figure_layers(model) -> tuple[str, ...]:
    """The layers of the paper's Fig. 2 (layers 2 to 5): the last conv of every block but the first, i.e.
    conv2..conv5 for ZFNet and AlexNet, conv2_2, conv3_3, conv4_3, conv5_3 for VGG16."""
    last_of_block = {}
    for name in model.conv_layers:
        last_of_block[name.removeprefix("conv").split("_")[0]] = name
    return tuple(last_of_block.values())[1:]


def section(model, data, out: Path, s) -> Path:
    plt = pyplot()
    layers = s.top9_layers or figure_layers(model)
    wanted = {layer: maps_for(model, layer, s.maps_per_layer, s.map_seed) for layer in layers}
    k = min(s.k, len(data))
    t0 = time.perf_counter()
    found = top9(model, data, wanted, k=k, batch=s.batch)
    figures, record = [], {"data": data.describe(), "k": k, "layers": {}}
    for layer, per_map in found.items():
        rows, labels = [], []
        record["layers"][layer] = {}
        for channel, units in per_map.items():
            proj = [signed_to_rgb(u.projection[:, u.box[1]:u.box[3], u.box[0]:u.box[2]]) for u in units]
            patch = [patch_to_rgb(u.patch, model.config, u.box) for u in units]
            blank = np.full((8, 8, 3), 255, np.uint8)
            rows.append(proj + [blank] + patch)
            labels.append(f"{layer} map {channel}: {k} projections | {k} input patches")
            record["layers"][layer][channel] = [u.to_json() for u in units]
        picture = grid(rows, labels, cell=64)
        fig, ax = plt.subplots(figsize=(picture.shape[1] / 100, picture.shape[0] / 100 + 0.6))
        ax.imshow(picture)
        ax.set_title(f"{layer}: top-{k} activations of {len(per_map)} feature maps over {len(data)} images")
        ax.set_xlabel(f"left: deconv projections of the {k} strongest activations (strongest first); "
                      f"right: the receptive-field patches")
        ax.set_ylabel("feature map")
        hide_ticks(ax)
        png = save(fig, out / f"top9-{layer}.png")
        figures.append({"file": png, "data": ["top9.json"], "caption": (
            f"Each row is one {layer} feature map. On the left, the deconvnet projections of its {k} strongest "
            f"activations across the set (one per image, strongest first) show what pixel structure excites the "
            f"map; on the right, the input patches under the same receptive fields. Similar structure across "
            f"a row means the map responds to one kind of pattern. A projection is a {DECONV_INTERPRETATION}: "
            f"what drives the unit, not what the class decision used (see the faithfulness section).")})
    write_json(out / "top9.json", record)
    return write_section(out, "top9", TITLE, figures,
                         {"seconds": round(time.perf_counter() - t0, 1), "images": len(data)})


def summary(metrics: dict) -> list[tuple[str, str, str]]:
    return []
