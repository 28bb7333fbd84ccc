"""The saliency maps the faithfulness analysis compares, all (H, W) float64 in input pixels, larger = more
salient, for one preprocessed image and one target class:

- ``occlusion``: Captum ``Occlusion``'s per-pixel attribution (the mean drop of the target's probability over
  the windows that covered the pixel; :class:`~zfserve.engine.occlusion.OcclusionEngine`, grey = mean fill);
- ``deconvnet``: the deconvnet projections (:class:`~zfserve.engine.deconv.DeconvEngine`, the paper's rule, seed
  = activation) of the last conv layer's units (conv5, conv5_3, ...) that contribute most to the target's logit (activation x its gradient, the
  strongest unit per feature map, up to ``units`` maps with a positive contribution; when none is positive,
  the strongest activations), summed as absolute values over units and colour channels;
- ``gradient``: the vanilla gradient of the target's logit (Simonyan et al. 2014), absolute values summed over
  the colour channels;
- ``gradcam``: Grad-CAM on the last conv layer (Selvaraju et al. 2017): ReLU of the maps weighted by their mean
  gradient of the target's logit, upsampled bilinearly with each unit placed at its receptive-field centre;
- ``random``: uniform noise, fixed per image (``seed``, image index): the scale of chance;
- ``centre``: the largest distance to the image centre minus each pixel's (largest at the centre): the centre
  prior of TorchRay's benchmark.

``random`` and ``centre`` ignore the model and the class, so the sanity checks must call them insensitive.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..engine.deconv import DeconvEngine, Units
from ..engine.occlusion import OcclusionEngine
from ..model import ZFNet

METHODS = ("occlusion", "deconvnet", "gradient", "gradcam", "random", "centre")
LABELS = {"occlusion": "occlusion (probability drop)", "deconvnet": "deconvnet (top-class last-conv units)",
          "gradient": "vanilla gradient", "gradcam": "Grad-CAM (last conv)", "random": "random map",
          "centre": "centre baseline"}
MODEL_FREE = ("random", "centre")
DEFAULT_WINDOW, DEFAULT_STRIDE, DEFAULT_UNITS = 48, 24, 9


def bilinear_matrix(size: int, units: int, start: float, jump: float) -> np.ndarray:
    """(size, units) weights that interpolate a map of ``units`` samples, sample i centred at pixel coordinate
    ``start + i * jump``, at the pixel centres ``p + 0.5`` (held constant beyond the first and last sample)."""
    t = np.clip((np.arange(size) + 0.5 - start) / jump, 0, units - 1)
    low = np.minimum(np.floor(t).astype(np.int64), max(units - 2, 0))
    frac = t - low
    out = np.zeros((size, units))
    rows = np.arange(size)
    out[rows, low] += 1 - frac
    if units > 1:
        out[rows, low + 1] += frac
    return out


@torch.no_grad()
def randomise_layer_(model: ZFNet, name: str, generator: torch.Generator) -> None:
    """Redraw a layer's weights and biases, each from a normal distribution with the trained tensor's mean and
    standard deviation (the layer keeps its scale, so activations stay in range; a redraw at the paper's
    N(0, 0.01^2) would shrink the logits to float noise and make every map 'change' for a trivial reason)."""
    layer = getattr(model, name)
    for tensor in (layer.weight, layer.bias):
        mean, std = float(tensor.mean()), float(tensor.std()) if tensor.numel() > 1 else 0.0
        tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std + mean)


def mprt_order(model: ZFNet) -> tuple[str, ...]:
    """Cascading randomisation's order (Adebayo et al. 2018): every weighted layer from the top down (fc8, fc7,
    fc6, then the conv layers from the last to the first), each step adding one layer."""
    return tuple(reversed(model.fc_layers)) + tuple(reversed(model.conv_layers))


def cascading_randomisation(model: ZFNet, seed: int = 0, layers=None):
    """Yield ``(layer, model)`` for each step of the cascade: one copy of ``model`` whose layers from the first of
    ``layers`` (default :func:`mprt_order`) down to ``layer`` are randomised (the same copy, changed in place from
    step to step)."""
    layers = mprt_order(model) if layers is None else layers
    twin = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(int(seed))
    for name in layers:
        randomise_layer_(twin, name, generator)
        yield name, twin


class SaliencyMaps:
    """The six maps of one model (see the module docstring). ``window`` / ``stride``: the occluder's side and
    step in pixels; ``units``: last-conv maps behind the deconvnet map; ``seed``: of the random map."""

    def __init__(self, model: ZFNet, *, window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE,
                 units: int = DEFAULT_UNITS, seed: int = 0):
        self.model = model.eval()
        self.window, self.stride, self.units, self.seed = int(window), int(stride), int(units), int(seed)
        self.size = model.input_size
        self._occlusion = None
        self.deconv = DeconvEngine(model)
        self.layer = model.last_conv   # deconvnet units and Grad-CAM: conv5, conv5_3, ...
        info = {i.name: i for i in model.layer_info()}[self.layer]
        self.upsample = bilinear_matrix(self.size, info.shape[-1], info.start, info.jump)

    @property
    def occlusion_engine(self) -> OcclusionEngine:
        if self._occlusion is None:   # built on first use: its ONNX Runtime sessions cost about a second
            self._occlusion = OcclusionEngine(self.model, batch_size=128, buckets=1)
        return self._occlusion

    def maps(self, x: np.ndarray, target: int, index: int, methods=METHODS) -> dict[str, np.ndarray]:
        """``{method: (H, W) map}`` for one input (3, H, W) and target class; ``index`` seeds the random map."""
        out, grads = {}, None
        for method in methods:
            if method in ("gradient", "gradcam", "deconvnet") and grads is None:
                grads = self.gradients(x, target)
            if method == "occlusion":
                out[method] = self.occlusion(x, target)
            elif method == "gradient":
                out[method] = np.abs(grads[0]).sum(0)
            elif method == "gradcam":
                out[method] = self.gradcam(*grads[1:])
            elif method == "deconvnet":
                out[method] = self.deconvnet(x, grads[1] * grads[2])
            elif method == "random":
                out[method] = self.random_map(index)
            else:
                out[method] = self.centre_map()
        return out

    def occlusion(self, x, target: int) -> np.ndarray:
        result = self.occlusion_engine.sweep(x, window=self.window, stride=self.stride, target=int(target),
                                             outputs=("attribution",), attribution_on="probability")
        return result.attribution.astype(np.float64)

    def gradients(self, x, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """d logit / d input (3, H, W), the last conv's activations (C, h, w) and d logit / d them (C, h, w)."""
        image = torch.as_tensor(np.asarray(x, dtype=np.float32))[None].requires_grad_(True)
        with torch.enable_grad():
            trace = self.model.trace(image, layers=(self.layer,))
            maps = trace.activations[self.layer]
            d_image, d_maps = torch.autograd.grad(trace.logits[0, int(target)], (image, maps))
        as_np = lambda t: t[0].detach().double().numpy()  # noqa: E731
        return as_np(d_image), as_np(maps), as_np(d_maps)

    def gradcam(self, maps: np.ndarray, d_maps: np.ndarray) -> np.ndarray:
        weights = d_maps.mean(axis=(1, 2))
        cam = np.maximum(np.tensordot(weights, maps, axes=1), 0.0)
        return self.upsample @ cam @ self.upsample.T

    def select_units(self, contribution: np.ndarray, activations: np.ndarray) -> list[tuple[int, int, int]]:
        """(c, y, x) of the last conv's units behind the deconvnet map (see the module docstring)."""
        score = contribution if (contribution > 0).any() else activations
        channels, _, width = score.shape
        flat = score.reshape(channels, -1)
        best = flat.argmax(1)
        value = flat[np.arange(channels), best]
        order = np.argsort(-value, kind="stable")[:self.units]
        if score is contribution:
            order = order[value[order] > 0]
        return [(int(c), int(best[c] // width), int(best[c] % width)) for c in order]

    def deconvnet(self, x, contribution: np.ndarray) -> np.ndarray:
        image, acts, switches = self.deconv.forward(np.asarray(x, dtype=np.float32), self.layer)
        chosen = self.select_units(contribution, acts[0].double().cpu().numpy())
        t = torch.tensor(chosen, dtype=torch.int64).reshape(-1, 3)
        units = Units(torch.zeros(len(t), dtype=torch.int64), t[:, 0], t[:, 1], t[:, 2])
        projected = self.deconv.project_units(self.layer, acts, switches, units)
        return projected.abs().sum(dim=(0, 1)).double().cpu().numpy()

    def random_map(self, index: int) -> np.ndarray:
        return np.random.default_rng([self.seed, int(index)]).random((self.size, self.size))

    def centre_map(self) -> np.ndarray:
        return centre_map(self.size)


def centre_map(size: int) -> np.ndarray:
    """The centre baseline: highest in the middle, falling with the distance from it."""
    centres = np.arange(size) + 0.5
    distance = np.hypot(centres[:, None] - size / 2, centres[None, :] - size / 2)
    return distance.max() - distance
