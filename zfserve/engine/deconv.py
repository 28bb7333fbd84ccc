"""Deconvnet projection (Zeiler & Fergus 2014, §2.1 and §3): any unit of any conv or pool layer of a member of
ZFNet's family (ZFNet, AlexNet, VGG) back to input pixels.

Per image, one forward pass records the chosen layer's activations and the int8 switches of the pools below
it. A unit is projected by keeping its activation, zeroing the rest of the layer, and walking down to the
pixels: at a pool, sum-unpool with the recorded switches; at a conv, ReLU then transposed convolution with
the forward weights (no bias). Local response normalization is the identity on the way down.

All selected units of all images go down together as the batch dimension, each reading its own image's
switches. The walk follows the model's layer table, so every member's geometry is exact: ZFNet's and AlexNet's
overlapping 3x3/2 pools (sums where windows share a position), VGG's 2x2/2 ones. Exact shortcut: a unit's projection is zero outside its receptive field, so every level is
computed only on the window that can be non-zero (the same size for every unit of a layer, at a per-unit
offset); positions of a window that fall outside a map are that map's zero padding and are masked. For a
ZFNet conv5 unit the windows are 3/5/7 (13x13 maps), 15 (26), 33 (55), 67 (110) and 139 (224) wide, about a
fifth of the full-map work. Results equal the full-map walk (and autograd with the deconvnet ReLU rule).

What a projection is: a **feature visualisation (class-insensitive)**
(:data:`~zfserve.engine.results.DECONV_INTERPRETATION`): the input pattern that drives a unit. It is not
evidence of what the class decision used: ``zfserve faithfulness`` finds the deconvnet map of the conv5 units
that contribute most to a class nearly the same when another class is explained (RandomLogit SSIM about 0.9 on
the embedded model), as Nie, Zhang and Patel (2018) predict. Use occlusion to attribute a decision.

Library use::

    engine = DeconvEngine(zfserve.weights.load_model("zfnet-demo"))
    for unit in engine.project(images, "conv5", top_k=9):
        unit.projection, unit.box, unit.patch, unit.activation
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from zfserve.kernels import unpool_sum

from .. import _checks as checks
from ..errors import InvalidArgumentError
from ..model import LayeredCNN
from .results import DEFAULT_DECONV_TOP_K, UnitProjection

DEFAULT_MAX_UNITS_PER_PASS = 128
SEEDS = ("activation", "one")


@dataclass
class Units:
    """Selected units as parallel int64 tensors (the batch of one projection pass)."""

    image_index: torch.Tensor
    channel: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor

    def __len__(self) -> int:
        return int(self.image_index.numel())

    @staticmethod
    def cat(parts: list["Units"]) -> "Units":
        return Units(*(torch.cat([getattr(p, f) for p in parts]) for f in ("image_index", "channel", "y", "x")))


class _LRNIdentityBackward(torch.nn.Module):
    """Local response normalization forward, identity backward: the deconvnet's reading of LRN."""

    def __init__(self, lrn: torch.nn.LocalResponseNorm):
        super().__init__()
        self.lrn = lrn

    def forward(self, x):
        return x + (self.lrn(x) - x).detach()


def captum_model(model: LayeredCNN) -> LayeredCNN:
    """A copy of ``model`` whose LRN layers (ZFNet's) have an identity backward, so that Captum's
    ``NeuronDeconvolution`` (which differentiates everything but ReLU normally) computes this engine's
    projection (with ``seed="one"``). For comparisons and tests; the engine itself does not use it."""
    import copy

    twin = copy.deepcopy(model)
    for name, child in list(twin.named_children()):
        if isinstance(child, torch.nn.LocalResponseNorm):
            setattr(twin, name, _LRNIdentityBackward(child))
    return twin


class DeconvEngine:
    """Deconvnet projections for a :class:`~zfserve.model.LayeredCNN` (any member of ZFNet's family).

    ``device``: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``); the model is moved there. The weights are read at
    every call, so a model that keeps training (feature-evolution snapshots) needs no new engine.
    ``max_units_per_pass`` bounds memory: more units than this go down in several batched passes.
    """

    def __init__(self, model: LayeredCNN, device: str | torch.device = "cpu", *,
                 max_units_per_pass: int = DEFAULT_MAX_UNITS_PER_PASS):
        self.device = checks.device(device)
        self.max_units_per_pass = checks.integer(max_units_per_pass, "max_units_per_pass", 1)
        self.model = model.to(self.device)
        self.input_size = model.input_size
        self._infos = {info.name: info for info in model.layer_info()}
        # Kernel, stride and the side of the map each backward step must produce (the layer's input).
        self._geometry = {g.name: g for g in model.layer_chain()}
        self.layers = model.spatial_layers   # what can be projected, in forward order
        # oneDNN's transposed convs run 1.4-1.9x faster channels-last on CPUs (measured on VGG16's shapes).
        self._layout = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self._weights: dict[str, tuple] = {}

    # ------------------------------------------------------------------ validation
    def _as_batch(self, images) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            if not np.issubdtype(images.dtype, np.floating):
                raise InvalidArgumentError(f"images: expected float32 network input, got dtype {images.dtype}",
                                           field="images")
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, torch.Tensor):
            raise InvalidArgumentError(f"images: expected a numpy array or torch tensor, got "
                                       f"{type(images).__name__}", field="images")
        if not images.is_floating_point():
            raise InvalidArgumentError(f"images: expected float32 network input, got dtype {images.dtype}",
                                       field="images")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        size = self.input_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size) or images.shape[0] == 0:
            raise InvalidArgumentError(f"images: expected shape (N, 3, {size}, {size}) or (3, {size}, {size}) "
                                       f"with N >= 1, got {tuple(images.shape)}", field="images")
        dtype = next(self.model.parameters()).dtype
        images = images.to(self.device, dtype)
        if not torch.isfinite(images).all():
            raise InvalidArgumentError("images: contain NaN or infinite values", field="images")
        return images

    # ------------------------------------------------------------------ forward and selection
    @torch.no_grad()
    def forward(self, images, layer: str):
        """One forward pass up to ``layer``: returns ``(images, activations of layer, switches)``."""
        checks.layer(layer, self.layers)
        x = self._as_batch(images)
        trace = self.model.trace(x, layers=(layer,), switches=True, stop_after=layer)
        return x, trace.activations[layer], trace.switches

    def select(self, activations: torch.Tensor, *, top_k: int | None = None, one_per_map: bool = True,
               units=None, maps=None) -> Units:
        """Choose units of a layer's activations ``(N, C, H, W)``.

        - ``top_k``: the strongest per image, at most one per feature map if ``one_per_map``; the default
          (None) means 9 when neither ``units`` nor ``maps`` is given, none otherwise;
        - ``units``: explicit ``(c, y, x)`` (taken in every image) or ``(image_index, c, y, x)``;
        - ``maps``: channels; in every image, the strongest position of each.
        Top-k units come first (image by image, strongest first), then the explicit units in the order given
        (a ``(c, y, x)`` unit once per image, in image order) or the maps (image by image). Ties go to the
        lowest channel / position. An explicit ``top_k`` must be 1..maps (1..units of the layer when not
        ``one_per_map``).
        """
        if units is not None and maps is not None:
            raise InvalidArgumentError("units/maps: give one of them, not both", field="units")
        if top_k is None:
            top_k = DEFAULT_DECONV_TOP_K if units is None and maps is None else 0
        else:
            self._check_top_k(top_k, activations.shape, one_per_map)
        parts = [self._top_k(activations, top_k, one_per_map)] if top_k else []
        if units is not None:
            parts.append(self._explicit_units(units, *activations.shape, activations.device))
        if maps is not None:
            parts.append(self._strongest_in_maps(activations, maps))
        return parts[0] if len(parts) == 1 else Units.cat(parts)

    @staticmethod
    def _check_top_k(top_k, shape, one_per_map) -> None:
        _, channels, height, width = shape
        limit = channels if one_per_map else channels * height * width
        checks.integer(top_k, "top_k", 1, limit, what=f"the layer's {'feature maps' if one_per_map else 'units'}")

    @staticmethod
    def _strongest_in_maps(activations, maps) -> Units:
        n_img, channels, _, width = activations.shape
        dev = activations.device
        maps = list(maps)
        if not maps:
            raise InvalidArgumentError("maps: empty list; give at least one channel", field="maps")
        for c in maps:
            checks.integer(c, "maps", 0, channels - 1, what="the layer's channels")
        chan = torch.tensor(maps, dtype=torch.int64, device=dev).repeat(n_img)
        img = torch.arange(n_img, device=dev).repeat_interleave(len(maps))
        pos = activations.flatten(2)[img, chan].argmax(dim=1)  # first maximum
        return Units(img, chan, pos // width, pos % width)

    @staticmethod
    def _top_k(activations, top_k, one_per_map) -> Units:
        n_img, _, height, width = activations.shape
        dev = activations.device
        flat = activations.flatten(2)
        if one_per_map:
            best, pos = flat.max(dim=2)  # (N, C)
            order = torch.sort(best, dim=1, descending=True, stable=True).indices[:, :top_k]
            chan = order.reshape(-1)
            img = torch.arange(n_img, device=dev).repeat_interleave(top_k)
            pos = pos[img, chan]
        else:
            order = torch.sort(flat.flatten(1), dim=1, descending=True, stable=True).indices[:, :top_k]
            order = order.reshape(-1)
            img = torch.arange(n_img, device=dev).repeat_interleave(top_k)
            chan, pos = order // (height * width), order % (height * width)
        return Units(img, chan, pos // width, pos % width)

    @staticmethod
    def _explicit_units(units, n_img, channels, height, width, dev) -> Units:
        rows = []
        for i, unit in enumerate(units):
            try:
                unit = tuple(unit)
            except TypeError:
                unit = (unit,)
            if len(unit) not in (3, 4) or not all(checks.is_integer(v) for v in unit):
                raise InvalidArgumentError(f"units[{i}]: expected integers (c, y, x) or (image_index, c, y, x), "
                                           f"got {unit!r}", field="units")
            limits = [("channel", channels), ("y", height), ("x", width)]
            if len(unit) == 4:
                limits.insert(0, ("image_index", n_img))
            for value, (name, bound) in zip(unit, limits):
                checks.integer(value, "units", 0, bound - 1, label=f"units[{i}]: {name}")
            rows.extend([(n, *unit) for n in range(n_img)] if len(unit) == 3 else [unit])
        if not rows:
            raise InvalidArgumentError("units: empty list; give at least one (c, y, x)", field="units")
        t = torch.tensor(rows, dtype=torch.int64, device=dev)
        return Units(t[:, 0], t[:, 1], t[:, 2], t[:, 3])

    # ------------------------------------------------------------------ projection
    @torch.no_grad()
    def project_units(self, layer: str, activations: torch.Tensor, switches: dict, units: Units, *,
                      seed: str = "activation") -> torch.Tensor:
        """Project ``units`` of ``layer`` to pixels: ``(K, 3, H, W)`` on the engine's device.

        ``seed``: ``"activation"`` keeps each unit's activation (the paper); ``"one"`` puts 1 there (a
        gradient-style seed, as Captum's NeuronDeconvolution does). The walk is linear in the seed.
        """
        checks.layer(layer, self.layers)
        if seed not in SEEDS:
            raise InvalidArgumentError(f"seed: {seed!r}; accepted: {', '.join(SEEDS)}", field="seed")
        size = self.input_size
        out = activations.new_empty((len(units), 3, size, size))
        for start in range(0, len(units), self.max_units_per_pass):
            part = slice(start, start + self.max_units_per_pass)
            chunk = Units(units.image_index[part], units.channel[part], units.y[part], units.x[part])
            values = activations[chunk.image_index, chunk.channel, chunk.y, chunk.x]
            if seed == "one":
                values = torch.ones_like(values)
            out[part] = self._walk_down(layer, activations.shape[1], switches, chunk, values)
        return out

    def _walk_down(self, layer, channels, switches, units: Units, values) -> torch.Tensor:
        k = len(units)
        rows = torch.arange(k, device=values.device)
        value = values.new_zeros((k, channels, 1, 1))
        value[rows, units.channel, 0, 0] = values
        top, left, width = units.y.clone(), units.x.clone(), 1  # window of the current level, per unit
        rectified = False
        for name in reversed(self.layers[:self.layers.index(layer) + 1]):
            g = self._geometry[name]
            if g.kind == "pool":
                kernel, stride = g.kernel, g.stride
                width_in = (width - 1) * stride + kernel
                if kernel == stride:   # VGG's 2x2/2: windows do not overlap, no sums
                    sw = self._window(switches[name], units.image_index, top, left, width, channels_last=True)
                    value = self._unpool_disjoint(value, sw, kernel)
                else:
                    sw = self._window(switches[name], units.image_index, top, left, width)
                    # The ReLU of the conv below is fused into the unpool.
                    value = unpool_sum(value, sw, (width_in, width_in), relu=True, kernel=kernel, stride=stride)
                top, left, width = top * stride, left * stride, width_in
                rectified = True
            else:
                if not rectified:
                    value = value.relu_()  # every value here is a fresh tensor of ours
                kernel, stride, pad = g.kernel, g.stride, g.padding
                # Padding 0 keeps the full support of the transposed conv; the rows and columns that land on
                # the forward pass's zero padding are dropped by the mask (or the final crop).
                value = F.conv_transpose2d(value.contiguous(memory_format=self._layout), self._weight(name),
                                           stride=stride)
                top, left, width = top * stride - pad, left * stride - pad, (width - 1) * stride + kernel
                if name != self.layers[0]:
                    self._zero_outside(value, top, left, g.in_size)
                rectified = False
        return self._paste(value, top, left, self.input_size)

    @staticmethod
    def _unpool_disjoint(value, switches, kernel) -> torch.Tensor:
        """Unpool of a kernel == stride pool (each input position in one window, so no sums), rectified:
        ``value`` (K, C, w, w), ``switches`` (K, w, w, C) -> (K, C, w*kernel, w*kernel), channels-last. Each pooled
        value goes to the one offset its switch names, so ReLU before the unpool is ReLU after it; built channels-
        last in one pass (the general unpool works on NCHW maps, and the conversion for the transposed conv below
        then costs a second copy of the largest maps of the walk)."""
        k, c, w, _ = value.shape
        pooled = value.relu().permute(0, 2, 3, 1)                                # (K, w, w, C)
        offsets = torch.arange(kernel * kernel, device=value.device, dtype=switches.dtype)
        spread = pooled.unsqueeze(3) * (switches.unsqueeze(3) == offsets[:, None])   # (K, w, w, k*k, C)
        spread = spread.view(k, w, w, kernel, kernel, c).permute(0, 1, 3, 2, 4, 5)
        return spread.reshape(k, w * kernel, w * kernel, c).permute(0, 3, 1, 2)

    def _weight(self, name: str) -> torch.Tensor:
        """A conv's weight in the walk's memory layout, converted again whenever the weight changed (the engine
        reads the model's weights at every call: a model that keeps training needs no new engine)."""
        weight = getattr(self.model, name).weight
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        cached = self._weights.get(name)
        if cached is None or cached[0] != key:
            cached = self._weights[name] = (key, weight.detach().contiguous(memory_format=self._layout))
        return cached[1]

    @staticmethod
    def _zero_outside(value, top, left, size) -> None:
        """Zero, in place, the positions of each unit's (C, w, w) window that lie outside the size x size map (the
        forward pass's zero padding). Only those rows and columns are written: most windows lie inside."""
        width = value.shape[-1]
        spatial = value.permute(0, 2, 3, 1)   # (K, w, w, C): row and column runs are contiguous channels-last
        for i, (t, l) in enumerate(zip(top.tolist(), left.tolist())):
            for start, axis in ((t, 0), (l, 1)):
                if start < 0:
                    spatial[i].narrow(axis, 0, min(-start, width)).zero_()
                if start + width > size:
                    keep = max(size - start, 0)
                    spatial[i].narrow(axis, keep, width - keep).zero_()

    @staticmethod
    def _window(switches, image_index, top, left, width, *, channels_last: bool = False) -> torch.Tensor:
        """Each unit's (C, width, width) window of its own image's switches (clamped at the border, where the
        values are zero anyway); (width, width, C) with ``channels_last``."""
        _, _, h, w = switches.shape
        steps = torch.arange(width, device=top.device)
        r = (top[:, None] + steps).clamp(0, h - 1)
        c = (left[:, None] + steps).clamp(0, w - 1)
        win = switches[image_index[:, None, None], :, r[:, :, None], c[:, None, :]]  # (K, width, width, C)
        return win if channels_last else win.permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def _paste(window, top, left, size) -> torch.Tensor:
        """Place each unit's (3, w, w) window at (top, left) of a zero (3, size, size) canvas, cropping."""
        k, ch, width, _ = window.shape
        padded = F.pad(window, (0, 1, 0, 1))  # index ``width`` reads a zero
        steps = torch.arange(size, device=window.device)
        r = steps[None, :] - top[:, None]
        c = steps[None, :] - left[:, None]
        r = torch.where((r >= 0) & (r < width), r, width)
        c = torch.where((c >= 0) & (c < width), c, width)
        rows = padded.gather(2, r[:, None, :, None].expand(k, ch, size, width + 1))
        return rows.gather(3, c[:, None, None, :].expand(k, ch, size, size))

    # ------------------------------------------------------------------ boxes and the one-call API
    def box(self, layer: str, y: int, x: int) -> tuple[int, int, int, int]:
        """Receptive field of unit (y, x) of ``layer``: (x0, y0, x1, y1) in input pixels, clipped, end exclusive."""
        checks.layer(layer, self.layers)
        info = self._infos[layer]
        half = info.receptive_field / 2
        size = self.input_size

        def span(i):
            centre = info.start + i * info.jump
            return max(0, int(round(centre - half))), min(size, int(round(centre + half)))

        (x0, x1), (y0, y1) = span(x), span(y)
        return x0, y0, x1, y1

    def project(self, images, layer: str, *, top_k: int | None = None, one_per_map: bool = True, units=None,
                maps=None, seed: str = "activation") -> list[UnitProjection]:
        """Forward ``images`` (float32 ``(N, 3, 224, 224)`` or one ``(3, 224, 224)``, preprocessed), choose
        units (see :meth:`select`) and project them all in one batched pass. Returns one
        :class:`UnitProjection` per unit, image by image, strongest first for top-k selections. Each is a
        feature visualisation (class-insensitive, :data:`~zfserve.engine.results.DECONV_INTERPRETATION`): what
        drives the unit, not an attribution of the class decision."""
        x, acts, switches = self.forward(images, layer)
        chosen = self.select(acts, top_k=top_k, one_per_map=one_per_map, units=units, maps=maps)
        projections = self.project_units(layer, acts, switches, chosen, seed=seed).cpu().numpy()
        activations = acts[chosen.image_index, chosen.channel, chosen.y, chosen.x].tolist()
        x_np = x.cpu().numpy()
        out = []
        for i, (n, c, y, xx) in enumerate(zip(chosen.image_index.tolist(), chosen.channel.tolist(),
                                              chosen.y.tolist(), chosen.x.tolist())):
            box = self.box(layer, y, xx)
            out.append(UnitProjection(n, layer, c, y, xx, float(activations[i]), box, projections[i],
                                      x_np[n, :, box[1]:box[3], box[0]:box[2]].copy()))
        return out
