"""The explanations as Open Inference Protocol models, beside each served model's NAME and NAME-bytes, so that an
unmodified OIP client (tritonclient, KServe's, perf_analyzer) gets heatmaps: tensors in, tensors out.

  ``NAME-occlusion``  input ``image``  FP32 [-1, 3, S, S]  (``NAME-occlusion-bytes``: ``image_bytes`` BYTES [-1, 1])
      outputs ``heatmap``        FP32  [-1, S, S]  each pixel's attribution: the mean drop of the target's
                                                   probability over the occluder positions covering it (Captum's
                                                   Occlusion definition; zfserve.v1's ``attribution`` map)
              ``probabilities``  FP32  [-1, C]     the unoccluded image's class probabilities (as model NAME)
              ``target``         INT64 [-1, 1]     the class explained
      max_batch_size: --max-images-per-request (the images are swept one after another, in one job)
  ``NAME-deconv``  input ``image`` FP32 [-1, 3, S, S]  (``NAME-deconv-bytes``: ``image_bytes`` BYTES [-1, 1])
      outputs ``projections``    FP32  [-1, 3, S, S]  one per unit projected (not per image: max_batch_size 0)
              ``units``          INT64 [-1, 4]        each projection's (image index, channel, y, x)
              ``activations``    FP32  [-1]           each unit's activation
              ``boxes``          INT64 [-1, 4]        each unit's receptive field (x0, y0, x1, y1), end exclusive
      only for models with layers (a runtime whose ``has_layers`` is false has no NAME-deconv).

Settings are request parameters, not inputs (generic clients send every declared input): occlusion ``window``,
``stride``, ``target``, ``fill`` ("mean", a number, or "r,g,b", in network-input units); deconv ``layer``,
``top_k``, ``units`` ("channel,y,x;channel,y,x"). Each is checked, naming ``parameters.<name>`` and the accepted
range (an unknown one is refused, except Triton's own ``triton_*``); ModelConfig lists them in its parameters.
``timeout`` (microseconds) lowers the call's deadline. The
response parameters say the zfserve ``model_version`` and the settings used, and for deconv the ``interpretation``
(a projection is a feature visualisation, not an attribution of the class decision).

The work is zfserve.v1's (:mod:`.explain`): the same engine calls on the same heavy-work pool, with its admission
limit, the call's deadline and cancellation (a cancelled call stops the sweep at its next progress report).
"""

from __future__ import annotations

import numpy as np

from .. import _checks as checks
from .._proto.inference import grpc_service_pb2 as pb
from .._proto.inference import model_config_pb2 as mc
from ..engine.results import DECONV_INTERPRETATION, DEFAULT_DECONV_TOP_K, DEFAULT_STRIDE, DEFAULT_WINDOW
from ..errors import InvalidArgumentError
from ..wire import DECONV, IMAGE_INPUT, OCCLUSION
from . import explain

HEATMAP, PROBABILITIES, TARGET = "heatmap", "probabilities", "target"
PROJECTIONS, UNITS, ACTIVATIONS, BOXES = "projections", "units", "activations", "boxes"
# Request parameters every model takes (Triton's; ``priority`` is accepted and ignored), and the prefix Triton
# reserves for its own (perf_analyzer sends triton_enable_empty_final_response with request parameters): ignored.
COMMON_PARAMETERS = ("timeout", "priority")
RESERVED_PREFIX = "triton_"
PLATFORMS = {OCCLUSION: "zfserve_occlusion", DECONV: "zfserve_deconv"}
DATATYPES = {"FP32": mc.TYPE_FP32, "INT64": mc.TYPE_INT64, "BYTES": mc.TYPE_STRING}


def tasks(runtime) -> tuple[str, ...]:
    """The explanations a model serves: deconv needs its layers (a model not loaded yet is listed with both)."""
    return (OCCLUSION, DECONV) if runtime is None or getattr(runtime, "has_layers", True) else (OCCLUSION,)


def accepted_parameters(task: str, runtime) -> dict[str, str]:
    """The request parameters of ``task`` on ``runtime`` and what each accepts (ModelConfig says them)."""
    size, classes = runtime.input_size, runtime.num_classes
    if task == OCCLUSION:
        return {"window": f"integer 1..{size}, default {DEFAULT_WINDOW}",
                "stride": f"integer 1..window, default {DEFAULT_STRIDE}",
                "target": f"integer 0..{classes - 1}, default: each image's top-1 class",
                "fill": "'mean' (default), a number, or 'r,g,b', in network-input units"}
    return {"layer": f"one of {', '.join(runtime.config.spatial_layers)}, default {runtime.config.last_conv}",
            "top_k": f"integer 1..{explain.MAX_DECONV_UNITS}, default {DEFAULT_DECONV_TOP_K} (unless units)",
            "units": "'channel,y,x;channel,y,x...' (instead of top_k)"}


def outputs(task: str, runtime) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, dims) of each output; occlusion's dims exclude the batch, deconv's are whole."""
    size = runtime.input_size
    if task == OCCLUSION:
        return [(HEATMAP, "FP32", [size, size]), (PROBABILITIES, "FP32", [runtime.num_classes]),
                (TARGET, "INT64", [1])]
    return [(PROJECTIONS, "FP32", [-1, 3, size, size]), (UNITS, "INT64", [-1, 4]), (ACTIVATIONS, "FP32", [-1]),
            (BOXES, "INT64", [-1, 4])]


def max_batch_size(task: str, options) -> int:
    """Occlusion answers per image (a batch dimension); deconv per unit (none: its shapes are whole)."""
    return options.max_images_per_request if task == OCCLUSION else 0


def input_dims(model, runtime) -> tuple[str, list[int]]:
    """The input's datatype and dims (without the batch for occlusion, whole for deconv)."""
    dims = [3, runtime.input_size, runtime.input_size] if model.input == IMAGE_INPUT else [1]
    return ("FP32" if model.input == IMAGE_INPUT else "BYTES"), (dims if model.task == OCCLUSION else [-1, *dims])


def metadata(model, runtime, options) -> pb.ModelMetadataResponse:
    datatype, dims = input_dims(model, runtime)
    batch = [-1] if max_batch_size(model.task, options) else []
    tm = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model.name, versions=[runtime.oip_version], platform=PLATFORMS[model.task],
        inputs=[tm(name=model.input, datatype=datatype, shape=[*batch, *dims])],
        outputs=[tm(name=name, datatype=kind, shape=[*batch, *dims]) for name, kind, dims in outputs(model.task,
                                                                                                     runtime)])


def config(model, runtime, options) -> mc.ModelConfig:
    datatype, dims = input_dims(model, runtime)
    made = mc.ModelConfig(
        name=model.name, platform=PLATFORMS[model.task], max_batch_size=max_batch_size(model.task, options),
        input=[mc.ModelInput(name=model.input, data_type=DATATYPES[datatype], dims=dims)],
        output=[mc.ModelOutput(name=name, data_type=DATATYPES[kind], dims=shape)
                for name, kind, shape in outputs(model.task, runtime)])
    made.parameters["max_images"].string_value = str(options.max_images_per_request)
    made.parameters["engine"].string_value = runtime.engine
    for name, accepted in accepted_parameters(model.task, runtime).items():
        made.parameters[f"parameter.{name}"].string_value = accepted
    if model.task == OCCLUSION:
        made.parameters["max_occlusion_positions"].string_value = str(options.max_occlusion_positions)
    else:
        made.parameters["interpretation"].string_value = DECONV_INTERPRETATION
        made.parameters["max_units"].string_value = str(explain.MAX_DECONV_UNITS)
    return made


# ------------------------------------------------------------------------------------------------ settings
def _value(param: pb.InferParameter):
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


def _settings(request, model, runtime) -> dict:
    """The request's parameters, checked, as the keyword arguments of the engine call."""
    params = {key: _value(value) for key, value in request.parameters.items()}
    accepted = accepted_parameters(model.task, runtime)
    unknown = sorted(key for key in set(params) - set(accepted) - set(COMMON_PARAMETERS)
                     if not key.startswith(RESERVED_PREFIX))
    if unknown:
        raise InvalidArgumentError(f"parameters: {', '.join(map(repr, unknown))} not accepted by model {model.name!r};"
                                   f" accepted: {', '.join((*accepted, *COMMON_PARAMETERS))}", field="parameters")
    if model.task == OCCLUSION:
        size = runtime.input_size
        window = checks.integer(params.get("window", DEFAULT_WINDOW), "parameters.window", 1, size)
        stride = checks.integer(params.get("stride", DEFAULT_STRIDE), "parameters.stride", 1, window,
                                what="at most the window")
        target = params.get("target")
        if target is not None:
            target = checks.integer(target, "parameters.target", 0, runtime.num_classes - 1,
                                    what="the model's classes")
        return dict(window=window, stride=stride, target=target, fill=_fill(params.get("fill", "mean")))
    layer = checks.layer(params.get("layer", runtime.config.last_conv), runtime.config.spatial_layers,
                         "parameters.layer")
    units = _units(params["units"]) if "units" in params else None
    top_k = params.get("top_k")
    if top_k is not None:
        top_k = checks.integer(top_k, "parameters.top_k", 1, explain.MAX_DECONV_UNITS)
    if units is not None and top_k is not None:
        raise InvalidArgumentError("parameters.units: give units or top_k, not both", field="parameters.units")
    return dict(layer=layer, top_k=top_k, one_per_map=True, units=units, maps=None)


def _fill(value):
    """'mean', a number, or 'r,g,b' (network-input units)."""
    if value == "mean":
        return "mean"
    try:
        if isinstance(value, str):
            parts = [float(v) for v in value.split(",")]
            if len(parts) not in (1, 3):
                raise ValueError
            values = np.asarray(parts)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values = np.asarray([float(value)])
        else:
            raise ValueError
        if not np.isfinite(values).all():
            raise ValueError
    except ValueError:
        raise InvalidArgumentError(f"parameters.fill: {value!r:.40}; accepted: 'mean', a finite number, or 'r,g,b' "
                                   f"(three finite numbers), in network-input units",
                                   field="parameters.fill") from None
    return float(values[0]) if values.size == 1 else values


def _units(value) -> list[tuple[int, int, int]]:
    """'channel,y,x;channel,y,x' -> [(channel, y, x), ...] (the engine checks each against the layer's shape)."""
    try:
        if not isinstance(value, str) or not value.strip():
            raise ValueError
        units = [tuple(int(v) for v in unit.split(",")) for unit in value.split(";")]
        if any(len(u) != 3 for u in units) or len(units) > explain.MAX_DECONV_UNITS:
            raise ValueError
    except ValueError:
        raise InvalidArgumentError(f"parameters.units: {value!r:.40}; accepted: 1..{explain.MAX_DECONV_UNITS} units "
                                   f"as 'channel,y,x;channel,y,x' (integers)", field="parameters.units") from None
    return units


def timeout_us(request) -> int | None:
    """The request parameter ``timeout`` (microseconds; 0 or unset: none)."""
    if "timeout" not in request.parameters:
        return None
    return checks.integer(_value(request.parameters["timeout"]), "parameters.timeout", 0,
                          what="microseconds") or None


# ------------------------------------------------------------------------------------------------ infer
def _occlusion_work(runtime, images, settings: dict, max_positions: int):
    """Sweep each image (one job: the pool's admission limit counts a request once) -> output arrays and the
    response parameters."""
    def work(job):
        maps, targets, result = [], [], None
        for image in images:
            result = explain.sweep(runtime, image, job, asked={}, gated=False, outputs=("attribution",),
                                   max_positions=max_positions, **settings)
            maps.append(result.attribution)
            targets.append([result.target])
        arrays = {HEATMAP: np.asarray(maps, dtype="<f4"),
                  PROBABILITIES: np.ascontiguousarray(runtime.classifier.scored(images).probabilities, dtype="<f4"),
                  TARGET: np.asarray(targets, dtype="<i8")}
        parameters = {"window": result.window, "stride": result.stride, "mode": result.mode,
                      "engine": result.engine, "fill": ",".join(repr(float(v)) for v in np.ravel(result.fill))}
        return arrays, parameters
    return work


def _deconv_work(runtime, images, settings: dict):
    layer = settings.pop("layer")

    def work(job):
        projected = explain.project(runtime, images, layer, job, **settings)
        size = runtime.input_size
        arrays = {
            PROJECTIONS: np.asarray([u.projection for u in projected], dtype="<f4").reshape(-1, 3, size, size),
            UNITS: np.asarray([[u.image_index, u.channel, u.y, u.x] for u in projected], dtype="<i8").reshape(-1, 4),
            ACTIVATIONS: np.asarray([u.activation for u in projected], dtype="<f4"),
            BOXES: np.asarray([list(u.box) for u in projected], dtype="<i8").reshape(-1, 4)}
        return arrays, {"layer": layer, "interpretation": DECONV_INTERPRETATION}
    return work


async def infer(servicer, request, model, runtime, context) -> pb.ModelInferResponse:
    """ModelInfer of an explanation model (``servicer``: the InferenceServicer, whose input stage it shares)."""
    state = servicer.state
    with runtime.stats(model.input, model.task).measure() as measured:
        served = [name for name, _, _ in outputs(model.task, runtime)]
        for out in request.outputs:
            if out.name not in served:
                raise InvalidArgumentError(f"outputs: {out.name!r} is not an output of model {model.name!r}; "
                                           f"accepted: {', '.join(map(repr, served))}", field="outputs")
        settings = _settings(request, model, runtime)
        timeout = timeout_us(request)
        images = await servicer._inputs(request, model, runtime, context)
        measured.inputs_done(len(images))
        if model.task == OCCLUSION:
            work = _occlusion_work(runtime, images, settings, state.options.max_occlusion_positions)
        else:
            explain.check_deconv_size(len(images), settings)
            work = _deconv_work(runtime, images, settings)
        arrays, parameters = await explain.run_measured(state, work, context, measured, timeout_us=timeout)
        kinds = {name: kind for name, kind, _ in outputs(model.task, runtime)}
        response = pb.ModelInferResponse(model_name=model.name, model_version=runtime.oip_version, id=request.id)
        response.parameters["model_version"].string_param = runtime.version
        for key, value in parameters.items():
            slot = response.parameters[key]
            if isinstance(value, int):
                slot.int64_param = value
            else:
                slot.string_param = str(value)
        for name in [out.name for out in request.outputs] or served:
            response.outputs.add(name=name, datatype=kinds[name], shape=list(arrays[name].shape))
            response.raw_output_contents.append(arrays[name].tobytes())
    return response


__all__ = ["accepted_parameters", "config", "infer", "metadata", "outputs", "tasks"]
