"""Fitting a model's out-of-distribution statistics (:mod:`.ood`) on held-out images of its own data, and keeping
them beside the model.

The images come from the same source int8's calibration takes (``--calibration``): the synthetic set at a seed the
model was not trained on (``synthetic`` = seed 5), or an ImageFolder of the user's held-out images. They are split
in two disjoint halves: the **fitted** images give the detectors their statistics (the nearest-neighbour bank, the
principal subspace, the mean and covariance), the **threshold** images their normalisation and the threshold (a
fitted image would be its own nearest neighbour). Synthetic halves are index ranges of one seed (every image is a
function of its seed and index); a folder's are alternate images of an evenly spaced subset.

A precision other than fp32 gets its own threshold (:func:`precision_threshold`): the first time a classifier of
that precision is built for the statistics, its graph scores the same threshold images (made again from what the
record says: the source and the image count) and the ``acceptance`` quantile of those scores is kept beside the
statistics, so every precision accepts the asked share of held-out images.

Features come from the served graph itself (:class:`~.classifier.Classifier` in fp32 on ONNX Runtime, the extra
outputs of :mod:`.ood_features`), so what is fitted is what is scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from .. import _checks as checks
from ..errors import InvalidArgumentError, ModelLoadError, ZFServeError
from . import ood
from .ood_features import LOGITS, feature_spec, head
from .quantize import Batches, HeldOut, folder_held_out, parse_source, training_seeds

# Synthetic defaults: 200 images per class of the embedded model's 11 for each half.
DEFAULT_FIT_IMAGES = 2200
DEFAULT_THRESHOLD_IMAGES = 2200
MAX_IMAGES = 20_000        # of a folder, both halves together


@dataclass
class OodSettings:
    """Where the held-out images come from (int8's ``--calibration`` and ``--calibration-images``; ``images`` is
    both halves together, None: 2 x 2,200 synthetic images, or every image of a folder up to 20,000) and the
    share of them to accept."""

    calibration: str = "synthetic"
    images: int | None = None
    acceptance: float = ood.DEFAULT_ACCEPTANCE

    def validate(self) -> "OodSettings":
        parse_source(self.calibration)
        if self.images is not None:
            checks.integer(self.images, "calibration_images", 2 * ood.MIN_IMAGES, MAX_IMAGES,
                           label="--calibration-images", what="images for both halves of the fit")
        if not isinstance(self.acceptance, (int, float)) or isinstance(self.acceptance, bool) \
                or not 0.5 <= self.acceptance < 1.0:
            raise InvalidArgumentError(f"--ood-acceptance: {self.acceptance!r} out of range; accepted 0.5..0.999 "
                                       f"(the share of in-distribution images accepted)", field="ood_acceptance")
        return self


# ---------------------------------------------------------------------------------------------------- data
class _Rendered:
    """Images ``start..stop-1`` of a synthetic seed, rendered when a slice of them is read (thousands of held-out
    images never sit in memory at once)."""

    def __init__(self, seed: int, start: int, stop: int):
        self.seed, self.start, self.stop = seed, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, rows: slice) -> np.ndarray:
        from ..data import render_images
        first, last, _ = rows.indices(len(self))
        return render_images(self.seed, range(self.start + first, self.start + last))


def _synthetic(seed: int, start: int, stop: int, config) -> HeldOut:
    return HeldOut(Batches(_Rendered(seed, start, stop), config), None,
                   f"synthetic seed {seed}, images {start}..{stop - 1}")


def held_out_halves(settings: OodSettings, config) -> tuple[HeldOut, HeldOut]:
    """(fitted images, threshold images): disjoint, neither from the model's training set."""
    source = parse_source(settings.calibration)
    if source.kind == "synthetic":
        if source.seed in training_seeds(config):
            raise InvalidArgumentError(f"--calibration: synthetic seed {source.seed} is the model's training set "
                                       f"(config.json provenance); use a held-out seed", field="calibration")
        fit_n = settings.images // 2 if settings.images else DEFAULT_FIT_IMAGES
        threshold_n = settings.images - fit_n if settings.images else DEFAULT_THRESHOLD_IMAGES
        return (_synthetic(source.seed, 0, fit_n, config),
                _synthetic(source.seed, fit_n, fit_n + threshold_n, config))
    from ..data.folders import folder_entries
    entries, classes = folder_entries(source.path)
    n = min(settings.images or MAX_IMAGES, len(entries))
    if n < 2 * ood.MIN_IMAGES:
        raise InvalidArgumentError(f"--calibration: {source.path} holds {len(entries)} images; the "
                                   f"out-of-distribution fit needs at least {2 * ood.MIN_IMAGES}",
                                   field="calibration")
    chosen = np.unique(np.linspace(0, len(entries) - 1, n).round().astype(int))
    return (folder_held_out(source.path, chosen[0::2], entries, classes, config),
            folder_held_out(source.path, chosen[1::2], entries, classes, config))


def features(classifier, data: HeldOut, names: list[str]) -> dict[str, np.ndarray]:
    """The named graph outputs of every image of ``data``, from ``classifier``'s own graph."""
    return backend_features(classifier.backend, data, names)


def backend_features(backend, data: HeldOut, names: list[str]) -> dict[str, np.ndarray]:
    """The named graph outputs of every image of ``data``, from an inference backend (``run_outputs``)."""
    parts = {name: [] for name in names}
    for batch in data.inputs:
        for name, value in zip(names, backend.run_outputs(np.ascontiguousarray(batch), names)):
            parts[name].append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


# ---------------------------------------------------------------------------------------------------- fit
def fit(snapshot, settings: OodSettings | None = None, *, data: tuple[HeldOut, HeldOut] | None = None,
        log=None) -> ood.OodDetector:
    """Fit and threshold the detectors on held-out images of ``snapshot``'s model (``data`` overrides them)."""
    from ..export import ensure_onnx
    from .backends import OnnxRuntimeBackend, available_threads
    settings = (settings or OodSettings()).validate()
    started = time.perf_counter()
    penultimate, low_level, weight, bias = _features_of(snapshot)
    # The fp32 graph on ONNX Runtime, as the classifier serves it (the classifier itself reads these statistics).
    backend = OnnxRuntimeBackend(ensure_onnx(snapshot).read_bytes(), threads=available_threads())
    fitted, threshold = data or held_out_halves(settings, snapshot.config)
    names = [penultimate, LOGITS] + ([low_level] if low_level else [])
    if log:
        log(f"out-of-distribution fit: features of {fitted.count} + {threshold.count} held-out images")
    fit_features, threshold_features = backend_features(backend, fitted, names), backend_features(backend, threshold,
                                                                                                  names)
    if len(fit_features[LOGITS]) < ood.MIN_IMAGES:
        raise InvalidArgumentError(f"fitted images: {len(fit_features[LOGITS])}; at least {ood.MIN_IMAGES} are "
                                   f"needed", field="calibration_images")
    detectors = ([ood.Vim.fit(penultimate, LOGITS, fit_features, weight, bias)] if weight is not None else []) + \
        [ood.Knn.fit(penultimate, fit_features)] + ([ood.Gaussian.fit(low_level, fit_features)] if low_level else [])
    record = {"data": f"{fitted.description} (fitted); {threshold.description} (threshold)",
              "fitted_images": int(len(fit_features[LOGITS])), "source": settings.calibration,
              "images": settings.images,
              "fitted_by": f"zfserve {__version__}", "seconds": None}
    detector = ood.calibrate(detectors, threshold_features, settings.acceptance, record)
    detector.record["seconds"] = round(time.perf_counter() - started, 1)
    return detector


def _features_of(snapshot) -> tuple:
    """(penultimate output, low-level output or None, the logits layer's weight and bias or None) of a model's
    served graph. An ONNX model's graph is opaque: its penultimate features are the input of its last Gemm/MatMul
    (:mod:`zfserve.onnx_graph`) and it has no low-level layer zfserve can name."""
    if snapshot.onnx_bytes is not None:
        from ..onnx_graph import FEATURES, head as graph_head
        try:
            weight, bias = graph_head(snapshot.onnx_bytes)
        except ModelLoadError:       # ViM needs the head's weights; the nearest-neighbour detector does not
            weight = bias = None
        return FEATURES, None, weight, bias
    model = snapshot.model()
    spec = feature_spec(model)
    weight, bias = head(model)
    return spec.penultimate, spec.low_level_output, weight.numpy(), bias.numpy()


# ---------------------------------------------------------------------------------------------------- per precision
def threshold_half(detector: ood.OodDetector, config) -> HeldOut:
    """The threshold images ``detector`` was calibrated on, made again from its record (source and image count)."""
    record = detector.record
    if "source" not in record or "threshold_images" not in record:
        raise ModelLoadError("the statistics do not record their held-out images (source, count)")
    images = record.get("images") or int(record.get("fitted_images", 0)) + int(record["threshold_images"])
    _, threshold = held_out_halves(OodSettings(calibration=record["source"], images=images,
                                               acceptance=detector.acceptance), config)
    if threshold.count != record["threshold_images"]:
        raise ModelLoadError(f"the held-out images of {record['source']} changed: {threshold.count} threshold "
                             f"images now, {record['threshold_images']} when fitted")
    return threshold


def precision_threshold(snapshot, detector: ood.OodDetector, precision: str, engine: str, backend,
                        metadata: dict, *, log=None) -> ood.OodDetector:
    """``detector`` with ``precision``'s own threshold on ``engine`` (``backend``: that graph's runtime,
    ``metadata``: its ONNX metadata): stored, or found now by scoring the threshold images with that graph and
    stored beside the statistics. fp32 keeps the fitted threshold. Where the threshold images cannot be made again
    (a calibration folder moved away), the fp32 threshold stays, with a warning and a note in the record."""
    import warnings
    if precision == "fp32":
        return detector
    identity = ood.graph_identity(precision, metadata)
    stored = ood.find_precision_threshold(snapshot, detector, precision, engine, identity)
    if stored is not None:
        return detector.with_threshold(stored["threshold"], precision, stored.get("accepted_on_threshold_images"))
    try:
        data = threshold_half(detector, snapshot.config)
    except ZFServeError as exc:
        warnings.warn(f"model {snapshot.name}: the out-of-distribution threshold of {precision} is fp32's ({exc})",
                      RuntimeWarning, stacklevel=2)
        return detector.with_threshold(detector.threshold, f"fp32 (no {precision} threshold: {exc})")
    if log:
        log(f"out-of-distribution threshold for {precision} on {engine}: scoring {data.count} threshold images")
    scores = detector.score(backend_features(backend, data, detector.inputs))
    threshold, accepted = ood.threshold_of(scores, detector.acceptance)
    try:
        ood.save_precision_threshold(writable_location(snapshot), precision, engine, detector, identity,
                                     snapshot.sha256, ood.preprocess_hash(snapshot.config), threshold, accepted,
                                     len(scores))
    except (ModelLoadError, OSError) as exc:   # still served with it; found again next time
        warnings.warn(f"model {snapshot.name}: the {precision} out-of-distribution threshold was not stored ({exc})",
                      RuntimeWarning, stacklevel=2)
    return detector.with_threshold(threshold, precision, accepted)


def writable_location(snapshot) -> Path:
    """Where new statistics go: beside the weights when that folder is the user's and writable, else the cache."""
    from ..export import _writable
    from ..weights import EMBEDDED_DIR
    for folder in ood.locations(snapshot):
        embedded = folder.resolve().is_relative_to(EMBEDDED_DIR)
        if not embedded and _writable(folder):
            return folder
    raise ModelLoadError(f"cannot write {ood.OOD_META}: neither the model's folder nor the cache is writable "
                         f"(set ZFSERVE_CACHE_DIR)")


knows_its_data = ood.knows_its_data


def ensure(snapshot, settings: OodSettings | None = None, *, refit: bool = False, log=None) -> tuple[str, Path | None]:
    """Make sure the model has current statistics: fit them when there are none (or ``refit``), provided held-out
    images are known (``settings`` given, or the model's provenance names the synthetic set). Returns what
    happened, in words, and where they are (None when there are none)."""
    detector, _ = ood.find(snapshot)
    if detector is not None and not refit:
        return "current", _current_location(snapshot)
    if settings is None and not knows_its_data(snapshot.config):
        return (f"not fitted: the held-out images of {snapshot.name}'s own data are unknown; give them with "
                f"--calibration DIR (an ImageFolder)"), None
    detector = fit(snapshot, settings, log=log)
    folder = writable_location(snapshot)
    ood.save(detector, folder, snapshot.sha256, ood.preprocess_hash(snapshot.config))
    return "fitted", folder


def _current_location(snapshot) -> Path | None:
    digest = ood.preprocess_hash(snapshot.config)
    return next((folder for folder in ood.locations(snapshot)
                 if ood.is_current(ood.read_meta(folder), snapshot.sha256, digest)), None)


__all__ = ["DEFAULT_FIT_IMAGES", "DEFAULT_THRESHOLD_IMAGES", "OodSettings", "backend_features", "ensure", "features",
           "fit", "held_out_halves", "knows_its_data", "precision_threshold", "threshold_half", "writable_location"]
