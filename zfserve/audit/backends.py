"""Where an audit's model runs. A backend has ``name``, ``version``, ``class_names`` and ``preprocess`` (the
model's PreprocessConfig: its resize/crop place masks and evidence), and

    classify(images: list[bytes]) -> list[(probabilities (C,), OodScore | None) | ZFServeError]
                                                                               one entry per image, in order
    occlude(image: bytes, *, window, stride, target) -> OcclusionResult        probability + attribution maps
    take_seconds() -> {stage: seconds}                                         spent since the last call

and optionally ``prepare(image) -> input | None`` (decode ahead, in a reading thread), after which ``classify`` and
``occlude_many(images, targets, *, window, stride)`` (several sweeps at once) take ``prepared=`` those inputs.

:class:`LocalBackend` runs the model here: the ONNX Runtime classifier (what ``zfserve classify`` runs) and the
occlusion engine (what ``zfserve occlude`` runs), both built from one snapshot of the model's files. A running
server is the other backend (``zfserve.client.RemoteAuditBackend``): the same decoder and engines, over gRPC.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..errors import ZFServeError
from ..preprocess import load_image
from ..weights import default_model_name, read_snapshot

OCCLUSION_OUTPUTS = ("probability", "attribution")


class LocalBackend:
    """The model here: classification as ``zfserve classify`` runs it (the model's engine and precision), occlusion
    in ``mode`` (default exact; the audit sets the mode its gate chose, :mod:`.gate`) through
    :class:`~zfserve.engine.occlusion_modes.OcclusionEngines`, which batches occluded images across a batch's
    inputs on the fast engines."""

    def __init__(self, model: str | None = None, *, device: str = "cpu", threads: int | None = None,
                 batch_size: int = 64, mode=None):
        from ..engine.classifier import Classifier
        from ..engine.occlusion_modes import EXACT_MODE, OcclusionEngines
        self.snapshot = read_snapshot(model or default_model_name())
        self.config = self.snapshot.config
        self.classifier = Classifier(self.snapshot, device=device, threads=threads, max_batch_size=batch_size,
                                     warmup=False)
        self.name, self.version = self.config.name, self.snapshot.version
        self.class_names = list(self.config.class_names)
        self.preprocess = self.config.preprocess
        self.device = device
        self.mode = mode or EXACT_MODE
        served = {(self.classifier.engine, self.classifier.precision): self.classifier} if device == "cpu" else {}
        self.engines = OcclusionEngines(self.snapshot, device=device, threads=threads, classifiers=served)
        self._seconds = {"decode": 0.0, "classify": 0.0}
        self._lock = threading.Lock()

    def _input(self, data: bytes) -> np.ndarray:
        return load_image(data, self.config, field="image")

    def _add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] += seconds

    def prepare(self, data: bytes) -> np.ndarray | None:
        """``data`` decoded into the network's input (None when it cannot be: classify reports why); reading
        threads call it ahead of the batch's turn."""
        t0 = time.perf_counter()
        try:
            return self._input(data)
        except ZFServeError:
            return None
        finally:
            self._add("decode", time.perf_counter() - t0)

    def _inputs(self, images: list[bytes], prepared) -> list:
        """Each image's input (decoded here unless ``prepared`` holds it), or its ZFServeError."""
        prepared = prepared or [None] * len(images)
        out = []
        for data, x in zip(images, prepared):
            try:
                out.append(self._input(data) if x is None else x)
            except ZFServeError as exc:
                out.append(exc)
        return out

    def classify(self, images: list[bytes], prepared: list | None = None) -> list:
        t0 = time.perf_counter()
        out = self._inputs(images, prepared)
        good = [(i, x) for i, x in enumerate(out) if not isinstance(x, ZFServeError)]
        t1 = time.perf_counter()
        if good:
            scored = self.classifier.scored(np.stack([x for _, x in good]))
            verdicts = scored.ood or [None] * len(good)
            for (i, _), p, verdict in zip(good, scored.probabilities, verdicts):
                out[i] = (p, verdict)
        self._add("decode", t1 - t0)
        self._add("classify", time.perf_counter() - t1)
        return out

    def occlude(self, image: bytes, *, window: int, stride: int, target: int):
        return self.occlude_many([image], [target], window=window, stride=stride)[0]

    def occlude_many(self, images: list[bytes], targets: list[int], *, window: int, stride: int,
                     prepared: list | None = None) -> list:
        """The sweeps of several images; on a batched engine their occluded copies share forward passes."""
        inputs = self._inputs(images, prepared)
        bad = next((x for x in inputs if isinstance(x, ZFServeError)), None)
        if bad is not None:
            raise bad
        return self.engines.sweep_many(inputs, targets, self.mode, window=window, stride=stride,
                                       outputs=OCCLUSION_OUTPUTS)

    def take_seconds(self) -> dict:
        with self._lock:
            seconds, self._seconds = self._seconds, {"decode": 0.0, "classify": 0.0}
        return seconds


__all__ = ["LocalBackend", "OCCLUSION_OUTPUTS"]
