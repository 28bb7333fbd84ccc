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
from ..wire import BYTES_INPUT, IMAGE_INPUT, infer_input
from .handlers import deadline_of, unary

PLATFORM = "onnxruntime_onnx"
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
        """The request's one input -> preprocessed float32 (N, 3, S, S): checked and converted off the event
        loop (repeated floats are slow to convert, ~50 ns each); encoded images go through the decode stage."""
        got = await asyncio.to_thread(infer_input, request, model.input_size,
                                      self.state.options.max_images_per_request, model.name)
        if isinstance(got, np.ndarray):
            return got
        _, deadline_mono = deadline_of(context)
        return await self.state.decode.decode(got, model.config, field="inputs[0]", deadline_mono=deadline_mono)

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
