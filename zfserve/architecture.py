"""The architectures of ZFNet's family: the one description from which the model, its layer names, its geometry
table and every engine (trace and switches, deconv, incremental occlusion, the unit index, the export) derive.

A model directory's ``config.json`` names its member with ``"architecture"`` (absent: ``"zfnet"``) and sets the
conv widths (``widths``, one per conv layer), ``fc_width`` and ``num_classes`` freely; the rest of the layer table
is fixed per member:

- ``zfnet``: Zeiler & Fergus 2014 (Fig. 3): conv -> ReLU -> 3x3/2 ceil-mode max-pool -> local response norm in
  blocks 1 and 2; 7x7/2 conv1 (pad 1), 5x5/2 conv2 (pad 0), 3x3/1 conv3..5 (pad 1).
- ``alexnet``: torchvision's AlexNet: 11x11/4 conv1 (pad 2), 5x5 conv2 (pad 2), 3x3 conv3..5 (pad 1), 3x3/2
  floor-mode pools, no LRN.
- ``vgg11`` / ``vgg13`` / ``vgg16`` / ``vgg19``: Simonyan & Zisserman's configurations A, B, D, E as torchvision
  builds them: 3x3/1 convs (pad 1) in five blocks, each block ending in a 2x2/2 max-pool. The batch-norm variants
  are the same networks once BN is folded into the convs (``zfserve import torchvision`` does that).

Every conv is followed by a ReLU; the classifier is fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> fc8 on
the flattened last pool. (torchvision's AdaptiveAvgPool2d before the classifier is the identity at its models'
224 input, where the last map is already 6 x 6 / 7 x 7; so AlexNet and VGG configs must keep that map size.)

Layer names, the one scheme: ZFNet and AlexNet name their layers ``conv1``..``conv5``, ``pool1``, ``pool2``,
``pool5``, ``fc6``..``fc8`` (the papers' and Caffe's names); VGG names conv ``i`` of block ``b`` ``conv{b}_{i}``
and the block's pool ``pool{b}`` (``conv1_1``, ``conv1_2``, ``pool1``, ..., ``conv5_3``, ``pool5``), then
``fc6``..``fc8``. Module names inside the model follow: the ReLU after ``convX`` is ``reluX``, after ``fcN``
``reluN``; dropouts are ``drop6``/``drop7``; ZFNet's LRNs are ``norm1``/``norm2``.

This module imports neither torch nor numpy, so the command line and the server can check layer names cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelLoadError

DEFAULT_ARCHITECTURE = "zfnet"
# VGG configurations (Simonyan & Zisserman 2015, Table 1): conv widths per block.
_VGG_BLOCKS = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}
ARCHITECTURES = ("zfnet", "alexnet", *_VGG_BLOCKS)
DEFAULT_WIDTHS = {
    "zfnet": (96, 256, 384, 384, 256),
    "alexnet": (64, 192, 384, 256, 256),
    **{name: tuple(w for block in blocks for w in block) for name, blocks in _VGG_BLOCKS.items()},
}
# The side of the last pooled map that torchvision's classifier reads (its AdaptiveAvgPool2d size).
CLASSIFIER_MAP = {"alexnet": 6, **{name: 7 for name in _VGG_BLOCKS}}
# ZFNet's local response normalization: size, alpha, beta, k (AlexNet's values, which ZFNet kept).
ZFNET_LRN = (5, 1e-4, 0.75, 2.0)
DROPOUT = 0.5
KINDS = ("conv", "pool", "norm", "fc")


@dataclass(frozen=True)
class Layer:
    """One layer of a member's table. ``conv``: kernel/stride/padding, ``width`` output channels, ``relu`` the
    name of the ReLU after it. ``pool``: max-pool kernel/stride, ``ceil_mode``. ``norm``: local response norm
    with ``lrn`` = (size, alpha, beta, k), applied to the pool before it. ``fc``: ``width`` outputs, ``relu`` and
    ``dropout`` names (None for the last)."""

    name: str
    kind: str
    kernel: int = 0
    stride: int = 0
    padding: int = 0
    width: int = 0
    ceil_mode: bool = False
    relu: str | None = None
    dropout: str | None = None
    lrn: tuple | None = None


def _conv(name: str, width: int, kernel: int, stride: int, padding: int) -> Layer:
    return Layer(name, "conv", kernel, stride, padding, width, relu="relu" + name.removeprefix("conv"))


def _fc(fc_width: int, num_classes: int) -> list[Layer]:
    return [Layer("fc6", "fc", width=fc_width, relu="relu6", dropout="drop6"),
            Layer("fc7", "fc", width=fc_width, relu="relu7", dropout="drop7"),
            Layer("fc8", "fc", width=num_classes)]


def _zfnet(widths) -> list[Layer]:
    c1, c2, c3, c4, c5 = widths
    pool = dict(kernel=3, stride=2, ceil_mode=True)
    return [_conv("conv1", c1, 7, 2, 1), Layer("pool1", "pool", **pool), Layer("norm1", "norm", lrn=ZFNET_LRN),
            _conv("conv2", c2, 5, 2, 0), Layer("pool2", "pool", **pool), Layer("norm2", "norm", lrn=ZFNET_LRN),
            _conv("conv3", c3, 3, 1, 1), _conv("conv4", c4, 3, 1, 1), _conv("conv5", c5, 3, 1, 1),
            Layer("pool5", "pool", **pool)]


def _alexnet(widths) -> list[Layer]:
    c1, c2, c3, c4, c5 = widths
    pool = dict(kernel=3, stride=2)
    return [_conv("conv1", c1, 11, 4, 2), Layer("pool1", "pool", **pool), _conv("conv2", c2, 5, 1, 2),
            Layer("pool2", "pool", **pool), _conv("conv3", c3, 3, 1, 1), _conv("conv4", c4, 3, 1, 1),
            _conv("conv5", c5, 3, 1, 1), Layer("pool5", "pool", **pool)]


def _vgg(architecture: str, widths) -> list[Layer]:
    layers, given = [], iter(widths)
    for block, convs in enumerate(_VGG_BLOCKS[architecture], start=1):
        layers += [_conv(f"conv{block}_{i}", next(given), 3, 1, 1) for i in range(1, len(convs) + 1)]
        layers.append(Layer(f"pool{block}", "pool", kernel=2, stride=2))
    return layers


def check_architecture(architecture) -> str:
    if architecture not in ARCHITECTURES:
        raise ModelLoadError(f"config: architecture must be one of {list(ARCHITECTURES)}, got {architecture!r}")
    return architecture


def layer_table(architecture: str, widths, fc_width: int, num_classes: int) -> tuple[Layer, ...]:
    """Every layer of a member, in forward order (ReLUs and dropouts are named on their conv / fc layer)."""
    check_architecture(architecture)
    expected = len(DEFAULT_WIDTHS[architecture])
    if len(widths) != expected:
        raise ModelLoadError(f"config: widths must list {expected} conv widths for {architecture}, got "
                             f"{list(widths)}")
    if architecture == "zfnet":
        convs = _zfnet(widths)
    elif architecture == "alexnet":
        convs = _alexnet(widths)
    else:
        convs = _vgg(architecture, widths)
    return tuple(convs + _fc(fc_width, num_classes))


def conv_out(size: int, layer: Layer) -> int:
    """Side of a conv's or pool's output for an input side ``size`` (PyTorch's rules, ceil mode included: the
    last window must start inside the input)."""
    if layer.kind == "conv":
        return (size + 2 * layer.padding - layer.kernel) // layer.stride + 1
    if not layer.ceil_mode:
        return (size - layer.kernel) // layer.stride + 1
    out = -(-(size - layer.kernel) // layer.stride) + 1
    return out - 1 if (out - 1) * layer.stride >= size else out


def last_map_side(table, input_size: int) -> int:
    """Side of the last pooled map (what fc6 reads, flattened) for an input side."""
    size = input_size
    for layer in table:
        if layer.kind in ("conv", "pool"):
            size = conv_out(size, layer)
            if size < 1:
                raise ModelLoadError(f"config: input_size {input_size} is too small: {layer.name}'s output would "
                                     f"be empty")
    return size


def check_input_size(architecture: str, table, input_size: int) -> None:
    """AlexNet and VGG read the last map at torchvision's size (see the module docstring)."""
    side = last_map_side(table, input_size)
    wanted = CLASSIFIER_MAP.get(architecture)
    if wanted is not None and side != wanted:
        raise ModelLoadError(f"config: input_size {input_size} gives {architecture} a {side} x {side} last map; its "
                             f"classifier reads {wanted} x {wanted} (input_size 224, as torchvision's models)")


def names(table, kinds=("conv", "pool", "fc")) -> tuple[str, ...]:
    """Names of the layers of ``kinds``, in forward order. The default, conv/pool/fc, are the named layers a
    trace records (a norm is not one: a pool's activation is taken before its LRN)."""
    return tuple(layer.name for layer in table if layer.kind in kinds)
