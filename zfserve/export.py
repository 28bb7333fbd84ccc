"""ONNX export of a model of ZFNet's family (ZFNet, AlexNet, VGG), with a parity check against PyTorch, and the
cached ``model.onnx`` of a model.

The graph has one input, ``image`` (float32 N x 3 x S x S, preprocessed, dynamic N), and the outputs
``logits``, ``probabilities`` (softmax inside the graph) and, when asked, named intermediate activations
(``conv5``, ``pool5``, ``conv5_3``, ... the model's own layer names, taken by ``LayeredCNN.trace``) and the
features the out-of-distribution score reads (:mod:`zfserve.engine.ood_features`; the cached export has them).

Local response normalization is written as ONNX ops chosen for ONNX Runtime's CPU speed (see
:func:`lrn_to_onnx`, which the occlusion engine's stage graphs use too); every ONNX Runtime session is made by
:func:`ort_session`, with one set of options.

Every export runs ``onnx.checker`` (full check) and compares ONNX Runtime against eager PyTorch on a fresh
random batch before the file is moved into place; a failure raises :class:`ExportError` and leaves no file.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__
from . import _checks as checks
from .config import SERVING_KEYS, ModelConfig
from .engine.ood_features import FeatureSpec, feature_spec, feature_tensors
from .errors import InvalidArgumentError, ModelLoadError, ZFServeError
from .model import LayeredCNN
from .weights import EMBEDDED_DIR, ONNX_FILE, WEIGHTS_FILE, state_dict_hash

INPUT_NAME = "image"
LOGITS = "logits"
PROBABILITIES = "probabilities"
MIN_OPSET, MAX_OPSET = 17, 20
# Bump when the exported graph changes shape or semantics, so cached files are re-exported.
EXPORT_FORMAT = "2"     # 2: the out-of-distribution features are outputs
# Metadata keys written into every exported file.
META_CLASS_NAMES = "zfserve.class_names"
META_PREPROCESS = "zfserve.preprocess"
META_MODEL_NAME = "zfserve.model_name"
META_MODEL_VERSION = "zfserve.model_version"
META_WEIGHTS_HASH = "zfserve.weights_sha256"
META_WEIGHTS_SOURCE = "zfserve.weights_source"
META_CONFIG_HASH = "zfserve.config_sha256"
META_OUTPUTS = "zfserve.outputs"
META_OOD_FEATURES = "zfserve.ood_features"
META_FORMAT = "zfserve.export_format"
META_EXPORTER = "zfserve.exporter"

PARITY_BATCH = 3          # not the batch the graph was traced with: exercises the dynamic batch dimension
PROBABILITY_ATOL = 1e-5
ACTIVATION_RTOL = 1e-4    # of the largest magnitude of that output


class ExportError(ZFServeError):
    """The exported graph failed the ONNX checker or does not match PyTorch."""


# ---------------------------------------------------------------------------------------------------- graphs
class OnnxGraph:
    """An ONNX graph built node by node: :meth:`op` adds a node and returns its output's name, :meth:`const`
    an initializer. The occlusion engine's stage graphs are written this way."""

    def __init__(self, prefix: str = ""):
        self.nodes, self.initializers, self.prefix, self._count = [], [], prefix, 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}{self._count}"

    def const(self, array, name: str | None = None) -> str:
        from onnx import numpy_helper
        name = name or self._name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attributes) -> str:
        from onnx import helper
        out = out or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attributes))
        return out

    def model(self, inputs, outputs, opset: int = MIN_OPSET):
        """The finished ``onnx.ModelProto`` (``inputs``/``outputs``: value infos, see :func:`tensor_info`)."""
        from onnx import helper
        graph = helper.make_graph(self.nodes, "zfserve_stage", inputs, outputs, self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def tensor_info(name: str, shape):
    """A float32 graph input or output (``shape`` may name dynamic dimensions, or be None)."""
    from onnx import TensorProto, helper
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


class _SymbolicGraph:
    """:class:`OnnxGraph`'s two calls over the TorchScript exporter's graph context (in a ``symbolic``)."""

    def __init__(self, g):
        self.g = g

    def const(self, array, name: str | None = None):
        return self.g.op("Constant", value_t=torch.from_numpy(np.ascontiguousarray(array)))

    def op(self, op_type: str, *inputs, out: str | None = None, **attributes):
        return self.g.op(op_type, *inputs, **{f"{key}_i": value for key, value in attributes.items()})


def lrn_to_onnx(graph, x, channels: int, size: int, alpha: float, beta: float, k: float, out: str | None = None):
    """Local response normalization, y = x / (k + alpha/size * sum of x^2 over ``size`` maps)^beta, written as
    ONNX ops chosen for ONNX Runtime's CPU speed; ``graph`` is an :class:`OnnxGraph` or the exporter's context.

    The window sum over channels is a 1x1 Conv with a banded C x C weight: ONNX Runtime runs it multi-threaded
    in its blocked (NCHWc) conv layout, so no layout reorder is needed around it. beta = 0.75 (the paper's)
    becomes sqrt(s) * sqrt(sqrt(s)), much cheaper than Pow. PyTorch's own decomposition (Pad + 3-D AveragePool
    + Pow, with shape arithmetic and an ``If``) and ONNX's ``LRN`` op (single-threaded, layout reorders; over
    10x slower on the occlusion engine's tiles) were both slower, measured.
    """
    index = np.arange(channels)
    offset = index[None, :] - index[:, None]  # input channel minus output channel
    # PyTorch pads the channel axis by size // 2 in front and (size - 1) // 2 behind, then averages.
    inside = (offset >= -(size // 2)) & (offset <= (size - 1) // 2)
    band = np.where(inside, np.float32(alpha / size), np.float32(0.0)).reshape(channels, channels, 1, 1)
    scale = graph.op("Conv", graph.op("Mul", x, x), graph.const(band), graph.const(np.full(channels, k, np.float32)),
                     kernel_shape=[1, 1])
    if beta == 0.75:
        root = graph.op("Sqrt", scale)
        denominator = graph.op("Mul", root, graph.op("Sqrt", root))
    else:
        denominator = graph.op("Pow", scale, graph.const(np.array(beta, np.float32)))
    return graph.op("Div", x, denominator, out=out)


class _LRNFunction(torch.autograd.Function):
    """PyTorch's LRN in eager mode; in the exported graph, :func:`lrn_to_onnx`."""

    @staticmethod
    def forward(ctx, x, channels, size, alpha, beta, k):
        return F.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g, x, channels, size, alpha, beta, k):
        return lrn_to_onnx(_SymbolicGraph(g), x, channels, size, alpha, beta, k)


class _ExportLRN(nn.Module):
    def __init__(self, lrn: nn.LocalResponseNorm):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = lrn.size, lrn.alpha, lrn.beta, lrn.k

    def forward(self, x):
        return _LRNFunction.apply(x, int(x.shape[1]), self.size, self.alpha, self.beta, self.k)


class _ExportGraph(nn.Module):
    """The exported function: image -> logits, probabilities, requested activations, out-of-distribution
    features (with ``features``)."""

    def __init__(self, model: LayeredCNN, extra_outputs: tuple[str, ...], features: FeatureSpec | None = None):
        super().__init__()
        self.model = model
        self.extra_outputs = extra_outputs
        self.features = features

    def forward(self, image):
        layers = self.extra_outputs + (self.features.layers if self.features else ())
        if not layers:
            logits = self.model(image)
            return logits, torch.softmax(logits, dim=1)
        trace = self.model.trace(image, layers=layers)
        extras = [trace.activations[name] for name in self.extra_outputs]
        if self.features:
            extras += feature_tensors(trace.activations, self.features)
        return (trace.logits, torch.softmax(trace.logits, dim=1), *extras)


def _export_copy(model: LayeredCNN) -> LayeredCNN:
    """A CPU eval copy with every LocalResponseNorm swapped for the ONNX-friendly form (the caller's model,
    which may be serving other requests, is never mutated)."""
    clone = copy.deepcopy(model).to("cpu").eval()
    for name, child in list(clone.named_children()):
        if isinstance(child, nn.LocalResponseNorm):
            setattr(clone, name, _ExportLRN(child))
    return clone


# ---------------------------------------------------------------------------------------------------- export
def config_hash(config: ModelConfig) -> str:
    """SHA-256 of the config as stored in config.json (class names and preprocessing included), less the
    provenance notes, which loading adds to (the source directory), and the serving choices (precision,
    engine), none of which change the graph."""
    data = {k: v for k, v in config.to_json().items() if k != "provenance" and k not in SERVING_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _check_extra_outputs(model: LayeredCNN, extra_outputs) -> tuple[str, ...]:
    if isinstance(extra_outputs, str):
        extra_outputs = (extra_outputs,)
    extra = tuple(extra_outputs)
    allowed = list(model.layer_names[:-1])  # the last fc layer is the logits output already
    bad = [n for n in extra if n not in allowed]
    if bad or len(set(extra)) != len(extra):
        raise InvalidArgumentError(f"extra_outputs: {list(extra)} must be distinct layer names from {allowed}",
                                   field="extra_outputs")
    return extra


def export_onnx(model: LayeredCNN, path: str | Path, *, extra_outputs=(), opset: int = 17, check: bool = True,
                weights_sha256: str | None = None, weights_source: str = "state_dict",
                ood_features: bool = False) -> Path:
    """Export ``model`` to ``path`` (written atomically) and return the path. ``ood_features``: add the outputs
    the out-of-distribution score reads (:func:`zfserve.engine.ood_features.feature_spec`).

    ``weights_sha256`` identifies the source weights in the metadata (default: :func:`state_dict_hash` of
    ``model``; :func:`ensure_onnx` passes the hash of the directory's weights file). With ``check`` (default)
    the file must pass ``onnx.checker`` (full check) and match eager PyTorch on a random batch.
    """
    import onnx

    if not isinstance(model, LayeredCNN):
        raise InvalidArgumentError(f"model: expected a zfserve LayeredCNN (ZFNet, AlexNet, VGG), got "
                                   f"{type(model).__name__}", field="model")
    checks.integer(opset, "opset", MIN_OPSET, MAX_OPSET)
    extra = _check_extra_outputs(model, extra_outputs)
    path = Path(path)
    config = model.config
    size = model.input_size
    features = feature_spec(model) if ood_features else None
    clash = sorted(set(extra) & set(features.outputs if features else ()))
    if clash:
        raise InvalidArgumentError(f"extra_outputs: {clash} are out-of-distribution feature outputs already",
                                   field="extra_outputs")
    output_names = [LOGITS, PROBABILITIES, *extra, *(features.outputs if features else ())]
    graph = _ExportGraph(_export_copy(model), extra, features)
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * _input_spread(config)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The TorchScript exporter (dynamo=False) is the one that honours the LRN symbolic above; its
        # deprecation and tracer warnings are about features this fixed graph does not use.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), buffer, input_names=[INPUT_NAME], output_names=output_names,
                          dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *output_names]},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    del buffer
    metadata = export_metadata(config, output_names, features.outputs if features else [],
                               weights_sha256 or state_dict_hash(model), weights_source,
                               f"zfserve {__version__}, torch {torch.__version__}, opset {opset}")
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"{config.architecture} {config.name} (version {config.version}) exported by zfserve"

    data = proto.SerializeToString()
    del proto
    return write_checked(data, path, "export",
                         verify=(lambda tmp: check_parity(tmp, model, extra_outputs=extra, features=features))
                         if check else None,
                         check=check)


def export_metadata(config: ModelConfig, outputs, features, weights_sha256: str, weights_source: str,
                    exporter: str) -> dict[str, str]:
    """The metadata every served graph carries (what it was made from, with which config)."""
    return {META_CLASS_NAMES: json.dumps(list(config.class_names)),
            META_PREPROCESS: json.dumps(config.preprocess.to_json()), META_MODEL_NAME: config.name,
            META_MODEL_VERSION: str(config.version), META_WEIGHTS_HASH: weights_sha256,
            META_WEIGHTS_SOURCE: weights_source, META_CONFIG_HASH: config_hash(config),
            META_OUTPUTS: json.dumps(list(outputs)), META_OOD_FEATURES: json.dumps(list(features)),
            META_FORMAT: EXPORT_FORMAT, META_EXPORTER: exporter}


def _input_spread(config: ModelConfig) -> float:
    """The standard deviation of the random inputs the export traces and checks with: a spread like real
    images' in the model's input units (50 for raw pixels minus a mean; about 1 for torchvision's units)."""
    return 50.0 * config.preprocess.input_limit() / 255.0


def write_checked(data: bytes, path: Path, what: str, *, verify=None, check: bool = True) -> Path:
    """Write a serialized ONNX model to ``path`` in one step: a temporary file beside it, then (with ``check``)
    the full ONNX checker and ``verify(temporary path)``, then a rename, so ``path`` only ever holds a file that
    passed and a failure leaves nothing behind. ``what`` starts every error message (the command's name)."""
    import onnx
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ExportError(f"{what}: cannot write {path}: {exc.strerror or exc}; use another --out, or set "
                          f"ZFSERVE_CACHE_DIR to a writable disk") from None
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except OSError as exc:   # a full disk (ENOSPC) shows here, or at the close inside the with
            raise ExportError(f"{what}: cannot write {path}: {exc.strerror or exc}; free space, or set "
                              f"ZFSERVE_CACHE_DIR to another disk") from None
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the file is as readable as the weights beside it
        if check:
            try:
                onnx.checker.check_model(str(tmp), full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
                raise ExportError(f"{what}: {path.name} fails the ONNX checker: {exc}") from None
            if verify is not None:
                verify(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_parity(onnx_path: str | Path, model: LayeredCNN, *, extra_outputs=(), batch: int = PARITY_BATCH,
                 seed: int = 1, features: FeatureSpec | None = None) -> float:
    """Run the ONNX file under ONNX Runtime and eager PyTorch on one random batch; raise ExportError unless
    probabilities agree within 1e-5 absolute and every other output within 1e-4 of its largest magnitude.
    Returns the largest probability difference."""
    extra = tuple(extra_outputs)
    size = model.input_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * _input_spread(model.config)
    session = ort_session(onnx_path)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {INPUT_NAME: x.numpy()})))
    if next(model.parameters()).device.type != "cpu":
        # The reference runs in fp32 on the CPU, like the session: GPU convs may use TF32 and miss 1e-5.
        model = copy.deepcopy(model).to("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            trace = model.trace(x, layers=extra + (features.layers if features else ()))
    finally:
        model.train(was_training)
    expected = {LOGITS: trace.logits, PROBABILITIES: torch.softmax(trace.logits, dim=1),
                **{name: trace.activations[name] for name in extra}}
    if features:
        expected.update(zip(features.outputs, feature_tensors(trace.activations, features)))
    worst = 0.0
    for name, reference in expected.items():
        reference = reference.float().cpu().numpy()
        if name not in got or got[name].shape != reference.shape:
            raise ExportError(f"export parity: output {name!r} has shape "
                              f"{None if name not in got else got[name].shape}, PyTorch gives {reference.shape}")
        diff = float(np.abs(got[name] - reference).max())
        if name == PROBABILITIES:
            worst = diff
            limit = PROBABILITY_ATOL
        else:
            limit = ACTIVATION_RTOL * max(1e-6, float(np.abs(reference).max()))
        if not diff <= limit:  # also catches NaN
            raise ExportError(f"export parity: output {name!r} differs from PyTorch by {diff:.3g} "
                              f"(accepted: at most {limit:.3g})")
    return worst


def ort_session(model, *, threads: int | None = None, providers=("CPUExecutionProvider",),
                profile_prefix: str | None = None):
    """An ONNX Runtime session for a file path or serialized model bytes, with zfserve's one set of options:
    every graph optimization, sequential execution, ``threads`` intra-op threads (None: ONNX Runtime's
    default, all cores), one inter-op thread (the graphs are chains: a second pool only competes for the same
    cores), errors-only logging and, with ``profile_prefix``, the profiler on."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=list(providers))


# ---------------------------------------------------------------------------------------------------- cache
def cache_root() -> Path:
    """Where exports of built-in models, in-memory models and read-only model directories are cached:
    ``$ZFSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/zfserve``, else ``~/.cache/zfserve``."""
    if os.environ.get("ZFSERVE_CACHE_DIR"):
        return Path(os.environ["ZFSERVE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "zfserve"


def read_metadata(path_or_bytes: str | Path | bytes) -> dict[str, str]:
    """The metadata props of an ONNX file or its bytes (empty if missing or unreadable)."""
    import onnx
    try:
        if isinstance(path_or_bytes, bytes):
            proto = onnx.load_from_string(path_or_bytes)
        else:
            proto = onnx.load(str(path_or_bytes), load_external_data=False)
    except Exception:  # a truncated or foreign file is simply not a usable cache entry  # noqa: BLE001
        return {}
    return {p.key: p.value for p in proto.metadata_props}


def _is_current(path: Path, weights_sha256: str, config_sha256: str) -> bool:
    if not path.is_file():
        return False
    meta = read_metadata(path)
    return (meta.get(META_WEIGHTS_HASH) == weights_sha256 and meta.get(META_CONFIG_HASH) == config_sha256
            and meta.get(META_FORMAT) == EXPORT_FORMAT)


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".zfserve-write-probe.")
        probe.close()
        return True
    except OSError:
        return False


def ensure_onnx(model=None) -> Path:
    """The path of an up-to-date ONNX export of a model, exporting it only when needed.

    ``model``: a name or directory (read once as a :class:`~zfserve.weights.Snapshot`), a Snapshot, or an
    in-memory model. A model directory keeps ``model.onnx`` beside its weights; it is re-exported when the
    hash of the weights (or of config.json) no longer matches the file's metadata. Read-only directories (an
    installed package), embedded models (package data), the built-in ``zfnet-paper`` and in-memory models use
    ``cache_root()/<name>-<hash>/model.onnx``, keyed by the weights hash.
    """
    from .weights import Snapshot, read_snapshot

    if isinstance(model, LayeredCNN):
        source, source_kind, config, candidates, build = (state_dict_hash(model), "state_dict", model.config, [],
                                                          lambda: model)
    else:
        snap = model if isinstance(model, Snapshot) else read_snapshot(model)
        if snap.onnx_bytes is not None:
            return _ensure_served(snap)
        source, config, build = snap.sha256, snap.config, snap.model
        source_kind = WEIGHTS_FILE if snap.directory is not None else "state_dict"
        # Embedded models are package data: never write beside them, use the cache.
        local = snap.directory is not None and not snap.directory.resolve().is_relative_to(EMBEDDED_DIR)
        candidates = [snap.directory] if local else []
    digest = config_hash(config)
    candidates.append(cache_root() / f"{config.name}-{source[:16]}")
    for folder in candidates:
        if _is_current(folder / ONNX_FILE, source, digest):
            return folder / ONNX_FILE
    for folder in candidates:
        if _writable(folder):
            return export_onnx(build(), folder / ONNX_FILE, weights_sha256=source, weights_source=source_kind,
                               ood_features=True)
    raise ModelLoadError(f"cannot write {ONNX_FILE}: neither {candidates[0]} nor the cache directory "
                         f"{candidates[-1]} is writable (set ZFSERVE_CACHE_DIR)")


# ---------------------------------------------------------------------------------------------------- ONNX models
def _ensure_served(snap) -> Path:
    """An ONNX model's served graph (:func:`zfserve.onnx_graph.served_graph`): ``served.onnx`` beside its
    ``model.onnx`` (or in the cache), made again when model.onnx's bytes or config.json change."""
    from .onnx_graph import FEATURES, SERVED_FILE, served_graph
    digest = config_hash(snap.config)
    local = snap.directory is not None and not snap.directory.resolve().is_relative_to(EMBEDDED_DIR)
    candidates = ([snap.directory] if local else []) + [cache_root() / f"{snap.config.name}-{snap.sha256[:16]}"]
    for folder in candidates:
        if _is_current(folder / SERVED_FILE, snap.sha256, digest):
            return folder / SERVED_FILE
    import onnx
    opset = next((o.version for o in onnx.load_from_string(snap.onnx_bytes).opset_import if o.domain in ("", "ai.onnx")),
                 None)
    outputs = [LOGITS, PROBABILITIES, FEATURES]
    metadata = export_metadata(snap.config, outputs, [FEATURES], snap.sha256, ONNX_FILE,
                               f"zfserve {__version__}: model.onnx wrapped (opset {opset})")
    data = served_graph(snap.onnx_bytes, snap.config, metadata)
    for folder in candidates:
        if _writable(folder):
            return write_checked(data, folder / SERVED_FILE, "import",
                                 verify=lambda tmp: check_served(tmp, snap.onnx_bytes, snap.config))
    raise ModelLoadError(f"cannot write {SERVED_FILE}: neither {candidates[0]} nor the cache directory "
                         f"{candidates[-1]} is writable (set ZFSERVE_CACHE_DIR)")


def check_served(served, original: bytes, config: ModelConfig, batch: int = PARITY_BATCH) -> float:
    """Run the served graph and the user's graph on one random batch; raise ExportError unless the served
    probabilities are the user's output (through a softmax when it gives logits) within 1e-5. Returns the largest
    difference."""
    rng = np.random.default_rng(1)
    size = config.input_size
    x = (rng.standard_normal((batch, 3, size, size)) * _input_spread(config)).astype(np.float32)
    theirs = ort_session(original)
    reference = theirs.run(None, {config.onnx["input"]: x})[0].reshape(batch, -1).astype(np.float64)
    if config.onnx["output"] == "logits":
        reference = np.exp(reference - reference.max(axis=1, keepdims=True))
        reference /= reference.sum(axis=1, keepdims=True)
    got = ort_session(served).run([PROBABILITIES], {INPUT_NAME: x})[0]
    if got.shape != reference.shape:
        raise ExportError(f"import: the served graph gives probabilities of shape {got.shape}, the model "
                          f"{reference.shape}")
    diff = float(np.abs(got - reference).max())
    if not diff <= PROBABILITY_ATOL:
        raise ExportError(f"import: the served graph's probabilities differ from the model's by {diff:.3g} "
                          f"(accepted: at most {PROBABILITY_ATOL:g})")
    return diff
