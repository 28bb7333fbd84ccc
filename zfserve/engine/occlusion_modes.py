"""Occlusion modes: which engine, precision and approximation draw a sweep, named as classification names its
engines (``--engine onnxruntime|openvino``, ``--precision fp32|int8|bf16``), and one place that builds and runs
them for a model.

- ``exact`` (engine ``incremental``): fp32 with every position, on the incremental engine (:mod:`.occlusion`: per
  window only the region of conv1..conv5 the occluder can change is recomputed; ONNX Runtime stages on CPUs,
  PyTorch on CUDA). Maps agree with occlude-and-forward to float rounding. The default wherever a caller asks
  for nothing else. It takes no approximation: its stored per-layer outputs are never combined with drill-down.
- ``ENGINE-PRECISION[+APPROXIMATION]``, e.g. ``openvino-int8``, ``onnxruntime-fp32+drilldown(coarse 2, refine 3)``:
  forward passes of occluded copies, batched, on that classification engine (:mod:`.occlusion_runtime`; on ONNX
  Runtime's CPU sessions only the part of the graph a window can change, :mod:`.occlusion_split`), every position
  or an approximation (:mod:`.occlusion_plans`). ``onnxruntime-fp32`` with every position equals brute force:
  exact too, but slower than the incremental engine on the layered models it knows. An ONNX model (an opaque
  graph, no layers to recompute) runs ``exact`` as this sweep.

Every :class:`~.results.OcclusionResult` says which engine, precision and mode drew it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..config import ENGINES, PRECISIONS
from ..errors import InvalidArgumentError
from .backends import check_combination
from .occlusion_plans import APPROXIMATIONS, EXACT, Approximation
from .occlusion_runtime import RuntimeOcclusionEngine, SweepStopped

EXACT_NAME = "exact"
INCREMENTAL = "incremental"


@dataclass(frozen=True)
class OcclusionMode:
    """An engine (``incremental`` or a classification engine), a precision and an approximation; the defaults are
    the exact mode."""

    engine: str = INCREMENTAL
    precision: str = "fp32"
    approximation: Approximation = field(default=EXACT)

    def __post_init__(self):
        if self.engine == INCREMENTAL:
            if self.precision != "fp32" or not self.approximation.exact:
                raise InvalidArgumentError("the incremental engine is exact: fp32, every position (approximations "
                                           "and other precisions run on --engine onnxruntime or openvino)",
                                           field="precision" if self.precision != "fp32" else "approximation")
            return
        if self.engine not in ENGINES:
            raise InvalidArgumentError(f"engine: {self.engine!r} not accepted; accepted: {', '.join(ENGINES)}",
                                       field="engine")
        if self.precision not in PRECISIONS:
            raise InvalidArgumentError(f"precision: {self.precision!r} not accepted; accepted: "
                                       f"{', '.join(PRECISIONS)}", field="precision")
        check_combination(self.engine, self.precision, "cpu")

    @property
    def exact(self) -> bool:
        """Whether it is the exact mode (the incremental engine)."""
        return self.engine == INCREMENTAL

    @property
    def name(self) -> str:
        if self.exact:
            return EXACT_NAME
        runtime = f"{self.engine}-{self.precision}"
        return runtime if self.approximation.exact else f"{runtime}+{self.approximation.name}"

    def to_json(self) -> dict:
        a = self.approximation
        return {"name": self.name, "engine": self.engine, "precision": self.precision, "approximation": a.kind,
                "coarse": a.coarse, "refine": a.refine, "margin": a.margin}

    @classmethod
    def from_json(cls, doc: dict) -> "OcclusionMode":
        return cls(doc["engine"], doc["precision"], Approximation(doc["approximation"], int(doc["coarse"]),
                                                                  int(doc["refine"]), float(doc["margin"])))


EXACT_MODE = OcclusionMode()
# An ONNX model's exact mode: every position, full forward passes on ONNX Runtime fp32 (brute force).
BRUTE_FORCE_KEY = ("onnxruntime", "fp32")
BRUTE_FORCE = OcclusionMode(*BRUTE_FORCE_KEY)


def mode_from(engine: str | None = None, precision: str | None = None, approximation: str | None = None, *,
              coarse: int | None = None, refine: int | None = None, margin: float | None = None,
              defaults: tuple[str | None, str | None] = (None, None)) -> OcclusionMode:
    """The mode a caller asked for by name (CLI flags, request fields). Nothing asked: exact. A fast mode's engine
    and precision default to ``defaults`` (the model's classification settings, config.json), else ONNX Runtime
    fp32."""
    kind = approximation or "none"
    if kind not in APPROXIMATIONS:
        raise InvalidArgumentError(f"approximation: {kind!r} not accepted; accepted: {', '.join(APPROXIMATIONS)}",
                                   field="approximation")
    knobs = {k: v for k, v in (("coarse", coarse), ("refine", refine), ("margin", margin)) if v is not None}
    if engine is None and precision is None and kind == "none":
        if knobs:
            raise InvalidArgumentError(f"{', '.join(knobs)}: knobs of an approximation; give --approximation too",
                                       field=next(iter(knobs)))
        return EXACT_MODE
    return OcclusionMode(engine or defaults[0] or "onnxruntime", precision or defaults[1] or "fp32",
                         Approximation(kind, **knobs))


class OcclusionEngines:
    """The occlusion engines of one model snapshot, each built on first use: the incremental engine for exact
    sweeps and one batched engine per (engine, precision). ``classifiers``: already-built classifiers to reuse
    (a server's), by (engine, precision). ``threads``: for the batched engines' classifiers (default: all
    cores). ``batch_size``: positions per batch (the engines' defaults when None). Thread-safe."""

    def __init__(self, snapshot, *, device: str = "cpu", threads: int | None = None, batch_size: int | None = None,
                 classifiers: dict | None = None, torch_model=None):
        self.snapshot = snapshot
        self.device = device
        self.threads = threads
        self.batch_size = batch_size
        self._classifiers = dict(classifiers or {})
        self._torch_model = torch_model            # a callable giving the PyTorch model (a server's, shared)
        self._exact = None
        self._runtime: dict[tuple[str, str], RuntimeOcclusionEngine] = {}
        self._lock = threading.Lock()

    @property
    def layered(self) -> bool:
        """Whether the model's layers are known; an ONNX model's exact sweep runs every position on ONNX Runtime
        fp32 (the graph split at its spatially local beginning where it has one, checked against full passes:
        equal to occlude-and-forward to float rounding)."""
        return self.snapshot.onnx_bytes is None

    def exact_engine(self):
        with self._lock:
            if self._exact is None:
                from .occlusion import OcclusionEngine
                model = self._torch_model() if self._torch_model else self.snapshot.model(self.device)
                self._exact = OcclusionEngine(model, device=self.device, batch_size=self.batch_size,
                                              workers=self.threads)
            return self._exact

    def runtime_engine(self, engine: str, precision: str) -> RuntimeOcclusionEngine:
        """The batched engine of (engine, precision): on CPUs one single-threaded forward pass in flight per
        thread (``threads``), on a reused classifier as many as its threads leave room for."""
        key = (engine, precision)
        with self._lock:
            if key not in self._runtime:
                from .classifier import Classifier, available_threads
                threads = self.threads or available_threads()
                on_cpu = self.device == "cpu" or engine == "openvino"
                classifier = self._classifiers.get(key)
                if classifier is None:
                    classifier = Classifier(self.snapshot, engine=engine, precision=precision,
                                            threads=1 if on_cpu else threads, streams=threads if on_cpu else 1,
                                            device=self.device if engine == "onnxruntime" else "cpu",
                                            max_batch_size=max(64, self.batch_size or 0))
                workers = max(1, threads // classifier.threads) if on_cpu else 1
                self._runtime[key] = RuntimeOcclusionEngine(classifier, batch_size=self.batch_size, workers=workers)
            return self._runtime[key]

    def warm(self, mode: OcclusionMode) -> None:
        """Build ``mode``'s engine and run it once (graph compilation, first-run allocations), so that the cost
        falls here rather than in the first sweep."""
        if mode.exact and self.layered:
            self.exact_engine()
            return
        mode = BRUTE_FORCE if mode.exact else mode
        engine = self.runtime_engine(mode.engine, mode.precision)
        engine.classifier.probabilities(np.zeros((1, 3, engine.size, engine.size), np.float32))

    def sweep(self, image, mode: OcclusionMode = EXACT_MODE, *, deadline: float | None = None, cancel=None,
              progress=None, check=None, **kwargs):
        """One sweep in ``mode`` (keyword arguments as the engines' ``sweep``); the result names its mode.
        ``check()``, which stops the sweep by raising, runs between the exact engine's stages (the batched engines
        stop at their progress reports, ``deadline`` and ``cancel``)."""
        if mode.exact and self.layered:
            result = self.exact_engine().sweep(image, progress=_checked(progress, deadline, cancel), check=check,
                                               **kwargs)
            result.mode = EXACT_NAME
            return result
        kwargs = self._runtime_arguments(kwargs)
        result = self.runtime_engine(*(BRUTE_FORCE_KEY if mode.exact else (mode.engine, mode.precision))).sweep(
            image, approximation=mode.approximation, progress=progress, deadline=deadline, cancel=cancel, **kwargs)
        if mode.exact:
            result.mode = EXACT_NAME
        return result

    def _runtime_arguments(self, kwargs: dict) -> dict:
        """The batched engines' arguments: the activity map's settings, at their defaults, mean nothing there; an
        ONNX model, which has no layer whose activity could be mapped, refuses others naming its kind."""
        kwargs = dict(kwargs)
        if not self.layered:
            from ..capabilities import require
            outputs = kwargs.get("outputs", ())
            outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs or ())
            if "activity" in outputs or kwargs.get("layer") not in (None, "") or kwargs.get("channel"):
                require(self.snapshot.config, "incremental_occlusion", "the activity map of a layer")
        for name in ("layer", "channel"):
            if name in kwargs and kwargs[name] in (None, "", "conv5"):
                kwargs.pop(name)
        return kwargs

    def sweep_many(self, images, targets, mode: OcclusionMode = EXACT_MODE, **kwargs) -> list:
        """Several images in ``mode``: batched engines share their forward batches across the images."""
        if mode.exact and self.layered:
            return [self.sweep(image, mode, target=target, **kwargs) for image, target in zip(images, targets)]
        if mode.exact:
            results = self.runtime_engine(*BRUTE_FORCE_KEY).sweep_many(images, targets,
                                                                       **self._runtime_arguments(kwargs))
            for result in results:
                result.mode = EXACT_NAME
            return results
        return self.runtime_engine(mode.engine, mode.precision).sweep_many(
            images, targets, approximation=mode.approximation, **self._runtime_arguments(kwargs))


def _checked(progress, deadline: float | None, cancel):
    """The exact engine's progress callback, also stopping it at ``deadline`` or on ``cancel``."""
    if deadline is None and cancel is None:
        return progress

    def report(done: int, total: int) -> None:
        if cancel is not None and cancel.is_set():
            raise SweepStopped("cancelled")
        if deadline is not None and time.monotonic() >= deadline:
            raise SweepStopped("deadline")
        if progress is not None:
            progress(done, total)
    return report


__all__ = ["EXACT_MODE", "EXACT_NAME", "INCREMENTAL", "OcclusionEngines", "OcclusionMode", "mode_from"]
