"""Paper Fig. 7 and object localization: occlusion sensitivity on example images, and two measures of whether
the evidence sits on the object: the occlusion pointing game and the share of the deconv projection's energy
that falls on the object mask."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..engine.deconv import DeconvEngine
from ..engine.occlusion import OcclusionEngine
from ..engine.results import DECONV_INTERPRETATION
from ..errors import InvalidArgumentError
from ..model import ZFNet
from ..preprocess import mask_to_input, to_display, to_input
from ..render import signed_to_rgb
from .dataset import AnalysisData, labels_match
from .figures import log, plt as pyplot, save, write_csv, write_json, write_section
from .saliency_metrics import centre_hit, is_difficult, per_class_accuracy

TITLE = "Occlusion sensitivity and object localization (Fig. 7)"
POINTING_TOLERANCE = 15                                  # pixels, the pointing game's usual tolerance


def drop_point(result, size: int) -> tuple[float, float]:
    """Where an occlusion sweep's evidence points: the centre ``(x, y)``, in input pixels, of the window whose
    occlusion lowers the target's probability most (the first such window in row-major order on ties), among
    the positions evaluated (an approximate sweep's ``evaluated``; its other positions are filled in)."""
    probability = result.probability
    if getattr(result, "evaluated", None) is not None:
        probability = np.where(result.evaluated, probability, np.inf)
    r, c = np.unravel_index(int(np.argmin(probability)), probability.shape)
    y0, x0 = int(result.starts[r]), int(result.starts[c])
    return (x0 + min(size, x0 + result.window)) / 2, (y0 + min(size, y0 + result.window)) / 2


def distance_to_mask(mask: np.ndarray, x: float, y: float, grid: np.ndarray | None = None) -> float:
    """Distance in pixels from the point ``(x, y)`` to the nearest pixel centre of ``mask`` (inf when empty)."""
    if not mask.any():
        return float("inf")
    grid = np.mgrid[0:mask.shape[0], 0:mask.shape[1]] if grid is None else grid
    return float(np.sqrt((grid[0][mask] + 0.5 - y) ** 2 + (grid[1][mask] + 0.5 - x) ** 2).min())


def pointing_game(model: ZFNet, data: AnalysisData, indices, *, window: int = 48, stride: int = 16,
                  tolerance: int = POINTING_TOLERANCE, engine=None, progress=None) -> dict:
    """Occlusion pointing game: for each image, the window position where the true class's probability is
    lowest; a hit when its centre lies within ``tolerance`` pixels of the object mask (input frame).

    Targets are the data's labels when its classes are the model's, else the model's top-1 class.
    ``engine``: an :class:`~zfserve.engine.occlusion.OcclusionEngine` of ``model`` to reuse.
    Returns per-image records and the hit rate.
    """
    engine = engine or OcclusionEngine(model)
    match = labels_match(model, data)
    size = model.input_size
    grid = np.mgrid[0:size, 0:size]
    records = []
    for done, index in enumerate(indices, 1):
        item = data.item(int(index))
        if item.mask is None:
            raise InvalidArgumentError("pointing game needs object masks (the synthetic set, or a directory "
                                       "with annotations.json)", field="data")
        mask = mask_to_input(item.mask, model.config)
        x = to_input(item.image, model.config)
        result = engine.sweep(x, window=window, stride=stride, target=item.label if match else None,
                              outputs=("probability",))
        cx, cy = drop_point(result, size)
        dist = distance_to_mask(mask, cx, cy, grid)
        records.append({"index": int(index), "target": int(result.target), "point": [cx, cy],
                        "distance": float(dist), "hit": bool(dist <= tolerance),
                        "base_probability": result.base_probability,
                        "min_probability": float(result.probability.min()),
                        "mask_share": float(mask.mean()), "label": int(item.label), "difficult": is_difficult(mask),
                        "centre_hit": centre_hit(mask, tolerance)["hit"]})
        if progress is not None:
            progress(done, len(indices))
    hits = [r["hit"] for r in records]
    return {"window": window, "stride": stride, "tolerance": tolerance, "labels_match": match,
            "hit_rate": float(np.mean(hits)) if hits else float("nan"), "n": len(records), "images": records,
            **_beside(records)}


def _beside(records: list[dict]) -> dict:
    """What the plain hit rate needs beside it: TorchRay's per-class average, the centre baseline on the same
    images (it always points at the image centre) and both on the difficult subset (off-centre or small objects,
    :func:`~zfserve.paper.saliency_metrics.is_difficult`)."""
    if not records:
        return {}
    hits, centre = (np.array([r[key] for r in records], dtype=float) for key in ("hit", "centre_hit"))
    labels = np.array([r["label"] for r in records])
    hard = np.array([r["difficult"] for r in records], dtype=bool)
    rate = lambda v: float(v.mean()) if v.size else float("nan")  # noqa: E731
    return {"per_class_hit_rate": per_class_accuracy(hits, labels), "centre_hit_rate": rate(centre),
            "centre_per_class_hit_rate": per_class_accuracy(centre, labels), "difficult_n": int(hard.sum()),
            "difficult_hit_rate": rate(hits[hard]), "centre_difficult_hit_rate": rate(centre[hard])}


def deconv_mask_energy(model: ZFNet, data: AnalysisData, indices, *, layer: str | None = None, batch: int = 16,
                       progress=None) -> dict:
    """For each image the deconv projection of its strongest ``layer`` unit (default: the last conv layer's,
    conv5 or conv5_3): the share of its energy (sum of
    squares over channels) that falls on the object mask, beside the mask's share of the image's area.
    ``ratio`` = mean energy share / mean area share (1 = no better than spreading evenly)."""
    engine = DeconvEngine(model)
    layer = model.last_conv if layer is None else layer
    indices = [int(i) for i in indices]
    energy_share, area_share = [], []
    for start in range(0, len(indices), batch):
        part = indices[start:start + batch]
        items = [data.item(i) for i in part]
        if any(it.mask is None for it in items):
            raise InvalidArgumentError("deconv energy needs object masks (the synthetic set, or a directory "
                                       "with annotations.json)", field="data")
        x = np.stack([to_input(it.image, model.config) for it in items])
        projected = engine.project(x, layer, top_k=1, one_per_map=False)
        for it, proj in zip(items, projected):
            mask = mask_to_input(it.mask, model.config)
            energy = (proj.projection.astype(np.float64) ** 2).sum(axis=0)
            total = energy.sum()
            energy_share.append(float(energy[mask].sum() / total) if total > 0 else 0.0)
            area_share.append(float(mask.mean()))
        if progress is not None:
            progress(min(len(indices), start + batch), len(indices))
    e, a = np.array(energy_share), np.array(area_share)
    return {"layer": layer, "n": len(indices), "energy_share": e.tolist(), "area_share": a.tolist(),
            "mean_energy_share": float(e.mean()), "mean_area_share": float(a.mean()),
            "ratio": float(e.mean() / a.mean()) if a.mean() > 0 else float("nan"),
            "mean_per_image_ratio": float(np.mean(e[a > 0] / a[a > 0])) if (a > 0).any() else float("nan")}


def section(model, data, out: Path, s) -> Path:
    if not data.has_masks:
        raise InvalidArgumentError("occlusion report needs object masks: use --data synthetic or a directory "
                                   "written by `zfserve data synth`", field="data")
    # One tile shape for all positions and large batches: fewer engine calls, faster on a busy 2-core CPU.
    engine = OcclusionEngine(model, batch_size=128, buckets=1)
    examples = _examples_figure(model, data, out, s, engine)
    indices = list(range(min(len(data), s.pointing_n or len(data))))
    t0 = time.perf_counter()
    pointing = pointing_game(model, data, indices, window=s.window, stride=s.pointing_stride, engine=engine,
                             progress=lambda d, t: log(f"pointing game {d}/{t}") if d % 20 == 0 or d == t
                             else None)
    t1 = time.perf_counter()
    energy = deconv_mask_energy(model, data, indices, batch=s.batch)
    t2 = time.perf_counter()
    write_json(out / "occlusion.json", {"data": data.describe(), "pointing_game": pointing,
                                        "deconv_mask_energy": energy,
                                        "seconds": {"pointing": round(t1 - t0, 1), "energy": round(t2 - t1, 1)}})
    write_csv(out / "occlusion.csv", ("image", "target", "hit", "distance", "energy_share", "area_share"),
              [(p["index"], p["target"], int(p["hit"]), round(p["distance"], 2), e, a) for p, e, a in
               zip(pointing["images"], energy["energy_share"], energy["area_share"])])
    localization = _localization_figure(out, pointing, energy)
    metrics = {"pointing_game_hit_rate": pointing["hit_rate"], "pointing_images": pointing["n"],
               "labels_match": labels_match(model, data), "deconv_energy_ratio": energy["ratio"],
               "deconv_mean_energy_share": energy["mean_energy_share"],
               "deconv_mean_area_share": energy["mean_area_share"], "deconv_layer": energy["layer"],
               **{f"pointing_{k}": pointing[k] for k in ("per_class_hit_rate", "centre_hit_rate",
                                                         "centre_per_class_hit_rate", "difficult_n",
                                                         "difficult_hit_rate", "centre_difficult_hit_rate")
                  if k in pointing}}
    caption = (
        f"Left: for each of {energy['n']} images, the share of the strongest {energy['layer']} unit's deconv energy "
        f"that lies "
        f"on the object mask against the mask's share of the image (points above the dashed line beat an even "
        f"spread; the dotted line is twice the area share). Right: pointing game — distance from the position "
        f"where the true class's probability is lowest to the object; hits are within {pointing['tolerance']} "
        f"px.")
    return write_section(out, "occlusion", TITLE,
                         [examples, {"file": localization, "data": ["occlusion.json", "occlusion.csv"],
                                     "caption": caption}], metrics)


def _examples_figure(model, data, out: Path, s, engine: OcclusionEngine) -> dict:
    """Fig. 7's rows for the first ``s.occlusion_examples`` images: input, activity of the strongest last-conv
    map (conv5, conv5_3, ...), its projection, the target's probability and the most probable class per occluder position."""
    plt = pyplot()
    match = labels_match(model, data)
    names = list(model.config.class_names)
    deconv = DeconvEngine(model)
    layer = model.last_conv
    examples = list(range(min(s.occlusion_examples, len(data))))
    fig, axes = plt.subplots(len(examples), 5, figsize=(19, 3.6 * len(examples)), squeeze=False,
                             constrained_layout=True)
    for row, index in enumerate(examples):
        item = data.item(index)
        x = to_input(item.image, model.config)
        r = engine.sweep(x, window=s.window, stride=s.stride, target=item.label if match else None,
                         outputs=("probability", "argmax", "activity"))
        proj = deconv.project(x, layer, maps=[r.channel])[0]
        panels = [
            ("(a) input", to_display(x, model.config), None),
            (f"(b) {layer} map {r.channel}: total activation", r.activity, "viridis"),
            (f"(c) {layer} map {r.channel}: deconv projection", signed_to_rgb(proj.projection), None),
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
    return {"file": save(fig, out / "occlusion.png"), "data": [], "caption": (
        f"For each example row: (a) the input; (b) the total activation of the {layer} feature map that is "
        "strongest on the unoccluded image, as a function of where the grey square is centred; (c) that map's strongest "
        f"unit projected to pixels (a {DECONV_INTERPRETATION}); (d) the probability of the correct class (low = "
        "the square hides what the model relies on); (e) the most probable class for each square position.")}


def _localization_figure(out: Path, pointing: dict, energy: dict) -> str:
    """Deconv energy on the mask against the mask's area, and the pointing game's distances."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    e, a = np.array(energy["energy_share"]), np.array(energy["area_share"])
    axes[0].scatter(a, e, s=8)
    lim = max(1e-3, float(max(a.max(), e.max())))
    axes[0].plot([0, lim], [0, lim], "k--", lw=1, label="energy share = area share")
    axes[0].plot([0, lim / 2], [0, lim], "r:", lw=1, label="2x area share")
    axes[0].set_xlabel("object mask: share of the image area")
    axes[0].set_ylabel("deconv energy on the mask (share)")
    axes[0].set_title(f"strongest {energy['layer']} unit per image: ratio {energy['ratio']:.2f}")
    axes[0].legend(fontsize=8)
    d = np.array([p["distance"] for p in pointing["images"]])
    axes[1].hist(np.minimum(d, 100), bins=20)
    axes[1].axvline(pointing["tolerance"], color="r", ls=":", label=f"tolerance {pointing['tolerance']} px")
    axes[1].set_xlabel("distance of the lowest-probability occluder centre to the object (pixels, capped 100)")
    axes[1].set_ylabel("images")
    centre = f" (centre baseline {pointing['centre_hit_rate']:.1%})" if "centre_hit_rate" in pointing else ""
    axes[1].set_title(f"pointing game: {pointing['hit_rate']:.1%} of {pointing['n']} images hit{centre}")
    axes[1].legend(fontsize=8)
    return save(fig, out / "occlusion-localization.png")


def summary(metrics: dict) -> list[tuple[str, str, str]]:
    if "pointing_game_hit_rate" not in metrics:
        return []
    rows = [("occlusion pointing game (lowest true-class probability on the object)",
             f"{metrics['pointing_game_hit_rate']:.1%} of {metrics['pointing_images']} images", ">= 90%")]
    if "pointing_centre_hit_rate" in metrics:
        rows.append(("the same images: occlusion vs the centre baseline (plain / per class / difficult subset)",
                     f"{metrics['pointing_game_hit_rate']:.1%} vs {metrics['pointing_centre_hit_rate']:.1%} / "
                     f"{metrics['pointing_per_class_hit_rate']:.1%} vs "
                     f"{metrics['pointing_centre_per_class_hit_rate']:.1%} / "
                     f"{metrics['pointing_difficult_hit_rate']:.1%} vs "
                     f"{metrics['pointing_centre_difficult_hit_rate']:.1%} "
                     f"({metrics['pointing_difficult_n']} images)", "occlusion well above the centre baseline"))
    rows.append((f"deconv energy on the object mask / mask area (strongest {metrics.get('deconv_layer', 'conv5')} "
                 f"unit)",
                 f"{metrics['deconv_energy_ratio']:.2f}x", ">= 2x"))
    return rows
