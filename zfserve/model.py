"""ZFNet (Zeiler & Fergus 2014, arXiv 1311.2901 v3, Fig. 3): a short, plain module.

Layer order in blocks 1 and 2 is the paper's: conv -> ReLU -> max-pool -> local response norm (AlexNet
normalizes before pooling; ZFNet pools first). Pools are 3x3/2 in ceil mode; conv1 pads 1, conv2 pads 0,
conv3-5 pad 1, which gives the paper's sizes 110/55/26/13/13/13/6 for a 224 input.

Besides ``forward`` (logits), :meth:`ZFNet.trace` returns the activations of named layers and the switches
of pool1, pool2 and pool5 as int8 window offsets (see ``zfserve.kernels.reference``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn

from zfserve.kernels import conv1_relu_pool
from zfserve.kernels.reference import max_pool_with_switches, pooled_size

from .config import ModelConfig
from .errors import InvalidArgumentError

# The named layers, in forward order. Activations are taken after the ReLU for conv and fc6/fc7, after
# the max-pool (before LRN) for pools, and are the logits for fc8.
LAYER_NAMES = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7", "fc8")
CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
POOL_LAYERS = ("pool1", "pool2", "pool5")
FC_LAYERS = ("fc6", "fc7", "fc8")
# The layers with a spatial map (what deconv can project, what an occluder changes), in forward order.
SPATIAL_LAYERS = tuple(name for name in LAYER_NAMES if name in CONV_LAYERS or name in POOL_LAYERS)

# Geometry of the conv and pool layers: kernel, stride, padding.
CONV_GEOMETRY = {"conv1": (7, 2, 1), "conv2": (5, 2, 0), "conv3": (3, 1, 1), "conv4": (3, 1, 1),
                 "conv5": (3, 1, 1)}
POOL_GEOMETRY = (3, 2, 0)
LRN_PARAMS = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
# Which pool follows which conv, and the conv whose output each pool reads.
POOL_AFTER = {"conv1": "pool1", "conv2": "pool2", "conv5": "pool5"}


@dataclass(frozen=True)
class Geometry:
    """One spatial layer (conv or pool) of a model for a given input size: the one table of layer sizes."""

    name: str
    kernel: int
    stride: int
    padding: int
    in_size: int                     # side of the map it reads
    out_size: int                    # side of the map it writes
    in_channels: int
    out_channels: int


@dataclass
class LayerInfo:
    """Static facts of one named layer for a given input size."""

    name: str
    shape: tuple[int, ...]           # (C, H, W) for conv/pool, (F,) for fc
    params: int
    receptive_field: int | None      # pixels, for conv/pool
    jump: int | None                 # input pixels between adjacent units
    start: float | None              # centre of unit (0, 0) in input pixel coordinates


@dataclass
class Trace:
    """What :meth:`ZFNet.trace` returns."""

    logits: torch.Tensor
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    switches: dict[str, torch.Tensor] = field(default_factory=dict)


def _out_size(name: str, size: int) -> int:
    if name in CONV_GEOMETRY:
        kernel, stride, pad = CONV_GEOMETRY[name]
        return (size + 2 * pad - kernel) // stride + 1
    kernel, stride, _ = POOL_GEOMETRY
    return pooled_size(size, kernel, stride)   # ceil mode


@torch.no_grad()
def paper_init_(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """The paper's init (§3): every conv and linear weight in ``module`` N(0, 0.01^2), every bias 0, drawn in
    module order from ``generator`` (default: the global one)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            layer.weight.normal_(0.0, 0.01, generator=generator)
            layer.bias.zero_()


@torch.no_grad()
def clip_filter_rms_(convs: Iterable[nn.Conv2d], radius: float = 0.1) -> None:
    """The paper's rule (§3): renormalize every conv filter whose RMS exceeds ``radius`` back to ``radius``.

    A filter is one output channel's (C_in x k x k) weights; RMS = sqrt(mean(w^2)). Biases and fully
    connected layers are untouched.
    """
    for conv in convs:
        w = conv.weight
        rms = w.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
        w.mul_(torch.where(rms > radius, radius / rms, torch.ones_like(rms)))


class ZFNet(nn.Module):
    """The paper's network. ``widths`` are conv1..conv5 channels; ``fc_width`` the width of fc6 and fc7."""

    def __init__(self, num_classes: int = 1000, fc_width: int = 4096,
                 widths: tuple[int, ...] = (96, 256, 384, 384, 256), input_size: int = 224,
                 config: ModelConfig | None = None):
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        self.widths = tuple(widths)
        self.input_size = input_size
        self.conv1 = nn.Conv2d(3, c1, *CONV_GEOMETRY["conv1"])
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.norm1 = nn.LocalResponseNorm(**LRN_PARAMS)
        self.conv2 = nn.Conv2d(c1, c2, *CONV_GEOMETRY["conv2"])
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.norm2 = nn.LocalResponseNorm(**LRN_PARAMS)
        self.conv3 = nn.Conv2d(c2, c3, *CONV_GEOMETRY["conv3"])
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(c3, c4, *CONV_GEOMETRY["conv4"])
        self.relu4 = nn.ReLU()
        self.conv5 = nn.Conv2d(c4, c5, *CONV_GEOMETRY["conv5"])
        self.relu5 = nn.ReLU()
        self.pool5 = nn.MaxPool2d(3, 2, ceil_mode=True)
        pooled = self.layer_chain()[-1].out_size
        self.fc6 = nn.Linear(c5 * pooled * pooled, fc_width)
        self.relu6 = nn.ReLU()
        self.drop6 = nn.Dropout(0.5)
        self.fc7 = nn.Linear(fc_width, fc_width)
        self.relu7 = nn.ReLU()
        self.drop7 = nn.Dropout(0.5)
        self.fc8 = nn.Linear(fc_width, num_classes)
        self.config = config or ModelConfig(num_classes=num_classes, fc_width=fc_width, widths=tuple(widths),
                                            input_size=input_size)
        self.reset_parameters()

    # ------------------------------------------------------------------ init and the paper's clipping rule
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """:func:`paper_init_`: every weight N(0, 0.01^2), every bias 0."""
        paper_init_(self, generator)

    def clip_filter_rms_(self, radius: float = 0.1) -> None:
        """:func:`clip_filter_rms_` on conv1 .. conv5."""
        clip_filter_rms_((getattr(self, name) for name in CONV_LAYERS), radius)

    # ------------------------------------------------------------------ geometry
    def layer_chain(self, input_size: int | None = None) -> list[Geometry]:
        """Kernel, stride, padding, map sides and channels of every spatial layer (conv1 .. pool5), in order."""
        size, channels, chain = input_size or self.input_size, 3, []
        for name in SPATIAL_LAYERS:
            kernel, stride, padding = CONV_GEOMETRY.get(name, POOL_GEOMETRY)
            out_channels = self.widths[CONV_LAYERS.index(name)] if name in CONV_GEOMETRY else channels
            out_size = _out_size(name, size)
            chain.append(Geometry(name, kernel, stride, padding, size, out_size, channels, out_channels))
            size, channels = out_size, out_channels
        return chain

    def spatial_sizes(self, input_size: int | None = None) -> dict[str, int]:
        """The side of every spatial layer's map: {name: size}."""
        return {g.name: g.out_size for g in self.layer_chain(input_size)}

    def channels(self) -> dict[str, int]:
        """The width of every named layer: feature maps of conv/pool layers, units of fc layers."""
        return {**{g.name: g.out_channels for g in self.layer_chain()},
                **{name: getattr(self, name).out_features for name in FC_LAYERS}}

    def layer_info(self) -> list[LayerInfo]:
        """Output shape, parameter count and receptive field of every named layer, in forward order."""
        chain = {g.name: g for g in self.layer_chain()}
        infos = []
        rf, jump, start = 1, 1, 0.5  # pixel centres sit at i + 0.5
        for name in LAYER_NAMES:
            g = chain.get(name)
            if g is None:
                infos.append(LayerInfo(name, (getattr(self, name).out_features,), self._params(name),
                                       None, None, None))
                continue
            rf = rf + (g.kernel - 1) * jump
            start = start + ((g.kernel - 1) / 2 - g.padding) * jump
            jump = jump * g.stride
            infos.append(LayerInfo(name, (g.out_channels, g.out_size, g.out_size), self._params(name), rf, jump,
                                   start))
        return infos

    def _params(self, name: str) -> int:
        module = getattr(self, name)
        return sum(p.numel() for p in module.parameters()) if isinstance(module, (nn.Conv2d, nn.Linear)) else 0

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.pool1(self.relu1(self.conv1(x))))
        x = self.norm2(self.pool2(self.relu2(self.conv2(x))))
        x = self.relu3(self.conv3(x))
        x = self.relu4(self.conv4(x))
        x = self.pool5(self.relu5(self.conv5(x)))
        x = self.drop6(self.relu6(self.fc6(torch.flatten(x, 1))))
        x = self.drop7(self.relu7(self.fc7(x)))
        return self.fc8(x)

    def trace(self, x: torch.Tensor, layers=LAYER_NAMES, switches: bool = False,
              stop_after: str | None = None) -> Trace:
        """Forward pass that keeps the activations of ``layers`` and, if asked, the int8 pool switches.

        ``stop_after`` ends the pass early at a named layer (logits are then an empty tensor).
        """
        keep = {layers} if isinstance(layers, str) else set(layers)
        unknown = keep - set(LAYER_NAMES)
        if stop_after is not None and stop_after not in LAYER_NAMES:
            unknown.add(stop_after)
        if unknown:
            raise InvalidArgumentError(f"unknown layer(s) {sorted(unknown)}; accepted: {list(LAYER_NAMES)}",
                                       field="layer")
        out = Trace(logits=x.new_empty(0))

        def record(name, value):
            if name in keep:
                out.activations[name] = value
            return stop_after == name

        def block(conv_name, relu, x):
            if conv_name == "conv1" and switches and _use_fused_conv1(x, self.conv1):
                # One Triton kernel for conv1 + ReLU + pool1 with int8 switches (zfserve.kernels).
                want_conv = "conv1" in keep or stop_after == "conv1"
                fused = conv1_relu_pool(x, self.conv1.weight, self.conv1.bias, return_conv=want_conv)
                if want_conv and record("conv1", fused[2]):
                    return fused[2], True
                out.switches["pool1"] = fused[1]
                return fused[0], record("pool1", fused[0])
            x = relu(getattr(self, conv_name)(x))
            if record(conv_name, x):
                return x, True
            pool_name = POOL_AFTER.get(conv_name)
            if pool_name is None:
                return x, False
            if switches:
                x, sw = max_pool_with_switches(x)
                out.switches[pool_name] = sw
            else:
                x = getattr(self, pool_name)(x)
            return x, record(pool_name, x)

        x, done = block("conv1", self.relu1, x)
        if done:
            return out
        x, done = block("conv2", self.relu2, self.norm1(x))
        if done:
            return out
        x, done = block("conv3", self.relu3, self.norm2(x))
        if done:
            return out
        for conv_name, relu in (("conv4", self.relu4), ("conv5", self.relu5)):
            x, done = block(conv_name, relu, x)
            if done:
                return out
        x = torch.flatten(x, 1)
        for fc_name, relu, drop in (("fc6", self.relu6, self.drop6), ("fc7", self.relu7, self.drop7)):
            x = drop(relu(getattr(self, fc_name)(x)))
            if record(fc_name, x):
                return out
        out.logits = self.fc8(x)
        record("fc8", out.logits)
        return out


def _use_fused_conv1(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """The fused conv1 kernel serves CUDA inputs when no gradient must flow through it (it has no backward)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
    return x.is_cuda and not needs_grad and conv.stride == (2, 2) and conv.padding == (1, 1)


def build(config: ModelConfig) -> ZFNet:
    """A freshly initialized ZFNet with the architecture ``config`` describes."""
    return ZFNet(config.num_classes, config.fc_width, config.widths, config.input_size, config=config)
