"""Static int8 quantization of a model's ONNX export: calibration on held-out images, an accuracy gate, and
the cached ``model.int8.onnx`` beside ``model.onnx``.

The steps (:func:`quantize_int8`):
1. calibration images: held-out images of the model's own data (``--calibration``): the synthetic set at a seed
   the model was not trained on (``synthetic`` = seed 5; training used 1, validation 2, the README's
   evaluations 3 and 4), or an ImageFolder (an evenly spaced subset; the rest is the accuracy set);
2. the LRNs are rewritten as straight-line fits over the range their int8 input can take
   (:mod:`.int8_graph`; the range is the calibration set's maximum, which bounds every calibration method's);
3. ONNX Runtime's static QDQ quantization: per-channel symmetric int8 weights, uint8 activations (the
   u8 x s8 kernels are ONNX Runtime's fast path on x86), calibration by ``minmax``, ``entropy`` or
   ``percentile``; the softmax stays float and ``logits`` leave the last Gemm in float, so probabilities are
   not rounded to 8 bits; the out-of-distribution features' reductions (the channel statistics) stay float; an
   ONNX model's last Gemm/MatMul stays float (:data:`ONNX_INT8_FORMAT`);
4. the accuracy gate: top-1 of the int8 graph against the fp32 graph on held-out labelled images; a drop of
   more than ``max_accuracy_drop`` percentage points is refused (:class:`QuantizationRefused`) and nothing is
   written. Images whose labels are not the model's classes (the untrained zfnet-paper on synthetic images)
   bound the drop by the top-1 disagreement instead;
5. the file, written atomically, carries the fp32 file's metadata plus its precision, the SHA-256 of the fp32
   file it was made from, the calibration, the LRN fits and the gate's figures. :func:`ensure_int8` re-makes it
   only when the fp32 file changed (new weights) or other calibration settings are asked for.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import _checks as checks
from ..config import ModelConfig
from ..errors import InvalidArgumentError, ZFServeError
from .int8_graph import (LRN_FIT_TOLERANCE, check_lrn_ranges, exclusive_branch, find_lrns, float_outputs,
                         linearize_lrns, space_to_depth_first_conv)

# zfserve.export (and so torch) is imported where it is used: the CLI reads this module's defaults for --help.
INPUT_NAME, LOGITS, PROBABILITIES = "image", "logits", "probabilities"   # zfserve.export's graph names

INT8_FILE = "model.int8.onnx"
# Bump when the int8 recipe changes, so cached int8 files are re-made.
INT8_FORMAT = "2"     # 2: the out-of-distribution features stay float
# ONNX models (kind "onnx") keep the last Gemm/MatMul (the one making the logits) float. Measured on the README's
# trained ResNet-18 (window 32, stride 16, the occlusion agreement gate's 100 images): with every layer quantized,
# int8's largest-drop location agreed with fp32's on 96% of them (93% strictly; pointing game 75 vs 78); with the
# last linear layer float on 99% (98%; 78 vs 78); keeping the first conv float too changed little (100%, 96%).
ONNX_INT8_FORMAT = "3"   # 3: an ONNX model's last linear layer stays float
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIBRATION = "synthetic"
# Chosen by measurement (README "int8"): on 2,000 held-out images all three methods keep top-1 (99.75%) and,
# but for one percentile run, agree with fp32 on every image; entropy's probabilities are the closest to fp32's
# at 64, 256 and 1024 calibration images (largest difference 0.037-0.038 vs min-max 0.047-0.049).
DEFAULT_CALIBRATION_METHOD = "entropy"
DEFAULT_CALIBRATION_IMAGES = 256
DEFAULT_ACCURACY_IMAGES = 1000
DEFAULT_MAX_ACCURACY_DROP = 0.5      # percentage points of top-1
CALIBRATION_SEED = 5                 # held out: training 1, validation 2, the README's evaluations 3 and 4
ACCURACY_SEED = 3
MAX_IMAGES = 100_000
# The graph rewrites made before quantization (see .int8_graph): the LRNs as straight-line fits, conv1 folded.
REWRITES = ("lrn", "space_to_depth")
BATCH = 16
META_PRECISION = "zfserve.precision"
META_FP32_SHA256 = "zfserve.fp32_sha256"
META_INT8_FORMAT = "zfserve.int8_format"
META_CALIBRATION = "zfserve.calibration"
META_LRN_FIT = "zfserve.lrn_fit"
META_ACCURACY = "zfserve.accuracy"
META_QUANTIZER = "zfserve.quantizer"


class QuantizationRefused(ZFServeError):
    """The int8 graph loses more top-1 accuracy than allowed; nothing was written."""


@dataclass
class Int8Settings:
    """How the int8 file is made: calibration source, image count and method; the accuracy gate."""

    calibration: str = DEFAULT_CALIBRATION     # "synthetic", "synthetic:SEED" or an ImageFolder directory
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    method: str = DEFAULT_CALIBRATION_METHOD
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP
    accuracy_images: int = DEFAULT_ACCURACY_IMAGES

    def validate(self) -> "Int8Settings":
        checks.integer(self.calibration_images, "calibration_images", 1, MAX_IMAGES, label="--calibration-images")
        checks.integer(self.accuracy_images, "accuracy_images", 1, MAX_IMAGES, label="--accuracy-images")
        checks.choice(self.method, "calibration_method", CALIBRATION_METHODS, label="--calibration-method")
        drop = self.max_accuracy_drop
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop <= 100:
            raise InvalidArgumentError(f"--max-accuracy-drop: {drop!r} out of range; accepted 0..100 (percentage "
                                       f"points of top-1)", field="max_accuracy_drop")
        parse_source(self.calibration)
        return self

    def calibration_record(self) -> dict:
        """What the int8 file's metadata records of these settings (and what makes a cached file current)."""
        return {"source": self.calibration, "images": self.calibration_images, "method": self.method}


# ---------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Source:
    kind: str                 # "synthetic" or "folder"
    seed: int = 0
    path: Path | None = None


def parse_source(text: str) -> Source:
    """``synthetic`` (seed 5), ``synthetic:SEED`` or an ImageFolder directory."""
    if not isinstance(text, str) or not text:
        raise InvalidArgumentError(f"--calibration: {text!r}; accepted: synthetic, synthetic:SEED or an "
                                   f"ImageFolder directory", field="calibration")
    if text == "synthetic":
        return Source("synthetic", CALIBRATION_SEED)
    if text.startswith("synthetic:"):
        seed = text.partition(":")[2]
        if not seed.isdigit() or int(seed) >= 2 ** 31:
            raise InvalidArgumentError(f"--calibration: {text!r}: the seed must be an integer 0..2^31-1",
                                       field="calibration")
        return Source("synthetic", int(seed))
    path = Path(text).expanduser()
    if not path.is_dir():
        raise InvalidArgumentError(f"--calibration: {text!r} is neither 'synthetic[:SEED]' nor a directory "
                                   f"(an ImageFolder: root/<class>/<images>)", field="calibration")
    return Source("folder", path=path)


class Batches:
    """uint8 (N, R, R, 3) images read as float32 (B, 3, S, S) batches in the model's input units, preprocessed
    when read: a thousand held-out images cost their 0.2 GB of bytes, not the 0.6 GB of their float inputs."""

    def __init__(self, images: np.ndarray, config: ModelConfig):
        self.images, self.config = images, config
        self.count = len(images)

    def __len__(self) -> int:
        return -(-self.count // BATCH)

    def __getitem__(self, index: int) -> np.ndarray:
        from ..preprocess import to_input
        if not 0 <= index < len(self):
            raise IndexError(index)
        return np.stack([to_input(np.asarray(img), self.config)
                         for img in self.images[index * BATCH:(index + 1) * BATCH]])


@dataclass
class HeldOut:
    """Images in the model's input units, in batches (:class:`Batches`, or a list of float32 arrays), for
    calibration or the accuracy gate."""

    inputs: object
    labels: np.ndarray | None     # in the model's class indices; None when the data's classes are not its own
    description: str

    @property
    def count(self) -> int:
        return getattr(self.inputs, "count", None) or sum(len(batch) for batch in self.inputs)


def training_seeds(config: ModelConfig) -> set[int]:
    data = (config.provenance or {}).get("data") or {}
    return {int(data[key]) for key in ("train_seed",) if isinstance(data.get(key), int)} \
        if data.get("kind") == "synthetic" else set()


def _labels_for(labels: np.ndarray, classes: list[str], config: ModelConfig) -> np.ndarray | None:
    names = list(config.class_names)
    if not set(classes) <= set(names):
        return None
    return np.asarray([names.index(classes[label]) for label in labels], dtype=np.int64)


def _synthetic(seed: int, n: int, config: ModelConfig) -> HeldOut:
    from ..data import CLASSES, synthetic_arrays
    images, labels = synthetic_arrays(seed, n)
    return HeldOut(Batches(images, config), _labels_for(labels, list(CLASSES), config),
                   f"synthetic seed {seed}, {n} images")


def folder_held_out(root: Path, indices: np.ndarray, entries, classes, config: ModelConfig) -> HeldOut:
    from ..preprocess import decode_image, resize_and_crop
    size = config.preprocess.resize
    images = np.stack([resize_and_crop(decode_image(entries[i].path, field=f"calibration {entries[i].path}"),
                                       size, size) for i in indices])
    labels = np.asarray([entries[i].label for i in indices], dtype=np.int64)
    return HeldOut(Batches(images, config), _labels_for(labels, classes, config),
                   f"{root}, {len(indices)} of {len(entries)} images")


def held_out_data(settings: Int8Settings, config: ModelConfig) -> tuple[HeldOut, HeldOut]:
    """(calibration images, accuracy images), disjoint, neither from the model's training set."""
    source = parse_source(settings.calibration)
    n, m = settings.calibration_images, settings.accuracy_images
    if source.kind == "synthetic":
        trained = training_seeds(config)
        if source.seed in trained:
            raise InvalidArgumentError(f"--calibration: synthetic seed {source.seed} is the model's training set "
                                       f"(config.json provenance); use a held-out seed, e.g. synthetic:"
                                       f"{CALIBRATION_SEED}", field="calibration")
        accuracy_seed = ACCURACY_SEED
        while accuracy_seed in trained or accuracy_seed == source.seed:
            accuracy_seed += 1
        return _synthetic(source.seed, n, config), _synthetic(accuracy_seed, m, config)
    from ..data.folders import folder_entries
    entries, classes = folder_entries(source.path)
    if len(entries) < n + 1:
        raise InvalidArgumentError(f"--calibration-images: {n} of the {len(entries)} images of {source.path} leave "
                                   f"none for the accuracy gate; accepted 1..{len(entries) - 1}",
                                   field="calibration_images")
    calibration = np.unique(np.linspace(0, len(entries) - 1, n).round().astype(int))
    rest = np.setdiff1d(np.arange(len(entries)), calibration)
    accuracy = rest[np.unique(np.linspace(0, len(rest) - 1, min(m, len(rest))).round().astype(int))]
    return (folder_held_out(source.path, calibration, entries, classes, config),
            folder_held_out(source.path, accuracy, entries, classes, config))


# ---------------------------------------------------------------------------------------------------- compare
def agreement_report(reference: np.ndarray, probabilities: np.ndarray, labels: np.ndarray | None) -> dict:
    """top-1 (and top-5) of both against the labels, top-1 agreement and the probability differences."""
    ref_top1, top1 = reference.argmax(1), probabilities.argmax(1)
    diff = np.abs(probabilities.astype(np.float64) - reference)
    report = {"n": int(len(reference)), "agreement": float(np.mean(ref_top1 == top1)),
              "max_abs_probability_diff": float(diff.max()), "mean_abs_probability_diff": float(diff.mean())}
    if labels is not None:
        k = min(5, reference.shape[1])
        hit = lambda p: np.any(np.argsort(-p, axis=1, kind="stable")[:, :k] == labels[:, None], axis=1)  # noqa
        report.update(reference_top1=float(np.mean(ref_top1 == labels)), top1=float(np.mean(top1 == labels)),
                      reference_top5=float(np.mean(hit(reference))), top5=float(np.mean(hit(probabilities))),
                      top5_k=k)
        report["top1_drop_pt"] = 100.0 * (report["reference_top1"] - report["top1"])
    return report


def _probabilities(session, data: HeldOut) -> np.ndarray:
    return np.concatenate([session.run([PROBABILITIES], {INPUT_NAME: batch})[0] for batch in data.inputs])


def _gate(report: dict, settings: Int8Settings, description: str) -> None:
    labelled = "top1_drop_pt" in report
    drop = report["top1_drop_pt"] if labelled else 100.0 * (1.0 - report["agreement"])
    report["gate"] = {"measure": "top-1 drop" if labelled else "top-1 disagreement (bounds the drop; the data's "
                      "classes are not the model's)", "value_pt": drop, "max_pt": settings.max_accuracy_drop}
    if drop > settings.max_accuracy_drop:
        what = (f"top-1 {100 * report['reference_top1']:.2f}% -> {100 * report['top1']:.2f}%" if labelled
                else f"top-1 agreement with fp32 {100 * report['agreement']:.2f}%")
        raise QuantizationRefused(
            f"int8: refused: {what} on {description}: a {drop:.2f} pt {'drop' if labelled else 'disagreement'} "
            f"exceeds --max-accuracy-drop {settings.max_accuracy_drop:g}; calibrate on more or other images "
            f"(--calibration, --calibration-images) or try another --calibration-method")


# ---------------------------------------------------------------------------------------------------- quantize
def _reader(data: HeldOut):
    """ONNX Runtime's calibration reader over the calibration batches; ``set_range`` lets the calibrator
    collect one batch at a time (its histograms would otherwise hold every activation of every image)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.start, self.stop = 0, len(data.inputs)

        def __len__(self):
            return len(data.inputs)

        def set_range(self, start_index: int, end_index: int):
            self.start, self.stop = start_index, end_index

        def get_next(self):
            if self.start >= self.stop:
                return None
            self.start += 1
            return {INPUT_NAME: data.inputs[self.start - 1]}

    return Reader()


def _lrn_input_maxima(proto, data: HeldOut) -> dict[str, float]:
    """The largest value of every LRN input over the calibration images (fp32 graph, those tensors as outputs)."""
    import onnx

    from ..export import ort_session
    names = [lrn.x for lrn in find_lrns(proto)]
    if not names:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    session = ort_session(probe.SerializeToString())
    maxima = dict.fromkeys(names, 0.0)
    for batch in data.inputs:
        for name, value in zip(names, session.run(names, {INPUT_NAME: batch})):
            maxima[name] = max(maxima[name], float(value.max()))
    return maxima


def _not_preprocessing_advice(record) -> bool:
    """Drops the quantizer's advice to run its pre-processing (symbolic shape inference and ONNX Runtime's basic
    optimizations): the exported graph has static shapes and folded constants already."""
    return "pre-processing" not in record.getMessage()


def _quantize_static(proto, data: HeldOut, method: str, float_nodes=()):
    """ONNX Runtime's static QDQ quantization of ``proto`` -> the quantized ModelProto; the softmax and
    ``float_nodes`` stay float."""
    import contextlib
    import io
    import logging

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    keep_float = [node.name for node in proto.graph.node if node.op_type == "Softmax"] + list(float_nodes)
    root = logging.getLogger()
    root.addFilter(_not_preprocessing_advice)
    # The histogram calibrators print their progress; a command's output is its own.
    quiet = contextlib.redirect_stdout(io.StringIO()) if method != "minmax" else contextlib.nullcontext()
    try:
        with tempfile.TemporaryDirectory(prefix="zfserve-int8.") as tmp, quiet:
            out = Path(tmp) / "int8.onnx"
            quantize_static(proto, str(out), _reader(data), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method], nodes_to_exclude=keep_float,
                            extra_options={"CalibStridedMinMax": 1})
            return onnx.load(str(out))
    finally:
        root.removeFilter(_not_preprocessing_advice)


def quantize_int8(fp32_path: str | Path, out_path: str | Path, config: ModelConfig,
                  settings: Int8Settings | None = None, *, data: tuple[HeldOut, HeldOut] | None = None,
                  rewrites: tuple[str, ...] = REWRITES) -> dict:
    """Make the int8 graph of the fp32 export at ``fp32_path`` and write it to ``out_path`` (atomically), unless
    the accuracy gate refuses it (:class:`QuantizationRefused`, nothing written). Returns the metadata record
    (calibration, LRN fits, accuracy). ``data`` overrides the (calibration, accuracy) images."""
    import onnx
    import onnxruntime

    from ..export import META_OOD_FEATURES, ExportError, ort_session, read_metadata, write_checked
    settings = (settings or Int8Settings()).validate()
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    fp32_bytes = fp32_path.read_bytes()
    features = json.loads(read_metadata(fp32_bytes).get(META_OOD_FEATURES) or "[]")
    calibration, accuracy = data or held_out_data(settings, config)
    proto = onnx.load_from_string(fp32_bytes)
    fits = linearize_lrns(proto, _lrn_input_maxima(proto, calibration), LRN_FIT_TOLERANCE) \
        if "lrn" in rewrites else []
    folded = space_to_depth_first_conv(proto, INPUT_NAME) if "space_to_depth" in rewrites else None
    # The features' own reductions stay float, and so do the outputs they make. A feature the classification
    # path reads on (fc7) keeps its 8-bit output: its ReLU is folded into that quantization.
    branch = exclusive_branch(proto, features)
    made_in_branch = [node.output[0] for node in proto.graph.node if node.name in branch and node.output[0] in features]
    head = float_head(proto) if int8_format(config) == ONNX_INT8_FORMAT else []
    float_nodes = ([folded["space_to_depth"]] if folded else []) + branch + head
    quantized = _quantize_static(proto, calibration, settings.method, float_nodes)
    del proto
    float_outputs(quantized, [LOGITS, *made_in_branch])
    problems = check_lrn_ranges(quantized, fits)
    if problems:
        raise ExportError("int8: the LRN fits do not hold in the quantized graph: " + "; ".join(problems))
    report = agreement_report(_probabilities(ort_session(fp32_bytes), accuracy),
                              _probabilities(ort_session(quantized.SerializeToString()), accuracy), accuracy.labels)
    report["data"] = accuracy.description
    _gate(report, settings, accuracy.description)
    record = {META_PRECISION: "int8", META_FP32_SHA256: hashlib.sha256(fp32_bytes).hexdigest(),
              META_INT8_FORMAT: int8_format(config),
              META_CALIBRATION: json.dumps({**settings.calibration_record(), "data": calibration.description}),
              META_LRN_FIT: json.dumps(fits), META_ACCURACY: json.dumps(report),
              META_QUANTIZER: f"onnxruntime {onnxruntime.__version__} static QDQ: weights int8 per channel "
                              f"(symmetric), activations uint8, softmax and logits float"
                              f"{'; float: ' + ', '.join(head) if head else ''}; rewrites: "
                              f"{', '.join(rewrites) or 'none'}"}
    metadata = {**read_metadata(fp32_bytes), **record}
    del quantized.metadata_props[:]
    for key, value in metadata.items():
        quantized.metadata_props.add(key=key, value=value)
    write_checked(quantized.SerializeToString(), out_path, "int8")
    return {key: json.loads(value) if key in (META_CALIBRATION, META_LRN_FIT, META_ACCURACY) else value
            for key, value in record.items()}


# ---------------------------------------------------------------------------------------------------- cache
def int8_format(config: ModelConfig | None) -> str:
    """The int8 recipe's version for ``config``'s kind of model (None: the family's)."""
    from ..capabilities import ONNX
    return ONNX_INT8_FORMAT if config is not None and config.kind == ONNX else INT8_FORMAT


def float_head(proto) -> list[str]:
    """The name of an ONNX model's last Gemm/MatMul, which stays float (see :data:`ONNX_INT8_FORMAT`)."""
    from ..onnx_graph import last_linear
    last = last_linear(proto.graph)
    return [last.name] if last is not None and last.name else []


def is_current_int8(path: Path, fp32_sha256: str, settings: Int8Settings | None = None,
                    config: ModelConfig | None = None) -> bool:
    """Whether ``path`` is an int8 file made from the fp32 file with this hash by the recipe of ``config``'s kind
    of model (and, when ``settings`` are given, with the same calibration)."""
    from ..export import read_metadata
    if not path.is_file():
        return False
    meta = read_metadata(path)
    if meta.get(META_FP32_SHA256) != fp32_sha256 or meta.get(META_INT8_FORMAT) != int8_format(config):
        return False
    if settings is None:
        return True
    try:
        recorded = json.loads(meta.get(META_CALIBRATION, "{}"))
    except json.JSONDecodeError:
        return False
    return all(recorded.get(k) == v for k, v in settings.calibration_record().items())


def _int8_places(fp32_path, config: ModelConfig, settings: Int8Settings | None) -> tuple[Path | None, list[Path]]:
    """(a current int8 file for the fp32 export at ``fp32_path``, or None; where one may be written)."""
    from ..export import cache_root
    fp32_path = Path(fp32_path)
    digest = hashlib.sha256(fp32_path.read_bytes()).hexdigest()
    candidates = [fp32_path.parent / INT8_FILE, cache_root() / f"{config.name}-int8-{digest[:16]}" / INT8_FILE]
    return next((p for p in candidates if is_current_int8(p, digest, settings, config)), None), candidates


def find_int8(fp32_path: str | Path, config: ModelConfig) -> Path | None:
    """The current int8 file for the fp32 export at ``fp32_path`` when one has been made (nothing is made)."""
    return _int8_places(fp32_path, config, None)[0]


def ensure_int8(fp32_path: str | Path, config: ModelConfig, settings: Int8Settings | None = None) -> Path:
    """The path of a current int8 file for the fp32 export at ``fp32_path``: ``model.int8.onnx`` beside it (or,
    where that folder is not writable, in the user cache), made only when missing, made from another fp32 file
    (the weights changed), or made with other calibration settings than ``settings`` (when given; None: any)."""
    from ..export import ExportError, _writable
    found, candidates = _int8_places(fp32_path, config, settings)
    if found is not None:
        return found
    for path in candidates:
        if _writable(path.parent):
            quantize_int8(fp32_path, path, config, settings)
            return path
    raise ExportError(f"int8: cannot write {INT8_FILE}: neither {candidates[0].parent} nor the cache directory "
                      f"{candidates[-1].parent} is writable (set ZFSERVE_CACHE_DIR)")
