"""Occlusion sensitivity (paper §4, Fig. 7): slide a square over the image and watch the network's output.

Maps over window positions: the probability of a target class, the most probable class, and the total
activation of one feature map (by default the map of the last conv layer, conv5 or conv5_3, strongest on the
unoccluded image); plus a per-pixel attribution with Captum ``Occlusion``'s definition (the average drop over
the windows that covered a pixel). Every member of ZFNet's family (ZFNet, AlexNet, VGG) runs the same way.

Positions: per axis ``ceil((224 - window) / stride) + 1`` windows starting at ``i * stride``; the last one is
clipped at the border (Captum's rule). ``fill`` is in network-input units (normalized): ``"mean"`` is 0,
the model's mean colour; ``fill_units="pixel"`` takes 0..255 values and normalizes them as images are.

Why it is fast and still exact: an occluder changes every conv map only near itself. The unoccluded pass is
cached; for each window only the changed region of each layer is recomputed, as a fixed-size tile (placed
inside the map, so every tile of a batch has the same shape) whose input is cut from the zero-padded cached
map of the layer below with the freshly computed tile of that layer pasted in. The first stage reads the
occluded image directly (ZFNet's and AlexNet's conv1 + pool1 (+ LRN) in one stage, a mask zeroing the conv1
row that ceil-mode pooling reads past the end; VGG's conv1_1 alone). Tiles of many positions run as one batch;
last-conv tiles are pasted into copies of the cached last-conv map for the last pool + fc6-8, batched across
groups. Recomputed values are the same arithmetic as a full forward pass, so the maps agree with brute force to
float rounding. Optionally, positions are grouped per axis by how large their changed regions are (windows near
the border change less), each group with its own, smaller tile shapes. The plan follows the model's layer
table (:mod:`zfserve.engine.occlusion_tiles`); each stage is a small ONNX graph run by ONNX Runtime on CPUs and
eager PyTorch elsewhere (:mod:`zfserve.engine.occlusion_stages`). This is exact incremental inference only: no
coarse-to-fine drill-down is combined with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .. import _checks as checks
from ..errors import InvalidArgumentError
from ..model import LayeredCNN
from . import occlusion_tiles as tiles
from .occlusion_fill import occluder
from .occlusion_stages import OrtStages, TorchStages
from .parallel import ordered_map
from .results import DEFAULT_STRIDE, DEFAULT_WINDOW, OUTPUTS, OcclusionResult, window_starts

BACKENDS = ("auto", "onnxruntime", "torch")
ATTRIBUTION_ON = ("probability", "logit")


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

    def __init__(self, model: LayeredCNN, *, device: str | torch.device = "cpu", batch_size: int | None = None,
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
        self.num_classes = self.channels[model.fc_layers[-1]]
        self.chain = model.layer_chain()
        self.plan, self.last_conv = tiles.stages(self.chain)
        self.tile_layers = [stage.name for stage in self.plan]
        # Layers below the last conv: their activity is updated from a summed-area table of the unoccluded map.
        self.tile_activity_layers = model.spatial_layers[:model.spatial_layers.index(self.last_conv)]
        self.workers = checks.integer(torch.get_num_threads() if workers is None else workers, "workers", 1) \
            if backend == "onnxruntime" else 1
        with torch.no_grad():
            self.stages = OrtStages(model, self.plan, threads=1 if self.workers > 1 else None) \
                if backend == "onnxruntime" else TorchStages(model, self.plan, self.device)
        self.stage_s: dict[str, float] = {}
        # Glue between stages in torch tensors (GPU) or numpy (CPU); tests flip it to run the GPU path on a CPU.
        self.tensor_glue = not on_cpu

    # -------------------------------------------------------------------------------------- validation
    def _check(self, window, stride, layer, channel, target, attribution_on, outputs):
        checks.integer(window, "window", 1, self.model.input_size, what="the input's side")
        checks.integer(stride, "stride", 1, window, what="the window")
        checks.layer(layer, self.model.layer_names)
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
              outputs: Sequence[str] = OUTPUTS, layer: str | None = None, channel: int | None = None,
              attribution_on: str = "probability", progress: Callable[[int, int], None] | None = None,
              fill_units: str = "input", max_positions: int | None = None,
              check: Callable[[], None] | None = None) -> OcclusionResult:
        """Slide a ``window`` square with ``stride`` over ``image`` (a (3, 224, 224) network input) and return
        the maps named in ``outputs``. ``fill``: ``"mean"`` (0 in input units), a number, or (r, g, b), in
        ``fill_units`` ("input": normalized network units; "pixel": 0..255, normalized like an image).
        ``target``: the class whose probability is mapped (default: the unoccluded top-1). ``layer`` /
        ``channel``: the feature map whose total activation is mapped (default: the last conv layer, the channel
        strongest on the unoccluded image). ``progress(done, total)`` is called after each batch of positions;
        ``check()`` before each stage of a batch (one that raises stops the sweep within a stage, where a batch
        takes up to ~1 s of a CPU core: how a server stops the sweep of a cancelled request at once).
        ``max_positions`` refuses sweeps of more positions (a server's cost cap)."""
        outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
        layer = self.last_conv if layer is None else layer
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
        logits, activity = self._occluded_passes(base, starts, window, layer if want_activity else None, progress,
                                                 check)
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
        caches = {"image": tiles.pad(self._native(x)),
                  "baseline": tiles.pad(self._native(np.broadcast_to(fill_map, (3, size, size))))}
        cached = [stage.below for stage in self.plan[1:]]
        for name in cached:
            caches[name] = tiles.pad(self._native(np.zeros((self.channels[name], self.sizes[name],
                                                            self.sizes[name]))))
        full = tiles.full_plan(self.sizes, self.tile_layers)
        origin = np.zeros(1, np.int64)
        base = self._tiles(caches, full, full, origin, origin, layer, want_all=True)
        maps = base["maps"]
        base.update(self._head(base["last"], None, 0, want_all=True))
        for name in cached:
            caches[name] = tiles.pad(maps["input:" + name][0])
        caches["last"] = maps[self.last_conv][0]
        logits = tiles.as_numpy(base["logits"])[0].astype(np.float64)
        values = tiles.as_numpy(maps[layer] if layer in maps else base["head"][layer])[0].astype(np.float64)
        per_channel = values.reshape(self.channels[layer], -1).sum(1)
        channel = int(per_channel.argmax()) if channel is None else int(channel)
        if want_activity and layer in self.tile_activity_layers:
            # Activity of a tile layer = base total - base sum under the tile + the tile's new sum.
            n = self.sizes[layer]
            caches["activity_table"] = tiles.integral(np.pad(values[:, :n, :n],
                                                             ((0, 0), (tiles.MARGIN,) * 2, (tiles.MARGIN,) * 2)))
        caches["activity_total"] = per_channel[channel]
        return _Base(caches, logits, int(logits.argmax()) if target is None else int(target), channel,
                     float(per_channel[channel]))

    def _occluded_passes(self, base: _Base, starts: np.ndarray, window: int, layer: str | None, progress,
                         check=None):
        """Logits (ny, nx, C) float32 of every occluded position and, when ``layer`` is given, the activity of
        its ``base.channel`` (ny, nx) float64; tiles run in batches, the head on batches pooled across groups."""
        count = len(starts)
        total = count * count
        logits = np.empty((count, count, self.num_classes), dtype=np.float32)
        activity = np.empty((count, count), dtype=np.float64) if layer is not None else None
        size = self.model.input_size
        groups = tiles.groups(self.chain, self.tile_layers, size, starts, window, self.buckets)
        plans = [tiles.axis_plan(self.chain, self.tile_layers, size, starts[g], window) for g in groups]
        queue, done = [], 0

        def run_head():
            nonlocal queue, done
            if check is not None:
                check()
            rows = np.concatenate([q[0] for q in queue])
            cols = np.concatenate([q[1] for q in queue])
            last = [q[2] for q in queue]
            last = np.concatenate(last) if isinstance(last[0], np.ndarray) else torch.cat(last)
            got = self._head(last, layer, base.channel)
            logits[rows, cols] = tiles.as_numpy(got["logits"])
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

        def tile_batch(b):
            return b, self._tiles(base.caches, b[2], b[3], b[4], b[5], layer, channel=base.channel, checkpoint=check)
        for (rows, cols, *_), got in ordered_map(tile_batch, batches, self.workers):   # workers > 1: batches at once
            queue.append((rows, cols, got["last"], got.get("activity")))
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
    def _tiles(self, caches, plan_y: tiles.AxisPlan, plan_x: tiles.AxisPlan, by, bx, layer, *, channel=0,
               want_all=False, checkpoint=None):
        """Recompute the tiles of a batch of positions (``by``/``bx`` index the axis plans): full last-conv maps,
        the activity of ``layer``/``channel`` if it is below the last conv and, with ``want_all``, every map
        (``maps[name]``: a layer's tile as recorded; ``maps["input:" + name]``: what the next stage reads)."""
        py, px = plan_y.take(by), plan_x.take(bx)
        out, maps = {}, {}
        if want_all:
            layer = None
        act_region = None   # (tile, row0, col0) holding the changed part of the activity layer
        below = None        # (tile the next stage pastes, row0, col0)
        for stage in self.plan:
            if checkpoint is not None:
                checkpoint()
            (ay, sy), (ax, sx) = py.tiles[stage.name], px.tiles[stage.name]
            if stage.below is None:
                made = self._first_stage(stage, caches, py, px, want_all or layer == stage.name,
                                         want_all or layer == stage.conv)
            else:
                g = self._geometry(stage.name)
                cy0, ch = tiles.span(ay, sy, g.kernel, g.stride, g.padding)
                cx0, cw = tiles.span(ax, sx, g.kernel, g.stride, g.padding)
                crop = tiles.paste(tiles.crop(caches[stage.below], cy0, cx0, ch, cw), cy0, cx0, *below)
                if stage.kind == "conv":
                    tile = self._stage(stage.name, "conv", stage.name, crop)
                    made = {"next": tile, "layer": tile}
                else:
                    normed, pooled = self._stage(stage.name, "pool_norm", stage.name, crop,
                                                 want_all or layer == stage.name)
                    made = {"next": normed, "layer": pooled}
            below = (made["next"], ay, ax)
            if layer == stage.name and stage.name != self.last_conv:   # last-conv activity: over full maps
                act_region = (made["layer"], ay, ax)
            elif "conv" in made and layer == stage.conv:
                act_region = made["conv"]
            if want_all:
                maps[stage.name], maps["input:" + stage.name] = made["layer"], made["next"]
                if "conv" in made:
                    maps[stage.conv] = made["conv"][0]
        last = below[0]
        if want_all:   # the base pass: the tiles are the full maps
            out["last"], out["maps"] = last, maps
        else:          # into copies of the cached last-conv map (the head batches positions from several groups)
            cached = caches["last"][None].repeat(len(by), 1, 1, 1) if torch.is_tensor(caches["last"]) else \
                np.repeat(caches["last"][None], len(by), axis=0)
            zero = np.zeros(len(by), np.int64)
            out["last"] = tiles.paste(cached, zero, zero, last, below[1], below[2])
        if act_region is not None:
            tile, row0, col0 = act_region
            h, w = tile.shape[-2:]
            out["activity"] = caches["activity_total"] - tiles.box_sums(caches["activity_table"], channel, row0,
                                                                        col0, h, w) + tiles.channel_sums(tile, channel)
        return out

    def _first_stage(self, stage: tiles.Stage, caches, py, px, want_pool: bool, want_conv: bool) -> dict:
        """The stage that reads the occluded image: the first conv (and, for an ``early`` stage, the pool after it
        and its LRN). Returns ``next`` (what the next stage reads), ``layer`` (the stage layer's own values) and,
        for an early stage, ``conv`` = (conv tile, row0, col0)."""
        (ay, sy), (ax, sx) = py.tiles[stage.name], px.tiles[stage.name]
        conv = self._geometry(stage.conv or stage.name)
        if stage.kind == "early":
            pool = self._geometry(stage.name)
            (ry, rh), (rx, rw) = (tiles.span(ay, sy, pool.kernel, pool.stride, 0),
                                  tiles.span(ax, sx, pool.kernel, pool.stride, 0))
        else:
            (ry, rh), (rx, rw) = (ay, sy), (ax, sx)
        (iy0, ih), (ix0, iw) = (tiles.span(ry, rh, conv.kernel, conv.stride, conv.padding),
                                tiles.span(rx, rw, conv.kernel, conv.stride, conv.padding))
        rows = iy0[:, None] + np.arange(ih)
        cols = ix0[:, None] + np.arange(iw)
        inside = (((rows >= py.lo[:, None]) & (rows < py.hi[:, None]))[:, None, :, None]
                  & ((cols >= px.lo[:, None]) & (cols < px.hi[:, None]))[:, None, None, :])
        image = tiles.where(inside, tiles.crop(caches["baseline"], iy0, ix0, ih, iw),
                            tiles.crop(caches["image"], iy0, ix0, ih, iw))
        if stage.kind != "early":
            tile = self._stage(stage.name, "conv", stage.name, image)
            return {"next": tile, "layer": tile}
        mask = tiles.native(tiles.exists(ry, rh, rx, rw, conv.out_size), image)
        normed, pooled, conv_tile = self._stage(stage.conv, "early", stage.conv, stage.name, image, mask,
                                                want_pool, want_conv)
        return {"next": normed, "layer": pooled, "conv": (conv_tile, ry, rx)}

    def _geometry(self, name: str):
        return next(g for g in self.chain if g.name == name)

    def _head(self, last, layer, channel: int, want_all: bool = False):
        """The last pool -> fc6 .. fc8 for full last-conv maps: logits, and the activity of ``layer`` if it is
        the last conv or above (with ``want_all``, every head output)."""
        head_layers = (self.chain[-1].name, *self.model.fc_layers[:-1])
        head = self._stage("head", "head", last, head_layers if want_all else (layer,))
        head[self.model.fc_layers[-1]] = head["logits"]
        out = {"logits": head["logits"], "head": head}
        if layer == self.last_conv:
            out["activity"] = tiles.channel_sums(last, channel)
        elif layer in head and not want_all:
            values = head[layer]
            out["activity"] = tiles.channel_sums(values if values.ndim == 4 else values[:, :, None], channel)
        return out

    def _stage(self, key: str, method: str, *args):
        """Run one stage and add its wall time to ``stage_s`` (on a GPU: launch time, no synchronization)."""
        start = time.perf_counter()
        out = getattr(self.stages, method)(*args)
        self.stage_s[key] = self.stage_s.get(key, 0.0) + time.perf_counter() - start
        return out


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
