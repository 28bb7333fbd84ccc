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
    settings, engines = GateSettings(int(window), int(stride)), runtime.occlusion_engines()
    choice = choose(runtime.snapshot, settings, engines, measure_missing=False)
    if choice.mode.precision == "int8" and not _int8_made(runtime.snapshot):
        # Making it takes minutes of calibration: never inside a request. Use what is there meanwhile.
        others = [m for m in choice.measured if m.precision != "int8"]
        fallback = choose(runtime.snapshot, settings, engines, modes=others, measure_missing=False)
        waiting = (f"{choice.mode.name} passed the gate, but the model's int8 graph is not made yet (zfserve export "
                   f"--precision int8)")
        return fallback.mode, waiting if fallback.mode.exact else f"{fallback.reason}; {waiting}"
    return choice.mode, choice.reason


_INT8_MADE: set = set()      # (model source, weights SHA-256) whose int8 graph was found


def _int8_made(snapshot) -> bool:
    """Whether the model's int8 graph exists already (remembered once found)."""
    key = (str(snapshot.source), snapshot.sha256)
    if key not in _INT8_MADE:
        from ..engine.quantize import find_int8
        from ..export import ensure_onnx
        if find_int8(ensure_onnx(snapshot), snapshot.config) is not None:
            _INT8_MADE.add(key)
    return key in _INT8_MADE


__all__ = ["resolve_mode"]
