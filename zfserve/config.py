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

from .errors import ModelLoadError

# The ImageNet per-channel mean in raw pixel units (0..255), the paper's input units.
IMAGENET_MEAN_RGB = (123.68, 116.78, 103.94)
# How an alpha channel is removed: composited onto the mean colour (the only mode implemented).
ALPHA_MODES = ("composite_mean",)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class PreprocessConfig:
    """How an image becomes the network's input: resize the short side, centre-crop, subtract the mean.

    ``mean`` is either three per-channel values in 0..255 units or the string ``"image"``, in which case the
    per-pixel mean image (3 x resize x resize, float32) is stored as the tensor ``mean_image`` in
    ``weights.safetensors`` and is available here as ``mean_image`` once loaded.
    """

    resize: int = 256
    crop: int = 224
    mean: Any = IMAGENET_MEAN_RGB
    # Alpha channels are composited onto the mean colour, so transparent pixels become 0 after subtraction.
    alpha: str = "composite_mean"
    mean_image: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not (_is_int(self.resize) and _is_int(self.crop) and 1 <= self.crop <= self.resize):
            raise ModelLoadError(f"config: preprocess.resize and preprocess.crop must be integers with "
                                 f"1 <= crop <= resize, got resize={self.resize!r}, crop={self.crop!r}")
        if isinstance(self.mean, str):
            if self.mean != "image":
                raise ModelLoadError(f"config: preprocess.mean must be 3 numbers or 'image', got {self.mean!r}")
        elif isinstance(self.mean, (list, tuple, np.ndarray)) and len(self.mean) == 3 \
                and all(_is_number(v) for v in self.mean):
            self.mean = tuple(float(v) for v in self.mean)
        else:
            raise ModelLoadError(f"config: preprocess.mean must be 3 numbers or 'image', got {self.mean!r}")
        self.resize, self.crop = int(self.resize), int(self.crop)
        if self.alpha not in ALPHA_MODES:
            raise ModelLoadError(f"config: preprocess.alpha must be one of {list(ALPHA_MODES)}, "
                                 f"got {self.alpha!r}")

    def mean_rgb(self) -> tuple[float, float, float]:
        """The per-channel mean (of the mean image, when one is used)."""
        if isinstance(self.mean, str):
            if self.mean_image is None:
                raise ModelLoadError("preprocess.mean is 'image' but no mean_image tensor was loaded")
            return tuple(float(v) for v in self.mean_image.reshape(3, -1).mean(axis=1))
        return tuple(float(v) for v in self.mean)

    def mean_crop(self) -> np.ndarray:
        """The mean to subtract from a centre-cropped image, shaped (3, crop, crop) or (3, 1, 1)."""
        if isinstance(self.mean, str):
            if self.mean_image is None:
                raise ModelLoadError("preprocess.mean is 'image' but no mean_image tensor was loaded")
            h, w = self.mean_image.shape[1:]
            top, left = (h - self.crop) // 2, (w - self.crop) // 2
            return self.mean_image[:, top:top + self.crop, left:left + self.crop].astype(np.float32)
        return np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)

    def to_json(self) -> dict:
        return {"resize": self.resize, "crop": self.crop,
                "mean": self.mean if isinstance(self.mean, str) else [float(v) for v in self.mean],
                "alpha": self.alpha}


@dataclass
class ModelConfig:
    """Everything in ``config.json``. ``widths`` are the conv1..conv5 channel counts."""

    name: str = "zfnet-paper"
    version: str = "0"
    num_classes: int = 1000
    fc_width: int = 4096
    widths: tuple[int, ...] = (96, 256, 384, 384, 256)
    input_size: int = 224
    class_names: list[str] = field(default_factory=list)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    weights_dtype: str = "float32"
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        sizes = {"num_classes": self.num_classes, "fc_width": self.fc_width, "input_size": self.input_size}
        for key, value in sizes.items():
            if not _is_int(value) or value < 1:
                raise ModelLoadError(f"config: {key} must be a positive integer, got {value!r}")
        if not isinstance(self.widths, (list, tuple)) or not all(_is_int(w) and w >= 1 for w in self.widths):
            raise ModelLoadError(f"config: widths must list 5 positive integers, got {self.widths!r}")
        self.widths = tuple(int(w) for w in self.widths)
        self.num_classes, self.fc_width, self.input_size = (int(v) for v in sizes.values())
        if not isinstance(self.class_names, (list, tuple)):
            raise ModelLoadError(f"config: class_names must be a list of strings, got {self.class_names!r}")
        if not self.class_names:
            self.class_names = [f"class_{i}" for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ModelLoadError(f"config: class_names has {len(self.class_names)} entries, "
                                 f"num_classes is {self.num_classes}")
        if len(self.widths) != 5:
            raise ModelLoadError(f"config: widths must list 5 conv widths, got {list(self.widths)}")
        if not all(isinstance(n, str) for n in self.class_names):
            raise ModelLoadError("config: class_names must be a list of strings")

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["widths"] = list(self.widths)
        out["preprocess"] = self.preprocess.to_json()
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
        pre_known = {"resize", "crop", "mean", "alpha"}
        unknown = sorted(set(pre) - pre_known)
        if unknown:
            raise ModelLoadError(f"{source}: unknown preprocess keys {unknown}; accepted: {sorted(pre_known)}")
        try:
            return cls(preprocess=PreprocessConfig(**pre), **data)
        except ModelLoadError as exc:  # name the file, not just "config"
            raise ModelLoadError(f"{source}: {str(exc).removeprefix('config: ')}") from None
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{source}: {exc}") from None
