"""Which occlusion mode a sweep request runs in: the one it names (exact when it names none), or with ``gated``
the fastest mode that passed the model's stored agreement gate for its window and stride (:mod:`zfserve.audit.
gate`; the server never measures one itself: ``zfserve occlusion-gate`` does)."""

from __future__ import annotations

from ..config import is_integer


def resolve_mode(runtime, asked: dict, gated: bool, window, stride):
    """(the :class:`~zfserve.engine.occlusion_modes.OcclusionMode`, why: the gate's verdict with ``gated``, else
    ""). Imports its engines here: the server starts without torch."""
    from ..audit.gate import GateSettings, choose
    from ..engine.occlusion_modes import EXACT_MODE, mode_from
    if not gated:
        return mode_from(**asked, defaults=(runtime.engine, runtime.precision)), ""
    if not (is_integer(window) and is_integer(stride) and 1 <= stride <= window <= runtime.input_size):
        return EXACT_MODE, ""          # the engine refuses these settings with its own message
    choice = choose(runtime.snapshot, GateSettings(int(window), int(stride)), runtime.occlusion_engines(),
                    measure_missing=False)
    return choice.mode, choice.reason


__all__ = ["resolve_mode"]
