"""Occlusion sensitivity (paper §4, Fig. 7): slide a square over the image and watch the network's output.

Maps over window positions: the probability of a target class, the most probable class, and the total
activation of one feature map (by default the conv5 map strongest on the unoccluded image); plus a per-pixel
attribution with Captum ``Occlusion``'s definition (the average drop over the windows that covered a pixel).

Positions: per axis ``ceil((224 - window) / stride) + 1`` windows starting at ``i * stride``; the last one is
clipped at the border (Captum's rule). ``fill`` is in network-input units (mean subtracted): ``"mean"`` is 0,
the model's mean colour; ``fill_units="pixel"`` takes 0..255 values and subtracts the model's mean.

Why it is fast and still exact: an occluder changes every conv map only near itself. The unoccluded pass is
cached; for each window only the changed region of each layer is recomputed, as a fixed-size tile (placed
inside the map, so every tile of a batch has the same shape) whose input is cut from the zero-padded cached
map of the layer below with the freshly computed tile of that layer pasted in. Block 1 reads the occluded
image directly (conv1 + pool1 + LRN in one stage; a mask zeroes the conv1 row that ceil-mode pooling reads
past the end). Tiles of many positions run as one batch; conv5 tiles are pasted into copies of the cached
conv5 map for pool5 + fc6-8, batched across groups. Recomputed values are the same arithmetic as a full
forward pass, so the maps agree with brute force to float rounding. Optionally, positions are grouped per axis
by how large their changed regions are (windows near the border change less), each group with its own,
smaller tile shapes. Each stage is a small ONNX graph run by ONNX Runtime on CPUs and eager PyTorch elsewhere
(:mod:`zfserve.engine.occlusion_stages`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import _checks as checks
from ..errors import InvalidArgumentError
from ..model import CONV_GEOMETRY, POOL_GEOMETRY, SPATIAL_LAYERS, ZFNet
from .occlusion_fill import occluder
from .occlusion_stages import OrtStages, TorchStages
from .parallel import ordered_map
from .results import DEFAULT_STRIDE, DEFAULT_WINDOW, OUTPUTS, OcclusionResult, window_starts

BACKENDS = ("auto", "onnxruntime", "torch")
ATTRIBUTION_ON = ("probability", "logit")
# The layers whose changed region is recomputed as a tile, in order (pool1 .. conv5; block 1 computes conv1
# inside its stage); conv5 tiles go into full-map copies for pool5 and the head.
TILE_LAYERS = SPATIAL_LAYERS[1:SPATIAL_LAYERS.index("conv5") + 1]
# Layers below conv5 whose activity is updated from a summed-area table of the unoccluded map.
TILE_ACTIVITY_LAYERS = SPATIAL_LAYERS[:SPATIAL_LAYERS.index("conv5")]
# The unoccluded maps the tiles are cut from: cache key -> layer (n = after LRN, c = after ReLU).
CACHED = (("n1", "pool1"), ("c2", "conv2"), ("n2", "pool2"), ("c3", "conv3"), ("c4", "conv4"))
# Cached maps are padded by this many zeros on every side so that every crop is a plain slice.
MARGIN = 8


# ------------------------------------------------------------------------------------------------ geometry
def _changed(lo, hi, k, s, p, n):
    """Outputs [lo', hi') of a k/s/p layer (n outputs) whose input window touches input rows [lo, hi)."""
    first = np.maximum(0, -(-(lo + p - k + 1) // s))
    last = np.minimum(n - 1, (hi - 1 + p) // s)
    return first, last + 1


def _span(start, size, k, s, p):
    """The input rows [start', start' + size') that outputs [start, start + size) of a k/s/p layer read."""
    return s * start - p, s * (size - 1) + k


@dataclass
class _AxisPlan:
    """One axis of a group of positions: window rows and, per tile layer, tile starts and a fixed size."""

    lo: np.ndarray
    hi: np.ndarray
    tiles: dict          # layer -> (starts (n,), size)

    def take(self, index: np.ndarray) -> "_AxisPlan":
        return _AxisPlan(self.lo[index], self.hi[index], {k: (a[index], s) for k, (a, s) in self.tiles.items()})


def _axis_plan(model: ZFNet, starts: np.ndarray, window: int) -> _AxisPlan:
    size = model.input_size
    lo = starts.astype(np.int64)
    hi = np.minimum(lo + window, size)
    changed = {}
    a, b = lo, hi
    for g in model.layer_chain()[:-1]:      # conv1 .. conv5 (pool5 reads full conv5 maps)
        a, b = _changed(a, b, g.kernel, g.stride, g.padding, g.out_size)
        changed[g.name] = (a, b, g.out_size)
    tiles = {}
    for name in TILE_LAYERS:
        a, b, n = changed[name]
        tile = int((b - a).max())
        tiles[name] = (np.clip(a, 0, n - tile), tile)
    return _AxisPlan(lo, hi, tiles)


def _full_plan(model: ZFNet) -> _AxisPlan:
    """Tiles that cover every map: the unoccluded pass through the same code, with an empty window."""
    sizes = model.spatial_sizes()
    zero = np.zeros(1, dtype=np.int64)
    return _AxisPlan(zero, zero, {name: (zero, sizes[name]) for name in TILE_LAYERS})


def _groups(model: ZFNet, starts: np.ndarray, window: int, buckets: int) -> list[np.ndarray]:
    """Split one axis's positions into ``buckets`` groups of similar changed-region size (contiguous in size
    order), so border windows, which change less, run with smaller tiles."""
    sizes = np.array([sum(_axis_plan(model, starts[i:i + 1], window).tiles[name][1] for name in TILE_LAYERS)
                      for i in range(len(starts))])
    order = np.argsort(sizes, kind="stable")
    return [chunk for chunk in np.array_split(order, min(buckets, len(starts))) if len(chunk)]


# ------------------------------------------------------------------------------------------------ glue
# Maps are (C, H, W) with MARGIN zeros on every side; corners are numpy int arrays in map coordinates.
def _pad(a):
    if isinstance(a, np.ndarray):
        return np.pad(a, ((0, 0), (MARGIN, MARGIN), (MARGIN, MARGIN)))
    return F.pad(a, (MARGIN,) * 4)


def _crop(padded, row0: np.ndarray, col0: np.ndarray, h: int, w: int):
    """Per-position (h, w) crops of a padded map -> (B, C, h, w)."""
    rows, cols = row0 + MARGIN, col0 + MARGIN
    if isinstance(padded, np.ndarray):
        out = np.empty((len(rows), padded.shape[0], h, w), dtype=padded.dtype)
        for b, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
            out[b] = padded[:, r:r + h, c:c + w]
        return out
    dev = padded.device
    rows = torch.as_tensor(rows, device=dev)[:, None] + torch.arange(h, device=dev)
    cols = torch.as_tensor(cols, device=dev)[:, None] + torch.arange(w, device=dev)
    return padded[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3).contiguous()


def _paste(dst, dst_row0: np.ndarray, dst_col0: np.ndarray, tile, tile_row0: np.ndarray, tile_col0: np.ndarray):
    """Write each position's tile into its crop ``dst`` (both placed by corners in the same map). The parts of
    a tile outside its crop are not read by that crop and are dropped."""
    b, c, h, w = dst.shape
    th, tw = tile.shape[-2:]
    off_r, off_c = tile_row0 - dst_row0, tile_col0 - dst_col0
    if isinstance(dst, np.ndarray):
        for i, (r, c) in enumerate(zip(off_r.tolist(), off_c.tolist())):
            r0, c0, r1, c1 = max(r, 0), max(c, 0), min(r + th, h), min(c + tw, w)
            if r1 > r0 and c1 > c0:
                dst[i, :, r0:r1, c0:c1] = tile[i, :, r0 - r:r1 - r, c0 - c:c1 - c]
        return dst
    dev = dst.device
    rows = torch.as_tensor(off_r, device=dev)[:, None] + torch.arange(th, device=dev)
    cols = torch.as_tensor(off_c, device=dev)[:, None] + torch.arange(tw, device=dev)
    # Parts that fall outside go to one spare row/column, cut off afterwards.
    spare = dst.new_empty(b, c, h + 1, w + 1)
    spare[:, :, :h, :w] = dst
    rows = torch.where((rows >= 0) & (rows < h), rows, h)
    cols = torch.where((cols >= 0) & (cols < w), cols, w)
    index_b = torch.arange(b, device=dev)[:, None, None]
    spare[index_b, :, rows[:, :, None], cols[:, None, :]] = tile.permute(0, 2, 3, 1)
    return spare[:, :, :h, :w].contiguous()


def _where(mask: np.ndarray, a, b):
    """``a`` where the (B, 1, h, w) boolean ``mask`` is set, else ``b``."""
    if isinstance(b, np.ndarray):
        return np.where(mask, a, b)
    return torch.where(torch.as_tensor(mask, device=b.device), a, b)


def _native(a: np.ndarray, like):
    return a if isinstance(like, np.ndarray) else torch.as_tensor(a, device=like.device)


def _channel_sums(a, channel: int) -> np.ndarray:
    """Per-position float64 sum of one channel of (B, C, ...) values."""
    if isinstance(a, np.ndarray):
        return a[:, channel].reshape(len(a), -1).sum(1, dtype=np.float64)
    return a[:, channel].reshape(len(a), -1).sum(1, dtype=torch.float64).cpu().numpy()


def _numpy(a) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.detach().cpu().numpy()


def _integral(a: np.ndarray) -> np.ndarray:
    """Summed-area table of a padded (C, H, W) map in float64, with a leading zero row and column."""
    table = np.zeros((a.shape[0], a.shape[1] + 1, a.shape[2] + 1))
    table[:, 1:, 1:] = a.astype(np.float64).cumsum(1).cumsum(2)
    return table


def _box_sums(table: np.ndarray, channel: int, row0: np.ndarray, col0: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sums of one channel of a padded map over the boxes [row0, row0+h) x [col0, col0+w)."""
    r0, c0, t = row0 + MARGIN, col0 + MARGIN, table[channel]
    return t[r0 + h, c0 + w] - t[r0, c0 + w] - t[r0 + h, c0] + t[r0, c0]


# ------------------------------------------------------------------------------------------------ engine
@dataclass
class _Base:
    """The unoccluded pass: the padded maps the tiles are cut from, and what the sweep's maps compare with."""

    caches: dict
    logits: np.ndarray                  # float64 (num_classes,)
    target: int
    channel: int
    activity: float                     # total activation of the activity layer's ``channel``


class OcclusionEngine:
    """Occlusion sweeps over one image at a time; see the module docstring.

    ``backend``: ``"onnxruntime"`` (CPU only), ``"torch"`` (any device) or ``"auto"`` (ONNX Runtime on the CPU
    when it is installed, else PyTorch). ``batch_size``: window positions per tile batch (default 128 on CPUs,
    1024 on GPUs, where launches rather than FLOPs dominate). ``buckets``: groups of positions per axis, each
    with its own, smaller tile sizes (default 1: one tile shape for all; more buckets save ~10% of the FLOPs
    but measured slower with ONNX Runtime on CPUs, 625 positions: 1 bucket 8.2 s, 3: 8.9 s, 8: 15.8 s CPU).
    ``workers``: tile batches computed at once with ONNX Runtime, each by single-threaded stages (default: PyTorch's
    thread count, so one worker per core; 1 with PyTorch stages).
    """

    def __init__(self, model: ZFNet, *, device: str | torch.device = "cpu", batch_size: int | None = None,
                 backend: str = "auto", buckets: int | None = None, workers: int | None = None):
        self.device = checks.device(device)
        on_cpu = self.device.type == "cpu"
        self.batch_size = checks.integer((128 if on_cpu else 1024) if batch_size is None else batch_size,
                                         "batch_size", 1)
        self.buckets = checks.integer(1 if buckets is None else buckets, "buckets", 1)
        checks.choice(backend, "backend", BACKENDS)
        if backend == "auto":
            backend = "onnxruntime" if on_cpu and _has_onnxruntime() else "torch"
        if backend == "onnxruntime" and not on_cpu:
            raise InvalidArgumentError(f"backend 'onnxruntime' runs on device 'cpu' only; use backend 'torch' "
                                       f"for {self.device}", field="backend")
        self.backend = backend
        self.model = model.eval()
        self.sizes = model.spatial_sizes()
        self.channels = model.channels()
        self.num_classes = self.channels["fc8"]
        self.workers = checks.integer(torch.get_num_threads() if workers is None else workers, "workers", 1) \
            if backend == "onnxruntime" else 1
        with torch.no_grad():
            self.stages = OrtStages(model, threads=1 if self.workers > 1 else None) if backend == "onnxruntime" \
                else TorchStages(model, self.device)
        self.stage_s: dict[str, float] = {}
        # Glue between stages in torch tensors (GPU) or numpy (CPU); tests flip it to run the GPU path on a CPU.
        self.tensor_glue = not on_cpu

    # -------------------------------------------------------------------------------------- validation
    def _check(self, window, stride, layer, channel, target, attribution_on, outputs):
        checks.integer(window, "window", 1, self.model.input_size, what="the input's side")
        checks.integer(stride, "stride", 1, window, what="the window")
        checks.layer(layer)
        if channel is not None:
            checks.integer(channel, "channel", 0, self.channels[layer] - 1, what=f"the maps of {layer}")
        if target is not None:
            checks.integer(target, "target", 0, self.num_classes - 1, what="the model's class indices")
        checks.choice(attribution_on, "attribution_on", ATTRIBUTION_ON)
        if not outputs or any(o not in OUTPUTS for o in outputs):
            raise InvalidArgumentError(f"outputs: {list(outputs)} not accepted; accepted: a non-empty subset of "
                                       f"{list(OUTPUTS)}", field="outputs")

    def _image(self, image) -> np.ndarray:
        size = self.model.input_size
        x = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        if tuple(x.shape) != (3, size, size):
            raise InvalidArgumentError(f"image must be a (3, {size}, {size}) network input (see "
                                       f"zfserve.preprocess.load_image), got shape {tuple(x.shape)}", field="image")
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise InvalidArgumentError("image contains NaN or infinite values", field="image")
        return x

    def _fill(self, fill, fill_units: str):
        """(the fill values as given, the occluder in network-input units): :func:`.occlusion_fill.occluder`."""
        return occluder(fill, fill_units, self.model.config.preprocess)

    def _native(self, a: np.ndarray):
        """numpy on the CPU, a torch tensor on other devices (see the note above the backends)."""
        a = np.ascontiguousarray(a, dtype=np.float32)
        return torch.as_tensor(a, device=self.device) if self.tensor_glue else a

    # -------------------------------------------------------------------------------------- the sweep
    @torch.no_grad()
    def sweep(self, image, window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE, fill="mean",
              target: int | None = None,
              outputs: Sequence[str] = OUTPUTS, layer: str = "conv5", channel: int | None = None,
              attribution_on: str = "probability", progress: Callable[[int, int], None] | None = None,
              fill_units: str = "input", max_positions: int | None = None) -> OcclusionResult:
        """Slide a ``window`` square with ``stride`` over ``image`` (a (3, 224, 224) network input) and return
        the maps named in ``outputs``. ``fill``: ``"mean"`` (0 in input units), a number, or (r, g, b), in
        ``fill_units`` ("input": mean-subtracted network units; "pixel": 0..255, the mean is subtracted).
        ``target``: the class whose probability is mapped (default: the unoccluded top-1). ``layer`` /
        ``channel``: the feature map whose total activation is mapped (default: conv5, the channel strongest
        on the unoccluded image). ``progress(done, total)`` is called after each batch of positions.
        ``max_positions`` refuses sweeps of more positions (a server's cost cap)."""
        outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
        self._check(window, stride, layer, channel, target, attribution_on, outputs)
        window, stride = int(window), int(stride)
        starts = window_starts(self.model.input_size, window, stride)
        if max_positions is not None and len(starts) ** 2 > max_positions:
            raise InvalidArgumentError(f"window/stride: window {window} and stride {stride} give {len(starts)} x "
                                       f"{len(starts)} = {len(starts) ** 2} positions; at most {max_positions} are "
                                       f"accepted (--max-occlusion-positions)", field="stride")
        x = self._image(image)
        fill_values, fill_map = self._fill(fill, fill_units)
        want_activity = "activity" in outputs
        self.stage_s = {}
        t0 = time.perf_counter()
        base = self._base_pass(x, fill_map, layer, channel, target, want_activity)
        timings = {"base_s": time.perf_counter() - t0}
        logits, activity = self._occluded_passes(base, starts, window, layer if want_activity else None, progress)
        timings["sweep_s"] = time.perf_counter() - t0 - timings["base_s"]
        timings["stages_s"] = dict(self.stage_s)   # summed over the base pass and the sweep
        result = OcclusionResult(
            window=window, stride=stride, starts=starts, fill=fill_values, fill_units=fill_units,
            target=base.target, layer=layer, channel=base.channel, attribution_on=attribution_on,
            base_logits=base.logits.astype(np.float32), base_probability=float(_softmax(base.logits)[base.target]),
            base_activity=base.activity, timings=timings, backend=self.backend)
        self._fill_maps(result, base.logits, logits, activity, outputs)
        return result

    def _base_pass(self, x: np.ndarray, fill_map: np.ndarray, layer: str, channel, target, want_activity) -> _Base:
        """The unoccluded pass, through the same tile code: one position with an empty window, tiles that
        cover whole maps, and all-zero caches (so each crop is exactly the tile pasted into it)."""
        size = self.model.input_size
        caches = {"image": _pad(self._native(x)),
                  "baseline": _pad(self._native(np.broadcast_to(fill_map, (3, size, size))))}
        for key, name in CACHED:
            caches[key] = _pad(self._native(np.zeros((self.channels[name], self.sizes[name], self.sizes[name]))))
        full = _full_plan(self.model)
        origin = np.zeros(1, np.int64)
        base = self._tiles(caches, full, full, origin, origin, layer, want_all=True)
        maps = base["maps"]
        base.update(self._head(base["c5"], None, 0, want_all=True))
        for key, _ in CACHED:
            caches[key] = _pad(maps[key][0])
        caches["c5"] = maps["conv5"][0]
        logits = _numpy(base["logits"])[0].astype(np.float64)
        values = _numpy(maps[layer] if layer in maps else base["head"][layer])[0].astype(np.float64)
        per_channel = values.reshape(self.channels[layer], -1).sum(1)
        channel = int(per_channel.argmax()) if channel is None else int(channel)
        if want_activity and layer in TILE_ACTIVITY_LAYERS:
            # Activity of a tile layer = base total - base sum under the tile + the tile's new sum.
            n = self.sizes[layer]
            caches["activity_table"] = _integral(np.pad(values[:, :n, :n],
                                                        ((0, 0), (MARGIN, MARGIN), (MARGIN, MARGIN))))
        caches["activity_total"] = per_channel[channel]
        return _Base(caches, logits, int(logits.argmax()) if target is None else int(target), channel,
                     float(per_channel[channel]))

    def _occluded_passes(self, base: _Base, starts: np.ndarray, window: int, layer: str | None, progress):
        """Logits (ny, nx, C) float32 of every occluded position and, when ``layer`` is given, the activity of
        its ``base.channel`` (ny, nx) float64; tiles run in batches, the head on batches pooled across groups."""
        count = len(starts)
        total = count * count
        logits = np.empty((count, count, self.num_classes), dtype=np.float32)
        activity = np.empty((count, count), dtype=np.float64) if layer is not None else None
        groups = _groups(self.model, starts, window, self.buckets)
        plans = [_axis_plan(self.model, starts[g], window) for g in groups]
        queue, done = [], 0

        def run_head():
            nonlocal queue, done
            rows = np.concatenate([q[0] for q in queue])
            cols = np.concatenate([q[1] for q in queue])
            c5 = [q[2] for q in queue]
            c5 = np.concatenate(c5) if isinstance(c5[0], np.ndarray) else torch.cat(c5)
            got = self._head(c5, layer, base.channel)
            logits[rows, cols] = _numpy(got["logits"])
            if activity is not None:
                activity[rows, cols] = got["activity"] if "activity" in got else \
                    np.concatenate([q[3] for q in queue])
            done += len(rows)
            queue = []
            if progress is not None:
                progress(done, total)

        batches = []
        for gy, plan_y in zip(groups, plans):
            for gx, plan_x in zip(groups, plans):
                iy, ix = (a.reshape(-1) for a in np.meshgrid(np.arange(len(gy)), np.arange(len(gx)), indexing="ij"))
                # Even batches: a group of 72 runs as 36 + 36, not 64 + 8.
                for part in np.array_split(np.arange(len(iy)), -(-len(iy) // self.batch_size)):
                    batches.append((gy[iy[part]], gx[ix[part]], plan_y, plan_x, iy[part], ix[part]))

        def tiles(b):
            return b, self._tiles(base.caches, b[2], b[3], b[4], b[5], layer, channel=base.channel)
        for (rows, cols, *_), got in ordered_map(tiles, batches, self.workers):   # workers > 1: batches at once
            queue.append((rows, cols, got["c5"], got.get("activity")))
            if sum(len(q[0]) for q in queue) >= self.batch_size:
                run_head()
        if queue:
            run_head()
        return logits, activity

    def _fill_maps(self, result: OcclusionResult, base_logits, logits, activity, outputs) -> None:
        """Put the maps named in ``outputs`` into ``result``."""
        probs = _softmax(logits.astype(np.float64))
        target = result.target
        if "probability" in outputs:
            result.probability = probs[..., target].astype(np.float32)
        if "argmax" in outputs:
            result.argmax = logits.argmax(-1)
        if activity is not None:
            result.activity = activity.astype(np.float32)
        if "attribution" in outputs:
            if result.attribution_on == "probability":
                drop = _softmax(base_logits)[target] - probs[..., target]
            else:
                drop = base_logits[target] - logits[..., target].astype(np.float64)
            result.attribution = result.per_pixel(drop, self.model.input_size)

    # -------------------------------------------------------------------------------------- one batch
    def _tiles(self, caches, plan_y: _AxisPlan, plan_x: _AxisPlan, by, bx, layer, *, channel=0, want_all=False):
        """Recompute the tiles of a batch of positions (``by``/``bx`` index the axis plans): full conv5 maps,
        the activity of ``layer``/``channel`` if it is below conv5 and, with ``want_all``, every map."""
        py, px = plan_y.take(by), plan_x.take(bx)
        out, maps = {}, {}
        if want_all:
            layer = None
        act_region = None   # (tile, row0, col0) holding the changed part of the activity layer

        # Block 1: the occluded input crop -> conv1 -> ReLU -> pool1 -> LRN.
        (p1y, s1y), (p1x, s1x) = py.tiles["pool1"], px.tiles["pool1"]
        r1y, h1 = _span(p1y, s1y, *POOL_GEOMETRY)
        r1x, w1 = _span(p1x, s1x, *POOL_GEOMETRY)
        iy0, ih = _span(r1y, h1, *CONV_GEOMETRY["conv1"])
        ix0, iw = _span(r1x, w1, *CONV_GEOMETRY["conv1"])
        rows = iy0[:, None] + np.arange(ih)
        cols = ix0[:, None] + np.arange(iw)
        inside = (((rows >= py.lo[:, None]) & (rows < py.hi[:, None]))[:, None, :, None]
                  & ((cols >= px.lo[:, None]) & (cols < px.hi[:, None]))[:, None, None, :])
        crop = _where(inside, _crop(caches["baseline"], iy0, ix0, ih, iw), _crop(caches["image"], iy0, ix0, ih, iw))
        mask = _native(self._exists(r1y, h1, r1x, w1, self.sizes["conv1"]), crop)
        n1, p1, c1 = self._stage("conv1", "early", "conv1", crop, mask, want_all or layer == "pool1",
                                 want_all or layer == "conv1")
        if layer == "conv1":
            act_region = (c1, r1y, r1x)
        elif layer == "pool1":
            act_region = (p1, p1y, p1x)

        # Block 2, split so that conv2 runs on its changed region only: the cached LRN1 map with the new pool1
        # tile -> conv2 -> ReLU; then the cached conv2 map with that tile -> pool2 -> LRN. (The zeros past the
        # end of the padded conv2 map are exact for ceil-mode pooling: ReLU outputs are >= 0.)
        (ay, sy), (ax, sx) = py.tiles["conv2"], px.tiles["conv2"]
        cy0, ch = _span(ay, sy, *CONV_GEOMETRY["conv2"])
        cx0, cw = _span(ax, sx, *CONV_GEOMETRY["conv2"])
        crop = _paste(_crop(caches["n1"], cy0, cx0, ch, cw), cy0, cx0, n1, p1y, p1x)
        c2 = self._stage("conv2", "conv", "conv2", crop)
        (p2y, s2y), (p2x, s2x) = py.tiles["pool2"], px.tiles["pool2"]
        qy0, qh = _span(p2y, s2y, *POOL_GEOMETRY)
        qx0, qw = _span(p2x, s2x, *POOL_GEOMETRY)
        crop = _paste(_crop(caches["c2"], qy0, qx0, qh, qw), qy0, qx0, c2, ay, ax)
        n2, p2 = self._stage("pool2", "pool_norm", "pool2", crop, want_all or layer == "pool2")
        if layer == "conv2":
            act_region = (c2, ay, ax)
        elif layer == "pool2":
            act_region = (p2, p2y, p2x)
        if want_all:
            maps.update(conv1=c1, pool1=p1, n1=n1, conv2=c2, c2=c2, pool2=p2, n2=n2)

        # Blocks 3-5: the cached map of the layer below with its new tile -> conv -> ReLU.
        below, below_y, below_x, cache = n2, p2y, p2x, "n2"
        for name, key in (("conv3", "c3"), ("conv4", "c4"), ("conv5", "c5")):
            (ay, sy), (ax, sx) = py.tiles[name], px.tiles[name]
            cy0, ch = _span(ay, sy, *CONV_GEOMETRY[name])
            cx0, cw = _span(ax, sx, *CONV_GEOMETRY[name])
            crop = _paste(_crop(caches[cache], cy0, cx0, ch, cw), cy0, cx0, below, below_y, below_x)
            below, below_y, below_x, cache = self._stage(name, "conv", name, crop), ay, ax, key
            if want_all:
                maps[name] = maps[key] = below
            if layer == name and name != "conv5":   # conv5 activity is summed over the full maps
                act_region = (below, ay, ax)

        # Into copies of the cached conv5 map (the head batches positions from several tile groups).
        if want_all:
            out["c5"] = below
            out["maps"] = maps
        else:
            c5 = caches["c5"][None].repeat(len(by), 1, 1, 1) if torch.is_tensor(caches["c5"]) else \
                np.repeat(caches["c5"][None], len(by), axis=0)
            zero = np.zeros(len(by), np.int64)
            out["c5"] = _paste(c5, zero, zero, below, below_y, below_x)
        if act_region is not None:
            tile, row0, col0 = act_region
            h, w = tile.shape[-2:]
            out["activity"] = caches["activity_total"] - _box_sums(caches["activity_table"], channel, row0, col0,
                                                                   h, w) + _channel_sums(tile, channel)
        return out

    def _head(self, c5, layer, channel: int, want_all: bool = False):
        """pool5 -> fc6 .. fc8 for full conv5 maps: logits, and the activity of ``layer`` if it is conv5 or
        above (with ``want_all``, every head output)."""
        head = self._stage("head", "head", c5, ("pool5", "fc6", "fc7") if want_all else (layer,))
        head["fc8"] = head["logits"]
        out = {"logits": head["logits"], "head": head}
        if layer == "conv5":
            out["activity"] = _channel_sums(c5, channel)
        elif layer in ("pool5", "fc6", "fc7", "fc8") and not want_all:
            values = head["logits"] if layer == "fc8" else head[layer]
            out["activity"] = _channel_sums(values if layer == "pool5" else values[:, :, None], channel)
        return out

    def _stage(self, key: str, method: str, *args):
        """Run one stage and add its wall time to ``stage_s`` (on a GPU: launch time, no synchronization)."""
        start = time.perf_counter()
        out = getattr(self.stages, method)(*args)
        self.stage_s[key] = self.stage_s.get(key, 0.0) + time.perf_counter() - start
        return out

    @staticmethod
    def _exists(row0: np.ndarray, h: int, col0: np.ndarray, w: int, n: int) -> np.ndarray:
        """(B, 1, h, w) float mask: 1 where a conv row and column of the tile exist in the real n x n map.
        Ceil-mode pooling reads one past the end; ReLU outputs are >= 0, so a zero there never wins a max."""
        rows = (row0[:, None] + np.arange(h)) < n
        cols = (col0[:, None] + np.arange(w)) < n
        return (rows[:, None, :, None] & cols[:, None, None, :]).astype(np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
