"""The one codec between the wire (zfserve.v1 and Open Inference Protocol messages) and zfserve's own types,
used by the server and the client alike, so a result read from a server is the engine's own result type:
:class:`~zfserve.engine.results.Prediction`, :class:`~zfserve.engine.results.UnitProjection`,
:class:`~zfserve.engine.results.OcclusionResult`.

Raw tensors travel as bytes + dtype + shape, checked before anything is decoded; every check names the field:
dtype in the accepted set, shape non-negative, byte length = product(shape) x itemsize, and for images the
(N, 3, S, S) shape, the request's image limit and (zfserve.v1) finite values. An OIP tensor is taken as sent,
as Triton does: a generic client's synthetic data (perf_analyzer's default is random bytes, some of which are
NaN or infinite float32 patterns) must run; such an image gets whatever the network makes of them, and
only that image: every layer works per image, so the other images of its batch are unaffected.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from pathlib import Path

import numpy as np

from ._proto.v1 import zfserve_pb2 as pb
from .engine.results import (DECONV_INTERPRETATION, DEFAULT_STRIDE, DEFAULT_WINDOW, OUTPUTS, OcclusionResult,
                             OodScore, Prediction, TopK, UnitProjection)
from .errors import InvalidArgumentError

# zfserve.v1 Tensor dtypes (little-endian on the wire).
DTYPES = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "int64": "<i8", "int32": "<i4", "int8": "i1",
          "uint8": "u1"}
# Most elements one tensor may claim (2^31, 8 GiB of float32: well above any message limit).
MAX_ELEMENTS = 1 << 31
# Open Inference Protocol datatypes (BYTES is handled separately).
OIP_DTYPES = {"BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1",
              "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}


def element_count(shape, field: str) -> int:
    """The number of elements of ``shape``, counted exactly (no int64 overflow), at most :data:`MAX_ELEMENTS`."""
    shape = [int(s) for s in shape]
    if any(s < 0 for s in shape):
        raise InvalidArgumentError(f"{field}.shape: dimensions must be >= 0, got {shape}", field=f"{field}.shape")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise InvalidArgumentError(f"{field}.shape: {shape} holds {count} elements; at most {MAX_ELEMENTS} are "
                                   f"accepted", field=f"{field}.shape")
    return count


def from_raw(data: bytes, dtype: str, shape, field: str) -> np.ndarray:
    """Bytes of a row-major little-endian array -> a numpy array (a writable copy) with that dtype and shape."""
    np_dtype = np.dtype(dtype)
    count = element_count(shape, field)
    expected = count * np_dtype.itemsize
    if len(data) != expected:
        raise InvalidArgumentError(
            f"{field}: {len(data)} bytes for shape {list(shape)} of {np_dtype.name}; expected {expected} "
            f"(product of the shape x {np_dtype.itemsize})", field=field)
    # A writable copy: the engines (PyTorch) warn on read-only buffers, and the copy is cheap next to compute.
    return np.frombuffer(bytearray(data), dtype=np_dtype).reshape([int(s) for s in shape])


def tensor_to_array(tensor, field: str) -> np.ndarray:
    """A zfserve.v1.Tensor -> numpy (native byte order)."""
    if tensor.dtype not in DTYPES:
        raise InvalidArgumentError(f"{field}.dtype: {tensor.dtype!r} is not accepted; accepted: "
                                   f"{sorted(DTYPES)}", field=f"{field}.dtype")
    arr = from_raw(tensor.data, DTYPES[tensor.dtype], tensor.shape, f"{field}.data")
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def array_to_tensor(arr: np.ndarray) -> pb.Tensor:
    """numpy -> a zfserve.v1.Tensor (raw little-endian bytes)."""
    arr = np.asarray(arr)
    name = arr.dtype.name
    if name not in DTYPES:
        raise TypeError(f"cannot send dtype {name}")
    data = np.ascontiguousarray(arr, dtype=np.dtype(DTYPES[name])).tobytes()
    return pb.Tensor(dtype=name, shape=list(arr.shape), data=data)


def check_images(arr: np.ndarray, field: str, input_size: int, max_images: int, *, finite: bool = True) -> np.ndarray:
    """A preprocessed batch: float32 (N, 3, S, S), 1 <= N <= max_images, and finite unless ``finite`` is false.
    Returns a float32 array."""
    expected = f"(N, 3, {input_size}, {input_size}) with 1 <= N <= {max_images}"
    if arr.dtype != np.float32:
        raise InvalidArgumentError(f"{field}.dtype: must be float32, got {arr.dtype.name}", field=f"{field}.dtype")
    if arr.ndim != 4 or tuple(arr.shape[1:]) != (3, input_size, input_size):
        raise InvalidArgumentError(f"{field}: shape must be {expected}, got {list(arr.shape)}", field=field)
    if not 1 <= arr.shape[0] <= max_images:
        raise InvalidArgumentError(f"{field}: {arr.shape[0]} images; shape must be {expected}", field=field)
    if finite and not np.isfinite(arr).all():
        raise InvalidArgumentError(f"{field}: holds NaN or infinite values; preprocessed images must be finite",
                                   field=field)
    return arr


def decode_bytes_elements(data: bytes, count: int, field: str) -> list[bytes]:
    """OIP BYTES raw contents: ``count`` elements, each a 4-byte little-endian length then that many bytes."""
    out, pos = [], 0
    for i in range(count):
        if pos + 4 > len(data):
            raise InvalidArgumentError(f"{field}: element {i} has no 4-byte length prefix ({len(data)} bytes, "
                                       f"{count} elements expected)", field=field)
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + length > len(data):
            raise InvalidArgumentError(f"{field}: element {i} claims {length} bytes, only {len(data) - pos} "
                                       f"remain", field=field)
        out.append(bytes(data[pos:pos + length]))
        pos += length
    if pos != len(data):
        raise InvalidArgumentError(f"{field}: {len(data) - pos} bytes after the last of {count} elements",
                                   field=field)
    return out


def encode_bytes_elements(items: list[bytes]) -> bytes:
    """The inverse of :func:`decode_bytes_elements` (for clients and tests)."""
    return b"".join(struct.pack("<I", len(b)) + bytes(b) for b in items)


def _optional_array(tensor) -> np.ndarray | None:
    """A response's tensor, or None where the server left it unset."""
    return tensor_to_array(tensor, "response") if tensor.dtype else None


# ---------------------------------------------------------------------------------------------- images
def images_message(images) -> pb.Images:
    """A request's images: file paths or encoded bytes (JPEG / PNG / WebP, decoded by the server), or one float32
    array (N, 3, S, S) or (3, S, S) already preprocessed."""
    if isinstance(images, np.ndarray):
        arr = images[None] if images.ndim == 3 else images
        return pb.Images(tensor=array_to_tensor(np.ascontiguousarray(arr, dtype=np.float32)))
    if isinstance(images, (bytes, bytearray, str, os.PathLike)):
        images = [images]
    encoded = []
    for item in images:
        if isinstance(item, (bytes, bytearray, memoryview)):
            encoded.append(bytes(item))
        elif isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if not path.is_file():
                raise InvalidArgumentError(f"images: no such file: {path}", field="images")
            encoded.append(path.read_bytes())
        else:
            raise InvalidArgumentError(f"images: expected paths, bytes or a float32 array, got "
                                       f"{type(item).__name__}", field="images")
    return pb.Images(encoded=encoded)


# ---------------------------------------------------------------------------------------------- ood
def ood_message(score: OodScore) -> pb.OutOfDistribution:
    return pb.OutOfDistribution(score=score.score, threshold=score.threshold,
                                out_of_distribution=score.out_of_distribution)


def ood_score(message: pb.OutOfDistribution) -> OodScore:
    return OodScore(float(message.score), float(message.threshold), bool(message.out_of_distribution))


# ---------------------------------------------------------------------------------------------- classify
def classify_request(images, *, top_k: int | None = None, model: str = "", return_probabilities: bool = False):
    """``top_k`` None: unset, the server's default."""
    request = pb.ClassifyRequest(model=model, images=images_message(images),
                                 return_probabilities=return_probabilities)
    if top_k is not None:
        request.top_k = top_k
    return request


def classify_response(model: str, version: str, predictions: list[list[Prediction]],
                      probabilities: np.ndarray | None = None, ood_note: str = "") -> pb.ClassifyResponse:
    """Top-k predictions per image (with each :class:`TopK`'s out-of-distribution score, when it has one) and,
    when given, the (N, C) float32 probabilities; ``ood_note`` says why there is no score."""
    response = pb.ClassifyResponse(model=model, model_version=version, ood_note=ood_note)
    for preds in predictions:
        entry = response.predictions.add(classes=[pb.ClassScore(index=int(p.index), name=p.name,
                                                                probability=float(p.probability)) for p in preds])
        if getattr(preds, "ood", None) is not None:
            entry.ood.CopyFrom(ood_message(preds.ood))
    if probabilities is not None:
        response.probabilities.CopyFrom(array_to_tensor(np.asarray(probabilities, dtype=np.float32)))
    return response


def predictions(response: pb.ClassifyResponse) -> list[TopK]:
    """The response's top-k lists, each with its out-of-distribution score as ``.ood`` (None without one)."""
    return [TopK([Prediction(c.index, c.name, c.probability) for c in p.classes],
                 ood_score(p.ood) if p.HasField("ood") else None) for p in response.predictions]


def probabilities(response: pb.ClassifyResponse) -> np.ndarray | None:
    return _optional_array(response.probabilities)


# ---------------------------------------------------------------------------------------------- deconv
def deconv_request(images, layer: str, *, top_k: int | None = None, one_per_map: bool = True, units=None,
                   maps=None, return_png: bool = False, return_patches: bool = False, return_tensor: bool = True,
                   model: str = "") -> pb.DeconvRequest:
    """``top_k`` None: unset, the engine's default (9 strongest when neither units nor maps are named)."""
    request = pb.DeconvRequest(model=model, images=images_message(images), layer=layer,
                               allow_same_map=not one_per_map, return_png=return_png, return_patches=return_patches,
                               return_tensor=return_tensor, maps=list(maps or ()),
                               units=[pb.Unit(channel=c, y=y, x=x) for c, y, x in (units or ())])
    if top_k is not None:
        request.top_k = top_k
    return request


def deconv_arguments(request: pb.DeconvRequest) -> dict:
    """A DeconvRequest as keyword arguments of ``DeconvEngine.project`` (top_k unset: the engine's default,
    the 9 strongest when neither units nor maps are named, else none)."""
    if request.units and request.maps:
        raise InvalidArgumentError("units/maps: give one of them, not both", field="units")
    return dict(top_k=request.top_k if request.HasField("top_k") else None, one_per_map=not request.allow_same_map,
                units=[(u.channel, u.y, u.x) for u in request.units] or None, maps=list(request.maps) or None)


def deconv_response(model: str, units: list[UnitProjection], *, tensor: bool, version: str = "",
                    ood: list[OodScore] | None = None, ood_note: str = "") -> pb.DeconvResponse:
    """The projections (with their ``png`` / ``patch_png`` when rendered) and, with ``tensor``, the stacked
    float32 (K, 3, S, S) projections; labelled with the model ``version``, what a projection is, and each image's
    out-of-distribution score (``ood``, or ``ood_note`` saying why there is none)."""
    response = pb.DeconvResponse(model=model, model_version=version, interpretation=DECONV_INTERPRETATION,
                                 ood=[ood_message(score) for score in ood or ()], ood_note=ood_note)
    for unit in units:
        x0, y0, x1, y1 = unit.box
        response.projections.add(image_index=unit.image_index, layer=unit.layer,
                                 unit=pb.Unit(channel=unit.channel, y=unit.y, x=unit.x),
                                 activation=float(unit.activation), box=pb.Box(y0=y0, x0=x0, y1=y1, x1=x1),
                                 png=unit.png, patch_png=unit.patch_png)
    if tensor and units:
        response.tensor.CopyFrom(array_to_tensor(np.stack([u.projection for u in units]).astype(np.float32)))
    return response


def projections(response: pb.DeconvResponse) -> list[UnitProjection]:
    """A DeconvResponse as the engine's UnitProjections (``projection`` None unless the tensor was sent;
    ``patch`` None: the server sends the patch only as a PNG)."""
    stack = _optional_array(response.tensor)
    scores = [ood_score(message) for message in response.ood]
    return [UnitProjection(p.image_index, p.layer, p.unit.channel, p.unit.y, p.unit.x, p.activation,
                           (p.box.x0, p.box.y0, p.box.x1, p.box.y1), None if stack is None else stack[i], None,
                           p.png, p.patch_png, response.model_version,
                           scores[p.image_index] if p.image_index < len(scores) else None)
            for i, p in enumerate(response.projections)]


# ---------------------------------------------------------------------------------------------- occlusion
def occlusion_request(image, *, window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE, fill="mean",
                      target: int | None = None, outputs=None, layer: str | None = None, channel: int | None = None,
                      attribution_on_logits: bool = False, return_png: bool = False, model: str = "",
                      fill_in_pixels: bool = False, mode: dict | None = None) -> pb.OcclusionRequest:
    """``mode``: the occlusion mode's request fields (:data:`MODE_FIELDS`, those given), or ``{"gated": True}``."""
    request = pb.OcclusionRequest(model=model, images=images_message(image), window=window, stride=stride,
                                  outputs=list(outputs or ()), activity_layer=layer or "",
                                  attribution_on_logits=attribution_on_logits, return_png=return_png,
                                  fill_in_pixels=fill_in_pixels)
    for key, value in (mode or {}).items():
        if key not in (*MODE_FIELDS, "gated"):
            raise InvalidArgumentError(f"mode: {key!r} not accepted; accepted: {', '.join(MODE_FIELDS)}, gated",
                                       field="mode")
        if value is not None:
            setattr(request, key, value)
    if target is not None:
        request.target = int(target)
    if channel is not None:
        request.activity_channel = int(channel)
    if fill is not None and not (isinstance(fill, str) and fill == "mean"):
        values = np.asarray(fill, dtype=np.float64).reshape(-1)
        if values.size == 1:
            request.fill_value = float(values[0])
        else:
            request.fill_per_channel.CopyFrom(array_to_tensor(values))
    return request


def sweep_arguments(request: pb.OcclusionRequest) -> dict:
    """An OcclusionRequest as keyword arguments of ``OcclusionEngine.sweep`` (window / stride unset: the
    defaults; an explicit 0 is passed on, to be refused like a local 0)."""
    fill_kind = request.WhichOneof("fill")
    if fill_kind == "fill_value":
        fill = float(request.fill_value)
    elif fill_kind == "fill_per_channel":
        values = tensor_to_array(request.fill_per_channel, "fill_per_channel")
        if values.shape != (3,):
            raise InvalidArgumentError(f"fill_per_channel: shape must be (3,), got {list(values.shape)}",
                                       field="fill_per_channel")
        fill = values.astype(np.float64)
    else:
        fill = "mean"
    args = dict(window=request.window if request.HasField("window") else DEFAULT_WINDOW,
                stride=request.stride if request.HasField("stride") else DEFAULT_STRIDE, fill=fill,
                target=request.target if request.HasField("target") else None,
                layer=request.activity_layer or None,   # None: the model's last conv layer
                channel=request.activity_channel if request.HasField("activity_channel") else None,
                attribution_on="logit" if request.attribution_on_logits else "probability",
                fill_units="pixel" if request.fill_in_pixels else "input")
    if request.outputs:
        args["outputs"] = tuple(request.outputs)
    return args


MODE_FIELDS = ("engine", "precision", "approximation", "coarse", "refine", "margin")


def sweep_mode(request: pb.OcclusionRequest) -> tuple[dict, bool]:
    """The occlusion mode a request asks for: (the fields of :data:`MODE_FIELDS` that are set, ``gated``)."""
    asked = {key: getattr(request, key) for key in MODE_FIELDS
             if (request.HasField(key) if key in ("coarse", "refine", "margin") else getattr(request, key))}
    if request.gated and asked:
        raise InvalidArgumentError(f"gated: the gate chooses the mode; leave {', '.join(asked)} unset",
                                   field="gated")
    return asked, bool(request.gated)


def occlusion_response(model: str, result: OcclusionResult, version: str = "",
                       ood_note: str = "") -> pb.OcclusionResponse:
    """A sweep's result (with its ``png`` pictures when rendered) as an OcclusionResponse, with the settings used,
    the model ``version`` (default: the result's own) and the image's out-of-distribution score (``result.ood``,
    or ``ood_note`` saying why there is none)."""
    ny, nx = result.shape
    response = pb.OcclusionResponse(
        model=model, target=int(result.target), positions_y=ny, positions_x=nx, activity_layer=result.layer,
        activity_channel=int(result.channel), base_probability=float(result.base_probability),
        base_activity=float(result.base_activity), starts=[int(s) for s in result.starts],
        window=int(result.window), stride=int(result.stride),
        fill=[float(v) for v in np.asarray(result.fill).reshape(-1)], fill_units=result.fill_units,
        attribution_on=result.attribution_on, backend=result.backend, seconds=result.seconds, png=result.png,
        model_version=version or result.model_version, ood_note=ood_note, engine=result.engine,
        precision=result.precision, mode=result.mode, gate=result.gate)
    if result.ood is not None:
        response.ood.CopyFrom(ood_message(result.ood))
    for name, arr in result.arrays().items():
        arr = np.asarray(arr).astype(np.int64 if name == "argmax" else np.float32, copy=False)
        getattr(response, name).CopyFrom(array_to_tensor(arr))
    if result.evaluated is not None:
        response.evaluated.CopyFrom(array_to_tensor(np.asarray(result.evaluated, dtype=np.uint8)))
    return response


def occlusion_result(r: pb.OcclusionResponse) -> OcclusionResult:
    """An OcclusionResponse as the engine's OcclusionResult (no ``base_logits``: the server does not send
    them; ``timings`` holds the server's total as ``sweep_s``)."""
    return OcclusionResult(
        window=r.window, stride=r.stride, starts=np.asarray(r.starts, dtype=np.int64),
        fill=np.asarray(r.fill, dtype=np.float64), fill_units=r.fill_units, target=r.target,
        layer=r.activity_layer, channel=r.activity_channel, attribution_on=r.attribution_on, base_logits=None,
        base_probability=r.base_probability, base_activity=r.base_activity,
        **{name: _optional_array(getattr(r, name)) for name in OUTPUTS},
        timings={"base_s": 0.0, "sweep_s": r.seconds}, backend=r.backend, png=dict(r.png),
        model_version=r.model_version, ood=ood_score(r.ood) if r.HasField("ood") else None, engine=r.engine,
        precision=r.precision or "fp32", mode=r.mode or "exact",
        evaluated=None if (evaluated := _optional_array(r.evaluated)) is None else evaluated.astype(bool),
        gate=r.gate)


# ---------------------------------------------------------------------------------------------- OIP
# Each model NAME is several OIP models: one per task (classification, and the explanations occlusion and deconv)
# and input kind, so that metadata and config say exactly what a request carries (perf_analyzer and other generic
# clients send every input a model declares). The task's suffix comes first: NAME-occlusion-bytes.
IMAGE_INPUT = "image"          # model NAME:        FP32 [-1, 3, S, S], preprocessed images
BYTES_INPUT = "image_bytes"    # model NAME-bytes:  BYTES [-1, 1] (or [-1]), encoded JPEG / PNG / WebP images
BYTES_MODEL_SUFFIX = "-bytes"
CLASSIFY, OCCLUSION, DECONV = "classify", "occlusion", "deconv"
TASK_SUFFIXES = {CLASSIFY: "", OCCLUSION: "-occlusion", DECONV: "-deconv"}


def oip_version(version: str) -> str:
    """The OIP version of a model version (``"<config version>+<weights hash>"``): a decimal integer, as Triton's
    versions are (perf_analyzer reads them as integers to find a model's statistics), derived from the whole
    version string, so every replica serving the same files reports the same number. 13 hex digits = 52 bits:
    below 2**53, exact in JSON too."""
    return str(int(hashlib.sha256(version.encode()).hexdigest()[:13], 16))


def oip_model_name(model: str, input_name: str, task: str = CLASSIFY) -> str:
    """The OIP name of ``model``'s ``task`` with ``input_name``, e.g. NAME-occlusion-bytes."""
    return model + TASK_SUFFIXES[task] + (BYTES_MODEL_SUFFIX if input_name == BYTES_INPUT else "")


def parse_oip_model_name(name: str) -> list[tuple[str, str, str]]:
    """Every (model, input name, task) whose OIP name is ``name`` (the caller keeps the one it serves)."""
    input_name, rest = (BYTES_INPUT, name[:-len(BYTES_MODEL_SUFFIX)]) if name.endswith(BYTES_MODEL_SUFFIX) \
        else (IMAGE_INPUT, name)
    return [(rest[:len(rest) - len(suffix)], input_name, task) for task, suffix in TASK_SUFFIXES.items()
            if rest.endswith(suffix) and len(rest) > len(suffix)]


def infer_input(request, input_name: str, input_size: int, max_images: int, model: str = "model"):
    """A ModelInferRequest's one input, which must be ``input_name``: the checked float32 (N, 3, S, S) array
    for ``image``, or the list of encoded images for ``image_bytes`` (to be decoded by the caller). Raw and
    typed contents are exclusive; every size, count and datatype is checked, naming the field."""
    wanted = "FP32" if input_name == IMAGE_INPUT else "BYTES"
    expected = (f"[N, 3, {input_size}, {input_size}]" if input_name == IMAGE_INPUT else "[N, 1]") + \
        f" with 1 <= N <= {max_images}"
    if len(request.inputs) != 1:
        raise InvalidArgumentError(f"inputs: model {model!r} takes exactly one input, {input_name!r} {wanted} "
                                   f"{expected}; got {len(request.inputs)}", field="inputs")
    tensor = request.inputs[0]
    raw = request.raw_input_contents
    if raw and tensor.HasField("contents"):
        raise InvalidArgumentError("raw_input_contents and inputs[0].contents are exclusive; send the data in one "
                                   "of them", field="raw_input_contents")
    if raw and len(raw) != 1:
        raise InvalidArgumentError(f"raw_input_contents: {len(raw)} entries for 1 input", field="raw_input_contents")
    shape = [int(s) for s in tensor.shape]
    if tensor.name != input_name:
        other = IMAGE_INPUT if input_name == BYTES_INPUT else BYTES_INPUT
        hint = ""
        if tensor.name == other:   # the right input for the sibling model
            base = model[:-len(BYTES_MODEL_SUFFIX)] if input_name == BYTES_INPUT else model
            hint = f"; send {other!r} to model {oip_model_name(base, other)!r}"
        raise InvalidArgumentError(f"inputs[0].name: {tensor.name!r} is not an input of model {model!r}; "
                                   f"accepted: {input_name!r}{hint}", field="inputs[0].name")
    if tensor.datatype != wanted:
        raise InvalidArgumentError(f"inputs[0].datatype: {tensor.name!r} must be {wanted}, got {tensor.datatype!r}",
                                   field="inputs[0].datatype")
    if input_name == IMAGE_INPUT:
        if raw:
            arr = from_raw(raw[0], OIP_DTYPES["FP32"], shape, "raw_input_contents[0]")
        else:
            values = tensor.contents.fp32_contents
            if element_count(shape, "inputs[0]") != len(values):
                raise InvalidArgumentError(f"inputs[0].contents.fp32_contents: {len(values)} values for shape "
                                           f"{shape}", field="inputs[0].contents")
            arr = np.asarray(values, dtype=np.float32).reshape(shape)
        return check_images(arr.astype(np.float32, copy=False), "inputs[0]", input_size, max_images, finite=False)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or not 1 <= shape[0] <= max_images:
        raise InvalidArgumentError(f"inputs[0].shape: {BYTES_INPUT!r} must be {expected} (or [N]), got {shape}",
                                   field="inputs[0].shape")
    if raw:
        return decode_bytes_elements(raw[0], shape[0], "raw_input_contents[0]")
    items = list(tensor.contents.bytes_contents)
    if len(items) != shape[0]:
        raise InvalidArgumentError(f"inputs[0].contents.bytes_contents: {len(items)} elements for shape {shape}",
                                   field="inputs[0].contents")
    return items
