"""Occlusion by full forward passes of occluded copies, batched, on any classification engine: ONNX Runtime
fp32 / int8 and OpenVINO fp32 / bf16 / int8 (whatever a :class:`~zfserve.engine.classifier.Classifier` runs).

It needs only what every image classifier has: a graph from a preprocessed (N, 3, S, S) float32 batch to class
probabilities, and the model's preprocessing (its mean, for fills in pixel units). Nothing here knows the
layers, so any such graph can be swept. Each position is one occluded copy of the image (the window filled,
Captum's rule for windows cut at the border); copies of one round of positions, of one or several images, run
in batches of ``batch_size``. On ONNX Runtime's CPU sessions the graph is split where it can be
(:mod:`.occlusion_split`): its spatially local beginning runs per copy only on the crop the window changes, the
rest on the clean image's tensor with that part pasted in, which gives the same probabilities with fewer
multiply-adds (checked against full passes before it is used; a graph it does not fit runs full passes). On ONNX Runtime fp32 the maps are those of occlude-and-forward (brute force) to
float rounding; int8 and bf16 are as close as their classification is (README "Precision"), and an
approximation (:mod:`.occlusion_plans`) evaluates only some positions. The agreement gate
(:mod:`zfserve.audit.gate`) measures both against the exact sweep before an audit uses them by default.

    engine = RuntimeOcclusionEngine(Classifier("zfnet-demo", engine="openvino", precision="int8"))
    result = engine.sweep(x, window=48, stride=32, approximation=Approximation("drilldown"))
    results = engine.sweep_many([x1, x2], targets=[None, 3], window=48, stride=32)   # batches shared

A sweep stops between batches when ``cancel`` (a :class:`threading.Event`) is set or ``deadline`` (a
``time.monotonic()`` value) has passed, raising :class:`SweepStopped`; ``progress(done, total)`` is called after
every batch (and may raise to stop it, as the server's does).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import _checks as checks
from ..errors import InvalidArgumentError, ZFServeError
from .occlusion_fill import occluder
from .occlusion_plans import EXACT, Approximation
from .parallel import ordered_map
from .results import DEFAULT_STRIDE, DEFAULT_WINDOW, OcclusionResult, window_starts

# What a sweep of a classifier's outputs can map ("activity" needs the layers: the incremental engine's).
RUNTIME_OUTPUTS = ("probability", "argmax", "attribution")
DEFAULT_BATCH_SIZE = 32
# Copies per pass when the graph is split: the suffix's input is the cut tensor of each copy (ResNet-18: 0.8 MB),
# and 8 of them stay in cache where 32 do not (measured on ResNet-18 at 224, 2 single-threaded sessions: 8 took
# 0.93x the time of 32 in fp32 and int8).
SPLIT_BATCH_SIZE = 8
# How far a split sweep may differ from full passes on its check image (probabilities): float rounding for fp32;
# int8 and bf16 graphs compute the same integers on a crop as on the whole image (measured: equal).
SPLIT_TOLERANCE = {"fp32": 1e-5, "int8": 1e-5, "bf16": 1e-3}


class SweepStopped(ZFServeError):
    """A sweep was cancelled or ran past its deadline (``reason``: "cancelled" or "deadline")."""

    def __init__(self, reason: str):
        super().__init__(f"occlusion sweep stopped: {reason}", field="deadline" if reason == "deadline" else None)
        self.reason = reason


class _Sweep:
    """One image's sweep in progress: its input, target, base probabilities and planner."""

    def __init__(self, x: np.ndarray, target: int | None):
        self.x, self.target = x, target
        self.base: np.ndarray | None = None   # the unoccluded probabilities
        self.planner = None
        self.argmax: np.ndarray | None = None
        self.pending = np.empty(0, np.int64)
        self.clean = None                     # its cut tensor, when the engine splits the graph

    def start(self, base: np.ndarray, approximation: Approximation, count: int) -> None:
        self.base = base.astype(np.float64)
        self.target = int(base.argmax()) if self.target is None else int(self.target)
        self.planner = approximation.planner(count, float(self.base[self.target]))
        self.argmax = np.zeros((count, count), dtype=np.int64)


class RuntimeOcclusionEngine:
    """Batched occlusion on ``classifier`` (its engine, precision and thread count). ``batch_size``: occluded
    copies per forward pass (default 32; 8 when the graph is split). ``workers``: forward passes in flight at once (give the classifier 1
    thread and, on OpenVINO, that many streams: independent single-threaded passes waste no CPU time waiting for
    each other, where one pass split over the cores synchronizes at every operator)."""

    def __init__(self, classifier, *, batch_size: int | None = None, workers: int = 1, split: bool = True):
        self.classifier = classifier
        self.engine, self.precision = classifier.engine, classifier.precision
        self.size = int(classifier.input_size)
        self.num_classes = int(classifier.num_classes)
        self.preprocess = classifier.config.preprocess
        self.batch_size = checks.integer(DEFAULT_BATCH_SIZE if batch_size is None else batch_size, "batch_size", 1,
                                         4096)
        self.split_batch_size = self.batch_size if batch_size is not None else SPLIT_BATCH_SIZE
        self.workers = checks.integer(workers, "workers", 1, 64)
        # Splitting the graph (:mod:`.occlusion_split`) runs on ONNX Runtime's CPU sessions; OpenVINO and CUDA
        # run full passes.
        self.split = bool(split) and self.engine == "onnxruntime" and getattr(classifier, "device", "cpu") == "cpu"
        self._splitter = None
        self._plans: dict[tuple[int, int], object] = {}
        self.split_notes: dict[tuple[int, int], str] = {}   # per (window, stride): the cut used, or why none
        self._plan_lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"{self.engine}-{self.precision}"

    # ------------------------------------------------------------------------------------------ checks
    def _check(self, window, stride, targets, outputs, attribution_on, max_positions) -> np.ndarray:
        checks.integer(window, "window", 1, self.size, what="the input's side")
        checks.integer(stride, "stride", 1, window, what="the window")
        for target in targets:
            if target is not None:
                checks.integer(target, "target", 0, self.num_classes - 1, what="the model's class indices")
        if not outputs or any(o not in RUNTIME_OUTPUTS for o in outputs):
            raise InvalidArgumentError(f"outputs: {list(outputs)} not accepted by the {self.name} engine; accepted: "
                                       f"a non-empty subset of {list(RUNTIME_OUTPUTS)} (the activity map needs the "
                                       f"exact engine)", field="outputs")
        if attribution_on != "probability":
            raise InvalidArgumentError(f"attribution_on: {attribution_on!r} not accepted by the {self.name} engine; "
                                       f"accepted: probability (logits need the exact engine)", field="attribution_on")
        starts = window_starts(self.size, int(window), int(stride))
        if max_positions is not None and len(starts) ** 2 > max_positions:
            raise InvalidArgumentError(f"window/stride: window {window} and stride {stride} give {len(starts)} x "
                                       f"{len(starts)} = {len(starts) ** 2} positions; at most {max_positions} are "
                                       f"accepted (--max-occlusion-positions)", field="stride")
        return starts

    def _image(self, image) -> np.ndarray:
        x = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        if tuple(x.shape) != (3, self.size, self.size):
            raise InvalidArgumentError(f"image must be a (3, {self.size}, {self.size}) network input (see "
                                       f"zfserve.preprocess.load_image), got shape {tuple(x.shape)}", field="image")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise InvalidArgumentError("image contains NaN or infinite values", field="image")
        return x

    # ------------------------------------------------------------------------------------------ sweeps
    def sweep(self, image, window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE, fill="mean",
              target: int | None = None, outputs: Sequence[str] = RUNTIME_OUTPUTS, *,
              approximation: Approximation = EXACT, progress: Callable[[int, int], None] | None = None,
              fill_units: str = "input", attribution_on: str = "probability", max_positions: int | None = None,
              deadline: float | None = None, cancel=None) -> OcclusionResult:
        """One image's sweep: the same arguments and result as the exact engine's ``sweep`` (without the activity
        map and logit attribution), plus ``approximation``, ``deadline`` and ``cancel``."""
        return self.sweep_many([image], [target], window, stride, fill, outputs, approximation=approximation,
                               progress=progress, fill_units=fill_units, attribution_on=attribution_on,
                               max_positions=max_positions, deadline=deadline, cancel=cancel)[0]

    def sweep_many(self, images: Sequence, targets: Sequence[int | None] | None = None,
                   window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE, fill="mean",
                   outputs: Sequence[str] = RUNTIME_OUTPUTS, *, approximation: Approximation = EXACT,
                   progress: Callable[[int, int], None] | None = None, fill_units: str = "input",
                   attribution_on: str = "probability", max_positions: int | None = None,
                   deadline: float | None = None, cancel=None) -> list[OcclusionResult]:
        """Sweep several images at once: each round's positions of every image share the forward batches.
        ``progress(done, total)`` counts positions over all images."""
        outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
        if not len(images):
            return []
        targets = [None] * len(images) if targets is None else list(targets)
        if len(targets) != len(images):
            raise InvalidArgumentError(f"targets: {len(targets)} given for {len(images)} images", field="target")
        starts = self._check(window, stride, targets, outputs, attribution_on, max_positions)
        window, stride = int(window), int(stride)
        fill_values, fill_map = occluder(fill, fill_units, self.preprocess)
        sweeps = [_Sweep(self._image(im), t) for im, t in zip(images, targets)]
        stop = _Stopper(deadline, cancel)
        t0 = time.perf_counter()
        stop.check()
        for s, p in zip(sweeps, self._run(np.stack([s.x for s in sweeps]))):
            s.start(p, approximation, len(starts))
        plan = self._plan(window, stride, starts)
        if plan is not None:
            for s, clean in zip(sweeps, plan.clean(np.stack([s.x for s in sweeps]))):
                s.clean = clean
        base_s = time.perf_counter() - t0
        fill = np.ascontiguousarray(np.broadcast_to(fill_map, (3, self.size, self.size)), np.float32)
        self._rounds(sweeps, starts, window, fill, stop, progress, plan)
        sweep_s = time.perf_counter() - t0 - base_s
        return [self._result(s, starts, window, stride, fill_values, fill_units, outputs, attribution_on,
                             approximation, {"base_s": base_s / len(sweeps), "sweep_s": sweep_s / len(sweeps)})
                for s in sweeps]

    def _rounds(self, sweeps: list[_Sweep], starts, window: int, fill: np.ndarray, stop, progress, plan) -> None:
        """Plan, batch and run rounds of positions until every planner is done."""
        total = sum(s.planner.count ** 2 for s in sweeps)
        active, reported = list(sweeps), 0
        while active:
            for s in active:
                s.pending = s.planner.next()
            active = [s for s in active if len(s.pending)]
            work = [(s, int(flat)) for s in active for flat in s.pending]
            batch = self.batch_size if plan is None else self.split_batch_size
            parts = [work[i:i + batch] for i in range(0, len(work), batch)]

            def forward(part):
                stop.check()
                if plan is not None:
                    count = len(starts)
                    return part, plan.probabilities([(s.x, s.clean, *divmod(flat, count)) for s, flat in part],
                                                    starts, fill)
                return part, self._run(self._occluded(part, starts, window, fill))
            for part, probs in ordered_map(forward, parts, self.workers):
                for (s, flat), p in zip(part, probs):
                    s.planner.record(np.array([flat]), np.array([p[s.target]], dtype=np.float64))
                    s.argmax.flat[flat] = int(p.argmax())
                reported = sum(s.planner.done for s in sweeps)
                if progress is not None:
                    progress(reported, total)
        if progress is not None and reported < total:   # an approximation skipped the rest: decided too
            progress(total, total)

    def _occluded(self, part, starts, window: int, fill: np.ndarray) -> np.ndarray:
        batch = np.empty((len(part), 3, self.size, self.size), np.float32)
        count = len(starts)
        for i, (s, flat) in enumerate(part):
            r, c = divmod(flat, count)
            y0, x0 = int(starts[r]), int(starts[c])
            y1, x1 = min(self.size, y0 + window), min(self.size, x0 + window)
            batch[i] = s.x
            batch[i, :, y0:y1, x0:x1] = fill[:, y0:y1, x0:x1]
        return batch

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.classifier.probabilities(batch)

    def _plan(self, window: int, stride: int, starts):
        """The graph split for (window, stride), built and checked against full passes on first use; None (full
        passes) when splitting is off, no cut saves work, or the check fails (the reason in ``split_notes``)."""
        if not self.split:
            return None
        with self._plan_lock:
            if (window, stride) not in self._plans:
                from .occlusion_split import Splitter, verify
                plan, note = None, "no cut saves work"
                try:
                    if self._splitter is None:
                        graph = getattr(self.classifier, "onnx_bytes", None) or \
                            Path(self.classifier.onnx_path).read_bytes()
                        self._splitter = Splitter(graph, self.size, getattr(self.classifier, "threads", None))
                    plan = self._splitter.plan(window, stride)
                    if plan is not None:
                        tolerance = SPLIT_TOLERANCE.get(self.precision, 1e-5)
                        diff = verify(plan, self._run, starts, self.size, tolerance)
                        note = f"split at {plan.cut.tensor} (largest difference from full passes {diff:.1e})"
                except Exception as exc:  # noqa: BLE001 - a graph the split cannot handle runs full passes
                    plan, note = None, f"full passes: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                self._plans[(window, stride)], self.split_notes[(window, stride)] = plan, note
            return self._plans[(window, stride)]

    def _result(self, s: _Sweep, starts, window, stride, fill_values, fill_units, outputs, attribution_on,
                approximation: Approximation, timings: dict) -> OcclusionResult:
        probability, nearest = s.planner.filled()
        evaluated = None if s.planner.evaluated.all() else s.planner.evaluated.copy()
        base_p = float(s.base[s.target])
        result = OcclusionResult(
            window=window, stride=stride, starts=starts, fill=fill_values, fill_units=fill_units, target=s.target,
            layer="", channel=0, attribution_on=attribution_on, base_logits=None, base_probability=base_p,
            base_activity=0.0, timings=timings, backend=self.engine, engine=self.engine, precision=self.precision,
            mode=f"{self.name}+{approximation.name}" if not approximation.exact else self.name,
            evaluated=evaluated)
        result.timings["forwards"] = int(s.planner.evaluated.sum()) + 1
        if "probability" in outputs:
            result.probability = probability.astype(np.float32)
        if "argmax" in outputs:
            result.argmax = s.argmax.reshape(-1)[nearest.reshape(-1)].reshape(nearest.shape)
        if "attribution" in outputs:
            result.attribution = result.per_pixel(base_p - probability, self.size)
        return result


class _Stopper:
    def __init__(self, deadline: float | None, cancel):
        self.deadline, self.cancel = deadline, cancel

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise SweepStopped("cancelled")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise SweepStopped("deadline")


__all__ = ["DEFAULT_BATCH_SIZE", "RUNTIME_OUTPUTS", "RuntimeOcclusionEngine", "SweepStopped"]
