"""Typed errors. Every rejection of user input raises one of these with a message that says what was wrong
and what is accepted; the CLI prints it on one line (exit 2) and the server maps it to a gRPC status."""

from __future__ import annotations


class ZFServeError(Exception):
    """Base class of every error zfserve raises on purpose. ``field`` names the offending input, if any."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class InvalidArgumentError(ZFServeError, ValueError):
    """A parameter outside its accepted range (window, stride, layer, unit, top-k, shape, dtype...)."""


class NotFoundError(ZFServeError, LookupError):
    """An unknown model, layer or file."""


class ImageError(InvalidArgumentError):
    """An image that cannot be accepted. Subclasses say why."""


class UnsupportedImageFormatError(ImageError):
    """Not one of the allowlisted formats (JPEG, PNG, WebP)."""


class CorruptImageError(ImageError):
    """Empty, truncated or undecodable image bytes."""


class ImageSizeError(ImageError):
    """Too many pixels, too many frames, or smaller than the minimum side."""


class ModelLoadError(ZFServeError):
    """A model directory that cannot be loaded: missing or corrupt file, wrong tensor, unknown config key."""


class ModelKindError(ZFServeError):
    """A capability this kind of model does not have (deconv of an ONNX graph, which has no layers to project
    through): a precondition of the model, not a bad argument (gRPC FAILED_PRECONDITION, HTTP 409, CLI exit 2)."""
