"""Arrays -> pictures: deconv projections, input patches, filters, labelled grids, occlusion maps, PNG bytes,
and the output directories of ``zfserve deconv`` and ``zfserve occlude``.

Everything here takes plain numpy arrays and result objects (uint8 (H, W, 3) for pictures) and needs only
Pillow, so the CLI, the server, library users and the reports share one rendering path.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .engine.results import DECONV_INTERPRETATION
from .errors import InvalidArgumentError
from .preprocess import preprocess_config, to_display

MID_GREY = 128
BACKGROUND = (255, 255, 255)
LABEL_COLOUR = (0, 0, 0)


def signed_to_rgb(values) -> np.ndarray:
    """Signed RGB values (3, H, W) -> uint8 (H, W, 3), contrast-stretched on their own around mid-grey.

    Zero maps to 128 and the largest absolute value to 1 or 255, so the sign of every pixel is kept and no
    channel is shifted; all zeros (a dead unit) are plain grey. Deconv projections and filters are shown
    this way (the paper's figures).
    """
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise InvalidArgumentError(f"projection: expected shape (3, H, W), got {tuple(arr.shape)}",
                                   field="projection")
    peak = float(np.abs(arr).max(initial=0.0))
    scaled = arr * (127.0 / peak) if peak > 0 and np.isfinite(peak) else np.zeros_like(arr)
    return np.clip(np.rint(MID_GREY + scaled), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def filter_grid(weight, scale: int = 4, pad: int = 1) -> np.ndarray:
    """conv1 weights (K, 3, k, k) (numpy or torch) -> one uint8 RGB picture, filters row-major on white, each
    contrast-stretched on its own around grey = 0 (:func:`signed_to_rgb`), ``scale`` pixels per tap."""
    w = np.asarray(weight.detach().float().cpu() if hasattr(weight, "detach") else weight, dtype=np.float32)
    if w.ndim != 4 or w.shape[1] != 3:
        raise InvalidArgumentError(f"filter grid needs RGB filters (K, 3, k, k), got {tuple(w.shape)}",
                                   field="layer")
    count, _, k, _ = w.shape
    cols = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / cols))
    cell = k * scale + pad
    picture = np.full((rows * cell + pad, cols * cell + pad, 3), 255, dtype=np.uint8)
    for i in range(count):
        tile = signed_to_rgb(w[i]).repeat(scale, 0).repeat(scale, 1)
        r, c = divmod(i, cols)
        picture[pad + r * cell: pad + r * cell + k * scale, pad + c * cell: pad + c * cell + k * scale] = tile
    return picture


def write_filter_grid(model, path, scale: int = 4) -> Path:
    """Write ``model``'s conv1 filters as a PNG grid (:func:`filter_grid`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(filter_grid(getattr(model, model.conv_layers[0]).weight, scale=scale)))
    return path


def patch_to_rgb(patch, config=None, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """An input patch (3, h, w) in network-input units -> uint8 (h, w, 3).

    With a per-pixel mean image the mean to add back depends on where the patch was cut; pass its ``box``
    (x0, y0, x1, y1 in input pixels) to use the exact mean there, otherwise the channel means are used.
    """

    patch = np.asarray(patch, dtype=np.float32)
    if patch.ndim != 3 or patch.shape[0] != 3:
        raise InvalidArgumentError(f"patch: expected shape (3, h, w), got {tuple(patch.shape)}", field="patch")
    if box is None:
        return to_display(patch, config)
    x0, y0, x1, y1 = box
    if (y1 - y0, x1 - x0) != patch.shape[1:]:
        raise InvalidArgumentError(f"box: {box} does not match the patch size {patch.shape[1:]}", field="box")
    # Paste into a full-size input so to_display adds the mean crop that belongs under the box.
    size = preprocess_config(config).crop
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise InvalidArgumentError(f"box: {box} must lie inside the {size}x{size} input", field="box")
    canvas = np.zeros((3, size, size), dtype=np.float32)
    canvas[:, y0:y1, x0:x1] = patch
    return to_display(canvas, config)[y0:y1, x0:x1]


def _as_picture(image, field: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise InvalidArgumentError(f"{field}: expected a uint8 (H, W, 3) or (H, W) picture, got "
                                   f"{arr.dtype} {tuple(arr.shape)}", field=field)
    return arr


def grid(rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str] | None = None, *, pad: int = 4,
         cell: int | None = None) -> np.ndarray:
    """Lay pictures out in rows -> one uint8 (H, W, 3) picture on a white background.

    ``rows``: a list of rows, each a list of uint8 pictures (different sizes are fine; each is centred in its
    cell, scaled up with nearest-neighbour to ``cell`` pixels if given, otherwise cells take the largest size).
    ``labels``: one optional text per row, drawn above it.
    """
    if not rows or not any(len(r) for r in rows):
        raise InvalidArgumentError("rows: expected at least one picture", field="rows")
    if labels is not None and len(labels) != len(rows):
        raise InvalidArgumentError(f"labels: {len(labels)} labels for {len(rows)} rows", field="labels")
    pictures = [[_as_picture(im, f"rows[{i}][{j}]") for j, im in enumerate(row)] for i, row in enumerate(rows)]
    if cell is not None:
        pictures = [[_fit(im, cell) for im in row] for row in pictures]
    cell_h = max(im.shape[0] for row in pictures for im in row)
    cell_w = max(im.shape[1] for row in pictures for im in row)
    font = ImageFont.load_default()
    label_h = 14 if labels is not None else 0
    ncols = max(len(row) for row in pictures)
    width = pad + ncols * (cell_w + pad)
    height = pad + len(pictures) * (label_h + cell_h + pad)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = pad
    for i, row in enumerate(pictures):
        if labels is not None:
            draw.text((pad, y), str(labels[i]), fill=LABEL_COLOUR, font=font)
            y += label_h
        for j, im in enumerate(row):
            x = pad + j * (cell_w + pad) + (cell_w - im.shape[1]) // 2
            canvas.paste(Image.fromarray(im), (x, y + (cell_h - im.shape[0]) // 2))
        y += cell_h + pad
    return np.asarray(canvas)


def _fit(picture: np.ndarray, cell: int) -> np.ndarray:
    """Scale so the longer side is ``cell`` pixels (nearest neighbour keeps pixels crisp)."""
    h, w = picture.shape[:2]
    scale = cell / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(picture).resize(size, Image.NEAREST))


def png_bytes(picture) -> bytes:
    """uint8 (H, W, 3) or (H, W) -> PNG file bytes."""
    arr = np.asarray(picture)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InvalidArgumentError(f"picture: expected uint8 (H, W), (H, W, 3) or (H, W, 4), got {arr.dtype} "
                                   f"{tuple(arr.shape)}", field="picture")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- occlusion
# Colour maps written out as a few anchor colours, linearly interpolated (no matplotlib needed).
SEQUENTIAL = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))   # viridis-like
DIVERGING = ((33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43))  # blue-white-red
# Distinct colours for class maps (cycled when there are more classes than colours).
CLASS_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
                 (0, 0, 128), (128, 128, 0))


def colorize(values, *, kind: str = "sequential", vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """A 2-D float map -> uint8 (H, W, 3). ``kind``: "sequential" (low dark violet .. high yellow) or
    "diverging" (negative blue, 0 white, positive red; symmetric around 0 unless vmin/vmax are given)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2:
        raise InvalidArgumentError(f"values: expected a 2-D map, got shape {tuple(arr.shape)}", field="values")
    if kind not in ("sequential", "diverging"):
        raise InvalidArgumentError(f"kind must be 'sequential' or 'diverging', got {kind!r}", field="kind")
    finite = arr[np.isfinite(arr)]
    if not finite.size:
        finite = np.zeros(1)
    if kind == "diverging":
        peak = float(np.abs(finite).max())
        lo, hi = (-peak, peak) if vmin is None and vmax is None else (vmin, vmax)
    else:
        lo = float(finite.min()) if vmin is None else vmin
        hi = float(finite.max()) if vmax is None else vmax
    t = np.zeros_like(arr) if hi <= lo else np.clip((np.nan_to_num(arr, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    anchors = np.asarray(SEQUENTIAL if kind == "sequential" else DIVERGING, dtype=np.float64)
    position = t * (len(anchors) - 1)
    index = np.minimum(position.astype(np.int64), len(anchors) - 2)
    frac = (position - index)[..., None]
    rgb = anchors[index] * (1.0 - frac) + anchors[index + 1] * frac
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _resize(picture: np.ndarray, size: int, smooth: bool) -> np.ndarray:
    return np.asarray(Image.fromarray(picture).resize((size, size), Image.BILINEAR if smooth else Image.NEAREST))


def heatmap_overlay(picture, values, *, kind: str = "sequential", alpha: float = 0.55,
                    vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Blend a colourized map over a uint8 (H, W, 3) picture. A map of another size is resized (bilinear)."""
    base = _as_picture(picture, "picture")
    if not 0.0 <= alpha <= 1.0:
        raise InvalidArgumentError(f"alpha must be in 0..1, got {alpha}", field="alpha")
    colours = colorize(values, kind=kind, vmin=vmin, vmax=vmax)
    if colours.shape[:2] != base.shape[:2]:
        colours = np.asarray(Image.fromarray(colours).resize(base.shape[1::-1], Image.BILINEAR))
    return np.clip(np.rint(base * (1.0 - alpha) + colours * alpha), 0, 255).astype(np.uint8)


def map_picture(values, *, size: int = 224, kind: str = "sequential", title: str | None = None) -> np.ndarray:
    """A map over window positions, one cell per position (nearest neighbour), with a title and the value
    range written below it."""
    arr = np.asarray(values, dtype=np.float64)
    body = _resize(colorize(arr, kind=kind), size, smooth=False)
    finite = arr[np.isfinite(arr)]
    caption = f"min {finite.min():.4g}  max {finite.max():.4g}" if finite.size else "no finite values"
    return _captioned(body, [title] if title else [], [(None, caption)])


def class_map(argmax, class_names=None, *, size: int = 224, max_legend: int = 10) -> np.ndarray:
    """The most probable class at each window position, one colour per class, with a legend of the classes
    that occupy the most positions (the rest are counted on one line)."""
    arr = np.asarray(argmax)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgumentError(f"argmax: expected a 2-D integer map, got {arr.dtype} {tuple(arr.shape)}",
                                   field="argmax")
    classes, counts = np.unique(arr, return_counts=True)
    order = classes[np.argsort(-counts, kind="stable")]
    slot = {int(c): i for i, c in enumerate(order)}
    palette = np.asarray(CLASS_COLOURS, dtype=np.uint8)
    cells = palette[np.vectorize(lambda c: slot[int(c)] % len(palette))(arr)]
    body = _resize(cells, size, smooth=False)

    def name(c):
        return class_names[c] if class_names is not None and 0 <= c < len(class_names) else f"class {c}"

    legend = [(tuple(int(v) for v in palette[slot[int(c)] % len(palette)]),
               f"{name(int(c))} ({int(counts[classes == c][0])})") for c in order[:max_legend]]
    if len(order) > max_legend:
        legend.append((None, f"+ {len(order) - max_legend} more classes"))
    return _captioned(body, [], legend)


def _captioned(body: np.ndarray, titles, lines) -> np.ndarray:
    """``body`` with title lines above and (swatch colour or None, text) lines below, on white."""
    font = ImageFont.load_default()
    line_h, pad = 14, 4
    h, w = body.shape[:2]
    height = pad + len(titles) * line_h + h + pad + len(lines) * line_h + pad
    width = max([w] + [8 * len(t) for t in titles] + [20 + 7 * len(t) for _, t in lines]) + 2 * pad
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = pad
    for text in titles:
        draw.text((pad, y), text, fill=LABEL_COLOUR, font=font)
        y += line_h
    canvas.paste(Image.fromarray(body), (pad, y))
    y += h + pad
    for colour, text in lines:
        x = pad
        if colour is not None:
            draw.rectangle([x, y + 2, x + 10, y + 12], fill=colour, outline=LABEL_COLOUR)
            x += 16
        draw.text((x, y), text, fill=LABEL_COLOUR, font=font)
        y += line_h
    return np.asarray(canvas)


def occlusion_pictures(result, picture, class_names=None) -> dict[str, np.ndarray]:
    """Pictures for an ``OcclusionResult`` and the uint8 (224, 224, 3) input it was computed on: the target's
    probability over the image (each pixel: the mean over the windows that covered it), the attribution,
    the most-probable-class map and the activity map; only for the maps the result holds."""
    base = _as_picture(picture, "picture")
    size = base.shape[0]
    out = {}
    target = class_names[result.target] if class_names is not None else f"class {result.target}"
    if result.probability is not None:
        pixels = result.per_pixel(result.probability, size)
        # Auto range (dark = lowest): an untrained model's probabilities move in the 4th decimal.
        out["probability"] = _captioned(heatmap_overlay(base, pixels), [f"p({target}) under occlusion"],
                                        [(None, f"unoccluded {result.base_probability:.4g}; occluded "
                                                f"{float(result.probability.min()):.4g} .. "
                                                f"{float(result.probability.max()):.4g}")])
    if result.attribution is not None:
        out["attribution"] = _captioned(heatmap_overlay(base, result.attribution, kind="diverging"),
                                        [f"attribution ({result.attribution_on} drop), {target}"], [])
    if result.argmax is not None:
        out["argmax"] = class_map(result.argmax, class_names, size=size)
    if result.activity is not None:
        out["activity"] = map_picture(result.activity, size=size,
                                      title=f"{result.layer} map {result.channel} total activation")
    return out


# ---------------------------------------------------------------------------------------------------- directories
DECONV_JSON = "deconv.json"
OCCLUSION_JSON = "occlusion.json"


def _picture_from_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data), formats=["PNG"]).convert("RGB"))


def patch_pictures(units, config=None) -> list[np.ndarray]:
    """Each projected unit's input patch as uint8 RGB: from its ``patch`` array (with the exact mean under its
    box, :func:`patch_to_rgb`) or, for a unit read from a server, from its ``patch_png``."""
    return [patch_to_rgb(u.patch, config, u.box) if u.patch is not None else _picture_from_png(u.patch_png)
            for u in units]


def write_deconv(out, units, *, layer: str, model: str, image: str, config=None, model_version: str = "") -> dict:
    """The output directory of ``zfserve deconv`` for one image's projected units (``DeconvEngine.project`` or
    ``Client.deconv`` with tensors and patches): one PNG per unit (``unit_NN_<layer>_c<C>_y<Y>_x<X>.png``),
    ``grid.png`` (projection | its receptive field | the input patch), ``projections.npz`` (K, 3, H, W
    float32) and ``deconv.json`` (model, its version (``model_version``, else the units'), what a projection is
    (``interpretation``), image, layer, per unit: channel, y, x, activation, box, file), which is also
    returned."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, rows, labels = [], [], []
    for i, (unit, patch) in enumerate(zip(units, patch_pictures(units, config))):
        picture = signed_to_rgb(unit.projection)
        name = f"unit_{i:02d}_{unit.layer}_c{unit.channel}_y{unit.y}_x{unit.x}.png"
        (out / name).write_bytes(png_bytes(picture))
        x0, y0, x1, y1 = unit.box
        rows.append([picture, picture[y0:y1, x0:x1], patch])
        labels.append(f"{unit.layer} c{unit.channel} y{unit.y} x{unit.x}  activation {unit.activation:.4g}")
        record = unit.to_json()
        del record["image_index"]  # one image per directory
        records.append({**record, "file": name})
    (out / "grid.png").write_bytes(png_bytes(grid(rows, labels)))
    np.savez(out / "projections.npz", projections=np.stack([u.projection for u in units]).astype(np.float32))
    version = model_version or next((u.model_version for u in units if u.model_version), "")
    doc = {"model": model, "model_version": version, "interpretation": DECONV_INTERPRETATION, "image": str(image),
           "layer": layer, "units": records, "grid": "grid.png", "projections": "projections.npz"}
    (out / DECONV_JSON).write_text(json.dumps(doc, indent=2))
    return doc


def write_occlusion(out, result, *, model: str, image: str, class_names, picture=None) -> dict:
    """The output directory of ``zfserve occlude`` for one sweep (``OcclusionEngine.sweep`` or
    ``Client.occlude``): a PNG per map (the result's own ``png`` pictures when it holds them, else drawn over
    ``picture``, the uint8 input, with :func:`occlusion_pictures`), ``occlusion.npz`` (the maps and ``starts``)
    and ``occlusion.json`` (the model and its version, the settings — window, stride, fill, fill units, target,
    probability or logit attribution —, the unoccluded and lowest probability, the activity range, the classes the
    argmax map shows, files), which is also returned."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pngs = result.png or {name: png_bytes(p) for name, p in occlusion_pictures(result, picture, class_names).items()}
    files = {}
    for name, data in pngs.items():
        files[name] = f"{name}.png"
        (out / files[name]).write_bytes(data)
    evaluated = {} if result.evaluated is None else {"evaluated": np.asarray(result.evaluated)}
    np.savez(out / "occlusion.npz", **result.arrays(), starts=result.starts, **evaluated)
    doc = {"model": model, "model_version": result.model_version, "image": str(image), "window": result.window,
           "stride": result.stride, "positions": list(result.shape), "fill": np.asarray(result.fill).tolist(),
           "fill_units": result.fill_units, "target": result.target, "target_name": class_names[result.target],
           "attribution_on": result.attribution_on, "unoccluded_probability": result.base_probability}
    if result.probability is not None:   # the lowest among the evaluated positions (an approximation fills others)
        measured = result.probability if result.evaluated is None else \
            np.where(result.evaluated, result.probability, np.inf)
        low = np.unravel_index(int(np.argmin(measured)), measured.shape)
        doc.update(min_probability=float(measured[low]),
                   min_probability_window={"y": int(result.starts[low[0]]), "x": int(result.starts[low[1]])})
    doc["activity"] = {"layer": result.layer, "channel": result.channel, "unoccluded": result.base_activity}
    if result.activity is not None:
        doc["activity"].update(min=float(result.activity.min()), max=float(result.activity.max()))
    if result.argmax is not None:
        doc["argmax_classes"] = sorted({class_names[int(c)] for c in np.unique(result.argmax)})
    doc.update(backend=result.backend, engine=result.engine, precision=result.precision, mode=result.mode,
               evaluated=None if result.evaluated is None else int(np.count_nonzero(result.evaluated)),
               seconds=round(result.seconds, 3), files={**files, "arrays": "occlusion.npz"})
    (out / OCCLUSION_JSON).write_text(json.dumps(doc, indent=2))
    return doc
