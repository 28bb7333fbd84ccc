"""The out-of-distribution score: fitted statistics and a function of feature arrays, nothing else.

An image far from the data a model was fitted on gets a confident answer all the same (the embedded model calls
a photo of Grace Hopper a "cross" at 99.96%); this score says so. It is the sum of three detectors, each
normalised by its own spread on held-out in-distribution images, chosen by measurement
(``benchmarks/ood_methods.py``, README "Out of distribution"):

- ``vim``: ViM (Wang et al. 2022): the penultimate features' residual off their principal subspace (the first
  half of the dimensions, as OpenOOD sets it for 512 features), scaled by ``alpha``, minus the energy
  ``logsumexp(logits)``;
- ``knn``: the distance of the L2-normalised penultimate features to their k-th nearest neighbour among the fitted
  images' (Sun et al. 2022);
- ``gaussian``: the Mahalanobis distance of a low-level layer's per-channel mean and standard deviation to their
  mean over the fitted images, with a shrunk covariance (what tells a photograph from a rendering).

Each detector's raw score ``s`` becomes ``(s - median) / (q - median)`` with the median and the ``acceptance``
quantile ``q`` of its scores on the threshold images (not the fitted ones: a fitted image is its own nearest
neighbour); the score is their sum, and ``threshold`` is the ``acceptance`` quantile of that sum on the same
images, so that share of in-distribution images is accepted. Higher means further from the model's data.

The threshold is the fp32 graph's. An int8 or bf16 graph computes the same features a little differently (the
8-bit fc7 moves the ViM term), so at the fp32 threshold it accepts fewer in-distribution images (93.8% instead of
95% for the embedded model in int8). Each other precision therefore gets its own threshold, the ``acceptance``
quantile of the scores that precision's graph gives the same threshold images (the normalisation stays the fp32
one, so scores of all precisions are on one scale), stored beside the statistics as ``ood.<precision>.<engine>.json``
(:func:`save_precision_threshold`) and keyed by the statistics and by what makes that graph (int8's calibration).

The detector reads named feature arrays (``features[name]``, float (N, D)), whatever computed them: the
classification graph's extra outputs for a ZFNet (:mod:`.ood_features`), or any graph's intermediate output.
Fitted statistics are stored beside the model as ``ood.safetensors`` (arrays) and ``ood.json`` (everything
else, with the SHA-256 of the weights they were fitted for): data, never pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError, ModelLoadError
from .results import OodScore

OOD_TENSORS = "ood.safetensors"
OOD_META = "ood.json"
# Bump when the score's definition changes, so stored statistics are fitted again.
OOD_FORMAT = "1"
DEFAULT_ACCEPTANCE = 0.95
KNN_K = 1
SHRINKAGE = 1e-3          # of the covariance's mean variance, added to its diagonal
MIN_IMAGES = 10           # per part (fitted, threshold) at the least
_blas = None              # threadpoolctl's controller, made on first use


# ---------------------------------------------------------------------------------------------------- detectors
def _rows(features: dict, name: str) -> np.ndarray:
    if name not in features:
        raise InvalidArgumentError(f"features: {name!r} is missing; given: {sorted(features)}", field="features")
    return np.asarray(features[name], dtype=np.float64).reshape(len(features[name]), -1)


def _as_stored(array) -> np.ndarray:
    """float64 values of the float32 the array is stored as: a loaded detector scores exactly as the fitted one."""
    return np.asarray(array, dtype=np.float32).astype(np.float64)


def _one_blas_thread():
    """A context in which numpy's BLAS runs on one thread. The score's products are small (at batch 1, 1 x 512 by
    512 x 2,200); OpenBLAS wakes its threads for them, and on cores the inference engine keeps busy they wait:
    measured on 2 loaded cores, 12 ms for the nearest-neighbour product instead of 0.06 ms on one thread."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController
        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class Vim:
    """ViM: ``alpha * |(x - origin) @ residual| - logsumexp(logits)``. ``origin`` is where the classifier's
    logits are all zero (``-pinv(W) @ b``), ``residual`` spans the features' minor principal directions."""

    features: str
    logits: str
    origin: np.ndarray
    residual: np.ndarray
    alpha: float
    kind = "vim"

    @classmethod
    def fit(cls, features: str, logits: str, data: dict, weight: np.ndarray, bias: np.ndarray) -> "Vim":
        x = _rows(data, features)
        origin = -np.linalg.pinv(np.asarray(weight, np.float64)) @ np.asarray(bias, np.float64)
        centred = x - origin
        values, vectors = np.linalg.eigh(centred.T @ centred / len(centred))
        principal = min(x.shape[1] // 2, 1000)   # OpenOOD's choice: 256 of 512 features, 1000 of 2048
        residual = vectors[:, np.argsort(values)[::-1][principal:]]
        norms = np.linalg.norm(centred @ residual, axis=1)
        alpha = float(_rows(data, logits).max(axis=1).mean() / max(norms.mean(), 1e-12))
        return cls(features, logits, origin, residual, alpha)

    def score(self, data: dict) -> np.ndarray:
        logits = _rows(data, self.logits)
        top = logits.max(axis=1, keepdims=True)
        energy = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        return self.alpha * np.linalg.norm((_rows(data, self.features) - self.origin) @ self.residual, axis=1) - energy

    def __post_init__(self):
        self.origin, self.residual = _as_stored(self.origin), _as_stored(self.residual)

    def arrays(self) -> dict:
        return {"origin": self.origin.astype(np.float32), "residual": self.residual.astype(np.float32)}

    def params(self) -> dict:
        return {"features": self.features, "logits": self.logits, "alpha": self.alpha}


@dataclass
class Knn:
    """The Euclidean distance of the L2-normalised features to the k-th nearest of the fitted images'."""

    features: str
    bank: np.ndarray
    k: int = KNN_K
    kind = "knn"

    def __post_init__(self):
        # Stored in float16 (unit vectors need no more), and used as stored, so a loaded detector is the fitted one.
        self.bank = np.asarray(self.bank, dtype=np.float16).astype(np.float32)

    @classmethod
    def fit(cls, features: str, data: dict, k: int = KNN_K) -> "Knn":
        return cls(features, _unit(_rows(data, features)), k)

    def score(self, data: dict) -> np.ndarray:
        similarity = _unit(_rows(data, self.features)).astype(np.float32) @ self.bank.T
        kth = np.partition(-similarity, self.k - 1, axis=1)[:, self.k - 1]
        return np.sqrt(np.maximum(2.0 + 2.0 * kth.astype(np.float64), 0.0))

    def arrays(self) -> dict:
        return {"bank": self.bank.astype(np.float16)}

    def params(self) -> dict:
        return {"features": self.features, "k": self.k}


@dataclass
class Gaussian:
    """The squared Mahalanobis distance to the fitted images' mean, with a shrunk covariance."""

    features: str
    mean: np.ndarray
    precision: np.ndarray
    kind = "gaussian"

    @classmethod
    def fit(cls, features: str, data: dict, shrinkage: float = SHRINKAGE) -> "Gaussian":
        x = _rows(data, features)
        mean = x.mean(axis=0)
        covariance = np.cov(x - mean, rowvar=False, bias=True).reshape(x.shape[1], x.shape[1])
        covariance += shrinkage * max(np.trace(covariance) / len(covariance), 1e-12) * np.eye(len(covariance))
        return cls(features, mean, np.linalg.inv(covariance))

    def score(self, data: dict) -> np.ndarray:
        d = _rows(data, self.features) - self.mean
        return ((d @ self.precision) * d).sum(axis=1)

    def __post_init__(self):
        self.mean, self.precision = _as_stored(self.mean), _as_stored(self.precision)

    def arrays(self) -> dict:
        return {"mean": self.mean.astype(np.float32), "precision": self.precision.astype(np.float32)}

    def params(self) -> dict:
        return {"features": self.features}


KINDS = {cls.kind: cls for cls in (Vim, Knn, Gaussian)}


# ---------------------------------------------------------------------------------------------------- the score
@dataclass
class OodDetector:
    """Detectors, their normalisation and the threshold. ``record`` says what they were fitted on (JSON)."""

    detectors: list
    centres: np.ndarray              # per detector: its median on the threshold images
    scales: np.ndarray               # per detector: its acceptance quantile there, less the median
    threshold: float
    acceptance: float
    record: dict = field(default_factory=dict)

    @property
    def inputs(self) -> list[str]:
        """The feature arrays the score reads."""
        names = []
        for d in self.detectors:
            names += [v for k, v in d.params().items() if k in ("features", "logits") and v not in names]
        return names

    @property
    def method(self) -> str:
        return " + ".join(f"{d.kind}({d.params()['features']})" for d in self.detectors)

    def detector_scores(self, features: dict) -> np.ndarray:
        """(N, detectors): each detector's raw score."""
        with _one_blas_thread():
            return np.stack([d.score(features) for d in self.detectors], axis=1)

    def score(self, features: dict) -> np.ndarray:
        """float64 (N,): the out-of-distribution score of each image (higher: further from the model's data)."""
        return ((self.detector_scores(features) - self.centres) / self.scales).sum(axis=1)

    def verdicts(self, features: dict) -> list[OodScore]:
        return [OodScore(float(s), float(self.threshold), bool(s > self.threshold)) for s in self.score(features)]

    def describe(self) -> dict:
        """What ``zfserve info``, ModelInfo and ModelConfig say of it."""
        return {"method": self.method, "threshold": float(self.threshold), "acceptance": float(self.acceptance),
                "data": self.record.get("data", ""), "fitted_images": self.record.get("fitted_images"),
                "threshold_images": self.record.get("threshold_images"),
                "threshold_precision": self.record.get("threshold_precision", "fp32")}

    def digest(self) -> str:
        """SHA-256 of what defines the score (detectors, normalisation, fp32 threshold): a per-precision threshold
        is current only for the statistics it was calibrated with."""
        import hashlib
        described = {"detectors": [{"kind": d.kind, **d.params()} for d in self.detectors],
                     "centres": self.centres.tolist(), "scales": self.scales.tolist(),
                     "threshold": float(self.record.get("fp32_threshold", self.threshold)),
                     "acceptance": float(self.acceptance), "data": self.record.get("data", "")}
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def with_threshold(self, threshold: float, precision: str, accepted: float | None = None) -> "OodDetector":
        """The same detector with ``precision``'s own threshold (the fp32 one kept in the record)."""
        from dataclasses import replace
        record = dict(self.record, fp32_threshold=self.record.get("fp32_threshold", float(self.threshold)),
                      threshold_precision=precision)
        if accepted is not None:
            record["accepted_on_threshold_images"] = float(accepted)
        return replace(self, threshold=float(threshold), record=record)


def calibrate(detectors: list, threshold_data: dict, acceptance: float = DEFAULT_ACCEPTANCE,
              record: dict | None = None) -> OodDetector:
    """The detector set, normalised and thresholded on held-out in-distribution features (never the fitted ones)."""
    if not 0.5 <= acceptance < 1.0:
        raise InvalidArgumentError(f"acceptance: {acceptance!r} out of range; accepted 0.5..0.999 (the share of "
                                   f"in-distribution images accepted)", field="acceptance")
    raw = np.stack([d.score(threshold_data) for d in detectors], axis=1)
    if len(raw) < MIN_IMAGES:
        raise InvalidArgumentError(f"threshold images: {len(raw)}; at least {MIN_IMAGES} are needed",
                                   field="calibration_images")
    centres = np.median(raw, axis=0)
    scales = np.maximum(np.quantile(raw, acceptance, axis=0) - centres, 1e-12)
    total = ((raw - centres) / scales).sum(axis=1)
    threshold, accepted = threshold_of(total, acceptance)
    record = dict(record or {})
    record.update(threshold_images=len(raw), accepted_on_threshold_images=accepted)
    return OodDetector(detectors, centres, scales, threshold, float(acceptance), record)


def threshold_of(scores: np.ndarray, acceptance: float) -> tuple[float, float]:
    """(the ``acceptance`` quantile of held-out in-distribution ``scores``, the share of them it accepts)."""
    threshold = float(np.quantile(np.asarray(scores, np.float64), acceptance))
    return threshold, float(np.mean(np.asarray(scores) <= threshold))


# ---------------------------------------------------------------------------------------------------- storage
def preprocess_hash(config) -> str:
    """SHA-256 of the model's preprocessing settings: with the weights' hash, what the statistics are keyed by (the
    features depend on both; a per-pixel mean image lives in the weights file)."""
    import hashlib
    return hashlib.sha256(json.dumps(config.preprocess.to_json(), sort_keys=True).encode()).hexdigest()


def save(detector: OodDetector, directory: str | Path, weights_sha256: str, preprocess_sha256: str) -> Path:
    """``ood.safetensors`` + ``ood.json`` in ``directory`` (each written to a temporary file, then renamed; the JSON
    last, so a reader that finds it current finds its arrays too). Returns the JSON's path."""
    from safetensors.numpy import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}.{d.kind}.{name}": np.ascontiguousarray(array)
               for i, d in enumerate(detector.detectors) for name, array in d.arrays().items()}
    meta = {"format": OOD_FORMAT, "weights_sha256": weights_sha256, "preprocess_sha256": preprocess_sha256,
            "detectors": [{"kind": d.kind, **d.params()} for d in detector.detectors],
            "centres": detector.centres.tolist(), "scales": detector.scales.tolist(),
            "threshold": detector.threshold, "acceptance": detector.acceptance, "record": detector.record}
    tmp = directory / f".{OOD_TENSORS}.tmp"
    save_file(tensors, str(tmp))
    tmp.chmod(0o644)   # as readable as the weights beside it
    tmp.replace(directory / OOD_TENSORS)
    tmp = directory / f".{OOD_META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(directory / OOD_META)
    return directory / OOD_META


def read_meta(directory: str | Path) -> dict | None:
    """``ood.json`` of ``directory`` (None when there is none)."""
    path = Path(directory) / OOD_META
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None


def is_current(meta: dict | None, weights_sha256: str, preprocess_sha256: str) -> bool:
    return bool(meta) and meta.get("format") == OOD_FORMAT and meta.get("weights_sha256") == weights_sha256 \
        and meta.get("preprocess_sha256") == preprocess_sha256


def load(directory: str | Path) -> OodDetector:
    """The detector stored in ``directory``; a missing, corrupt or inconsistent file is a ModelLoadError naming it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    directory = Path(directory)
    meta = read_meta(directory)
    path = directory / OOD_TENSORS
    if meta is None:
        raise ModelLoadError(f"{directory / OOD_META}: missing")
    try:
        tensors = load_file(str(path))
        detectors = []
        for i, spec in enumerate(meta["detectors"]):
            spec = dict(spec)
            cls = KINDS[spec.pop("kind")]
            arrays = {key.split(".", 2)[2]: value for key, value in tensors.items()
                      if key.startswith(f"{i}.{cls.kind}.")}
            detectors.append(cls(**spec, **arrays))
        centres, scales = np.asarray(meta["centres"], np.float64), np.asarray(meta["scales"], np.float64)
        if centres.shape != (len(detectors),) or scales.shape != centres.shape or not np.all(scales > 0):
            raise ValueError("centres and scales must hold one positive scale per detector")
        return OodDetector(detectors, centres, scales, float(meta["threshold"]), float(meta["acceptance"]),
                           dict(meta.get("record") or {}))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{path}: missing, corrupt or truncated ({exc})") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{directory / OOD_META}: does not describe {path.name} ({exc!r})") from None


# ---------------------------------------------------------------------------------------------------- per precision
PRECISION_FORMAT = "1"


def precision_file(precision: str, engine: str) -> str:
    """The file name of a precision's threshold: ``ood.int8.onnxruntime.json``."""
    return f"ood.{precision}.{engine}.json"


def graph_identity(precision: str, metadata: dict) -> dict:
    """What makes a precision's graph, from its ONNX metadata: for int8 its recipe version and calibration (source,
    image count, method), not its bytes (the same calibration on another ONNX Runtime build gives a graph that
    differs in the last bits, and scores as this one does); for bf16 nothing beyond the weights."""
    if precision != "int8":
        return {}
    from .quantize import META_CALIBRATION, META_INT8_FORMAT
    try:
        calibration = json.loads(metadata.get(META_CALIBRATION) or "{}")
    except json.JSONDecodeError:
        calibration = {}
    return {"int8_format": metadata.get(META_INT8_FORMAT),
            "calibration": {k: calibration.get(k) for k in ("source", "images", "method")}}


def save_precision_threshold(directory: str | Path, precision: str, engine: str, detector: OodDetector,
                             identity: dict, weights_sha256: str, preprocess_sha256: str, threshold: float,
                             accepted: float, images: int) -> Path:
    """Write ``precision`` on ``engine``'s threshold for ``detector`` (atomically; JSON, never pickle)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": PRECISION_FORMAT, "precision": precision, "engine": engine, "weights_sha256": weights_sha256,
            "preprocess_sha256": preprocess_sha256, "statistics_sha256": detector.digest(), "graph": identity,
            "threshold": float(threshold), "acceptance": float(detector.acceptance),
            "accepted_on_threshold_images": float(accepted), "threshold_images": int(images),
            "fp32_threshold": float(detector.record.get("fp32_threshold", detector.threshold))}
    path = directory / precision_file(precision, engine)
    tmp = directory / f".{path.name}.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(path)
    return path


def find_precision_threshold(snapshot, detector: OodDetector, precision: str, engine: str,
                             identity: dict) -> dict | None:
    """The stored threshold of ``precision`` on ``engine`` for these statistics and this graph, or None."""
    wanted = {"format": PRECISION_FORMAT, "weights_sha256": snapshot.sha256,
              "preprocess_sha256": preprocess_hash(snapshot.config), "statistics_sha256": detector.digest(),
              "graph": identity}
    for folder in locations(snapshot):
        path = Path(folder) / precision_file(precision, engine)
        try:
            meta = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            meta = None   # unreadable: made again where it can be written
        if meta and all(meta.get(key) == value for key, value in wanted.items()) \
                and isinstance(meta.get("threshold"), (int, float)):
            return meta
    return None


# ---------------------------------------------------------------------------------------------------- location
def locations(snapshot) -> list[Path]:
    """Where a model's statistics may be, in the order they are read: beside its weights (embedded models ship
    theirs there), then the user cache, ``<cache>/<name>-<weights hash>/``, as the ONNX export of a read-only
    model."""
    from ..export import cache_root
    beside = [snapshot.directory] if snapshot.directory is not None else []
    return beside + [cache_root() / f"{snapshot.config.name}-{snapshot.sha256[:16]}"]


def knows_its_data(config) -> bool:
    """Whether held-out images of the model's own data are known without being given: its provenance says it was
    trained on the synthetic set, of which any other seed is held out."""
    data = (config.provenance or {}).get("data") or {}
    return data.get("kind") == "synthetic"


def fit_command(snapshot) -> str:
    """The command that fits a model's statistics: an embedded model by its name, a directory as a placeholder (the
    note reads the same wherever the model runs, a server's paths are not a client's business)."""
    from ..weights import EMBEDDED_DIR
    embedded = snapshot.directory is None or snapshot.directory.resolve().is_relative_to(EMBEDDED_DIR)
    images = "" if knows_its_data(snapshot.config) else " --calibration DIR"   # held-out images only the user has
    return f"zfserve export --model {snapshot.name if embedded else '<its directory>'}{images}"


def find(snapshot) -> tuple[OodDetector | None, str]:
    """The current statistics of a snapshot's model, or None and why there are none (a note for every answer)."""
    digest = preprocess_hash(snapshot.config)
    stale = []
    for folder in locations(snapshot):
        try:
            meta = read_meta(folder)
            if is_current(meta, snapshot.sha256, digest):
                return load(folder), ""
        except ModelLoadError as exc:
            return None, f"model {snapshot.name}: its out-of-distribution statistics cannot be read ({exc})"
        if meta is not None:
            stale.append(folder)
    why = "were fitted for other weights or another format" if stale else "have not been fitted"
    command = fit_command(snapshot)
    images = "DIR: an ImageFolder of" if command.endswith(" DIR") else "--calibration:"
    return None, (f"model {snapshot.name}: no out-of-distribution score (its statistics {why}); fit them with "
                  f"`{command}` ({images} held-out images of its own data)")


__all__ = ["DEFAULT_ACCEPTANCE", "Gaussian", "KINDS", "Knn", "OOD_META", "OOD_TENSORS", "OodDetector", "Vim",
           "calibrate", "find", "find_precision_threshold", "fit_command", "graph_identity", "is_current", "knows_its_data",
           "load",
           "locations", "precision_file", "preprocess_hash", "read_meta", "save", "save_precision_threshold",
           "threshold_of"]
