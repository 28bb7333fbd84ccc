"""The Open Inference Protocol (KServe v2) service ``inference.GRPCInferenceService``.

Each model has two inputs, of which a request gives exactly one:
  ``image``        FP32  [-1, 3, S, S]  preprocessed images (the model's input units)
  ``image_bytes``  BYTES [-1] (or [-1, 1])  encoded JPEG / PNG / WebP images
and one output, ``probabilities`` FP32 [-1, C], always in ``raw_output_contents`` (tritonclient reads only
that). Raw and typed contents are exclusive. The request parameter ``timeout`` (int64 microseconds) may lower
the queue timeout; ``priority`` is accepted and ignored. ModelInfer shares the dynamic batcher with Classify.
"""

from __future__ import annotations

import asyncio

import numpy as np

from .. import __version__
from .. import _checks as checks
from .._proto.inference import grpc_service_pb2 as pb
from .._proto.inference import grpc_service_pb2_grpc as pb_grpc
from .._proto.inference import model_config_pb2 as mc
from ..errors import InvalidArgumentError, NotFoundError
from ..wire import OIP_DTYPES, check_images, decode_bytes_elements, element_count, from_raw
from .handlers import deadline_of, unary

PLATFORM = "onnxruntime_onnx"
IMAGE_INPUT = "image"
BYTES_INPUT = "image_bytes"
OUTPUT = "probabilities"
# Only what is implemented: ModelConfig. (No shared memory, statistics, trace, classification extension.)
EXTENSIONS = ["model_configuration"]


def _param_value(param: pb.InferParameter):
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state):
        self.state = state
        self.metrics = state.metrics

    def _model(self, name: str, version: str):
        if not name:
            raise InvalidArgumentError("model_name: required; served: "
                                       f"{sorted(self.state.repository.models)}", field="model_name")
        model = self.state.repository.get(name)
        served = model.runtime.version if model.runtime else None
        if version and served and version != served:
            raise NotFoundError(f"model_version: model {name!r} has version {served!r}, not {version!r}",
                                field="model_version")
        return model

    def _ready_model(self, name: str, version: str):
        return self.state.serving(self._model(name, version))

    @unary("ServerLive")
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @unary("ServerReady")
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.ready)

    @unary("ModelReady")
    async def ModelReady(self, request, context):
        model = self._model(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.state.model_ready(model))

    @unary("ServerMetadata")
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="zfserve", version=__version__, extensions=EXTENSIONS)

    @unary("ModelMetadata")
    async def ModelMetadata(self, request, context):
        model = self._ready_model(request.name, request.version)
        size = model.input_size
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name, versions=[model.version], platform=PLATFORM,
            inputs=[tm(name=IMAGE_INPUT, datatype="FP32", shape=[-1, 3, size, size]),
                    tm(name=BYTES_INPUT, datatype="BYTES", shape=[-1])],
            outputs=[tm(name=OUTPUT, datatype="FP32", shape=[-1, model.num_classes])])

    @unary("ModelConfig")
    async def ModelConfig(self, request, context):
        model = self._ready_model(request.name, request.version)
        size = model.input_size
        batching = self.state.options.batching
        config = mc.ModelConfig(
            name=model.name, platform=PLATFORM, max_batch_size=batching.max_batch_size,
            input=[mc.ModelInput(name=IMAGE_INPUT, data_type=mc.TYPE_FP32, dims=[3, size, size], optional=True),
                   mc.ModelInput(name=BYTES_INPUT, data_type=mc.TYPE_STRING, dims=[1], optional=True)],
            output=[mc.ModelOutput(name=OUTPUT, data_type=mc.TYPE_FP32, dims=[model.num_classes])],
            dynamic_batching=mc.ModelDynamicBatching(
                max_queue_delay_microseconds=batching.max_queue_delay_us, preserve_ordering=False,
                default_queue_policy=mc.ModelQueuePolicy(
                    timeout_action=mc.ModelQueuePolicy.REJECT,
                    default_timeout_microseconds=batching.default_timeout_us,
                    allow_timeout_override=True, max_queue_size=batching.max_queue_size)))
        return pb.ModelConfigResponse(config=config)

    async def _inputs(self, request, model, context) -> np.ndarray:
        """The request's one input -> preprocessed float32 (N, 3, S, S)."""
        max_images = self.state.options.max_images_per_request
        if len(request.inputs) != 1:
            raise InvalidArgumentError(
                f"inputs: exactly one input is accepted ({IMAGE_INPUT!r} FP32 [N,3,{model.input_size},"
                f"{model.input_size}] or {BYTES_INPUT!r} BYTES [N]), got {len(request.inputs)}", field="inputs")
        tensor = request.inputs[0]
        raw = request.raw_input_contents
        if raw and tensor.HasField("contents"):
            raise InvalidArgumentError("raw_input_contents and inputs[0].contents are exclusive; send the data "
                                       "in one of them", field="raw_input_contents")
        if raw and len(raw) != 1:
            raise InvalidArgumentError(f"raw_input_contents: {len(raw)} entries for 1 input",
                                       field="raw_input_contents")
        shape = [int(s) for s in tensor.shape]
        if tensor.name == IMAGE_INPUT:
            if tensor.datatype != "FP32":
                raise InvalidArgumentError(f"inputs[0].datatype: {IMAGE_INPUT!r} must be FP32, got "
                                           f"{tensor.datatype!r}", field="inputs[0].datatype")
            if raw:
                arr = from_raw(raw[0], OIP_DTYPES["FP32"], shape, "raw_input_contents[0]")
            else:
                values = tensor.contents.fp32_contents
                if element_count(shape, "inputs[0]") != len(values):
                    raise InvalidArgumentError(f"inputs[0].contents.fp32_contents: {len(values)} values for shape "
                                               f"{shape}", field="inputs[0].contents")
                # Repeated floats are slow to convert (~50 ns each): off the event loop.
                arr = await asyncio.to_thread(lambda: np.asarray(values, dtype=np.float32).reshape(shape))
            return check_images(arr.astype(np.float32, copy=False), "inputs[0]", model.input_size, max_images)
        if tensor.name == BYTES_INPUT:
            if tensor.datatype != "BYTES":
                raise InvalidArgumentError(f"inputs[0].datatype: {BYTES_INPUT!r} must be BYTES, got "
                                           f"{tensor.datatype!r}", field="inputs[0].datatype")
            if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or not 1 <= shape[0] <= max_images:
                raise InvalidArgumentError(f"inputs[0].shape: {BYTES_INPUT!r} must be [N] or [N, 1] with 1 <= N <= "
                                           f"{max_images}, got {shape}", field="inputs[0].shape")
            if raw:
                items = decode_bytes_elements(raw[0], shape[0], "raw_input_contents[0]")
            else:
                items = list(tensor.contents.bytes_contents)
                if len(items) != shape[0]:
                    raise InvalidArgumentError(f"inputs[0].contents.bytes_contents: {len(items)} elements for "
                                               f"shape {shape}", field="inputs[0].contents")
            _, deadline_mono = deadline_of(context)
            return await self.state.decode.decode(items, model.config, field="inputs[0]",
                                                  deadline_mono=deadline_mono)
        raise InvalidArgumentError(f"inputs[0].name: {tensor.name!r} is not an input of model {model.name!r}; "
                                   f"accepted: {IMAGE_INPUT!r}, {BYTES_INPUT!r}", field="inputs[0].name")

    @unary("ModelInfer")
    async def ModelInfer(self, request, context):
        model = self._ready_model(request.model_name, request.model_version)
        for out in request.outputs:
            if out.name != OUTPUT:
                raise InvalidArgumentError(f"outputs: {out.name!r} is not an output of model {model.name!r}; "
                                           f"accepted: {OUTPUT!r}", field="outputs")
        timeout_us = None
        if "timeout" in request.parameters:
            value = _param_value(request.parameters["timeout"])
            timeout_us = checks.integer(value, "parameters.timeout", 0, what="microseconds") or None
        images = await self._inputs(request, model, context)
        deadline, _ = deadline_of(context)
        probs = await model.batcher.submit(images, timeout_us=timeout_us, deadline=deadline)
        probs = np.ascontiguousarray(probs, dtype="<f4")
        out = pb.ModelInferResponse.InferOutputTensor(name=OUTPUT, datatype="FP32", shape=list(probs.shape))
        return pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id,
                                     outputs=[out], raw_output_contents=[probs.tobytes()])
