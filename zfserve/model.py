"""The layered CNN of ZFNet's family: one short, plain module built from the layer table of
:mod:`zfserve.architecture` (ZFNet, AlexNet, VGG-11/13/16/19), ZFNet being the default configuration.

ZFNet is Zeiler & Fergus 2014 (arXiv 1311.2901 v3, Fig. 3). Layer order in its blocks 1 and 2 is the paper's:
conv -> ReLU -> max-pool -> local response norm (AlexNet normalizes before pooling; ZFNet pools first). Pools
are 3x3/2 in ceil mode; conv1 pads 1, conv2 pads 0, conv3-5 pad 1, which gives the paper's sizes
110/55/26/13/13/13/6 for a 224 input. Module names are the layer names (``conv1``, ``conv5_3``, ``fc6``, ...),
so state-dict keys are ``conv1.weight``, ``fc8.bias``, ...

Besides ``forward`` (logits), :meth:`LayeredCNN.trace` returns the activations of named layers and the switches
of every pool as int8 window offsets (see ``zfserve.kernels.reference``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn

from zfserve.kernels import conv1_relu_pool
from zfserve.kernels.reference import max_pool_with_switches

from . import architecture as arch
from .config import ModelConfig
from .errors import InvalidArgumentError

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
    kind: str = "conv"               # "conv" or "pool"
    ceil_mode: bool = False          # pools: PyTorch's ceil mode (ZFNet's pools)
    norm: str | None = None          # pools: the local response norm module that follows it (ZFNet's)


@dataclass
class LayerInfo:
    """Static facts of one named layer for a given input size."""

    name: str
    shape: tuple[int, ...]           # (C, H, W) for conv/pool, (F,) for fc
    params: int
    receptive_field: int | None      # pixels, for conv/pool
    jump: int | None                 # input pixels between adjacent units
    start: float | None              # centre of unit (0, 0) in input pixel coordinates
    kind: str = "conv"               # "conv", "pool" or "fc"


@dataclass
class Trace:
    """What :meth:`LayeredCNN.trace` returns."""

    logits: torch.Tensor
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    switches: dict[str, torch.Tensor] = field(default_factory=dict)


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


@torch.no_grad()
def fold_batchnorm_(conv: nn.Conv2d, running_mean, running_var, weight, bias, eps: float) -> None:
    """Fold an eval-mode BatchNorm that follows ``conv`` into it (in place, float32 on the conv's device):
    s = weight / sqrt(running_var + eps), w' = w * s per output channel, b' = (b - running_mean) * s + bias."""
    dev = conv.weight.device
    as32 = lambda t: t.detach().to(dev, torch.float32)   # noqa: E731
    scale = as32(weight) / torch.sqrt(as32(running_var) + eps)
    conv.bias.copy_((conv.bias - as32(running_mean)) * scale + as32(bias))
    conv.weight.mul_(scale.view(-1, 1, 1, 1))


class LayeredCNN(nn.Module):
    """A member of ZFNet's family, built from its layer table (:func:`zfserve.architecture.layer_table`).

    ``LayeredCNN(config=ModelConfig(architecture="vgg16", ...))`` builds any member; without a config the
    arguments describe a ZFNet (``widths``: conv1..conv5 channels, ``fc_width``: fc6 and fc7), so
    ``ZFNet(num_classes=11, fc_width=512)`` is the paper's network with a small classifier. ``ZFNet`` is this
    class under the name the library has always exported."""

    def __init__(self, num_classes: int = 1000, fc_width: int = 4096, widths: tuple[int, ...] | None = None,
                 input_size: int = 224, config: ModelConfig | None = None):
        super().__init__()
        if config is None:
            config = ModelConfig(num_classes=num_classes, fc_width=fc_width,
                                 widths=None if widths is None else tuple(widths), input_size=input_size)
        self.config = config
        self.architecture = config.architecture
        self.widths = config.widths
        self.input_size = config.input_size
        self.table = config.layer_table()
        channels, flat = 3, None
        for layer in self.table:   # registration order = forward order (paper_init_ draws in this order)
            if layer.kind == "conv":
                self.add_module(layer.name, nn.Conv2d(channels, layer.width, layer.kernel, layer.stride,
                                                      layer.padding))
                self.add_module(layer.relu, nn.ReLU())
                channels = layer.width
            elif layer.kind == "pool":
                self.add_module(layer.name, nn.MaxPool2d(layer.kernel, layer.stride, ceil_mode=layer.ceil_mode))
            elif layer.kind == "norm":
                size, alpha, beta, k = layer.lrn
                self.add_module(layer.name, nn.LocalResponseNorm(size, alpha, beta, k))
            else:
                if flat is None:
                    side = self.layer_chain()[-1].out_size
                    flat = channels * side * side
                self.add_module(layer.name, nn.Linear(flat, layer.width))
                flat = layer.width
                if layer.relu:
                    self.add_module(layer.relu, nn.ReLU())
                    self.add_module(layer.dropout, nn.Dropout(arch.DROPOUT))
        self.reset_parameters()

    # ------------------------------------------------------------------ names (from the config's table)
    @property
    def layer_names(self) -> tuple[str, ...]:
        """Every named layer a trace records (conv, pool, fc), in forward order."""
        return self.config.layer_names()

    @property
    def conv_layers(self) -> tuple[str, ...]:
        return self.config.conv_layers

    @property
    def pool_layers(self) -> tuple[str, ...]:
        return self.config.layer_names(("pool",))

    @property
    def fc_layers(self) -> tuple[str, ...]:
        return self.config.layer_names(("fc",))

    @property
    def spatial_layers(self) -> tuple[str, ...]:
        return self.config.spatial_layers

    @property
    def last_conv(self) -> str:
        return self.config.last_conv

    # ------------------------------------------------------------------ init and the paper's clipping rule
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """:func:`paper_init_`: every weight N(0, 0.01^2), every bias 0."""
        paper_init_(self, generator)

    def clip_filter_rms_(self, radius: float = 0.1) -> None:
        """:func:`clip_filter_rms_` on every conv layer."""
        clip_filter_rms_((getattr(self, name) for name in self.conv_layers), radius)

    # ------------------------------------------------------------------ geometry
    def layer_chain(self, input_size: int | None = None) -> list[Geometry]:
        """Kernel, stride, padding, map sides and channels of every spatial layer (conv and pool), in order."""
        size, channels, chain = input_size or self.input_size, 3, []
        for layer in self.table:
            if layer.kind == "norm":
                chain[-1] = Geometry(**{**chain[-1].__dict__, "norm": layer.name})
                continue
            if layer.kind == "fc":
                break
            out_channels = layer.width if layer.kind == "conv" else channels
            out_size = arch.conv_out(size, layer)
            chain.append(Geometry(layer.name, layer.kernel, layer.stride, layer.padding, size, out_size, channels,
                                  out_channels, layer.kind, layer.ceil_mode))
            size, channels = out_size, out_channels
        return chain

    def spatial_sizes(self, input_size: int | None = None) -> dict[str, int]:
        """The side of every spatial layer's map: {name: size}."""
        return {g.name: g.out_size for g in self.layer_chain(input_size)}

    def channels(self) -> dict[str, int]:
        """The width of every named layer: feature maps of conv/pool layers, units of fc layers."""
        return {**{g.name: g.out_channels for g in self.layer_chain()},
                **{name: getattr(self, name).out_features for name in self.fc_layers}}

    def layer_info(self) -> list[LayerInfo]:
        """Output shape, parameter count and receptive field of every named layer, in forward order."""
        chain = {g.name: g for g in self.layer_chain()}
        infos = []
        rf, jump, start = 1, 1, 0.5  # pixel centres sit at i + 0.5
        for name in self.layer_names:
            g = chain.get(name)
            if g is None:
                infos.append(LayerInfo(name, (getattr(self, name).out_features,), self._params(name),
                                       None, None, None, "fc"))
                continue
            rf = rf + (g.kernel - 1) * jump
            start = start + ((g.kernel - 1) / 2 - g.padding) * jump
            jump = jump * g.stride
            infos.append(LayerInfo(name, (g.out_channels, g.out_size, g.out_size), self._params(name), rf, jump,
                                   start, g.kind))
        return infos

    def _params(self, name: str) -> int:
        module = getattr(self, name)
        return sum(p.numel() for p in module.parameters()) if isinstance(module, (nn.Conv2d, nn.Linear)) else 0

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.table:
            x = self._step(layer, x)
        return x

    def trace(self, x: torch.Tensor, layers=None, switches: bool = False,
              stop_after: str | None = None) -> Trace:
        """Forward pass that keeps the activations of ``layers`` (default: every named layer) and, if asked,
        the int8 switches of every pool. Activations are taken after the ReLU for conv layers and fc6/fc7,
        after the max-pool (before any LRN) for pools, and are the logits for the last fc layer.

        ``stop_after`` ends the pass early at a named layer (logits are then an empty tensor).
        """
        names = self.layer_names
        keep = set(names) if layers is None else {layers} if isinstance(layers, str) else set(layers)
        unknown = keep - set(names)
        if stop_after is not None and stop_after not in names:
            unknown.add(stop_after)
        if unknown:
            raise InvalidArgumentError(f"unknown layer(s) {sorted(unknown)}; accepted: {list(names)}",
                                       field="layer")
        out = Trace(logits=x.new_empty(0))
        table = self.table
        i = 0
        while i < len(table):
            layer = table[i]
            if i == 0 and switches and self._fused_conv1(x):
                # One Triton kernel for conv1 + ReLU + pool1 with int8 switches (zfserve.kernels).
                want_conv = layer.name in keep or stop_after == layer.name
                conv = getattr(self, layer.name)
                fused = conv1_relu_pool(x, conv.weight, conv.bias, return_conv=want_conv)
                if want_conv and self._record(out, keep, stop_after, layer.name, fused[2]):
                    return out
                x, out.switches[table[1].name] = fused[0], fused[1]
                if self._record(out, keep, stop_after, table[1].name, x):
                    return out
                i += 2
                continue
            x = self._step(layer, x, out, switches)
            if layer.kind != "norm" and self._record(out, keep, stop_after, layer.name, x):
                return out
            i += 1
        out.logits = x
        return out

    def _step(self, layer: arch.Layer, x: torch.Tensor, out: Trace | None = None,
              switches: bool = False) -> torch.Tensor:
        """One layer of the forward pass (with a pool's switches recorded into ``out`` when asked)."""
        if layer.kind == "conv":
            return getattr(self, layer.relu)(getattr(self, layer.name)(x))
        if layer.kind == "pool" and switches:
            x, out.switches[layer.name] = max_pool_with_switches(x, layer.kernel, layer.stride, layer.ceil_mode)
            return x
        if layer.kind == "fc":
            x = getattr(self, layer.name)(x if x.dim() == 2 else torch.flatten(x, 1))
            return getattr(self, layer.dropout)(getattr(self, layer.relu)(x)) if layer.relu else x
        return getattr(self, layer.name)(x)

    @staticmethod
    def _record(out: Trace, keep: set, stop_after: str | None, name: str, value: torch.Tensor) -> bool:
        """Keep ``value`` if asked for; whether the pass ends here."""
        if name in keep:
            out.activations[name] = value
        return stop_after == name

    def _fused_conv1(self, x: torch.Tensor) -> bool:
        """The fused conv1 kernel serves ZFNet's block 1 geometry (a first conv of stride 2, padding 1, straight
        into a 3x3/2 ceil-mode pool) on CUDA inputs, when no gradient must flow through it (it has no
        backward)."""
        first, second = self.table[0], self.table[1]
        if not (first.stride == 2 and first.padding == 1 and second.kind == "pool"
                and (second.kernel, second.stride, second.ceil_mode) == (3, 2, True)):
            return False
        conv = getattr(self, first.name)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
        return x.is_cuda and not needs_grad


# The name the library has always exported; the paper's network is this class's default configuration.
ZFNet = LayeredCNN


def build(config: ModelConfig) -> LayeredCNN:
    """A freshly initialized model with the architecture ``config`` describes."""
    return LayeredCNN(config=config)
