"""The argument checks every layer above shares: integer ranges, a choice from a list, layer names, devices.
Importing it loads neither torch nor the model (the CLI uses it before any work starts).

Each raises :class:`~zfserve.errors.InvalidArgumentError` whose message names the field (or the flag the user
typed, via ``label``), the value given and what is accepted, and whose ``field`` is the parameter's name.
"""

from __future__ import annotations

from typing import Sequence

from .config import is_integer
from .errors import InvalidArgumentError

DEVICE_TYPES = ("cpu", "cuda")


def integer(value, field: str, low: int | None = None, high: int | None = None, *,
            label: str | None = None, what: str = "") -> int:
    """``value`` as an int when it is an integer within ``low..high`` (an end given as None is open).

    ``label`` is how the message names the field (default ``field``; the CLI passes its flag); ``what`` says
    where the bounds come from, e.g. ``"the layer's feature maps"``.
    """
    if is_integer(value) and (low is None or value >= low) and (high is None or value <= high):
        return int(value)
    if low is not None and high is not None:
        accepted = f"{low}..{high}"
    elif low is not None:
        accepted = f">= {low}"
    elif high is not None:
        accepted = f"<= {high}"
    else:
        accepted = "an integer"
    kind = "" if is_integer(value) else " (not an integer)"
    raise InvalidArgumentError(f"{label or field}: {value!r}{kind} out of range; accepted {accepted}"
                               f"{f' ({what})' if what else ''}", field=field)


def choice(value, field: str, accepted: Sequence, *, label: str | None = None):
    """``value`` when it is one of ``accepted``."""
    if value in accepted:
        return value
    raise InvalidArgumentError(f"{label or field}: {value!r} not accepted; accepted: "
                               f"{', '.join(str(a) for a in accepted)}", field=field)


def layer(name, accepted: Sequence[str], field: str = "layer") -> str:
    """A layer name from ``accepted`` (a model's own names: ``model.layer_names``, ``config.spatial_layers``,
    ...)."""
    return choice(name, field, accepted)


def device(name, *, allow_auto: bool = False):
    """A ``torch.device`` for ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (and ``"auto"`` when allowed: CUDA when
    present, else the CPU). CUDA must exist when it is asked for."""
    import torch
    if allow_auto and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accepted = ", ".join(("auto", "cpu", "cuda[:N]") if allow_auto else ("cpu", "cuda[:N]"))
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"device: {name!r} not accepted; accepted: {accepted}", field="device") from None
    if dev.type not in DEVICE_TYPES:
        raise InvalidArgumentError(f"device: {name!r} not accepted; accepted: {accepted}", field="device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device: {name!r} was asked for but no CUDA device is available; use cpu",
                                   field="device")
    return dev
