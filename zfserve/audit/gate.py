"""The occlusion agreement gate: a fast occlusion mode (:mod:`zfserve.engine.occlusion_modes`) becomes an
audit's default only once it has been measured against the exact sweep, as int8 classification must first pass
its accuracy gate.

On held-out images (the synthetic set at seed 4 for models of the synthetic classes, else the folder the model's
int8 graph was calibrated on, less the images calibration used; or ``data``: an ImageFolder or a folder with
``annotations.json``), for the audit's window, stride and pointing tolerance, each candidate
mode's evidence is compared with the exact sweep's, image by image, as the audit computes it
(:mod:`zfserve.paper.localization`):
- location: the centre of the largest drop lies within the tolerance of the exact one;
- pointing-game hit (images with masks): the same hit or miss, and so the same ``evidence_off_object`` flag (the
  audit's other flags come from classification, which no occlusion mode changes);
- the pointing game over all images within ``max_pointing_delta`` points of the exact one.
A mode passes when location, hit and flag agreement are each at least ``min_agreement``. The figures (and the
exact sweep's per-image evidence, so that new candidates need not repeat it) are stored as JSON in
``occlusion-gate.json`` beside the model's ONNX export (the model directory, or the cache for embedded and
read-only models; an embedded model may ship its own, read when none was measured here), keyed by the weights'
SHA-256 and the settings; a mode's figures also record the graph it ran and its runtime (library version, CPU
capabilities) and count only where those are the same.

:func:`choose` returns the fastest mode that passes (candidates in order of their measured seconds per image,
measured until one passes), or exact with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import _checks as checks
from ..engine.occlusion_modes import EXACT_MODE, OcclusionMode
from ..engine.occlusion_plans import Approximation
from ..data import CLASSES
from ..errors import InvalidArgumentError, ZFServeError
from ..paper.localization import distance_to_mask, drop_point
from ..preprocess import mask_to_input, to_input
from .defaults import DEFAULT_GATE_IMAGES, DEFAULT_MIN_AGREEMENT, DEFAULT_TOLERANCE

GATE_FILE = "occlusion-gate.json"
GATE_FORMAT = "2"
GATE_SEED = 4                  # held out: training 1, validation 2, the audit's synthetic images 3, int8's 5
DEFAULT_MAX_POINTING_DELTA = 1.0      # percentage points
PROBE_IMAGES = 4               # images each candidate's speed is first measured on (CPU time: robust to load)
SWEEP_CHUNK = 8                # images per sweep_many call (as the audit batches them)
TIE = 1e-3                     # probability: windows whose drops differ by less are the same evidence


@dataclass(frozen=True)
class GateSettings:
    """What is measured (window, stride, tolerance, data, images) and what passes (the two thresholds)."""

    window: int
    stride: int
    tolerance: int = DEFAULT_TOLERANCE
    data: str = "auto"
    images: int = DEFAULT_GATE_IMAGES
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    max_pointing_delta: float = DEFAULT_MAX_POINTING_DELTA

    def __post_init__(self):
        checks.integer(self.window, "window", 1, 224, label="--occlusion WINDOW")
        checks.integer(self.stride, "stride", 1, self.window, label="--occlusion STRIDE")
        checks.integer(self.tolerance, "tolerance", 0, 224, label="--tolerance")
        checks.integer(self.images, "gate_images", 1, 100_000, label="--gate-images")
        if not 0.0 <= float(self.min_agreement) <= 1.0:
            raise InvalidArgumentError(f"--gate-min-agreement: {self.min_agreement}; accepted 0..1",
                                       field="min_agreement")
        if not 0.0 <= float(self.max_pointing_delta) <= 100.0:
            raise InvalidArgumentError(f"max_pointing_delta: {self.max_pointing_delta}; accepted 0..100 points",
                                       field="max_pointing_delta")

    def measured_on(self) -> dict:
        """The key of the stored figures (the thresholds are applied when deciding, not when measuring)."""
        return {"window": int(self.window), "stride": int(self.stride), "tolerance": int(self.tolerance),
                "data": self.data, "images": int(self.images), "fill": "mean"}


@dataclass
class GateChoice:
    """What :func:`choose` decided: the mode, why (one line), its figures (None for exact)."""

    mode: OcclusionMode
    reason: str
    figures: dict | None = None
    table: dict = field(default_factory=dict)       # every measured mode's figures, by name
    measured: list = field(default_factory=list)    # the modes measured on this runtime (chosen among)

    @property
    def name(self) -> str:
        return self.mode.name

    @property
    def note(self) -> str:
        """The mode and why, as the audit prints it."""
        return f"{self.mode.name} ({self.reason})"

    def to_json(self) -> dict:
        return {"mode": self.mode.name, "reason": self.reason, "figures": self.figures, "measured": self.table}


# The approximations a candidate may use: each at its defaults and at its cheapest sensible settings (one
# neighbourhood refined; a lattice of every 4th position, for fine grids; refining only next to the largest drop
# found so far).
APPROXIMATION_CANDIDATES = (Approximation(), Approximation("drilldown"), Approximation("drilldown", refine=1),
                            Approximation("drilldown", coarse=4), Approximation("early-stop"),
                            Approximation("early-stop", margin=0.0))


def candidates(precisions=("int8", "bf16", "fp32")) -> list[OcclusionMode]:
    """The fast modes this machine can run: int8 and bf16 on OpenVINO (when installed; bf16 where the CPU has
    it), int8 on ONNX Runtime, and fp32 on ONNX Runtime with an approximation; each with every position and
    with each of :data:`APPROXIMATION_CANDIDATES`."""
    runtimes = []
    if _openvino_capabilities() is not None:
        caps = _openvino_capabilities()
        runtimes += [("openvino", p) for p in ("int8", "bf16") if p in precisions and (p != "bf16" or "BF16" in caps)]
    runtimes += [("onnxruntime", p) for p in ("int8", "fp32") if p in precisions]
    # fp32 with every position on ONNX Runtime is brute force: exact, but slower than the exact mode.
    return [OcclusionMode(engine, precision, a) for engine, precision in runtimes for a in APPROXIMATION_CANDIDATES
            if not (engine == "onnxruntime" and precision == "fp32" and a.exact)]


# ---------------------------------------------------------------------------------------------- storage
_PATHS: dict[tuple[str, str], Path] = {}


def gate_path(snapshot) -> Path:
    """Where a model's gate figures live: beside its ONNX export (found once per process and weights: finding
    the export reads its metadata)."""
    key = (str(snapshot.source), snapshot.sha256)
    if key not in _PATHS:
        from ..export import ensure_onnx
        _PATHS[key] = ensure_onnx(snapshot).parent / GATE_FILE
    return _PATHS[key]


def _read(path: Path) -> list[dict]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return doc.get("entries", []) if doc.get("format") == GATE_FORMAT else []


def _entry(entries: list[dict], sha256: str, measured_on: dict) -> dict | None:
    return next((e for e in entries if e["weights_sha256"] == sha256 and e["measured_on"] == measured_on), None)


def _write(path: Path, entries: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": GATE_FORMAT, "entries": entries}, separators=(",", ":")) + "\n")
    tmp.replace(path)


def stored(snapshot, settings: GateSettings) -> dict | None:
    """The stored figures of this model and settings (None: never measured): those measured here, else those
    shipped in the model's own directory (an embedded model's, measured when it was packaged)."""
    paths = [gate_path(snapshot)]
    if snapshot.directory is not None and (snapshot.directory / GATE_FILE).resolve() != paths[0].resolve():
        paths.append(snapshot.directory / GATE_FILE)
    for path in paths:
        entry = _entry(_read(path), snapshot.sha256, settings.measured_on())
        if entry is not None:
            return entry
    return None


def _store(snapshot, settings: GateSettings, entry: dict) -> None:
    path = gate_path(snapshot)
    entries = [e for e in _read(path) if not (e["weights_sha256"] == snapshot.sha256
                                              and e["measured_on"] == settings.measured_on())]
    _write(path, entries + [entry])


def _openvino_capabilities() -> str | None:
    try:
        from ..engine.backends import openvino_core
        return " ".join(openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except (ImportError, ZFServeError):
        return None


def runtime_of(mode: OcclusionMode) -> dict:
    """The runtime a mode's figures hold for: the library and version, and OpenVINO's CPU capabilities."""
    if mode.engine == "openvino":
        import openvino
        return {"library": f"openvino {openvino.__version__}", "cpu": _openvino_capabilities()}
    import onnxruntime
    return {"library": f"onnxruntime {onnxruntime.__version__}", "cpu": ""}


def graph_sha256(engine) -> str:
    """SHA-256 of the ONNX file a batched engine's classifier runs."""
    return hashlib.sha256(Path(engine.classifier.onnx_path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- data
@dataclass
class _Images:
    inputs: np.ndarray            # (N, 3, S, S)
    targets: list[int | None]     # the label when the model's classes are the data's, else None (top-1)
    masks: list[np.ndarray | None]   # in the input frame
    description: str


def held_out(snapshot, settings: GateSettings) -> _Images:
    """The gate's images: ``auto`` (the synthetic set at seed 4 for models of the synthetic classes, else the
    folder the model's int8 graph was calibrated on, without the images calibration used), ``synthetic`` /
    ``synthetic:SEED``, or a folder (ImageFolder, or annotations.json with masks)."""
    from ..engine.quantize import training_seeds
    from ..paper.dataset import AnalysisData
    config = snapshot.config
    data, skip = settings.data, 0
    if data == "auto":
        calibrated = None if list(config.class_names) == list(CLASSES) else _calibration_folder(snapshot)
        data, skip = calibrated or ("synthetic", 0)
    if data == "synthetic" or data.startswith("synthetic:"):
        seed = GATE_SEED if data == "synthetic" else checks.integer(
            int(data.partition(":")[2]) if data.partition(":")[2].isdigit() else -1, "gate_data", 0,
            label="--gate-data synthetic:SEED")
        if seed in training_seeds(config):
            raise InvalidArgumentError(f"--gate-data: synthetic seed {seed} is the model's training set; use a held-out "
                                       f"seed", field="gate_data")
        source = AnalysisData("synthetic", seed=seed, n=settings.images)
    elif Path(data).is_dir():
        source = AnalysisData(data, n=1 << 30)
    else:
        raise InvalidArgumentError(f"--gate-data: {data!r}; accepted: auto, synthetic, synthetic:SEED or a folder of "
                                   f"held-out images (ImageFolder, or annotations.json with masks)", field="gate_data")
    match = list(config.class_names) == list(source.classes)
    if not match and source.source == "synthetic":
        raise InvalidArgumentError("--gate-data: the model's classes are not the synthetic set's and its int8 graph "
                                   "was not calibrated on a folder; give a folder of held-out images of its own "
                                   "classes (--gate-data DIR)", field="gate_data")
    indices = _spread(len(source), settings.images, skip)
    items = [source.item(int(i)) for i in indices]
    what = source.describe() if source.source == "synthetic" else \
        f"{data}, {len(items)} of {len(source)} images" + (f" (not the {skip} int8 calibrated on)" if skip else "")
    return _Images(np.stack([to_input(it.image, config) for it in items]),
                   [int(it.label) if match else None for it in items],
                   [mask_to_input(it.mask, config) if it.mask is not None else None for it in items], what)


def _calibration_folder(snapshot) -> tuple[str, int] | None:
    """(the folder the model's int8 graph was calibrated on, how many of its images calibration took), if any."""
    from ..engine.quantize import INT8_FILE, META_CALIBRATION
    from ..export import read_metadata
    path = gate_path(snapshot).parent / INT8_FILE
    record = json.loads(read_metadata(path).get(META_CALIBRATION, "{}")) if path.is_file() else {}
    source = record.get("source")
    return (source, int(record.get("images", 0))) if source and Path(source).is_dir() else None


def _spread(count: int, wanted: int, skip: int) -> np.ndarray:
    """``wanted`` indices spread evenly over ``0..count-1``, leaving out the ``skip`` that int8 calibration took
    (spread the same way, :func:`zfserve.engine.quantize.held_out_data`)."""
    if count <= wanted and not skip:
        return np.arange(count)
    taken = np.unique(np.linspace(0, count - 1, skip).round().astype(int)) if skip else np.empty(0, int)
    rest = np.setdiff1d(np.arange(count), taken)
    if not len(rest):
        raise InvalidArgumentError(f"--gate-data: every one of the {count} images was used for int8 calibration; "
                                   f"give a folder of other held-out images", field="gate_data")
    return rest[np.unique(np.linspace(0, len(rest) - 1, min(wanted, len(rest))).round().astype(int))]


# ---------------------------------------------------------------------------------------------- measuring
def _evidence(results, images: _Images, lo: int, tolerance: int, size: int) -> list[dict]:
    """Per image: the target, the largest drop's centre (x, y), its position (flat index), the hit, the drop, and
    the positions tied with it (their drop within :data:`TIE` of the largest)."""
    out = []
    for i, r in enumerate(results, lo):
        cx, cy = drop_point(r, size)
        mask = images.masks[i]
        hit = None if mask is None else bool(distance_to_mask(mask, cx, cy) <= tolerance)
        measured = np.where(r.evaluated, r.probability, np.inf) if r.evaluated is not None else r.probability
        at = int(np.argmin(measured))
        ties = np.flatnonzero(measured <= measured.flat[at] + TIE)
        out.append({"target": int(r.target), "x": float(cx), "y": float(cy), "at": at, "hit": hit,
                    "drop": float(r.base_probability - measured.flat[at]), "ties": [int(t) for t in ties]})
    return out


def _sweep_all(engines, mode: OcclusionMode, images: _Images, settings: GateSettings, count: int):
    """(per-image evidence, seconds per image: wall and CPU, forwards per image) of ``mode`` on the first
    ``count`` images."""
    evidence, forwards, t0, c0 = [], 0, time.perf_counter(), time.process_time()
    for lo in range(0, count, SWEEP_CHUNK):
        hi = min(count, lo + SWEEP_CHUNK)
        results = engines.sweep_many(list(images.inputs[lo:hi]), images.targets[lo:hi], mode,
                                     window=settings.window, stride=settings.stride,
                                     outputs=("probability",))
        evidence += _evidence(results, images, lo, settings.tolerance, images.inputs.shape[-1])
        forwards += sum(r.timings.get("forwards", len(r.starts) ** 2 + 1) for r in results)
    seconds = {"wall": (time.perf_counter() - t0) / count, "cpu": (time.process_time() - c0) / count}
    return evidence, seconds, forwards / count


def compare(exact: list[dict], fast: list[dict], tolerance: int) -> dict:
    """Agreement figures of ``fast`` against ``exact`` evidence (same images, same order). The location agrees
    when the two centres lie within ``tolerance`` or the fast mode's window is one whose exact drop ties with
    the largest (within :data:`TIE`: which of two such windows wins is decided by rounding, and even two fp32
    engines may differ there); ``strict_location_agreement`` counts distance alone."""
    strict = [np.hypot(e["x"] - f["x"], e["y"] - f["y"]) <= tolerance for e, f in zip(exact, fast)]
    near = [ok or f["at"] in e["ties"] for ok, e, f in zip(strict, exact, fast)]
    masked = [(e["hit"], f["hit"]) for e, f in zip(exact, fast) if e["hit"] is not None]
    same_hit = [a == b for a, b in masked]
    return {
        "images": len(exact), "with_masks": len(masked),
        "location_agreement": float(np.mean(near)) if near else None,
        "strict_location_agreement": float(np.mean(strict)) if strict else None,
        "hit_agreement": float(np.mean(same_hit)) if masked else None,
        "flag_agreement": {"evidence_off_object": float(np.mean(same_hit)) if masked else None},
        "pointing_game": {"exact": 100.0 * float(np.mean([a for a, _ in masked])) if masked else None,
                          "mode": 100.0 * float(np.mean([b for _, b in masked])) if masked else None},
        "mean_abs_drop_difference": float(np.mean([abs(e["drop"] - f["drop"]) for e, f in zip(exact, fast)])),
        "disagreeing_images": [i for i, ok in enumerate(near) if not ok][:20],
    }


def verdict(figures: dict, settings: GateSettings) -> list[str]:
    """Why ``figures`` fail the gate ([] when they pass)."""
    reasons = []
    need = settings.min_agreement
    for name, value in (("location", figures["location_agreement"]), ("pointing hit", figures["hit_agreement"]),
                        *((f"flag {k}", v) for k, v in figures["flag_agreement"].items())):
        if value is not None and value < need:
            reasons.append(f"{name} agreement {value:.1%} < {need:.0%}")
    pg = figures["pointing_game"]
    if pg["exact"] is not None and abs(pg["mode"] - pg["exact"]) > settings.max_pointing_delta:
        reasons.append(f"pointing game {pg['mode']:.1f}% vs exact {pg['exact']:.1f}% (more than "
                       f"{settings.max_pointing_delta:g} points apart)")
    return reasons


def _log(log, text: str) -> None:
    if log is not None:
        log(text)


def measure(snapshot, settings: GateSettings, engines, modes: list[OcclusionMode], *, every: bool = False,
            log=None) -> dict:
    """Measure ``modes`` against exact (reusing what is stored) and store the figures; without ``every``, stop
    at the first mode (fastest first) that passes. Returns the stored entry."""
    entry = stored(snapshot, settings) or {"weights_sha256": snapshot.sha256, "model": snapshot.name,
                                          "measured_on": settings.measured_on(), "modes": {}}
    images = None
    if "exact" not in entry:
        images = held_out(snapshot, settings)
        _log(log, f"gate: exact occlusion on {images.description} (window {settings.window}, stride "
                  f"{settings.stride}; once per model and settings)")
        evidence, seconds, _ = _sweep_all(engines, EXACT_MODE, images, settings, len(images.inputs))
        entry["exact"] = {"evidence": evidence, "seconds_per_image": seconds["wall"],
                          "cpu_seconds_per_image": seconds["cpu"], "data": images.description}
        _store(snapshot, settings, entry)
    todo = [m for m in modes if not _current(entry["modes"].get(m.name), m)]
    if not todo:
        return entry
    images = images or held_out(snapshot, settings)
    probes = entry.setdefault("probes", {})      # CPU seconds per image on the first few images: the order
    for mode in todo:
        if not _current(probes.get(mode.name), mode):
            _sweep_all(engines, mode, images, settings, 1)          # builds and warms the engine
            cpu = _sweep_all(engines, mode, images, settings, min(PROBE_IMAGES, len(images.inputs)))[1]["cpu"]
            probes[mode.name] = {"runtime": runtime_of(mode), "cpu_seconds_per_image": cpu}
            _store(snapshot, settings, entry)
    best = min((r["figures"]["cpu_seconds_per_image"] for m in modes if _current(r := entry["modes"].get(m.name), m)
                and not verdict(r["figures"], settings)), default=float("inf"))
    for mode in sorted(todo, key=lambda m: probes[m.name]["cpu_seconds_per_image"]):
        if not every and probes[mode.name]["cpu_seconds_per_image"] >= best:
            break                          # slower than a mode that passed already: it could not be chosen
        evidence, seconds, forwards = _sweep_all(engines, mode, images, settings, len(images.inputs))
        figures = compare(entry["exact"]["evidence"], evidence, settings.tolerance)
        figures.update(seconds_per_image=seconds["wall"], cpu_seconds_per_image=seconds["cpu"],
                       forwards_per_image=forwards,
                       speedup_vs_exact=entry["exact"]["cpu_seconds_per_image"] / seconds["cpu"])
        engine = engines.runtime_engine(mode.engine, mode.precision)
        entry["modes"][mode.name] = {"mode": mode.to_json(), "runtime": runtime_of(mode),
                                     "graph_sha256": graph_sha256(engine), "figures": figures}
        _store(snapshot, settings, entry)
        reasons = verdict(figures, settings)
        _log(log, f"gate: {mode.name}: {'passed' if not reasons else 'refused: ' + '; '.join(reasons)} "
                  f"({_summary(figures)})")
        if not reasons:
            best = min(best, seconds["cpu"])
            if not every:
                break
    return entry


def _current(record: dict | None, mode: OcclusionMode) -> bool:
    return record is not None and record["runtime"] == runtime_of(mode)


def _summary(f: dict) -> str:
    parts = [f"location {f['location_agreement']:.1%}"]
    if f["hit_agreement"] is not None:
        pg = f["pointing_game"]
        parts += [f"hit {f['hit_agreement']:.1%}", f"pointing game {pg['mode']:.1f}% vs {pg['exact']:.1f}%"]
    parts.append(f"{f['cpu_seconds_per_image'] * 1e3:.0f} CPU-ms/image, {f['speedup_vs_exact']:.1f}x exact, "
                 f"{f['images']} images")
    return ", ".join(parts)


def choose(snapshot, settings: GateSettings, engines, *, modes: list[OcclusionMode] | None = None,
           measure_missing: bool = True, log=None) -> GateChoice:
    """The fastest mode of ``modes`` that passes the gate for ``settings``, measuring what is missing when
    ``measure_missing``; else exact, with the reason. ``modes`` default: :func:`candidates`, and when only
    looking up, every mode stored for these settings too."""
    if modes is None:
        modes = candidates()
        if not measure_missing:
            measured = stored(snapshot, settings)
            modes += [m for m in (OcclusionMode.from_json(r["mode"]) for r in (measured or {}).get("modes", {}).values())
                      if m not in modes]
    try:
        entry = measure(snapshot, settings, engines, modes, log=log) if measure_missing else \
            stored(snapshot, settings)
    except InvalidArgumentError as exc:    # no held-out images for this model: exact, saying why
        return GateChoice(EXACT_MODE, f"no fast mode: {exc}")
    if entry is None:
        return GateChoice(EXACT_MODE, f"no gate measured for window {settings.window}, stride {settings.stride}: "
                                      f"zfserve occlusion-gate")
    table = {name: r["figures"] for name, r in entry["modes"].items()}
    measured = [m for m in modes if _current(entry["modes"].get(m.name), m)]
    passing = [m for m in measured if not verdict(entry["modes"][m.name]["figures"], settings)]
    if not passing:
        refused = "; ".join(f"{m.name}: {', '.join(verdict(entry['modes'][m.name]['figures'], settings))}"
                            for m in measured)
        return GateChoice(EXACT_MODE, f"fallback: no fast mode passed the gate{': ' + refused if refused else ''}",
                          None, table, measured)
    mode = min(passing, key=lambda m: entry["modes"][m.name]["figures"]["cpu_seconds_per_image"])
    figures = entry["modes"][mode.name]["figures"]
    return GateChoice(mode, f"gate passed: {_summary(figures)}", figures, table, measured)


__all__ = ["DEFAULT_GATE_IMAGES", "DEFAULT_MAX_POINTING_DELTA", "DEFAULT_MIN_AGREEMENT", "GATE_FILE", "GateChoice",
           "GateSettings", "candidates", "choose", "compare", "gate_path", "held_out", "measure", "stored", "verdict"]
