"""The unit index the explorer page reads: for every feature map of the model's conv layers (conv1..conv5,
conv1_1..conv5_3, ...), its top-9 activations over a data set (paper Fig. 2's search, :func:`~zfserve.paper.top9.top_activations`), each with the input patch
under its receptive field.

Built once by ``zfserve index --model M --data D`` and stored beside the model, keyed to the SHA-256 of the
weights, so a retrained model never shows another model's index:

- a writable model directory gets ``<model-dir>/index/``;
- embedded models (package data), read-only directories and the built-in ``zfnet-paper`` use the cache,
  ``cache_root()/<name>-<sha256[:16]>/index/`` (where :func:`zfserve.export.ensure_onnx` keeps model.onnx).

Layout of an index directory (written into a temporary directory beside it and renamed into place)::

    index.json          format, model, weights_sha256, data, k, per layer: channels, receptive field, cell,
                        strip format
    conv1/0042.png      map 42 of conv1: its (up to) k patches side by side, strongest first, one per cell of
    conv3/0042.jpg      the layer's patch side; the file's text (PNG tEXt "zfserve.units", JPEG comment)
                        holds the units' JSON: dataset image, its label, activation, position, box, patch size

Each strip carries its own units, so one file read gives a self-consistent answer even while a rebuild
replaces the directory. Patches wider than :data:`PATCH_MAX` pixels (conv4, conv5) are downscaled. Layers
whose patches are larger than :data:`PNG_MAX_CELL` (conv3..conv5) are stored as JPEG (quality 90, no chroma
subsampling, cells on the 8-pixel block grid so no block straddles two patches): on the noisy natural-looking
patches these layers hold, PNG is 5x larger (about 120 MB instead of 20 MB for the demo model over 100
images). :meth:`UnitIndex.units` always answers PNG bytes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from .. import __version__
from .. import _checks as checks
from ..errors import InvalidArgumentError, NotFoundError
from ..export import cache_root
from ..preprocess import to_display
from ..weights import EMBEDDED_DIR, Snapshot, read_snapshot
from .dataset import AnalysisData
from .top9 import top_activations

INDEX_DIR = "index"
INDEX_FILE = "index.json"
INDEX_FORMAT = 1          # bump when the layout changes: older indexes are then not found
INDEX_KIND = "zfserve unit index"
UNITS_CHUNK = "zfserve.units"
TOP_K = 9
PATCH_MAX = 96            # the longest side of a stored patch, in pixels
PNG_MAX_CELL = 32         # layers with larger patches store JPEG strips
JPEG_QUALITY = 90
JPEG_BLOCK = 8
DEFAULT_SYNTHETIC_N = 1000
DEFAULT_SEED = 3
DEFAULT_BATCH = 32
ALL_IMAGES = 2 ** 62
PATCH_BATCH = 32          # dataset images prepared at once while cutting patches


# ---------------------------------------------------------------------------------------------------- where
def _snapshot(model) -> Snapshot:
    return model if isinstance(model, Snapshot) else read_snapshot(model)


def index_locations(model) -> list[Path]:
    """Where the index of ``model`` (a name, directory or :class:`Snapshot`) may live, in the order they are
    searched: ``<model-dir>/index`` for a model directory that is not package data, then the cache entry for
    its weights hash."""
    snap = _snapshot(model)
    places = []
    if snap.directory is not None and not snap.directory.resolve().is_relative_to(EMBEDDED_DIR):
        places.append(snap.directory / INDEX_DIR)
    places.append(cache_root() / f"{snap.name}-{snap.sha256[:16]}" / INDEX_DIR)
    return places


def _can_create_in(directory: Path) -> bool:
    """Whether a directory can be created inside ``directory`` (creating it first if needed)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(dir=directory, prefix=".zfserve-write-probe.")).rmdir()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------- read
@dataclass
class UnitIndex:
    """A built index (what :func:`find_index` returns): its directory and the contents of index.json."""

    path: Path
    meta: dict = field(repr=False)
    conv_layers: tuple = ()          # the model's conv layers: the names a layer is checked against

    @property
    def model(self) -> str:
        return self.meta["model"]

    @property
    def data(self) -> str:
        return self.meta["data"]

    @property
    def layers(self) -> list[str]:
        return list(self.meta["layers"])

    def describe(self) -> dict:
        """What ListModels-style answers show: ``{"data": ..., "layers": [...], "k": 9}``."""
        return {"data": self.data, "layers": self.layers, "k": self.meta["k"]}

    def units(self, layer: str, channel: int) -> list[dict]:
        """The top activations of feature map ``channel`` of ``layer``, strongest first: dicts with ``image``
        (the dataset index), ``label`` (its class name, or ""), ``activation``, ``y``, ``x`` (in the map),
        ``box`` ``[x0, y0, x1, y1]`` (input pixels) and ``patch_png`` (PNG bytes of the input patch)."""
        checks.layer(layer, self.conv_layers or tuple(self.meta["layers"]))
        if layer not in self.meta["layers"]:
            raise NotFoundError(f"layer: {layer} is not in the unit index of {self.model} (indexed: "
                                f"{', '.join(self.layers)}); rebuild it with zfserve index --layers", field="layer")
        channels = self.meta["layers"][layer]["channels"]
        checks.integer(channel, "channel", 0, channels - 1, what=f"the feature maps of {layer}")
        geometry = self.meta["layers"][layer]
        strip_path = self.path / layer / f"{int(channel):04d}.{geometry['format']}"
        try:
            with Image.open(strip_path, formats=["PNG", "JPEG"]) as strip:
                strip.load()
                records = json.loads(_strip_text(strip))
                pixels = strip.convert("RGB")
        except (OSError, KeyError, ValueError) as exc:
            raise NotFoundError(f"index: {strip_path} is missing or unreadable ({exc}); rebuild it with "
                                f"zfserve index --model {self.model}", field="index") from None
        cell = geometry["cell"]
        out = []
        for rank, record in enumerate(records):
            width, height = record.pop("size")
            patch = pixels.crop((rank * cell, 0, rank * cell + width, height))
            out.append({**record, "patch_png": _png(patch)})
        return out


def _png(picture: Image.Image) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def _strip_bytes(picture: Image.Image, kind: str, text: str) -> bytes:
    """A strip as PNG (the units in a tEXt chunk) or JPEG (the units in its comment)."""
    buf = io.BytesIO()
    if kind == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text(UNITS_CHUNK, text)
        picture.save(buf, format="PNG", pnginfo=info)
    else:
        picture.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, comment=text.encode())
    return buf.getvalue()


def _strip_text(strip: Image.Image) -> str:
    if strip.format == "PNG":
        return strip.text[UNITS_CHUNK]
    return strip.info["comment"].decode()


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / INDEX_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("kind") == INDEX_KIND else None


def find_index(model) -> UnitIndex | None:
    """The current index of ``model`` (a name, directory or :class:`Snapshot`), or None when there is none for
    exactly these weights (never built, built for other weights, of an older format, or unreadable)."""
    snap = _snapshot(model)
    for folder in index_locations(snap):
        meta = _read_meta(folder)
        if meta and meta.get("format") == INDEX_FORMAT and meta.get("weights_sha256") == snap.sha256:
            return UnitIndex(folder, meta, snap.config.conv_layers)
    return None


# ---------------------------------------------------------------------------------------------------- build
def _check_layers(layers, conv_layers) -> list[str]:
    chosen = list(conv_layers if layers is None else layers)
    if not chosen:
        raise InvalidArgumentError(f"layers: empty; accepted: any of {', '.join(conv_layers)}", field="layers")
    for name in chosen:
        checks.layer(name, conv_layers, field="layers")
    return sorted(set(chosen), key=conv_layers.index)


def _data(data, n: int | None, seed: int) -> AnalysisData:
    if isinstance(data, AnalysisData):
        return data
    if str(data) == "synthetic":
        return AnalysisData("synthetic", seed=seed, n=DEFAULT_SYNTHETIC_N if n is None else n)
    if not Path(str(data)).is_dir():
        raise InvalidArgumentError(f"data: {str(data)!r} is neither 'synthetic' nor a directory", field="data")
    # AnalysisData keeps at most n of the directory's images: "all" is any n at least that many.
    return AnalysisData(str(data), n=ALL_IMAGES if n is None else n)


def _source(data: AnalysisData) -> dict:
    if data.source == "synthetic":
        return {"kind": "synthetic", "seed": data.seed, "n": len(data)}
    return {"kind": "folder", "path": str(Path(data.source).resolve()), "n": len(data)}


def _layer_geometry(model, layers) -> dict:
    """Per layer: channels, receptive field and the side of a stored patch (the cell of its strips)."""
    infos = {info.name: info for info in model.layer_info()}
    out = {}
    for name in layers:
        rf = infos[name].receptive_field
        side = min(rf, PATCH_MAX)
        kind = "png" if side <= PNG_MAX_CELL else "jpg"
        cell = side if kind == "png" else -(-side // JPEG_BLOCK) * JPEG_BLOCK
        out[name] = {"channels": infos[name].shape[0], "map_size": infos[name].shape[1], "receptive_field": rf,
                     "patch_side": side, "cell": cell, "format": kind}
    return out


def _stored_patch(patch: np.ndarray, receptive_field: int) -> Image.Image:
    """A uint8 patch scaled like every patch of its layer: by PATCH_MAX / receptive field when that is < 1."""
    picture = Image.fromarray(patch)
    scale = min(1.0, PATCH_MAX / receptive_field)
    if scale < 1.0:
        width, height = picture.size
        picture = picture.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.LANCZOS)
    return picture


def _cut_patches(model, data: AnalysisData, tops: dict, geometry: dict, progress=None) -> dict:
    """The stored patch of every top unit: ``{(layer, channel, rank): PIL image}``. Each dataset image is
    prepared once for all the units that fall in it."""
    from ..engine.deconv import DeconvEngine
    box_of = DeconvEngine(model).box
    by_image: dict[int, list] = {}
    for layer, per_map in tops.items():
        for channel, units in per_map.items():
            for rank, unit in enumerate(units):
                by_image.setdefault(unit.image_index, []).append((layer, channel, rank, unit))
    images = sorted(by_image)
    patches = {}
    for start in range(0, len(images), PATCH_BATCH):
        chunk = images[start:start + PATCH_BATCH]
        inputs = data.inputs(chunk, model.config)
        for x, image_index in zip(inputs, chunk):
            # What patch_to_rgb(x[:, box], config, box) gives for each box (the input with the mean under
            # it added back), computed once per image rather than once per unit.
            picture = to_display(x, model.config)
            for layer, channel, rank, unit in by_image[image_index]:
                x0, y0, x1, y1 = box = box_of(layer, unit.y, unit.x)
                patch = _stored_patch(picture[y0:y1, x0:x1], geometry[layer]["receptive_field"])
                patches[(layer, channel, rank)] = (box, patch)
        if progress is not None:
            progress("patches", min(start + PATCH_BATCH, len(images)), len(images))
    return patches


def _write_strips(folder: Path, tops: dict, patches: dict, geometry: dict, class_of) -> None:
    for layer, per_map in tops.items():
        cell, kind = geometry[layer]["cell"], geometry[layer]["format"]
        (folder / layer).mkdir()
        for channel, units in per_map.items():
            strip = Image.new("RGB", (cell * len(units), cell), (255, 255, 255))
            records = []
            for rank, unit in enumerate(units):
                box, picture = patches[(layer, channel, rank)]
                strip.paste(picture, (rank * cell, 0))
                records.append({"image": unit.image_index, "label": class_of(unit.image_index),
                                "activation": unit.activation, "y": unit.y, "x": unit.x, "box": list(box),
                                "size": list(picture.size)})
            text = json.dumps(records, separators=(",", ":"))
            (folder / layer / f"{channel:04d}.{kind}").write_bytes(_strip_bytes(strip, kind, text))


def _install(staging: Path, target: Path) -> None:
    """Move a finished index into place. A previous index is renamed aside first (a directory cannot be
    renamed over a non-empty one) and removed after; readers meanwhile find either one or none."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}-old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_index(model, data="synthetic", *, n: int | None = None, seed: int = DEFAULT_SEED, layers=None,
                batch_size: int = DEFAULT_BATCH, progress=None) -> UnitIndex:
    """Build and store the unit index of ``model`` (a name, directory or :class:`Snapshot`) over ``data``
    (``"synthetic"``: ``n`` images of synthetic seed ``seed``, default 1000; or an ImageFolder directory: its
    first ``n`` images, default all) for ``layers`` (default: every conv layer). ``progress(stage, done, total)``
    is called as it goes (stages "activations", then "patches"). Returns the new :class:`UnitIndex`."""
    t0 = time.perf_counter()
    snap = _snapshot(model)
    chosen = _check_layers(layers, snap.config.conv_layers)
    checks.integer(batch_size, "batch_size", 1, 1024)
    if n is not None:
        checks.integer(n, "n", 1)
    checks.integer(seed, "seed", 0)
    dataset = _data(data, n, seed)
    target = next((p for p in index_locations(snap) if _can_create_in(p.parent)), None)
    if target is None:
        raise NotFoundError(f"index: cannot write the index: neither {index_locations(snap)[0].parent} nor the "
                            f"cache directory is writable (set ZFSERVE_CACHE_DIR)", field="index")
    net = snap.model()
    geometry = _layer_geometry(net, chosen)
    k = min(TOP_K, len(dataset))

    def on_batch(done, total):
        if progress is not None:
            progress("activations", done, total)

    tops = top_activations(net, dataset, {name: None for name in chosen}, k=k, batch=batch_size,
                           progress=on_batch)
    patches = _cut_patches(net, dataset, tops, geometry, progress)
    labels = dataset.labels()
    classes = list(dataset.classes)

    def class_of(image_index: int) -> str:
        label = int(labels[image_index])
        return classes[label] if 0 <= label < len(classes) else ""

    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{INDEX_DIR}-build-"))
    try:
        _write_strips(staging, tops, patches, geometry, class_of)
        meta = {"kind": INDEX_KIND, "format": INDEX_FORMAT, "model": snap.name, "model_version": snap.version,
                "weights_sha256": snap.sha256, "data": dataset.describe(), "source": _source(dataset), "k": k,
                "patch_max": PATCH_MAX, "layers": geometry, "zfserve": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - t0, 1)}
        (staging / INDEX_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(staging, 0o755)   # mkdtemp makes it private; an index is as readable as the model beside it
        _install(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return UnitIndex(target, meta, snap.config.conv_layers)
