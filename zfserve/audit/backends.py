"""Where an audit's model runs. A backend has ``name``, ``version``, ``class_names`` and ``preprocess`` (the
model's PreprocessConfig: its resize/crop place masks and evidence), and

    classify(images: list[bytes]) -> list[(probabilities (C,), OodScore | None) | ZFServeError]
                                                                               one entry per image, in order
    occlude(image: bytes, *, window, stride, target) -> OcclusionResult        probability + attribution maps
    take_seconds() -> {stage: seconds}                                         spent since the last call

:class:`LocalBackend` runs the model here: the ONNX Runtime classifier (what ``zfserve classify`` runs) and the
occlusion engine (what ``zfserve occlude`` runs), both built from one snapshot of the model's files. A running
server is the other backend (``zfserve.client.RemoteAuditBackend``): the same decoder and engines, over gRPC.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import ZFServeError
from ..preprocess import load_image
from ..weights import default_model_name, read_snapshot

OCCLUSION_OUTPUTS = ("probability", "attribution")


class LocalBackend:
    def __init__(self, model: str | None = None, *, device: str = "cpu", threads: int | None = None,
                 batch_size: int = 64):
        from ..engine.classifier import Classifier
        self.snapshot = read_snapshot(model or default_model_name())
        self.config = self.snapshot.config
        self.classifier = Classifier(self.snapshot, device=device, threads=threads, max_batch_size=batch_size,
                                     warmup=False)
        self.name, self.version = self.config.name, self.snapshot.version
        self.class_names = list(self.config.class_names)
        self.preprocess = self.config.preprocess
        self.device = device
        self._occlusion = None
        self._decoded: dict[int, np.ndarray] = {}   # id(bytes) -> input, for the batch just classified
        self._seconds = {"decode": 0.0, "classify": 0.0}

    def _input(self, data: bytes) -> np.ndarray:
        return load_image(data, self.config, field="image")

    def classify(self, images: list[bytes]) -> list:
        t0 = time.perf_counter()
        out, good, self._decoded = [None] * len(images), [], {}
        for i, data in enumerate(images):
            try:
                self._decoded[id(data)] = x = self._input(data)
                good.append((i, x))
            except ZFServeError as exc:
                out[i] = exc
        t1 = time.perf_counter()
        if good:
            scored = self.classifier.scored(np.stack([x for _, x in good]))
            verdicts = scored.ood or [None] * len(good)
            for (i, _), p, verdict in zip(good, scored.probabilities, verdicts):
                out[i] = (p, verdict)
        self._seconds["decode"] += t1 - t0
        self._seconds["classify"] += time.perf_counter() - t1
        return out

    def occlusion_engine(self):
        if self._occlusion is None:
            from ..engine.occlusion import OcclusionEngine
            self._occlusion = OcclusionEngine(self.snapshot.model(self.device), device=self.device)
        return self._occlusion

    def occlude(self, image: bytes, *, window: int, stride: int, target: int):
        x = self._decoded.get(id(image))
        x = self._input(image) if x is None else x
        return self.occlusion_engine().sweep(x, window=window, stride=stride, target=target,
                                             outputs=OCCLUSION_OUTPUTS)

    def take_seconds(self) -> dict:
        seconds, self._seconds = self._seconds, {"decode": 0.0, "classify": 0.0}
        return seconds


__all__ = ["LocalBackend", "OCCLUSION_OUTPUTS"]
