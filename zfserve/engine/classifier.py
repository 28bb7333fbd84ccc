"""Classification on ONNX Runtime (or OpenVINO): preprocessed float32 batches in, probabilities and top-k out.

One session per Classifier (:mod:`.backends`); ``run`` is thread-safe, so concurrent callers share it (each call
builds its own IO binding on CUDA). Batches above ``max_batch_size`` are split into several runs. CPU
threads: intra-op = all cores this process may use, inter-op 1 (the graph is a chain; a second pool only
competes for the same cores). ``precision`` picks the graph: the fp32 export, or its calibrated int8
quantization (``model.int8.onnx``, :mod:`.quantize`); bf16 runs the fp32 export on OpenVINO in bf16.

Every answer also says how far each image lies from the model's own data (:mod:`.ood`): the statistics fitted
for these weights are read when the classifier is made, and the features they score come out of the same pass
as the probabilities (extra outputs of the graph). A model without statistics classifies all the same;
``ood_note`` then says why there is no score.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .. import _checks as checks
from ..config import ENGINES, PRECISIONS, ModelConfig
from ..errors import InvalidArgumentError, ModelLoadError, ZFServeError
from ..export import META_WEIGHTS_HASH, PROBABILITIES, ensure_onnx, read_metadata
from ..model import LayeredCNN
from ..weights import Snapshot, read_snapshot
from . import ood as ood_score
from .backends import OnnxRuntimeBackend, OpenVinoBackend, available_threads, check_combination
from .results import DEFAULT_TOP_K, Prediction, ScoredBatch, TopK

MAX_BATCH_SIZE_LIMIT = 4096


class Classifier:
    """A model's ONNX export under ONNX Runtime.

    ``model``: a model name, a model directory, a :class:`~zfserve.weights.Snapshot` or a loaded
    :class:`~zfserve.model.LayeredCNN` (ZFNet, AlexNet, VGG; exported to the cache, see
    :func:`zfserve.export.ensure_onnx`); default: the default model. ``device``: ``"cpu"`` or
    ``"cuda"`` (the CUDA execution provider with IO binding; falls back to CPU with a warning when this
    onnxruntime has no CUDA provider). ``threads``: intra-op threads (default: all usable cores).
    ``profile_prefix``: turn on ONNX Runtime's profiler, writing ``<prefix>_<date>.json`` on
    :meth:`end_profiling`. ``precision``: ``"fp32"``, ``"int8"`` (made on first use from held-out calibration
    images, see :func:`zfserve.engine.quantize.ensure_int8`; ``int8`` settings choose the calibration) or
    ``"bf16"`` (OpenVINO only); ``engine``: ``"onnxruntime"`` or ``"openvino"``. Both default to the model's
    config.json (``precision``, ``engine``), else fp32 on ONNX Runtime. ``streams``: OpenVINO runs that many
    calls at once, ``threads`` each (an ONNX Runtime session runs concurrent calls as they come).

    ``ood``: score every image against the model's out-of-distribution statistics (``ood_detector``; None, with
    the reason in ``ood_note``, when there are none); False leaves the score off.

    Input errors raise :class:`~zfserve.errors.InvalidArgumentError` with ``field`` ``"batch"`` (type, dtype,
    rank, shape, size), ``"image"`` (non-finite values in one image) or ``"top_k"``.
    """

    def __init__(self, model=None, *, device: str = "cpu", max_batch_size: int = 64, threads: int | None = None,
                 warmup: bool = True, profile_prefix: str | None = None, precision: str | None = None,
                 engine: str | None = None, int8=None, ood: bool = True, streams: int = 1):
        import onnxruntime as ort

        checks.choice(device, "device", checks.DEVICE_TYPES)
        checks.integer(max_batch_size, "max_batch_size", 1, MAX_BATCH_SIZE_LIMIT)
        if threads is not None:
            checks.integer(threads, "threads", 1, what="or None: all cores")
        if precision is not None:
            checks.choice(precision, "precision", PRECISIONS)
        if engine is not None:
            checks.choice(engine, "engine", ENGINES)
        self.config, self.onnx_path, snapshot = _resolve(model)
        weights_sha256 = snapshot.sha256 if snapshot is not None else None
        self.precision = precision or self.config.precision or "fp32"
        self.engine = engine or self.config.engine or "onnxruntime"
        self.name = self.config.name
        self.class_names = list(self.config.class_names)
        self.num_classes = self.config.num_classes
        self.input_size = self.config.preprocess.crop
        self.max_batch_size = int(max_batch_size)
        self.threads = int(threads or available_threads())

        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            warnings.warn("device 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider; "
                          "running on CPU", RuntimeWarning, stacklevel=2)
            device = "cpu"
        self.device = device
        check_combination(self.engine, self.precision, device)
        if self.precision == "int8":
            from .quantize import ensure_int8
            self.onnx_path = ensure_int8(self.onnx_path, self.config, int8)
        # The session is built from bytes read once and checked against the weights they were exported from,
        # so a file replaced on disk meanwhile can never be what is served.
        onnx_bytes = self.onnx_path.read_bytes()
        if weights_sha256 is not None and read_metadata(onnx_bytes).get(META_WEIGHTS_HASH) != weights_sha256:
            raise ModelLoadError(f"{self.onnx_path}: changed on disk while the model was loading; load it again")
        try:
            if self.engine == "openvino":
                self.backend = OpenVinoBackend(onnx_bytes, threads=self.threads, precision=self.precision,
                                               streams=checks.integer(streams, "streams", 1, 64))
            else:
                self.backend = OnnxRuntimeBackend(onnx_bytes, threads=self.threads, device=device,
                                                  profile_prefix=profile_prefix)
        except ZFServeError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types  # noqa: BLE001
            raise ModelLoadError(f"{self.onnx_path}: ONNX Runtime cannot load it ({exc})") from None
        outputs = self.backend.outputs
        if PROBABILITIES not in outputs or outputs[PROBABILITIES][-1] != self.num_classes:
            raise ModelLoadError(f"{self.onnx_path}: expected output {PROBABILITIES!r} with {self.num_classes} "
                                 f"classes, found {outputs}")
        self.ood_detector, self.ood_note = _detector(snapshot, outputs) if ood else (None, "score turned off")
        if self.ood_detector is not None and self.precision != "fp32":
            # int8 and bf16 score a little differently: their own threshold keeps the asked acceptance.
            from .ood_fit import precision_threshold
            self.ood_detector = precision_threshold(snapshot, self.ood_detector, self.precision, self.engine,
                                                    self.backend, read_metadata(onnx_bytes))
        if warmup:
            # The first run allocates the arena and picks kernels; pay that here, not in a request.
            self._run(np.zeros((1, 3, self.input_size, self.input_size), np.float32))

    # ------------------------------------------------------------------------------------------ inference
    @property
    def providers(self) -> list[str]:
        return self.backend.providers

    def probabilities(self, batch: np.ndarray, *, finite: bool = True) -> np.ndarray:
        """float32 (N, 3, S, S) preprocessed images -> float32 (N, num_classes) probabilities. Non-finite values
        are refused unless ``finite`` is false; then such an image gets whatever the network makes of them,
        and only it: every layer works per image."""
        batch = self._validate(batch, finite)
        n = batch.shape[0]
        if n <= self.max_batch_size:
            return self._run(batch)
        out = np.empty((n, self.num_classes), np.float32)
        for start in range(0, n, self.max_batch_size):
            stop = min(n, start + self.max_batch_size)
            out[start:stop] = self._run(batch[start:stop])
        return out

    def scored(self, batch: np.ndarray, *, finite: bool = True) -> ScoredBatch:
        """As :meth:`probabilities`, with each image's out-of-distribution verdict from the same pass (``ood``
        None when the model has none)."""
        batch = self._validate(batch, finite)
        if self.ood_detector is None:
            return ScoredBatch(self.probabilities(batch, finite=False))
        parts = [self._run_scored(batch[start:start + self.max_batch_size])
                 for start in range(0, batch.shape[0], self.max_batch_size)]
        if len(parts) == 1:
            return parts[0]
        return ScoredBatch(np.concatenate([p.probabilities for p in parts]), [v for p in parts for v in p.ood])

    def classify(self, batch: np.ndarray, top_k: int = DEFAULT_TOP_K) -> list[TopK]:
        """The ``top_k`` most probable classes of each image, most probable first, each list with the image's
        out-of-distribution verdict as ``.ood`` (None when the model has no statistics)."""
        self._check_k(top_k)
        scored = self.scored(batch)
        verdicts = scored.ood or [None] * len(scored)
        return [TopK(preds, ood) for preds, ood in zip(self.top_k(scored.probabilities, top_k), verdicts)]

    def top_k(self, probabilities: np.ndarray, k: int) -> list[list[Prediction]]:
        """Rows of probabilities -> their ``k`` largest entries as Predictions (ties: lower index first)."""
        self._check_k(k)
        probabilities = np.asarray(probabilities)
        if probabilities.ndim != 2 or probabilities.shape[1] != self.num_classes:
            raise InvalidArgumentError(f"probabilities: expected shape (N, {self.num_classes}), got "
                                       f"{probabilities.shape}", field="probabilities")
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [[Prediction(int(i), self.class_names[i], float(row[i])) for i in idx]
                for row, idx in zip(probabilities, order)]

    def release_memory(self) -> None:
        """Give back to the system what the largest batch so far made the runtime hold: ONNX Runtime's CPU arena
        keeps every region a batch grew it by (about 8 MB per image of the batch for ZFNet) until a run asks it
        to shrink; this is one 1-image run that does (OpenVINO: its pooled idle requests are dropped). For
        servers, once they go idle after large batches; a batch after it grows the arena again."""
        s = self.input_size
        self.backend.release_memory(np.zeros((1, 3, s, s), np.float32))

    def end_profiling(self) -> str:
        """Stop ONNX Runtime's profiler (``profile_prefix``) and return the trace file's path."""
        return self.backend.end_profiling()

    # ------------------------------------------------------------------------------------------ internals
    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.backend.run(batch)

    def _run_scored(self, batch: np.ndarray) -> ScoredBatch:
        names = self.ood_detector.inputs
        probabilities, *features = self.backend.run_outputs(batch, [PROBABILITIES, *names])
        return ScoredBatch(probabilities, self.ood_detector.verdicts(dict(zip(names, features))))

    def _check_k(self, k) -> None:
        checks.integer(k, "top_k", 1, self.num_classes, what="the model's classes")

    def _validate(self, batch, finite: bool = True) -> np.ndarray:
        s = self.input_size
        expected = f"float32 (N, 3, {s}, {s}) with N >= 1"
        if not isinstance(batch, np.ndarray):
            raise InvalidArgumentError(f"batch: expected a numpy array {expected}, got {type(batch).__name__}",
                                       field="batch")
        if batch.dtype != np.float32:
            raise InvalidArgumentError(f"batch: dtype {batch.dtype} is not accepted; expected {expected}",
                                       field="batch")
        if batch.ndim != 4:
            raise InvalidArgumentError(f"batch: rank {batch.ndim} (shape {batch.shape}) is not accepted; "
                                       f"expected {expected}", field="batch")
        if batch.shape[1:] != (3, s, s) or batch.shape[0] < 1:
            raise InvalidArgumentError(f"batch: shape {batch.shape} is not accepted; expected {expected}",
                                       field="batch")
        ok = np.isfinite(batch).all(axis=(1, 2, 3)) if finite else True
        if not np.all(ok):
            bad = np.flatnonzero(~ok)
            raise InvalidArgumentError(f"image: {len(bad)} image(s) of the batch hold NaN or infinite values "
                                       f"(first: index {int(bad[0])}); every value must be finite",
                                       field="image")
        return np.ascontiguousarray(batch)


def _resolve(model) -> tuple[ModelConfig, Path, Snapshot | None]:
    """(config with preprocessing, path of a current ONNX export, the snapshot whose weights hash it must carry)
    for a name, directory, Snapshot or in-memory model (LayeredCNN; no snapshot)."""
    if isinstance(model, LayeredCNN):
        return model.config, ensure_onnx(model), None
    if model is not None and not isinstance(model, (str, os.PathLike, Snapshot)):
        raise InvalidArgumentError(f"model: expected a model name, a directory, a Snapshot or a LayeredCNN, got "
                                   f"{type(model).__name__}", field="model")
    snapshot = model if isinstance(model, Snapshot) else read_snapshot(model)
    return snapshot.config, ensure_onnx(snapshot), snapshot


def _detector(snapshot: Snapshot | None, outputs: dict):
    """The snapshot's out-of-distribution detector and "", or None and why not."""
    if snapshot is None:
        return None, "an in-memory model has no out-of-distribution statistics (they are kept beside a model's files)"
    detector, note = ood_score.find(snapshot)
    missing = [name for name in (detector.inputs if detector else ()) if name not in outputs]
    if missing:
        return None, f"model {snapshot.name}: no out-of-distribution score (the served graph lacks outputs {missing})"
    return detector, note
