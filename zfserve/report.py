"""The paper's figures as files: one PNG per figure (matplotlib, labelled axes), the numbers behind each figure
as JSON (and CSV for tables and curves) beside it, and ``report.html``: one offline page that shows every
figure with a sentence on how to read it.

Each section writes its files plus ``section-<name>.json`` (title, figures, metrics) into the output
directory; ``report.html`` is rebuilt from whatever section files are there, so sections can be run one at a
time (``zfserve report invariance ...``) or all together (``zfserve report all ...``).
"""

from __future__ import annotations

import csv
import html
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# zfserve.engine.analysis (torch) is imported inside the functions that use it, so that the CLI can build its
# parser from SECTIONS and Settings without loading torch.
from .errors import InvalidArgumentError, ZFServeError
from .render import patch_to_rgb, projection_to_rgb

SECTIONS = ("top9", "evolution", "invariance", "architecture", "occlusion", "correspondence", "filters")
HTML_FILE = "report.html"
TITLES = {
    "top9": "Top-9 activations per feature map (Fig. 2)",
    "evolution": "Feature evolution during training (Fig. 4)",
    "invariance": "Invariance to translation, scale and rotation (Fig. 5)",
    "architecture": "Architecture selection: layer 1 (Fig. 6)",
    "occlusion": "Occlusion sensitivity and object localization (Fig. 7)",
    "correspondence": "Correspondence analysis (Table 1)",
    "filters": "Layer-1 filters",
}


@dataclass
class Settings:
    """How much each section computes. Defaults are the report's; tests shrink them."""

    n: int = 200                               # images of the analysis set (top-9 search, pointing game, energy)
    seed: int = 3                              # synthetic seed (held out from training)
    data: str = "synthetic"
    batch: int = 16
    top9_layers: tuple = ("conv2", "conv3", "conv4", "conv5")   # the paper's Fig. 2 layers
    maps_per_layer: int = 4
    k: int = 9
    invariance_images: int = 5                 # the paper's five
    amounts: dict = field(default_factory=dict)   # transform -> amounts (default: analysis.default_amounts)
    correspondence_images: int = 10
    occlusion_examples: int = 3
    window: int = 48                           # occluder side (pixels)
    stride: int = 16                           # occluder stride of the Fig. 7 examples
    pointing_stride: int = 32                  # occluder stride of the pointing game (every image: coarser)
    pointing_n: int | None = None              # images of the pointing game and deconv energy (None: n)
    arch_steps: int = 40
    arch_batch: int = 16
    arch_pool: int = 128                       # synthetic training images the architecture runs share
    arch_lr: float = 0.04                      # see analysis.architecture_runs
    map_seed: int = 0                          # which feature maps are shown


def _log(message: str) -> None:
    print(f"[report {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ZFServeError("report: matplotlib is not installed; install it with pip install 'zfserve[report]'",
                           field="report") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return path.name


def _write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    return path.name


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _write_csv(path: Path, header, rows) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path.name


def _section(out: Path, name: str, title: str, figures: list[dict], metrics: dict | None = None,
             note: str = "") -> Path:
    """``figures``: dicts with ``file`` (PNG), ``caption`` (how to read it) and ``data`` (files beside it)."""
    path = out / f"section-{name}.json"
    _write_json(path, {"name": name, "title": title, "figures": figures, "metrics": metrics or {}, "note": note})
    return path


def _maps(model, layer: str, count: int, seed: int) -> list[int]:
    from .engine import analysis as A
    channels = getattr(model, layer).out_channels
    rng = np.random.default_rng([seed, A.LAYER_NAMES.index(layer)])
    return sorted(rng.choice(channels, min(count, channels), replace=False).tolist())


# ------------------------------------------------------------------------------------------------- top-9
def section_top9(model, data: A.AnalysisData, out: Path, s: Settings) -> Path:
    plt = _plt()
    from .engine import analysis as A
    from .render import grid
    wanted = {layer: _maps(model, layer, s.maps_per_layer, s.map_seed) for layer in s.top9_layers}
    k = min(s.k, len(data))
    t0 = time.perf_counter()
    found = A.top9(model, data, wanted, k=k, batch=s.batch)
    figures, record = [], {"data": data.describe(), "k": k, "layers": {}}
    for layer, per_map in found.items():
        rows, labels = [], []
        record["layers"][layer] = {}
        for channel, units in per_map.items():
            proj = [projection_to_rgb(u.projection[:, u.box[1]:u.box[3], u.box[0]:u.box[2]]) for u in units]
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
        ax.set_xticks([])
        ax.set_yticks([])
        png = _save(fig, out / f"top9-{layer}.png")
        figures.append({"file": png, "data": ["top9.json"], "caption": (
            f"Each row is one {layer} feature map. On the left, the deconvnet projections of its {k} strongest "
            f"activations across the set (one per image, strongest first) show what pixel structure excites the "
            f"map; on the right, the input patches under the same receptive fields. Similar structure across "
            f"a row means the map responds to one kind of pattern.")})
    _write_json(out / "top9.json", record)
    return _section(out, "top9", TITLES["top9"], figures,
                    {"seconds": round(time.perf_counter() - t0, 1), "images": len(data)})


# ------------------------------------------------------------------------------------------------- evolution
def section_evolution(model, data, out: Path, s: Settings) -> Path:
    plt = _plt()
    from .engine import analysis as A
    ev = A.load_evolution(model)
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
    png = _save(fig, out / "evolution.png")
    record = {"epochs": epochs, "layers": layers, "maps": maps, "image_index": ev["image_index"],
              "position": ev["position"], "activation": ev["activation"]}
    _write_json(out / "evolution.json", record)
    rows = [(layers[li], int(maps[li, mi]), int(epochs[e]), float(ev["activation"][li, mi, e]))
            for li in range(n_layers) for mi in range(n_maps) for e in range(n_epochs)]
    _write_csv(out / "evolution.csv", ("layer", "map", "epoch", "activation"), rows)
    caption = ("Rows are feature maps (layer and map number), columns training epochs. Each cell is the deconv "
               "projection of that map's strongest activation over a fixed probe set at that epoch. A row that "
               "stops changing has converged: in the paper lower layers settle within a few epochs, upper layers "
               "only late.")
    return _section(out, "evolution", TITLES["evolution"],
                    [{"file": png, "data": ["evolution.json", "evolution.csv"], "caption": caption}],
                    {"epochs": epochs.tolist()})


# ------------------------------------------------------------------------------------------------- invariance
def section_invariance(model, data, out: Path, s: Settings) -> Path:
    plt = _plt()
    from .engine import analysis as A
    indices = list(range(min(s.invariance_images, len(data))))
    result = A.invariance(model, data, indices, amounts=s.amounts, batch=s.batch)
    low, high = result["layers"]
    fig, axes = plt.subplots(3, 3, figsize=(13, 10), squeeze=False, constrained_layout=True)
    units = {"translation": "vertical translation (pixels)", "scale": "scale factor", "rotation":
             "rotation (degrees)"}
    rows, metrics = [], {}
    for col, kind in enumerate(A.TRANSFORMS):
        r = result[kind]
        amounts = r["amounts"]
        for row, (what, values) in enumerate(((f"{low} distance", r["distance"][low]),
                                              (f"{high} distance", r["distance"][high]),
                                              ("P(true class)", r["probability"]))):
            ax = axes[row, col]
            for i, index in enumerate(indices):
                ax.plot(amounts, values[i], marker=".", label=f"image {index}")
            ax.set_xlabel(units[kind])
            ax.set_ylabel(what if what.startswith("P") else f"Euclidean {what}")
            if row == 0:
                ax.set_title(kind)
        axes[0, 0].legend(fontsize=7)
        share = {layer: A.growth_share(r["distance"][layer], amounts, A.IDENTITY[kind]) for layer in (low, high)}
        metrics[kind] = {"growth_share": share,
                         "mean_relative_distance": {layer: float(r["relative"][layer].mean()) for layer in (low, high)}}
        for i, index in enumerate(indices):
            for a, amount in enumerate(amounts):
                rows.append((kind, amount, index, float(r["distance"][low][i, a]), float(r["distance"][high][i, a]),
                             float(r["relative"][low][i, a]), float(r["relative"][high][i, a]),
                             float(r["probability"][i, a])))
    fig.suptitle("Invariance: feature distance to the untransformed image and true-class probability")
    png = _save(fig, out / "invariance.png")
    _write_csv(out / "invariance.csv", ("transform", "amount", "image", f"{low}_distance", f"{high}_distance",
                                        f"{low}_relative", f"{high}_relative", "p_true"), rows)
    metrics["translation_layer7_grows_slower"] = bool(metrics["translation"]["growth_share"][high]
                                                      < metrics["translation"]["growth_share"][low])
    metrics["images"] = indices
    metrics["targets"] = result["labels"]
    _write_json(out / "invariance.json", metrics)
    caption = (f"Columns: vertical translation, scale, rotation of {len(indices)} images (one line each). Top "
               f"row: Euclidean distance between the {low} feature vectors of the transformed and original image; "
               f"middle: the same at {high}; bottom: probability of the true class. {low} changes at once and a "
               f"lot; {high} should change gradually (quasi-linearly for translation and scale); a flat "
               f"probability means the output is invariant to that transform. growth_share in invariance.json is "
               f"the mean of d / max(d) over non-identity amounts (lower = grows more slowly).")
    return _section(out, "invariance", TITLES["invariance"],
                    [{"file": png, "data": ["invariance.json", "invariance.csv"], "caption": caption}], metrics)


# ------------------------------------------------------------------------------------------------- architecture
def section_architecture(model, data, out: Path, s: Settings) -> Path:
    plt = _plt()
    from .engine import analysis as A
    from .evaluate import filter_grid
    import torch
    cache = out / "architecture-cache"
    runs = A.architecture_runs(cache, steps=s.arch_steps, batch=s.arch_batch, pool=s.arch_pool, lr=s.arch_lr,
                               progress=lambda v, d, t: _log(f"architecture {v}: step {d}/{t}") if d % 10 == 0
                               or d == t else None)
    names = list(runs)
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(5 * len(names) + 5, 5), squeeze=False,
                             constrained_layout=True)
    for ax, name in zip(axes[0], names):
        ax.imshow(filter_grid(torch.from_numpy(np.asarray(runs[name]["weights"]["conv1"])), scale=3))
        st = runs[name]["stats"]
        ax.set_title(f"{name}\nconv1 filters after {runs[name]['steps']} steps", fontsize=9)
        ax.set_xlabel(f"dominance {st['dominance']:.2f}, dead {st['dead_share']:.0%}, "
                      f"high-freq {st['high_frequency_share']:.2f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
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
    png = _save(fig, out / "architecture.png")
    record = {name: {k: v for k, v in runs[name].items() if k not in ("weights", "cached")} for name in names}
    _write_json(out / "architecture.json", record)
    _write_csv(out / "architecture.csv", ("variant", "conv1", "clip", "steps", "loss_first", "loss_last") + measures,
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
    return _section(out, "architecture", TITLES["architecture"],
                    [{"file": png, "data": ["architecture.json", "architecture.csv"], "caption": caption}],
                    {name: record[name]["stats"] | {"loss_last": record[name]["loss_last"]} for name in names})


# ------------------------------------------------------------------------------------------------- occlusion
def section_occlusion(model, data, out: Path, s: Settings) -> Path:
    plt = _plt()
    from .engine import analysis as A
    from .engine.deconv import DeconvEngine
    from .engine.occlusion import OcclusionEngine
    from .preprocess import to_display, to_input
    if not data.has_masks:
        raise InvalidArgumentError("occlusion report needs object masks: use --data synthetic or a directory "
                                   "written by `zfserve data synth`", field="data")
    match = A.labels_match(model, data)
    names = list(model.config.class_names)
    # One tile shape for all positions and large batches: fewer engine calls, faster on a busy 2-core CPU.
    engine, deconv = OcclusionEngine(model, batch_size=128, buckets=1), DeconvEngine(model)
    examples = list(range(min(s.occlusion_examples, len(data))))
    fig, axes = plt.subplots(len(examples), 5, figsize=(19, 3.6 * len(examples)), squeeze=False,
                             constrained_layout=True)
    for row, index in enumerate(examples):
        item = data.item(index)
        x = to_input(item.image, model.config)
        r = engine.sweep(x, window=s.window, stride=s.stride, target=item.label if match else None,
                         outputs=("probability", "argmax", "activity"))
        proj = deconv.project(x, "conv5", maps=[r.channel])[0]
        panels = [
            ("(a) input", to_display(x, model.config), None),
            (f"(b) conv5 map {r.channel}: total activation", r.activity, "viridis"),
            (f"(c) conv5 map {r.channel}: deconv projection", projection_to_rgb(proj.projection), None),
            (f"(d) P({names[r.target]})", r.probability, "jet"),
            ("(e) most probable class", r.argmax, "tab20"),
        ]
        for col, (title, img, cmap) in enumerate(panels):
            ax = axes[row, col]
            if cmap is None:
                ax.imshow(img)
                ax.set_xlabel("x (pixels)")
                ax.set_ylabel("y (pixels)")
            else:
                centres = r.starts + s.window / 2
                shown = ax.imshow(img, cmap=cmap, extent=(centres[0] - s.stride / 2, centres[-1] + s.stride / 2,
                                                         centres[-1] + s.stride / 2, centres[0] - s.stride / 2),
                                  interpolation="nearest")
                ax.set_xlabel("occluder centre x (pixels)")
                ax.set_ylabel("occluder centre y (pixels)")
                if col == 4:
                    classes = np.unique(img)
                    if len(names) <= 20:   # tab20: one fixed colour per class, named on the colour bar
                        shown.set_clim(-0.5, 19.5)
                        bar = fig.colorbar(shown, ax=ax, fraction=0.046, ticks=classes)
                        bar.ax.set_yticklabels([names[c] for c in classes], fontsize=7)
                    else:
                        ax.set_title(title + "\n" + ", ".join(names[c] for c in classes[:6]), fontsize=8)
                        continue
                else:
                    fig.colorbar(shown, ax=ax, fraction=0.046)
            ax.set_title(title, fontsize=9)
    fig.suptitle(f"Occlusion sensitivity: grey (mean) {s.window}x{s.window} square, stride {s.stride}")
    png = _save(fig, out / "occlusion.png")

    indices = list(range(min(len(data), s.pointing_n or len(data))))
    t0 = time.perf_counter()
    pointing = A.pointing_game(model, data, indices, window=s.window, stride=s.pointing_stride, engine=engine,
                               progress=lambda d, t: _log(f"pointing game {d}/{t}") if d % 20 == 0 or d == t
                               else None)
    t1 = time.perf_counter()
    energy = A.deconv_mask_energy(model, data, indices, batch=s.batch)
    t2 = time.perf_counter()
    _write_json(out / "occlusion.json", {"data": data.describe(), "pointing_game": pointing,
                                          "deconv_mask_energy": energy,
                                          "seconds": {"pointing": round(t1 - t0, 1), "energy": round(t2 - t1, 1)}})
    _write_csv(out / "occlusion.csv", ("image", "target", "hit", "distance", "energy_share", "area_share"),
               [(p["index"], p["target"], int(p["hit"]), round(p["distance"], 2), e, a) for p, e, a in
                zip(pointing["images"], energy["energy_share"], energy["area_share"])])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    e, a = np.array(energy["energy_share"]), np.array(energy["area_share"])
    axes[0].scatter(a, e, s=8)
    lim = max(1e-3, float(max(a.max(), e.max())))
    axes[0].plot([0, lim], [0, lim], "k--", lw=1, label="energy share = area share")
    axes[0].plot([0, lim / 2], [0, lim], "r:", lw=1, label="2x area share")
    axes[0].set_xlabel("object mask: share of the image area")
    axes[0].set_ylabel("deconv energy on the mask (share)")
    axes[0].set_title(f"strongest conv5 unit per image: ratio {energy['ratio']:.2f}")
    axes[0].legend(fontsize=8)
    d = np.array([p["distance"] for p in pointing["images"]])
    axes[1].hist(np.minimum(d, 100), bins=20)
    axes[1].axvline(pointing["tolerance"], color="r", ls=":", label=f"tolerance {pointing['tolerance']} px")
    axes[1].set_xlabel("distance of the lowest-probability occluder centre to the object (pixels, capped 100)")
    axes[1].set_ylabel("images")
    axes[1].set_title(f"pointing game: {pointing['hit_rate']:.1%} of {pointing['n']} images hit")
    axes[1].legend(fontsize=8)
    png2 = _save(fig, out / "occlusion-localization.png")
    metrics = {"pointing_game_hit_rate": pointing["hit_rate"], "pointing_images": pointing["n"],
               "labels_match": match, "deconv_energy_ratio": energy["ratio"],
               "deconv_mean_energy_share": energy["mean_energy_share"],
               "deconv_mean_area_share": energy["mean_area_share"]}
    captions = [
        ("For each example row: (a) the input; (b) the total activation of the conv5 feature map that is strongest "
         "on the unoccluded image, as a function of where the grey square is centred; (c) that map's strongest "
         "unit projected to pixels; (d) the probability of the correct class (low = the square hides what the "
         "model relies on); (e) the most probable class for each square position."),
        (f"Left: for each of {energy['n']} images, the share of the strongest conv5 unit's deconv energy that lies "
         f"on the object mask against the mask's share of the image (points above the dashed line beat an even "
         f"spread; the dotted line is twice the area share). Right: pointing game — distance from the position "
         f"where the true class's probability is lowest to the object; hits are within {pointing['tolerance']} "
         f"px."),
    ]
    return _section(out, "occlusion", TITLES["occlusion"],
                    [{"file": png, "data": [], "caption": captions[0]},
                     {"file": png2, "data": ["occlusion.json", "occlusion.csv"], "caption": captions[1]}], metrics)


# ------------------------------------------------------------------------------------------------- correspondence
def section_correspondence(model, data, out: Path, s: Settings) -> Path:
    plt = _plt()
    from .engine import analysis as A
    from .data import CLASSES
    from .preprocess import to_display
    if "face" not in data.classes:
        raise InvalidArgumentError("correspondence needs face images: use --data synthetic or a directory with "
                                   "a 'face' class and annotations.json", field="data")
    if data.source == "synthetic":   # faces are every 11th synthetic image: look past --n if needed
        data = A.AnalysisData("synthetic", seed=data.seed, n=max(len(data), len(CLASSES) * s.correspondence_images))
    faces = data.indices_of(data.classes.index("face"))[:s.correspondence_images]
    if len(faces) < 2:
        raise InvalidArgumentError(f"correspondence needs at least 2 face images; --n {len(data)} gives "
                                   f"{len(faces)} (every {len(CLASSES)}th synthetic image is a face)", field="n")
    result = A.correspondence(model, data, faces, seed=s.seed)
    # Control: the same architecture at its initialization. Aligned faces put each part at nearly the same
    # place, so even random filters change consistently there; a trained model should beat this baseline.
    import torch
    from .model import build
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = build(model.config).eval()
    control = A.correspondence(untrained, data, faces, seed=s.seed)
    layers = result["layers"]
    rows = [(part, *[f"{result['rows'][part][l]['mean']:.4f}" for l in layers],
             *[f"{result['rows'][part][l]['std']:.4f}" for l in layers]) for part in result["rows"]]
    _write_csv(out / "correspondence.csv", ("occluded", *[f"{l}_mean" for l in layers],
                                            *[f"{l}_std" for l in layers]), rows)
    _write_json(out / "correspondence.json", {k: v for k, v in result.items() if k != "inputs"}
                | {"untrained_control": control["rows"]})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.3]})
    parts = list(result["rows"])
    width = 0.8 / len(layers)
    for i, layer in enumerate(layers):
        axes[0].bar(np.arange(len(parts)) + i * width, [result["rows"][p][layer]["mean"] for p in parts], width,
                    yerr=[result["rows"][p][layer]["std"] for p in parts], capsize=3, label=layer)
    axes[0].set_xticks(np.arange(len(parts)) + width * (len(layers) - 1) / 2, parts)
    axes[0].set_xlabel("occluded region")
    axes[0].set_ylabel("normalized Hamming distance of sign(eps), mean +- std over pairs")
    for i, layer in enumerate(layers):
        axes[0].plot(np.arange(len(parts)) + i * width, [control["rows"][p][layer]["mean"] for p in parts], "kx",
                     markersize=9, zorder=3, label="untrained control" if i == 0 else None)
    axes[0].legend()
    shown = []
    for j in range(min(5, len(faces))):
        img = to_display(result["inputs"][j], model.config).copy()
        for part, colour in zip(parts, ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))):
            x0, y0, x1, y1 = result["boxes"][part][j]
            img[y0:y1, [x0, max(x0, x1 - 1)]] = colour
            img[[y0, max(y0, y1 - 1)], x0:x1] = colour
        shown.append(img)
    axes[1].imshow(np.concatenate(shown, axis=1))
    axes[1].set_xlabel("aligned face images; boxes: right eye (red), left eye (green), nose (blue), "
                       "random (yellow)", fontsize=8)
    axes[1].set_xticks([])
    axes[1].set_yticks([])
    png = _save(fig, out / "correspondence.png")
    table = {part: {layer: result["rows"][part][layer] for layer in layers} for part in parts}
    conv = layers[0]
    metrics = {"table": table, "untrained_control": control["rows"], "images": len(faces),
               f"parts_below_random_{conv}": all(table[p][conv]["mean"] < table["random"][conv]["mean"]
                                                 for p in parts if p != "random")}
    caption = (f"{len(faces)} face images, cropped around the face (as the paper's frontal dog images). The same "
               f"part, or a random region of the same size, is filled with the mean in each; eps is the change of "
               f"the {' / '.join(layers)} feature vector. Bars: the normalized Hamming distance between sign(eps) "
               f"of two images, mean +- std over all pairs. Lower than 'random' means occluding that part changes "
               f"the representation the same way in every image: the model corresponds the part implicitly. Crosses: the same architecture untrained "
               f"(a control: aligned parts sit at nearly the same place in every image, which alone makes the "
               f"changes agree).")
    return _section(out, "correspondence", TITLES["correspondence"],
                    [{"file": png, "data": ["correspondence.json", "correspondence.csv"], "caption": caption,
                      "table": {"header": ["occluded", *[f"{l} (mean +- std)" for l in layers],
                                           *[f"{l} untrained" for l in layers]],
                                "rows": [[p, *[f"{table[p][l]['mean']:.3f} +- {table[p][l]['std']:.3f}"
                                               for l in layers],
                                          *[f"{control['rows'][p][l]['mean']:.3f}" for l in layers]]
                                         for p in parts]}}], metrics)


# ------------------------------------------------------------------------------------------------- filters
def section_filters(model, data, out: Path, s: Settings) -> Path:
    plt = _plt()
    from .engine import analysis as A
    from .evaluate import filter_grid
    weight = model.conv1.weight.detach().cpu()
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(filter_grid(weight, scale=4))
    ax.set_title(f"{model.config.name}: {weight.shape[0]} conv1 filters ({weight.shape[2]}x{weight.shape[3]})")
    ax.set_xlabel("filter (row-major)")
    ax.set_xticks([])
    ax.set_yticks([])
    png = _save(fig, out / "filters.png")
    stats = A.filter_stats(weight.numpy())
    _write_json(out / "filters.json", stats)
    caption = ("The model's layer-1 filters, each contrast-stretched on its own around grey = 0. Trained filters "
               "should look like oriented edges and colour blobs; noise means untrained, and one filter much "
               "brighter than the rest is the dominance that RMS clipping prevents (dominance in filters.json).")
    return _section(out, "filters", TITLES["filters"], [{"file": png, "data": ["filters.json"], "caption": caption}],
                    {"dominance": stats["dominance"], "high_frequency_share": stats["high_frequency_share"]})


RUNNERS = {"top9": section_top9, "evolution": section_evolution, "invariance": section_invariance,
           "architecture": section_architecture, "occlusion": section_occlusion,
           "correspondence": section_correspondence, "filters": section_filters}


# ------------------------------------------------------------------------------------------------- driver
def build(model, out, sections=SECTIONS, settings: Settings | None = None, *, strict: bool = True) -> dict:
    """Run ``sections`` into ``out`` and rebuild ``report.html``. With ``strict=False`` a section that cannot
    run on this model or data (say, no recorded evolution) is noted in the report instead of failing."""
    from .engine import analysis as A
    s = settings or Settings()
    unknown = [name for name in sections if name not in RUNNERS]
    if unknown:
        raise InvalidArgumentError(f"section: {unknown}; accepted: {', '.join(SECTIONS)}, all", field="section")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = A.AnalysisData(s.data, seed=s.seed, n=s.n)
    model.eval()
    timings = {}
    for name in sections:
        t0 = time.perf_counter()
        _log(f"{name}: start ({data.describe()})")
        try:
            RUNNERS[name](model, data, out, s)
        except ZFServeError as exc:
            if strict:
                raise
            _section(out, name, TITLES[name], [], {}, note=f"not produced: {exc}")
            _log(f"{name}: skipped: {exc}")
        timings[name] = round(time.perf_counter() - t0, 1)
        _log(f"{name}: done in {timings[name]} s")
    meta = {"model": model.config.name, "data": data.describe(), "timings_s": timings,
            "settings": {k: v for k, v in vars(s).items()}}
    previous = out / "report.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        meta["timings_s"] = old.get("timings_s", {}) | timings
    _write_json(previous, meta)
    write_html(out, title=f"zfserve report: {model.config.name}", meta=meta)
    return meta


def summary_rows(metrics: dict) -> list[tuple[str, str, str]]:
    """The headline numbers of the sections present: (measure, value, what the paper or the project's acceptance
    expects)."""
    rows = []
    occ = metrics.get("occlusion") or {}
    if "pointing_game_hit_rate" in occ:
        rows.append(("occlusion pointing game (lowest true-class probability on the object)",
                     f"{occ['pointing_game_hit_rate']:.1%} of {occ['pointing_images']} images", ">= 90%"))
        rows.append(("deconv energy on the object mask / mask area (strongest conv5 unit)",
                     f"{occ['deconv_energy_ratio']:.2f}x", ">= 2x"))
    inv = metrics.get("invariance") or {}
    if "translation" in inv:
        share = inv["translation"]["growth_share"]
        low, high = list(share)
        rows.append((f"translation: growth share of the distance, {low} vs {high}",
                     f"{share[low]:.3f} vs {share[high]:.3f}", f"{high} < {low} (grows more slowly)"))
    cor = metrics.get("correspondence") or {}
    if "table" in cor:
        layer = next(iter(cor["table"]["random"]))
        parts = ", ".join(f"{p} {v[layer]['mean']:.3f}" for p, v in cor["table"].items() if p != "random")
        rows.append((f"correspondence at {layer}: parts vs random region",
                     f"{parts}; random {cor['table']['random'][layer]['mean']:.3f}", "every part < random"))
    arch = metrics.get("architecture") or {}
    if "zfnet-7x7s2" in arch and "zfnet-7x7s2-noclip" in arch:
        rows.append(("layer-1 dominance (max / median filter RMS), clipped vs not",
                     f"{arch['zfnet-7x7s2']['dominance']:.2f} vs {arch['zfnet-7x7s2-noclip']['dominance']:.2f}",
                     "without clipping one filter dominates (larger value)"))
    return rows


def write_html(out, *, title: str = "zfserve report", meta: dict | None = None) -> Path:
    """One offline page: every section's figures (relative links), captions, metrics and tables."""
    out = Path(out)
    esc = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "img{max-width:100%;border:1px solid #ccc}figure{margin:1.5em 0}figcaption{margin-top:.4em}"
             "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.2em .6em}"
             "pre{background:#f4f4f4;padding:.6em;overflow-x:auto;font-size:85%}.note{color:#a00}</style>"
             "</head><body>", f"<h1>{esc(title)}</h1>"]
    if meta:
        parts.append(f"<p>Model <b>{esc(str(meta.get('model')))}</b>, data {esc(str(meta.get('data')))}. "
                     f"Reproduces the analyses of Zeiler &amp; Fergus (2014), sections 3-4. Numbers behind every "
                     f"figure are in the JSON/CSV files linked under it.</p>")
    found = [(name, out / f"section-{name}.json") for name in SECTIONS if (out / f"section-{name}.json").is_file()]
    rows = summary_rows({name: json.loads(path.read_text()).get("metrics", {}) for name, path in found})
    if rows:
        parts.append("<h2 id='summary'>Summary</h2><table><tr><th>measure</th><th>value</th><th>expected "
                     "(paper / acceptance)</th></tr>" + "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td><td>{esc(c)}</td></tr>"
                                                     for a, b, c in rows) + "</table>")
    parts.append("<ul>" + "".join(f"<li><a href='#{n}'>{esc(json.loads(p.read_text())['title'])}</a></li>"
                                  for n, p in found) + "</ul>")
    for name, path in found:
        sec = json.loads(path.read_text())
        parts.append(f"<h2 id='{esc(name)}'>{esc(sec['title'])}</h2>")
        if sec.get("note"):
            parts.append(f"<p class='note'>{esc(sec['note'])}</p>")
        for figure in sec["figures"]:
            parts.append(f"<figure><img src='{esc(figure['file'])}' alt='{esc(sec['title'])}'>"
                         f"<figcaption>{esc(figure['caption'])}")
            if figure.get("data"):
                parts.append(" Data: " + ", ".join(f"<a href='{esc(d)}'>{esc(d)}</a>" for d in figure["data"]))
            parts.append("</figcaption></figure>")
            table = figure.get("table")
            if table:
                parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in table["header"]) + "</tr>"
                             + "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>"
                                       for row in table["rows"]) + "</table>")
        if sec.get("metrics"):
            parts.append("<details><summary>metrics</summary><pre>"
                         + esc(json.dumps(sec["metrics"], indent=1, default=_jsonable)) + "</pre></details>")
    parts.append("</body></html>\n")
    path = out / HTML_FILE
    path.write_text("".join(parts))
    return path


__all__ = ["SECTIONS", "Settings", "build", "write_html", "RUNNERS"]
