"""The one definition of how an image becomes the network's input. Every path (CLI, server, engines,
training, evaluation) goes through :func:`load_image` / :func:`load_images`.

Decoding untrusted bytes safely:
- only JPEG, PNG and WebP are opened (only their Pillow plugins are consulted, so other decoders never run);
- the size and frame count are read from the header (:func:`read_header`) and checked *before* any pixel is
  decoded: a pixel limit (default 40 MP) and a minimum side (default 32 px); Pillow's own decompression-bomb
  check is not run, so its warnings and its numbers never reach a user, only ours; truncated files are errors
  (``LOAD_TRUNCATED_IMAGES`` stays off);
- only the first frame of an animated PNG/WebP is decoded; EXIF orientation is applied;
- the cost of a large image is bounded: inference decodes at a working size (JPEG at 1/2 to 1/8 scale while
  decoding, other formats reduced in uint8 right after), cuts images longer than 16:1 to their centre first,
  and never holds a full-size image in floating point; a ``check`` callback can stop the work between steps.
Colour: grayscale, palette and CMYK are converted to RGB; 16-bit images are scaled to 8 bits (not clipped);
alpha is composited onto the model's mean colour, so fully transparent pixels become 0 after normalization
(the same value the occlusion engine fills with).
Then: resize the short side to ``resize`` (bilinear, antialiased; images longer than 16:1 are first cut to
their centre 16:1 part, which holds all the crop needs), centre-crop ``crop`` x ``crop``, and normalize per
channel, ``(pixel * scale - mean) / std`` (:meth:`~zfserve.config.PreprocessConfig.normalize`; the mean per
channel, or the matching centre crop of the per-pixel mean image). Output: float32 (3, crop, crop). ZFNet's
units are raw pixels minus the mean (scale 1, std 1: roughly -128..128, the paper's); torchvision's models take
pixels / 255 normalized by the ImageNet mean and std (roughly -2..2.6).
"""

from __future__ import annotations

import io
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Union

import numpy as np
from PIL import Image, ImageOps

from .config import ModelConfig, PreprocessConfig
from .errors import CorruptImageError, ImageSizeError, InvalidArgumentError, UnsupportedImageFormatError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MIN_SIDE = 32
DEFAULT_MAX_FRAMES = 1000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MAX_ASPECT = 16
# Inference decodes large images to a short side of at least this many times the resize side (then resizes).
WORKING_SCALE = 2

ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike, np.ndarray]

# Leading bytes of formats we refuse, so the error can name what was sent without running its decoder.
_REFUSED_MAGIC = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"),
    (b"\x00\x00\x01\x00", "ICO"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"8BPS", "PSD"),
    (b"\x01\xda", "SGI"), (b"icns", "ICNS"), (b"SIMPLE  =", "FITS"), (b"qoif", "QOI"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"), (b"%PDF", "PDF"),
)


def preprocess_config(config) -> PreprocessConfig:
    """The preprocessing of ``config``: a ModelConfig, a PreprocessConfig, a model (LayeredCNN), or None (the
    defaults)."""
    if config is None:
        return PreprocessConfig()
    if isinstance(config, PreprocessConfig):
        return config
    if isinstance(config, ModelConfig):
        return config.preprocess
    if hasattr(config, "config") and isinstance(config.config, ModelConfig):  # a model
        return config.config.preprocess
    raise TypeError(f"expected a ModelConfig or PreprocessConfig, got {type(config).__name__}")


def _sniff_refused(head: bytes) -> str | None:
    for magic, name in _REFUSED_MAGIC:
        if head.startswith(magic):
            return name
    return None


def _read_source(source, field: str, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidArgumentError(f"{field}: no such file: {path}", field=field)
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageSizeError(f"{field}: file is {size} bytes; at most {max_bytes} are accepted", field=field)
        data = path.read_bytes()
    else:
        raise InvalidArgumentError(f"{field}: expected image bytes, a path or a uint8 array, "
                                   f"got {type(source).__name__}", field=field)
    if not data:
        raise CorruptImageError(f"{field}: empty image (0 bytes); send JPEG, PNG or WebP bytes", field=field)
    if len(data) > max_bytes:
        raise ImageSizeError(f"{field}: {len(data)} bytes; at most {max_bytes} are accepted", field=field)
    return data


def _to_rgb_array(im: Image.Image, pre: PreprocessConfig, premultiplied: bool = False) -> np.ndarray:
    """Any decoded mode -> uint8 (H, W, 3); ``premultiplied``: ``im`` is "RGBa" (see :func:`_shrink`)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit (or 32-bit) grayscale: scale to 8 bits instead of clipping everything above 255.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    # Transparency is an alpha channel, or a palette index / colour key (PNG tRNS) in P, L, 1 and RGB images.
    if premultiplied:
        return _composite_on_mean(np.asarray(im), pre, premultiplied=True)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or \
        (im.mode in ("P", "L", "1", "RGB") and "transparency" in im.info)
    if has_alpha:
        return _composite_on_mean(np.asarray(im.convert("RGBA")), pre)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _composite_on_mean(rgba: np.ndarray, pre: PreprocessConfig, premultiplied: bool = False) -> np.ndarray:
    """uint8 (H, W, 4) -> uint8 (H, W, 3): alpha-blend onto the mean colour (transparent -> 0 after subtraction).
    ``premultiplied``: the colour channels already carry the alpha factor."""
    rgba = rgba.astype(np.float32)
    alpha = rgba[:, :, 3:4] / 255.0
    mean = np.asarray(pre.mean_rgb(), dtype=np.float32).reshape(1, 1, 3)
    rgb = (rgba[:, :, :3] if premultiplied else rgba[:, :, :3] * alpha) + mean * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding a pixel."""

    width: int
    height: int
    format: str
    frames: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _open(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Open ``data`` with the allowlisted plugins only. This is Pillow's ``Image.open`` without its
    decompression-bomb check: that check warns (on stderr) or fails with Pillow's own limit, while ours, lower,
    is applied right after the header is read, in our words."""
    Image.preinit()   # registers JPEG and PNG (and a few others we never consult) ...
    if any(fmt not in Image.OPEN for fmt in ALLOWED_FORMATS):
        Image.init()  # ... and, once, every plugin, WebP among them
    prefix = data[:16]
    for fmt in ALLOWED_FORMATS:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and not accept(prefix):
            continue
        try:
            return factory(io.BytesIO(data), "")
        except Image.DecompressionBombError:   # some plugins (WebP) check a header's canvas themselves
            raise ImageSizeError(f"{field}: the header claims too many pixels; at most {max_pixels} pixels are "
                                 f"accepted", field=field) from None
        except (SyntaxError, IndexError, TypeError, struct.error, EOFError) as exc:
            raise CorruptImageError(f"{field}: corrupt {fmt} header ({exc})", field=field) from None
        except (OSError, ValueError) as exc:
            raise CorruptImageError(f"{field}: corrupt image header ({exc})", field=field) from None
    refused = _sniff_refused(prefix)
    if refused:
        raise UnsupportedImageFormatError(f"{field}: {refused} images are not accepted; accepted formats: "
                                          f"JPEG, PNG, WebP", field=field)
    raise CorruptImageError(f"{field}: not a decodable JPEG, PNG or WebP image ({len(data)} bytes)", field=field)


def _open_checked(data: bytes, field: str, max_pixels: int, min_side: int, max_frames: int) -> Image.Image:
    """:func:`_open`, then the size and frame limits from the header, before any pixel is decoded."""
    im = _open(data, field, max_pixels)
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise ImageSizeError(f"{field}: {width}x{height} = {width * height} pixels; at most {max_pixels} "
                             f"pixels are accepted", field=field)
    if min(width, height) < min_side:
        im.close()
        raise ImageSizeError(f"{field}: {width}x{height} is too small; each side must be at least "
                             f"{min_side} pixels", field=field)
    frames = getattr(im, "n_frames", 1)
    if frames > max_frames:
        im.close()
        raise ImageSizeError(f"{field}: {frames} frames; at most {max_frames} are accepted (only the "
                             f"first is used)", field=field)
    return im


def read_header(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
                max_frames: int = DEFAULT_MAX_FRAMES, max_bytes: int = DEFAULT_MAX_BYTES,
                field: str = "image") -> ImageHeader:
    """The size, format and frame count of image bytes or a file, checked against the same limits as
    :func:`decode_image`, decoding nothing (what a request's pixel budget is counted from)."""
    if isinstance(source, np.ndarray):
        _array_to_rgb(source[:1, :1], field, 1, max_pixels, PreprocessConfig())   # dtype and layout only
        return ImageHeader(int(source.shape[1]), int(source.shape[0]), "array", 1)
    with _open_checked(_read_source(source, field, max_bytes), field, max_pixels, min_side, max_frames) as im:
        return ImageHeader(im.size[0], im.size[1], im.format, getattr(im, "n_frames", 1))


def decode_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
                 max_frames: int = DEFAULT_MAX_FRAMES, max_bytes: int = DEFAULT_MAX_BYTES,
                 config=None, field: str = "image", working_size: int | None = None,
                 check: Callable[[], None] | None = None) -> np.ndarray:
    """Safely decode image bytes or a file to uint8 RGB (H, W, 3), EXIF orientation applied.

    ``working_size``: the image may come back smaller, its short side still at least ``working_size``:
    a JPEG decodes at 1/2, 1/4 or 1/8 scale (Pillow's draft mode) and other images are reduced by an integer
    factor (box filter, in uint8, alpha premultiplied) right after decoding; images longer than 16:1 are cut to
    their centre 16:1 part first. So a large image never exists as a full-size float array. ``check()``, if
    given, is called between the steps (open, decode, reduce, convert) and may raise to stop the work.
    """
    pre = preprocess_config(config)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, field, min_side, max_pixels, pre)
    check = check or (lambda: None)
    opened = _open_checked(_read_source(source, field, max_bytes), field, max_pixels, min_side, max_frames)
    fmt = opened.format

    def step(work):
        """One decode step; a decoder's failure becomes our error (``check``'s own exceptions pass through)."""
        try:
            return work()
        except Image.DecompressionBombError:
            raise ImageSizeError(f"{field}: too many pixels; at most {max_pixels} pixels are accepted",
                                 field=field) from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
            raise CorruptImageError(f"{field}: truncated or corrupt {fmt} data ({exc})", field=field) from None

    with opened:
        check()
        im = step(lambda: _decoded(opened, working_size))
        check()
        im, premultiplied = step(lambda: _shrink(_centre_of_long(im), working_size))
        check()
        rgb = step(lambda: _to_rgb_array(ImageOps.exif_transpose(im), pre, premultiplied))
    check()
    return rgb


def _decoded(im: Image.Image, working_size: int | None) -> Image.Image:
    """The first frame's pixels (a JPEG at 1/2 .. 1/8 scale when that still covers ``working_size``)."""
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    if working_size and im.format == "JPEG":
        im.draft(im.mode, _at_least(im.size, working_size))
    im.load()
    return im


def _at_least(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """``size`` scaled so that its short side is ``short_side`` (never up)."""
    scale = min(1.0, short_side / min(size))
    return max(1, math.ceil(size[0] * scale)), max(1, math.ceil(size[1] * scale))


def _long_centre(width: int, height: int) -> tuple[int, int, int, int] | None:
    """Only the centre of a very long image reaches the crop: its centre MAX_ASPECT:1 part (left, top, right,
    bottom), so that a thin 40 MP strip (32 x 1,250,000) is neither converted nor resized whole; None for images
    up to 16:1, which are used whole."""
    longest = MAX_ASPECT * min(width, height)
    if max(width, height) <= longest:
        return None
    left, top = max(0, (width - longest) // 2), max(0, (height - longest) // 2)
    return left, top, left + min(width, longest), top + min(height, longest)


def _centre_of_long(im: Image.Image) -> Image.Image:
    box = _long_centre(*im.size)
    return im if box is None else im.crop(box)


def _shrink(im: Image.Image, working_size: int | None) -> tuple[Image.Image, bool]:
    """Reduce by the largest integer factor that keeps the short side >= ``working_size`` (in 8-bit modes;
    palettes and 16-bit greys are converted first, alpha is premultiplied so that averaging is exact).
    Returns the image and whether its alpha is premultiplied ("RGBa")."""
    factor = min(im.size) // working_size if working_size else 1
    if factor < 2:
        return im, False
    if im.mode in ("P", "PA", "1") or "transparency" in im.info:
        im = im.convert("RGBA")
    elif im.mode.startswith("I;16"):
        im = im.convert("I")
    premultiplied = im.mode in ("RGBA", "LA", "La", "RGBa")
    if premultiplied:
        im = im.convert("RGBa") if im.mode != "RGBa" else im
    return im.reduce(factor), premultiplied


def _array_to_rgb(arr: np.ndarray, field: str, min_side: int, max_pixels: int,
                  pre: PreprocessConfig) -> np.ndarray:
    """A uint8 (H, W[, 1|3|4]) array, treated like a decoded image of that mode (RGBA is composited)."""
    if arr.dtype != np.uint8:
        raise InvalidArgumentError(f"{field}: arrays must be uint8 (H, W[, 1|3|4]), got dtype {arr.dtype}",
                                   field=field)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InvalidArgumentError(f"{field}: arrays must be shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); "
                                   f"got {tuple(arr.shape)}", field=field)
    h, w = arr.shape[:2]
    if min(h, w) < min_side or h * w > max_pixels:
        raise ImageSizeError(f"{field}: {w}x{h} is outside the accepted size (sides >= {min_side}, "
                             f"at most {max_pixels} pixels)", field=field)
    if arr.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(arr, 3, axis=2))
    if arr.shape[2] == 4:
        return _composite_on_mean(arr, pre)
    return np.ascontiguousarray(arr)


def resize_and_crop(rgb: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (crop, crop, 3): short side to ``resize`` (bilinear, antialiased), centre crop."""
    h, w = rgb.shape[:2]
    box = _long_centre(w, h)
    if box is not None:
        left, top, right, bottom = box
        rgb = rgb[top:bottom, left:right]
        h, w = rgb.shape[:2]
    if min(h, w) != resize:
        scale = resize / min(h, w)
        w, h = max(resize, round(w * scale)), max(resize, round(h * scale))
        rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
    top, left = (h - crop) // 2, (w - crop) // 2
    return rgb[top:top + crop, left:left + crop]


def to_input(rgb: np.ndarray, config=None) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> the network's input, float32 (3, crop, crop), normalized."""
    pre = preprocess_config(config)
    cropped = resize_and_crop(rgb, pre.resize, pre.crop)
    chw = cropped.transpose(2, 0, 1).astype(np.float32)
    return np.ascontiguousarray(pre.normalize(chw))


def load_image(source: ImageSource, config=None, **limits) -> np.ndarray:
    """bytes | path | uint8 array -> float32 (3, crop, crop), ready for the network.

    ``config`` is a model's ``ModelConfig`` (``model.config``), its ``PreprocessConfig`` or a model.
    ``limits``: ``max_pixels``, ``min_side``, ``max_frames``, ``max_bytes``, ``field`` (name used in errors),
    ``check`` (see :func:`decode_image`). Large images are decoded at a working size of twice the resize
    side (:data:`WORKING_SCALE`), never at full size in floating point.
    """
    pre = preprocess_config(config)
    return to_input(decode_image(source, config=pre, working_size=WORKING_SCALE * pre.resize, **limits), pre)


def load_images(sources: Iterable[ImageSource], config=None, **limits) -> np.ndarray:
    """Batch form of :func:`load_image`: float32 (N, 3, crop, crop). Errors name the failing item's index;
    ``check`` is also called before each image."""
    field = limits.pop("field", "images")
    check = limits.get("check") or (lambda: None)
    arrays = []
    for i, src in enumerate(sources):
        check()
        arrays.append(load_image(src, config, field=f"{field}[{i}]", **limits))
    if not arrays:
        raise InvalidArgumentError(f"{field}: no images given", field=field)
    return np.stack(arrays)


def to_display(x: np.ndarray, config=None) -> np.ndarray:
    """Inverse of :func:`to_input` (up to the resize): float32 (3, H, W) network input -> uint8 (H, W, 3)."""
    pre = preprocess_config(config)
    return np.clip(np.rint(pre.denormalize(x)), 0, 255).astype(np.uint8).transpose(1, 2, 0)


# ---------------------------------------------------------------------------------------------- frames
# Where raw-image annotations (object masks, part boxes) land in the network input after resize_and_crop.
def input_frame(shape: tuple[int, int], config=None) -> tuple[float, float, int, int]:
    """How raw-image pixel coordinates map to network-input coordinates under :func:`resize_and_crop`:
    ``(scale_x, scale_y, left, top)`` with ``x_in = x * scale_x - left``."""
    pre = preprocess_config(config)
    h, w = shape
    sx = sy = 1.0
    if min(h, w) != pre.resize:
        scale = pre.resize / min(h, w)
        nw, nh = max(pre.resize, round(w * scale)), max(pre.resize, round(h * scale))
        sx, sy, w, h = nw / w, nh / h, nw, nh
    return sx, sy, (w - pre.crop) // 2, (h - pre.crop) // 2


def mask_to_input(mask: np.ndarray, config=None) -> np.ndarray:
    """An object mask (bool, raw-image frame) -> bool (crop, crop) in the network input's frame."""
    pre = preprocess_config(config)
    rgb = np.repeat((np.asarray(mask, dtype=np.uint8) * 255)[..., None], 3, axis=2)
    return resize_and_crop(rgb, pre.resize, pre.crop)[..., 0] >= 128


def box_to_input(box, shape: tuple[int, int], config=None) -> tuple[int, int, int, int]:
    """A box ``[x0, y0, x1, y1]`` in the raw image -> the same box in input pixels, clipped to the crop."""
    pre = preprocess_config(config)
    sx, sy, left, top = input_frame(shape, config)
    x0, y0, x1, y1 = box
    clip = lambda v: int(min(pre.crop, max(0, v)))  # noqa: E731
    return (clip(math.floor(x0 * sx - left)), clip(math.floor(y0 * sy - top)),
            clip(math.ceil(x1 * sx - left)), clip(math.ceil(y1 * sy - top)))
