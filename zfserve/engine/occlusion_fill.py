"""The occluder's fill, shared by the occlusion engines: ``"mean"`` (0 in network-input units, the model's mean
colour), one number or (r, g, b), in input units (normalized as the model's preprocessing does) or 0..255 pixel
units."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError

FILL_UNITS = ("input", "pixel")


def occluder(fill, fill_units: str, preprocess) -> tuple[np.ndarray, np.ndarray]:
    """(the fill values as given, the occluder as a (3, 1, 1) or (3, H, W) float32 array in network-input units);
    ``preprocess``: the model's PreprocessConfig (its normalization turns pixel values into input units)."""
    if fill_units not in FILL_UNITS:
        raise InvalidArgumentError(f"fill_units must be one of {list(FILL_UNITS)}, got {fill_units!r}",
                                   field="fill_units")
    accepted = "'mean', a number or 3 numbers (r, g, b)"
    if isinstance(fill, str):
        if fill != "mean":
            raise InvalidArgumentError(f"fill must be {accepted}, got {fill!r}", field="fill")
        return np.zeros(3), np.zeros((3, 1, 1), np.float32)
    try:
        values = np.asarray(fill, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"fill must be {accepted}, got {fill!r}", field="fill") from None
    if values.size == 1:
        values = np.repeat(values, 3)
    if values.size != 3 or not np.isfinite(values).all():
        raise InvalidArgumentError(f"fill must be {accepted}, got {fill!r}", field="fill")
    if fill_units == "pixel":
        if not ((values >= 0) & (values <= 255)).all():
            raise InvalidArgumentError(f"fill in pixel units must be in 0..255, got {values.tolist()}",
                                       field="fill")
        return values, preprocess.normalize(values.reshape(3, 1, 1)).astype(np.float32)
    limit = preprocess.input_limit()   # a normalized pixel lies within +-limit (255 for raw pixels minus a mean)
    if not (np.abs(values) <= limit).all():
        raise InvalidArgumentError(f"fill in input units must be in -{limit:g}..{limit:g}, got {values.tolist()}",
                                   field="fill")
    return values, values.reshape(3, 1, 1).astype(np.float32)


__all__ = ["FILL_UNITS", "occluder"]
