"""One row per input: the record function that both runners (this process, or Ray Data actors) call, so both
give the same rows.

Per input: read the bytes (a vanished or unreadable file is a ``failed`` row), hash them, read the header
(size; the decoder's limits: an unsupported, corrupt or oversized file is a ``failed`` row with the decoder's
one-line reason), then classify the batch's readable images together and, per image, sweep the occluder.

The evidence of an image, from its occlusion sweep over the target class (the label when the model knows it,
else the top-1 class), is, with the report's conventions (``zfserve.paper.localization``):
- ``evidence_x``/``evidence_y``: the centre of the window whose occlusion lowers the target's probability most,
  in source-image pixels (mapped back through the resize and centre crop);
- ``evidence_drop``: that largest drop of the target's probability;
- ``evidence_in_mask``: the share of the positive per-pixel attribution (Captum's occlusion attribution, the
  drops averaged over the windows covering a pixel) that falls on the object mask;
- ``pointing_hit``: that centre lies within ``tolerance`` (15) input pixels of the mask.
Flags: ``failed``; ``misclassified`` (label known, top-1 differs); ``low_confidence`` (top-1 probability below the
threshold); ``evidence_off_object`` (a mask is known and the pointing game misses); ``out_of_distribution`` (the
image's out-of-distribution score, ``ood_score``, is above the model's threshold, ``ood_threshold``: it is unlike
the model's data, and its prediction means little; both are null when the model has no statistics). A label that
is none of the model's classes leaves ``correct`` null; the summary counts and names such labels.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ZFServeError
from ..paper.localization import distance_to_mask, drop_point
from ..preprocess import (DEFAULT_MAX_BYTES, decode_image, input_frame, mask_to_input, read_header,
                          resize_and_crop)
from .defaults import DEFAULT_LOW_CONFIDENCE, DEFAULT_OCCLUSION, DEFAULT_TOLERANCE
from .sources import AuditInput, read_bytes

HEATMAPS_DIR = "heatmaps"


def schema():
    """The Arrow schema of ``results.parquet`` (one row per input)."""
    import pyarrow as pa
    f32, i32, s, b = pa.float32(), pa.int32(), pa.string(), pa.bool_()
    return pa.schema([
        ("path", s), ("sha256", s), ("width", i32), ("height", i32), ("status", s), ("error", s),
        ("label", s), ("correct", b), ("predicted", s), ("probability", f32),
        ("top_k_classes", pa.list_(s)), ("top_k_indices", pa.list_(i32)), ("top_k_probabilities", pa.list_(f32)),
        ("target", s), ("evidence_x", f32), ("evidence_y", f32), ("evidence_drop", f32),
        ("evidence_in_mask", f32), ("pointing_distance", f32), ("pointing_hit", b), ("mask_error", s),
        ("occlusion_window", i32), ("occlusion_stride", i32), ("model", s), ("model_version", s),
        ("misclassified", b), ("low_confidence", b), ("evidence_off_object", b), ("failed", b), ("heatmap", s),
        ("ood_score", f32), ("ood_threshold", f32), ("out_of_distribution", b),
        ("occlusion_mode", s),     # what drew the evidence: "exact", or a gated fast mode (audit.gate)
    ])


@dataclass
class AuditSettings:
    """What a record depends on (the same on every worker)."""

    top_k: int = 5
    occlusion: tuple[int, int] | None = DEFAULT_OCCLUSION
    low_confidence: float = DEFAULT_LOW_CONFIDENCE
    tolerance: int = DEFAULT_TOLERANCE
    heatmaps: bool = True
    # The occlusion mode the runner chose (OcclusionMode.to_json(); None: exact), so Ray actors use the same.
    occlusion_mode: dict | None = None


@dataclass
class _Staged:
    """An input after reading: its bytes, hash, size and mask, or why it failed."""

    input: AuditInput
    data: bytes | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    mask: np.ndarray | None = None
    mask_error: str | None = None
    error: str | None = None
    probabilities: np.ndarray | None = None
    ood: object = None                   # its OodScore, when the model has statistics
    prepared: np.ndarray | None = None      # the decoded input, when the backend decodes ahead


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over images (``read`` = read + hash + header)."""

    seconds: dict = field(default_factory=lambda: {"read": 0.0, "decode": 0.0, "classify": 0.0,
                                                   "occlusion": 0.0, "write": 0.0})

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def merge(self, other: dict) -> None:
        for stage, seconds in other.items():
            self.add(stage, seconds)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _stage(item: AuditInput, done: dict) -> tuple[_Staged, bool]:
    """Read, hash and check one input. Returns it and whether a previous run already recorded these bytes."""
    staged = _Staged(item)
    try:
        staged.data = read_bytes(item.path, max_bytes=DEFAULT_MAX_BYTES)
    except ZFServeError as exc:   # over the byte limit: refused without reading it all
        staged.error = _one_line(exc)
        return staged, item.path in done and done[item.path] is None
    except OSError as exc:
        staged.error = f"image: cannot read {item.path}: {exc.strerror or _one_line(exc)}"
        return staged, item.path in done and done[item.path] is None
    staged.sha256 = hashlib.sha256(staged.data).hexdigest()
    if done.get(item.path, "") == staged.sha256:
        return staged, True
    try:
        header = read_header(staged.data, field="image")
        staged.width, staged.height = header.width, header.height
    except ZFServeError as exc:
        staged.error = _one_line(exc)
        return staged, False
    if item.mask_path:
        try:
            mask = decode_image(read_bytes(item.mask_path), field="mask")[..., 0] >= 128
            if mask.shape != (staged.height, staged.width):
                raise ValueError(f"mask: {mask.shape[1]} x {mask.shape[0]} pixels, the image is "
                                 f"{staged.width} x {staged.height}")
            staged.mask = mask
        except (OSError, ValueError, ZFServeError) as exc:
            staged.mask_error = _one_line(exc)
    return staged, False


class Auditor:
    """Turns batches of :class:`AuditInput` into rows with one backend (local engines or a server; see
    :mod:`zfserve.audit.backends`). ``done``: path -> SHA-256 (None: unreadable) of rows already written, which
    are skipped when the bytes are unchanged. ``heatmap_dir``: where flagged images' heatmaps go (None: none)."""

    def __init__(self, backend, settings: AuditSettings, *, done: dict | None = None,
                 heatmap_dir: str | Path | None = None):
        self.backend = backend
        self.settings = settings
        self.done = done or {}
        self.heatmap_dir = Path(heatmap_dir) if heatmap_dir else None
        self.times = StageTimes()
        self.skipped = 0
        self.class_names = list(backend.class_names)

    def audit(self, inputs: list[AuditInput]) -> list[dict]:
        """The rows of ``inputs`` (those not already done)."""
        staged, skipped, seconds = self.stage(inputs)
        self.skipped += skipped
        self.times.add("read", seconds)
        return self.rows(staged)

    def stage(self, inputs: list[AuditInput]) -> tuple[list[_Staged], int, float]:
        """Read, hash and check ``inputs`` (thread-safe: a runner may stage the next batches ahead). Returns the
        inputs still to do, how many were already done, and the seconds it took."""
        t0 = time.perf_counter()
        staged, skipped = [], 0
        for item in inputs:
            s, already = _stage(item, self.done)
            if already:
                skipped += 1
            else:
                staged.append(s)
        seconds = time.perf_counter() - t0
        prepare = getattr(self.backend, "prepare", None)     # decoding too, off the model's thread
        if prepare is not None:
            for s in staged:
                if s.error is None:
                    s.prepared = prepare(s.data)
        return staged, skipped, seconds

    def rows(self, staged: list[_Staged]) -> list[dict]:
        """Classify the staged inputs together, then sweep them (together where the backend batches occluded
        images across inputs): one row per staged input."""
        readable = [s for s in staged if s.error is None]
        answers = self.backend.classify([s.data for s in readable], **self._prepared(readable)) \
            if readable else []
        self.times.merge(self.backend.take_seconds())
        for s, answer in zip(readable, answers):
            if isinstance(answer, Exception):
                s.error = _one_line(answer)
            else:
                s.probabilities, s.ood = answer
        rows = [self._row(s) for s in staged]
        if self.settings.occlusion:
            todo = [(s, row) for s, row in zip(staged, rows) if row["status"] == "ok"]
            t0 = time.perf_counter()
            results = self._sweeps([s for s, _ in todo], [row.pop("_target") for _, row in todo])
            self.times.add("occlusion", time.perf_counter() - t0)
            for (s, row), result in zip(todo, results):
                self._evidence(s, row, result)
        return rows

    def _sweeps(self, staged: list[_Staged], targets: list[int]) -> list:
        window, stride = self.settings.occlusion
        many = getattr(self.backend, "occlude_many", None)
        if many is not None:
            return many([s.data for s in staged], targets, window=window, stride=stride, **self._prepared(staged))
        return [self.backend.occlude(s.data, window=window, stride=stride, target=t) for s, t in zip(staged, targets)]

    def _prepared(self, staged: list[_Staged]) -> dict:
        return {"prepared": [s.prepared for s in staged]} if hasattr(self.backend, "prepare") else {}

    # ------------------------------------------------------------------------------------------ one row
    def _row(self, s: _Staged) -> dict:
        b = self.backend
        row = {"path": s.input.path, "sha256": s.sha256, "width": s.width, "height": s.height, "label": s.input.label,
               "status": "failed" if s.error else "ok", "error": s.error, "mask_error": s.mask_error,
               "model": b.name, "model_version": b.version, "failed": s.error is not None,
               "misclassified": False, "low_confidence": False, "evidence_off_object": False,
               "out_of_distribution": False}
        if s.error:
            return row
        probs = np.asarray(s.probabilities, dtype=np.float64)
        order = np.argsort(-probs, kind="stable")[:self.settings.top_k]
        label_index = self.class_names.index(s.input.label) if s.input.label in self.class_names else None
        row.update(predicted=self.class_names[int(order[0])], probability=float(probs[order[0]]),
                   top_k_indices=[int(i) for i in order], top_k_classes=[self.class_names[int(i)] for i in order],
                   top_k_probabilities=[float(probs[i]) for i in order],
                   correct=None if label_index is None else bool(order[0] == label_index))
        row["misclassified"] = row["correct"] is False
        row["low_confidence"] = row["probability"] < self.settings.low_confidence
        if s.ood is not None:
            row.update(ood_score=s.ood.score, ood_threshold=s.ood.threshold,
                       out_of_distribution=s.ood.out_of_distribution)
        if self.settings.occlusion:
            row["_target"] = int(order[0]) if label_index is None else label_index
        return row

    def _evidence(self, s: _Staged, row: dict, result) -> None:
        window, stride = self.settings.occlusion
        target = int(result.target)
        pre = self.backend.preprocess
        size = pre.crop
        cx, cy = drop_point(result, size)
        sx, sy, left, top = input_frame((s.height, s.width), pre)
        attribution = np.maximum(np.asarray(result.attribution, dtype=np.float64), 0.0)
        measured = result.probability if result.evaluated is None else result.probability[result.evaluated]
        row.update(target=self.class_names[target], occlusion_window=window, occlusion_stride=stride,
                   evidence_x=(cx + left) / sx, evidence_y=(cy + top) / sy,
                   evidence_drop=float(result.base_probability - np.min(measured)), occlusion_mode=result.mode)
        if s.mask is not None:
            mask = mask_to_input(s.mask, pre)
            total = attribution.sum()
            distance = distance_to_mask(mask, cx, cy)
            row.update(evidence_in_mask=float(attribution[mask].sum() / total) if total > 0 else None,
                       pointing_distance=distance if np.isfinite(distance) else None,
                       pointing_hit=bool(distance <= self.settings.tolerance))
            row["evidence_off_object"] = not row["pointing_hit"]
        if self.heatmap_dir is not None and self.settings.heatmaps and \
                (row["misclassified"] or row["low_confidence"] or row["evidence_off_object"] or
                 row["out_of_distribution"]):
            t0 = time.perf_counter()
            row["heatmap"] = self._heatmap(s, result.attribution)
            self.times.add("write", time.perf_counter() - t0)

    def _heatmap(self, s: _Staged, attribution: np.ndarray) -> str:
        """The image beside its attribution overlay (input frame), as a PNG under heatmaps/; returns its
        path relative to the audit's folder."""
        from ..render import grid, heatmap_overlay, png_bytes
        pre = self.backend.preprocess
        picture = resize_and_crop(decode_image(s.data, field="image", working_size=2 * pre.resize),
                                  pre.resize, pre.crop)
        overlay = heatmap_overlay(picture, attribution, kind="diverging")
        name = f"{hashlib.sha256(s.input.path.encode()).hexdigest()[:16]}.png"
        self.heatmap_dir.mkdir(parents=True, exist_ok=True)
        (self.heatmap_dir / name).write_bytes(png_bytes(grid([[picture, overlay]])))
        return f"{HEATMAPS_DIR}/{name}"


__all__ = ["AuditSettings", "Auditor", "HEATMAPS_DIR", "StageTimes", "schema"]
