"""``zfserve import onnx``: any ONNX image classifier (one NCHW float input, one class output) as a model
directory: ``model.onnx`` (the bytes as given) + ``config.json`` (``kind: onnx``; classes, input, preprocessing,
whether the output is logits or probabilities).

The graph must pass the ONNX checker (full check), load in ONNX Runtime and classify a test image; its input side
is read from the graph (or, when the graph leaves it dynamic, is the crop) and checked against ``crop``. Every
refusal is one line naming what is wrong and what is accepted, and nothing is written: the directory is built
beside ``out``, checked as a whole (the served graph against the user's on a random batch, one classification
of a test image) and renamed into place. With ``calibration`` (an ImageFolder of held-out images of the model's
own data) the out-of-distribution statistics are fitted too.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .config import ONNX_OUTPUTS, ModelConfig, PreprocessConfig
from .errors import InvalidArgumentError, ModelLoadError, ZFServeError
from .onnx_graph import inspect, load
from .weights import CONFIG_FILE, ONNX_FILE

RESIZE_RATIO = 256 / 224    # the short side before the crop, when not given: torchvision's ratio
MAX_BYTES = 2 << 30          # protobuf's limit for one message; larger graphs keep weights outside (not supported)


def read_classes(path: str | Path) -> list[str]:
    """One class name per line (blank lines at the end ignored)."""
    try:
        names = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"--classes: {path}: cannot be read ({exc})", field="classes") from None
    while names and not names[-1].strip():
        names.pop()
    if not names or any(not n.strip() for n in names):
        raise InvalidArgumentError(f"--classes: {path}: one non-empty class name per line, got {len(names)} lines",
                                   field="classes")
    return [n.strip() for n in names]


def _ort_check(data: bytes, source: str, facts, size: int) -> np.ndarray:
    """One run of the user's graph in ONNX Runtime on a batch of 2 (the batch dimension must be free); its output."""
    from .export import ort_session
    try:
        session = ort_session(data)
    except Exception as exc:  # onnxruntime raises its own types  # noqa: BLE001
        ops = sorted({f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in load(data, source).graph.node
                      if n.domain not in ("", "ai.onnx")})
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgumentError(f"{source}: operators ONNX Runtime cannot run"
                                   f"{' (' + ', '.join(ops) + ')' if ops else ''}: {first[:300]}",
                                   field="model") from None
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    try:
        return session.run([facts.output], {facts.input: x})[0]
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0][:300]
        raise InvalidArgumentError(f"{source}: ONNX Runtime cannot run it on a batch of 2 images of {size} x {size} "
                                   f"({first}); accepted: a graph with a free batch dimension", field="model") from None


def _check(data: bytes, source: str, classes: list[str], crop: int | None):
    """(the graph's facts, the input side), or the refusal."""
    import onnx
    proto = load(data, source)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InvalidArgumentError(f"{source}: fails the ONNX checker: {str(exc).strip().splitlines()[0][:300]}",
                                   field="model") from None
    facts = inspect(proto, source)
    size = facts.size or crop
    if size is None:
        raise InvalidArgumentError(f"{source}: the graph's input side is dynamic; give it with --crop",
                                   field="crop")
    if crop is not None and crop != size:
        raise InvalidArgumentError(f"--crop: {crop}, but the graph's input {facts.input!r} is {size} x {size}; "
                                   f"accepted: {size} (the crop is the input side)", field="crop")
    out = _ort_check(data, source, facts, size)
    if out.ndim < 2 or int(np.prod(out.shape[1:])) != out.shape[1] or out.shape[1] != len(classes):
        raise InvalidArgumentError(f"{source}: output {facts.output!r} has shape {list(out.shape)} per batch of 2; "
                                   f"accepted: (N, {len(classes)}), one value per class of --classes "
                                   f"({len(classes)} names)", field="classes")
    return facts, size


def import_onnx(model: str | Path, classes: str | Path | list[str], out: str | Path, *, name: str | None = None,
                version: str = "1", preprocess: dict | None = None, output: str = "logits",
                calibration: str | None = None, log=None) -> Path:
    """Import the ONNX file ``model`` as the model directory ``out`` (new, or empty) and return its path.
    ``preprocess``: PreprocessConfig's fields (resize, crop, scale, mean, std; default torchvision's);
    ``output``: whether the graph's output is ``logits`` or ``probabilities``; ``calibration``: an ImageFolder of
    held-out images on which to fit the out-of-distribution statistics."""
    from .import_torchvision import TORCHVISION_PREPROCESS
    source = Path(model)
    if output not in ONNX_OUTPUTS:
        raise InvalidArgumentError(f"--output: {output!r}; accepted: {', '.join(ONNX_OUTPUTS)}", field="output")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgumentError(f"--out: {out} exists and is not an empty directory", field="out")
    try:
        if source.stat().st_size > MAX_BYTES:
            raise InvalidArgumentError(f"{source}: larger than 2 GB (weights in external files are not supported)",
                                       field="model")
        data = source.read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(f"{source}: cannot be read ({exc.strerror or exc})", field="model") from None
    names = list(classes) if isinstance(classes, list) else read_classes(classes)
    settings = {**TORCHVISION_PREPROCESS, **(preprocess or {})}
    facts, size = _check(data, source.name, names, (preprocess or {}).get("crop"))
    settings["crop"] = size
    if not (preprocess and preprocess.get("resize")):   # torchvision's ratio: 256 for a 224 crop
        settings["resize"] = round(size * RESIZE_RATIO)
    config = ModelConfig(name=name or out.name, version=str(version), num_classes=len(names), input_size=size,
                         class_names=names, preprocess=PreprocessConfig(**settings), kind="onnx",
                         onnx={"input": facts.input, "layout": "NCHW", "output": output},
                         provenance={"source": f"zfserve import onnx {source.name}"})
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / ONNX_FILE).write_bytes(data)
        (staging / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")
        _finish(staging, calibration, log)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except ZFServeError:
        raise
    except OSError as exc:
        raise ModelLoadError(f"--out: cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _finish(directory: Path, calibration: str | None, log) -> None:
    """The served graph (checked against the user's), one classification of a test image, and the
    out-of-distribution fit when held-out images are given."""
    from .data import render_images
    from .engine.classifier import Classifier
    from .preprocess import to_input
    from .weights import read_snapshot
    snapshot = read_snapshot(directory)
    classifier = Classifier(snapshot, warmup=False, ood=False)
    image = to_input(render_images(0, range(1))[0], snapshot.config)
    probabilities = classifier.probabilities(image[None])
    if not np.isfinite(probabilities).all():
        raise InvalidArgumentError("model: the graph gives non-finite probabilities on a test image", field="model")
    if calibration is not None:
        from .engine import ood, ood_fit
        settings = ood_fit.OodSettings(calibration=calibration).validate()
        detector = ood_fit.fit(snapshot, settings, log=log)
        ood.save(detector, directory, snapshot.sha256, ood.preprocess_hash(snapshot.config))


__all__ = ["import_onnx", "read_classes"]
