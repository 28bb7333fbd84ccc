"""Paper Fig. 4, feature evolution during training: for a few feature maps per layer, the deconv projection of
each map's strongest activation over a fixed probe set, at every epoch snapshot a run kept.

:func:`write_evolution` computes it from a run's snapshots into the model directory's ``evolution.npz``
(``zfserve train --evolution`` or ``zfserve evolution``); :func:`section` draws it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import ModelConfig
from ..data import resize_images, synthetic_arrays
from ..engine.deconv import DeconvEngine
from ..errors import InvalidArgumentError, NotFoundError
from ..evaluate import centre_inputs
from ..model import ZFNet, build
from ..render import signed_to_rgb
from ..train.checkpoint import load_snapshot, run_config, snapshot_paths
from .figures import plt as pyplot, save, write_csv, write_json, write_section

TITLE = "Feature evolution during training (Fig. 4)"
# Evolution is recorded by `zfserve train`, which trains ZFNet; an imported model has no training record.
ARCHITECTURES = ("zfnet",)
ONLY_NOTE = "feature evolution is recorded while `zfserve train` trains a ZFNet; imported models have none"
EVOLUTION_FILE = "evolution.npz"
EVOLUTION_SIZE = 64


def _render_projection(projection: np.ndarray, box, size: int) -> np.ndarray:
    """The projection inside the unit's receptive field (:func:`~zfserve.render.signed_to_rgb`), resized to
    ``size`` pixels."""
    x0, y0, x1, y1 = box
    img = signed_to_rgb(projection[:, y0:y1, x0:x1])
    resample = Image.NEAREST if max(img.shape[:2]) < size // 2 else Image.BILINEAR
    return np.asarray(Image.fromarray(img).resize((size, size), resample))


def evolution_data(snapshots: dict[int, Path], config: ModelConfig, probes: np.ndarray, *,
                   layers=None, maps_per_layer: int = 6, seed: int = 0,
                   size: int = EVOLUTION_SIZE) -> dict[str, np.ndarray]:
    """Feature evolution (paper Fig. 4): for a seeded subset of feature maps per layer, at every snapshot
    epoch, the deconv projection of that map's strongest activation over the probe images.

    ``probes`` are network inputs (N, 3, crop, crop). Returns arrays for ``np.savez``: ``renders`` uint8
    (layers, maps, epochs, size, size, 3), ``epochs``, ``layers``, ``maps`` (layers, maps), and per render the
    ``image_index``, ``position`` (y, x) in the layer's map and the ``activation``.
    """
    if not snapshots:
        raise InvalidArgumentError("no snapshots to compute feature evolution from", field="snapshots")
    epochs = sorted(snapshots)
    rng = np.random.default_rng(seed)
    probe_t = torch.from_numpy(np.ascontiguousarray(probes, dtype=np.float32))
    model = build(config)
    layers = model.conv_layers if layers is None else layers
    widths = {name: getattr(model, name).out_channels for name in model.conv_layers}
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
    images, _ = synthetic_arrays(seed, n)
    return centre_inputs(resize_images(images, config.preprocess.resize), config)


def write_evolution(run_dir: str | Path, model_dir: str | Path | None = None, *, probe_seed: int = 1,
                    probe_n: int = 110, maps_per_layer: int = 6, seed: int = 0) -> Path:
    """Compute feature evolution from a run's snapshots into ``model_dir/evolution.npz`` (default: the run
    directory itself, which is also a model directory), as `zfserve evolution` and `zfserve train --evolution` do."""
    run_dir = Path(run_dir)
    model_dir = Path(model_dir or run_dir)
    config = run_config(run_dir)
    probes = probe_inputs(config, seed=probe_seed, n=probe_n)
    data = evolution_data(snapshot_paths(run_dir), config, probes, maps_per_layer=maps_per_layer, seed=seed)
    data["probe"] = np.asarray([probe_seed, probe_n], dtype=np.int64)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / EVOLUTION_FILE
    np.savez_compressed(path, **data)
    return path


def load_evolution(model: ZFNet) -> dict[str, np.ndarray]:
    """The feature-evolution data (Fig. 4) recorded in the model directory (``evolution.npz``, written by
    ``zfserve train --evolution`` / ``zfserve evolution``)."""
    directory = getattr(model, "model_dir", None)
    if directory is None or not (Path(directory) / EVOLUTION_FILE).is_file():
        where = directory or "the built-in zfnet-paper model (no directory)"
        raise NotFoundError(f"model: no {EVOLUTION_FILE} in {where}; record it with `zfserve train --evolution` "
                            f"or `zfserve evolution --run DIR`", field="model")
    with np.load(Path(directory) / EVOLUTION_FILE, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def section(model, data, out: Path, s) -> Path:
    plt = pyplot()
    ev = load_evolution(model)
    renders, epochs, layers, maps = ev["renders"], ev["epochs"], [str(v) for v in ev["layers"]], ev["maps"]
    n_layers, n_maps, n_epochs = renders.shape[:3]
    fig, axes = plt.subplots(n_layers * n_maps, n_epochs, figsize=(n_epochs * 0.9 + 1, n_layers * n_maps * 0.9),
                             squeeze=False)
    for li in range(n_layers):
        for mi in range(n_maps):
            for e in range(n_epochs):
                ax = axes[li * n_maps + mi, e]
                ax.imshow(renders[li, mi, e])
                ax.set_xticks([])
                ax.set_yticks([])
                if li * n_maps + mi == n_layers * n_maps - 1:
                    ax.set_xlabel(f"epoch {int(epochs[e])}", fontsize=7)
            axes[li * n_maps + mi, 0].set_ylabel(f"{layers[li]} #{int(maps[li, mi])}", fontsize=7)
    fig.suptitle("Feature evolution: strongest activation's projection per snapshot epoch")
    png = save(fig, out / "evolution.png")
    record = {"epochs": epochs, "layers": layers, "maps": maps, "image_index": ev["image_index"],
              "position": ev["position"], "activation": ev["activation"]}
    write_json(out / "evolution.json", record)
    rows = [(layers[li], int(maps[li, mi]), int(epochs[e]), float(ev["activation"][li, mi, e]))
            for li in range(n_layers) for mi in range(n_maps) for e in range(n_epochs)]
    write_csv(out / "evolution.csv", ("layer", "map", "epoch", "activation"), rows)
    caption = ("Rows are feature maps (layer and map number), columns training epochs. Each cell is the deconv "
               "projection of that map's strongest activation over a fixed probe set at that epoch. A row that "
               "stops changing has converged: in the paper lower layers settle within a few epochs, upper layers "
               "only late.")
    return write_section(out, "evolution", TITLE,
                         [{"file": png, "data": ["evolution.json", "evolution.csv"], "caption": caption}],
                         {"epochs": epochs.tolist()})


def summary(metrics: dict) -> list[tuple[str, str, str]]:
    return []
