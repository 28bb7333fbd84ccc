"""The model configuration stored as ``config.json`` in a model directory: architecture, classes, preprocessing.

One place for these facts: the model, the preprocessing, the ONNX metadata and the server all read them from
here. Unknown keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import architecture as arch
from . import capabilities as caps
from .errors import InvalidArgumentError, ModelLoadError

# The ImageNet per-channel mean in raw pixel units (0..255), the paper's input units.
IMAGENET_MEAN_RGB = (123.68, 116.78, 103.94)
# torchvision's preprocessing for its ImageNet models: pixels / 255, then this mean and std per channel.
TORCHVISION_SCALE = 1.0 / 255.0
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
UNIT_STD = (1.0, 1.0, 1.0)
# How an alpha channel is removed: composited onto the mean colour (the only mode implemented).
ALPHA_MODES = ("composite_mean",)
# What classification may run in and on (``--precision``, ``--engine``, config.json ``precision``/``engine``):
# int8 is a calibrated static quantization of the ONNX export; bf16 runs on OpenVINO only (ONNX Runtime's CPU
# provider has no bf16 kernels).
PRECISIONS = ("fp32", "int8", "bf16")
ENGINES = ("onnxruntime", "openvino")
# Keys of config.json that choose how the model is served, not what it computes (not part of the export's hash).
SERVING_KEYS = ("precision", "engine")
# An ONNX model's ``onnx`` section: its graph's image input, the layout, and what its class output holds.
ONNX_KEYS = ("input", "layout", "output")
ONNX_LAYOUTS = ("NCHW",)
ONNX_OUTPUTS = ("logits", "probabilities")
# Keys of config.json that only a layered model has (left out of an ONNX model's config.json).
LAYERED_KEYS = ("fc_width", "widths", "architecture", "weights_dtype")


def is_integer(value) -> bool:
    """An integer (Python or numpy), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _three_numbers(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray)) and len(value) == 3 and all(_is_number(v) for v in value)


@dataclass
class PreprocessConfig:
    """How an image becomes the network's input: resize the short side (bilinear, antialiased), centre-crop,
    then per channel ``(pixel * scale - mean) / std``.

    ``scale`` maps 0..255 pixels to the units of ``mean`` and ``std``: 1 for ZFNet (raw pixels minus a mean, std
    1, the paper's units), 1/255 for torchvision's models (0..1 pixels, ImageNet mean and std). ``mean`` is three
    per-channel values or the string ``"image"``, in which case the per-pixel mean image (3 x resize x resize,
    float32, in the same units) is stored as the tensor ``mean_image`` in ``weights.safetensors`` and is available
    here as ``mean_image`` once loaded. ``scale`` and ``std`` are written to config.json only when they are not
    1, so ZFNet configs stay as they were.
    """

    resize: int = 256
    crop: int = 224
    mean: Any = IMAGENET_MEAN_RGB
    # Alpha channels are composited onto the mean colour, so transparent pixels become 0 after normalization.
    alpha: str = "composite_mean"
    scale: float = 1.0
    std: Any = UNIT_STD
    mean_image: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not (is_integer(self.resize) and is_integer(self.crop) and 1 <= self.crop <= self.resize):
            raise ModelLoadError(f"config: preprocess.resize and preprocess.crop must be integers with "
                                 f"1 <= crop <= resize, got resize={self.resize!r}, crop={self.crop!r}")
        if isinstance(self.mean, str):
            if self.mean != "image":
                raise ModelLoadError(f"config: preprocess.mean must be 3 numbers or 'image', got {self.mean!r}")
        elif _three_numbers(self.mean):
            self.mean = tuple(float(v) for v in self.mean)
        else:
            raise ModelLoadError(f"config: preprocess.mean must be 3 numbers or 'image', got {self.mean!r}")
        if not (_three_numbers(self.std) and all(v > 0 for v in self.std)):
            raise ModelLoadError(f"config: preprocess.std must be 3 positive numbers, got {self.std!r}")
        self.std = tuple(float(v) for v in self.std)
        if not (_is_number(self.scale) and self.scale > 0):
            raise ModelLoadError(f"config: preprocess.scale must be a positive number, got {self.scale!r}")
        self.scale = float(self.scale)
        self.resize, self.crop = int(self.resize), int(self.crop)
        if self.alpha not in ALPHA_MODES:
            raise ModelLoadError(f"config: preprocess.alpha must be one of {list(ALPHA_MODES)}, "
                                 f"got {self.alpha!r}")

    def mean_rgb(self) -> tuple[float, float, float]:
        """The per-channel mean colour in 0..255 pixel units (of the mean image, when one is used): the colour
        that becomes 0 after normalization."""
        if isinstance(self.mean, str):
            if self.mean_image is None:
                raise ModelLoadError("preprocess.mean is 'image' but no mean_image tensor was loaded")
            return tuple(float(v) / self.scale for v in self.mean_image.reshape(3, -1).mean(axis=1))
        return tuple(float(v) / self.scale for v in self.mean)

    def mean_crop(self) -> np.ndarray:
        """The mean to subtract from a centre-cropped, scaled image, shaped (3, crop, crop) or (3, 1, 1)."""
        if isinstance(self.mean, str):
            if self.mean_image is None:
                raise ModelLoadError("preprocess.mean is 'image' but no mean_image tensor was loaded")
            h, w = self.mean_image.shape[1:]
            top, left = (h - self.crop) // 2, (w - self.crop) // 2
            return self.mean_image[:, top:top + self.crop, left:left + self.crop].astype(np.float32)
        return np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)

    def normalize(self, pixels: np.ndarray, *, channel_mean: bool = False) -> np.ndarray:
        """float32 (3, crop, crop) pixels in 0..255 (or (3, 1, 1) colours) -> network input units.
        ``channel_mean``: subtract the per-channel mean even when a mean image is stored (for pictures that are
        not a centre crop, such as re-aligned faces)."""
        x = np.asarray(pixels, dtype=np.float32)
        if self.scale != 1.0:
            x = x * np.float32(self.scale)
        mean = self.mean_crop()
        if channel_mean:
            mean = np.asarray(self.mean_rgb(), dtype=np.float32).reshape(3, 1, 1) * np.float32(self.scale)
        x = x - mean
        if self.std != UNIT_STD:
            x = x / np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        return x

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`normalize`: network input -> float32 pixels in 0..255 (not clipped)."""
        x = np.asarray(x, dtype=np.float32)
        mean = self.mean_crop()
        if mean.shape[1:] != (1, 1) and mean.shape[1:] != x.shape[1:]:
            mean = mean.reshape(3, -1).mean(axis=1).reshape(3, 1, 1)
        if self.std != UNIT_STD:
            x = x * np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        x = x + mean
        return x / np.float32(self.scale) if self.scale != 1.0 else x

    def input_limit(self) -> float:
        """A bound on the magnitude of a normalized 0..255 pixel (255 x scale / the smallest std; 255 for raw
        pixels minus a mean): the range an occluder's fill in input units is checked against."""
        return 255.0 * self.scale / min(self.std)

    def to_json(self) -> dict:
        out = {"resize": self.resize, "crop": self.crop,
               "mean": self.mean if isinstance(self.mean, str) else [float(v) for v in self.mean],
               "alpha": self.alpha}
        if self.scale != 1.0 or self.std != UNIT_STD:
            out.update(scale=self.scale, std=list(self.std))
        return out

    def describe(self) -> str:
        """One line for people (the OIP input's description, ``zfserve info``)."""
        mean = "the mean image" if isinstance(self.mean, str) else \
            "(" + ", ".join(f"{v:g}" for v in self.mean) + ")"
        pixels = "pixels" if self.scale == 1.0 else f"pixels x {self.scale:.6g}"
        std = "" if self.std == UNIT_STD else " / (" + ", ".join(f"{v:g}" for v in self.std) + ")"
        return f"({pixels} - {mean}){std}, resize {self.resize}, centre crop {self.crop}"


@dataclass
class ModelConfig:
    """Everything in ``config.json``. ``architecture`` names the member of ZFNet's family
    (:mod:`zfserve.architecture`; absent: ``"zfnet"``) and ``widths`` its conv widths, one per conv layer (absent:
    the member's published widths)."""

    name: str = "zfnet-paper"
    version: str = "0"
    num_classes: int = 1000
    fc_width: int = 4096
    widths: tuple[int, ...] | None = None
    input_size: int = 224
    class_names: list[str] = field(default_factory=list)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    weights_dtype: str = "float32"
    provenance: dict = field(default_factory=dict)
    # How a server (or `classify`) runs it when no --precision / --engine says otherwise; None: fp32 on ONNX
    # Runtime. A model repository can so serve one model in int8 and another in fp32.
    precision: str | None = None
    engine: str | None = None
    architecture: str = arch.DEFAULT_ARCHITECTURE
    # ``layered`` (ZFNet's family, the default) or ``onnx`` (an opaque graph: model.onnx; see zfserve.capabilities)
    kind: str = caps.LAYERED
    onnx: dict | None = None

    def __post_init__(self):
        if self.kind not in caps.KINDS:
            raise ModelLoadError(f"config: kind must be one of {list(caps.KINDS)}, got {self.kind!r}")
        if self.kind == caps.ONNX:
            self._check_onnx()
        elif self.onnx is not None:
            raise ModelLoadError("config: an 'onnx' section needs kind 'onnx'")
        sizes = {"num_classes": self.num_classes, "fc_width": self.fc_width, "input_size": self.input_size}
        for key, value in sizes.items():
            if not is_integer(value) or value < 1:
                raise ModelLoadError(f"config: {key} must be a positive integer, got {value!r}")
        if self.kind == caps.LAYERED:
            self._check_layered()
        self.num_classes, self.fc_width, self.input_size = (int(v) for v in sizes.values())
        if not isinstance(self.class_names, (list, tuple)):
            raise ModelLoadError(f"config: class_names must be a list of strings, got {self.class_names!r}")
        if not self.class_names:
            self.class_names = [f"class_{i}" for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ModelLoadError(f"config: class_names has {len(self.class_names)} entries, "
                                 f"num_classes is {self.num_classes}")
        if self.kind == caps.LAYERED:
            arch.check_input_size(self.architecture, self.layer_table(), self.input_size)
        elif self.input_size != self.preprocess.crop:
            raise ModelLoadError(f"config: input_size {self.input_size} must equal preprocess.crop "
                                 f"{self.preprocess.crop} (the graph's input side)")
        if not all(isinstance(n, str) for n in self.class_names):
            raise ModelLoadError("config: class_names must be a list of strings")
        for key, accepted in (("precision", PRECISIONS), ("engine", ENGINES)):
            if getattr(self, key) is not None and getattr(self, key) not in accepted:
                raise ModelLoadError(f"config: {key} must be one of {list(accepted)} (or absent), got "
                                     f"{getattr(self, key)!r}")

    def _check_onnx(self) -> None:
        section = self.onnx
        if not isinstance(section, dict) or sorted(section) != sorted(ONNX_KEYS):
            raise ModelLoadError(f"config: kind 'onnx' needs an 'onnx' section with exactly the keys "
                                 f"{list(ONNX_KEYS)}, got {section!r}")
        if not isinstance(section["input"], str) or not section["input"]:
            raise ModelLoadError(f"config: onnx.input must name the graph's image input, got {section['input']!r}")
        if section["layout"] not in ONNX_LAYOUTS:
            raise ModelLoadError(f"config: onnx.layout must be one of {list(ONNX_LAYOUTS)}, got "
                                 f"{section['layout']!r}")
        if section["output"] not in ONNX_OUTPUTS:
            raise ModelLoadError(f"config: onnx.output must be one of {list(ONNX_OUTPUTS)}, got "
                                 f"{section['output']!r}")

    def _check_layered(self) -> None:
        arch.check_architecture(self.architecture)
        if self.widths is None:
            self.widths = arch.DEFAULT_WIDTHS[self.architecture]
        if not isinstance(self.widths, (list, tuple)) or not all(is_integer(w) and w >= 1 for w in self.widths):
            raise ModelLoadError(f"config: widths must list positive integers, got {self.widths!r}")
        self.widths = tuple(int(w) for w in self.widths)

    # The layer table and the names derived from it (see zfserve.architecture), without loading torch.
    def layer_table(self) -> tuple[arch.Layer, ...]:
        if self.kind != caps.LAYERED:   # an opaque graph: no layer zfserve knows
            return ()
        return arch.layer_table(self.architecture, self.widths, self.fc_width, self.num_classes)

    def layer_names(self, kinds=("conv", "pool", "fc")) -> tuple[str, ...]:
        """Named layers of ``kinds`` in forward order (default: every layer a trace can record)."""
        return arch.names(self.layer_table(), kinds)

    @property
    def conv_layers(self) -> tuple[str, ...]:
        return self.layer_names(("conv",))

    @property
    def spatial_layers(self) -> tuple[str, ...]:
        """The layers with a spatial map (what deconv projects, what an occluder changes), in forward order."""
        caps.require(self, "layers", "deconv, activity and gradient maps (they name a layer of the network)")
        return self.layer_names(("conv", "pool"))

    @property
    def last_conv(self) -> str:
        """The deepest conv layer (conv5, conv5_3, ...): the default for deconv, activity maps and Grad-CAM."""
        caps.require(self, "layers", "deconv, activity and gradient maps (they name a layer of the network)")
        return self.conv_layers[-1]

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["widths"] = list(self.widths) if self.widths is not None else None
        out["preprocess"] = self.preprocess.to_json()
        for key in SERVING_KEYS:   # written only when set, so configs without them stay as they were
            if out[key] is None:
                del out[key]
        if self.architecture == arch.DEFAULT_ARCHITECTURE:   # likewise: ZFNet configs stay as they were
            del out["architecture"]
        if self.kind == caps.LAYERED:
            del out["kind"], out["onnx"]
        else:                                  # an opaque graph has none of the layer table's facts
            for key in LAYERED_KEYS:
                out.pop(key, None)
        return out

    @classmethod
    def from_json(cls, data: dict, source: str = "config.json") -> "ModelConfig":
        if not isinstance(data, dict):
            raise ModelLoadError(f"{source}: expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelLoadError(f"{source}: unknown config keys {unknown}; accepted: {sorted(known)}")
        data = dict(data)
        pre = data.pop("preprocess", {}) or {}
        pre_known = {"resize", "crop", "mean", "alpha", "scale", "std"}
        unknown = sorted(set(pre) - pre_known)
        if unknown:
            raise ModelLoadError(f"{source}: unknown preprocess keys {unknown}; accepted: {sorted(pre_known)}")
        try:
            return cls(preprocess=PreprocessConfig(**pre), **data)
        except ModelLoadError as exc:  # name the file, not just "config"
            raise ModelLoadError(f"{source}: {str(exc).removeprefix('config: ')}") from None
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{source}: {exc}") from None


@dataclass
class TrainConfig:
    """The training recipe of ``zfserve train`` (``zfserve.train``): the paper's defaults, plus the documented
    deviations for short runs. It lives here, beside the model's config, so the CLI can build its parser from
    these defaults without loading torch. (Feature evolution is computed from the snapshots afterwards:
    ``zfserve.paper.evolution.write_evolution``, or ``zfserve train --evolution``.)"""

    out: str
    data: str = "synthetic"
    val_data: str | None = None        # ImageFolder for validation; default: a held-out synthetic seed / 10% split
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-2
    momentum: float = 0.9
    optimizer: str = "sgd"             # "sgd" (the paper) or "adam" (a documented deviation for short runs)
    weight_decay: float = 0.0          # not stated in the paper
    conv1_weight_decay: float = 0.0    # decoupled decay of conv1 only: each step w *= 1 - lr * value (see recipe)
    dropout: float = 0.5
    init: str = "paper"                # "paper": N(0, 0.01^2); "scaled": see train.recipe.init_weights
    clip_radius: float = 0.1
    batchnorm: bool = False            # train with BatchNorm after conv1..5, folded into the convs when saved
    tied_fc6: bool = False             # train fc6 shared over pool5's positions, expanded when saved
    erase: float = 0.0                 # probability that a training crop gets one mean-filled square (Cutout)
    fc_width: int = 4096
    resize: int = 256                  # images are resize x resize; crops are crop x crop
    crop: int = 224
    seed: int = 0
    train_seed: int = 1                # synthetic data seeds
    train_n: int = 11000
    val_seed: int = 2
    val_n: int = 550
    plateau_patience: int = 1          # epochs without val-loss improvement before lr /10
    plateau_threshold: float = 0.01    # relative improvement that counts
    min_lr: float = 1e-5
    warmup_steps: int = 0              # linear lr warmup (0 = the paper: none)
    amp: str = "none"                  # "bf16" autocast (fp32 master weights) or "none"
    channels_last: bool = True
    device: str = "auto"
    snapshot_epochs: list = field(default_factory=list)   # empty: the paper's epochs scaled to this run
    cache_dir: str | None = None
    workers: int = 1                   # processes that render synthetic data before training
    max_steps_per_epoch: int = 0       # 0 = whole epoch (tests use a few)
    max_minutes: float = 0.0           # > 0: stop after the epoch past which another would overrun this budget
    name: str = "zfnet-demo"
    command: str = ""

    def validate(self) -> None:
        checks = [("epochs", self.epochs >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
                  ("lr", self.lr > 0, "> 0"), ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                  ("dropout", 0 <= self.dropout < 1, "in [0, 1)"), ("clip_radius", self.clip_radius > 0, "> 0"),
                  ("fc_width", self.fc_width >= 1, ">= 1"), ("crop", 32 <= self.crop <= self.resize,
                                                             f"in [32, resize={self.resize}]"),
                  ("init", self.init in ("paper", "scaled"), "'paper' or 'scaled'"),
                  ("amp", self.amp in ("none", "bf16"), "'none' or 'bf16'"),
                  ("optimizer", self.optimizer in ("sgd", "adam"), "'sgd' or 'adam'"),
                  ("train_n", self.train_n >= 1, ">= 1"), ("val_n", self.val_n >= 1, ">= 1"),
                  ("erase", 0 <= self.erase <= 1, "in [0, 1]"),
                  ("conv1_weight_decay", 0 <= self.conv1_weight_decay and self.lr * self.conv1_weight_decay < 1,
                   f">= 0 and < 1 / lr = {1 / self.lr:g}" if self.lr > 0 else ">= 0 and < 1 / lr")]
        for name, ok, accepted in checks:
            if not ok:
                raise InvalidArgumentError(f"{name}={getattr(self, name)!r} is out of range; accepted: {accepted}",
                                           field=name)


def training_data(config: ModelConfig) -> str:
    """What a model was trained on, in plain words, from its provenance (``zfserve info``, ModelInfo, the explorer):
    a ``training_data`` note when its packager wrote one, else what ``zfserve train`` recorded."""
    provenance = config.provenance or {}
    if provenance.get("training_data"):
        return str(provenance["training_data"])
    data = provenance.get("data")
    if isinstance(data, dict) and data.get("kind") == "synthetic":
        count = f"{data['train_n']:,} training images" if is_integer(data.get("train_n")) else "training images"
        return (f"synthetic images of {config.num_classes} shapes ({', '.join(config.class_names)}), one per image on a "
                f"cluttered background, drawn by zfserve's generator ({count}, seed {data.get('train_seed')}); "
                f"photographs are outside it: real photos need a model trained on them (your own)")
    if isinstance(data, str) and data:
        return f"the images of {data} (an ImageFolder: {config.num_classes} classes)"
    if str(provenance.get("source", "")).startswith("built-in"):
        return "none: untrained (the paper's initialisation); its answers mean nothing"
    return "not recorded in its provenance"
