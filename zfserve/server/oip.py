"""The Open Inference Protocol (KServe v2) service ``inference.GRPCInferenceService``.

Each served model NAME is two classification OIP models, one per input kind, so that metadata and config describe
exactly what a request must carry (perf_analyzer and other generic clients send every input a model declares),
and its explanations NAME-occlusion[-bytes] and NAME-deconv[-bytes] (see :mod:`.oip_explain`):
  ``NAME``        input ``image``        FP32  [-1, 3, S, S]  preprocessed images (the model's input units)
  ``NAME-bytes``  input ``image_bytes``  BYTES [-1, 1]        encoded JPEG / PNG / WebP images ([N] accepted too)
Both have the output ``probabilities`` FP32 [-1, C] and, when the model has out-of-distribution statistics, two
more from the same pass: ``ood_score`` FP32 [-1, 1] (higher: further from the model's data; the tensor's parameter
``threshold`` is the model's threshold) and ``out_of_distribution`` BOOL [-1, 1] (score above the threshold).
Output tensors, not response parameters: a score belongs to each image of a batch, every OIP client reads tensors
(``as_numpy``), and a client that asks for ``probabilities`` alone gets only that, as before. ModelMetadata lists
them and ModelConfig has them plus the parameters ``ood_threshold``, ``ood_acceptance`` and ``ood_method`` (or
``ood`` with the reason there is no score). Outputs are always in ``raw_output_contents`` (tritonclient reads only
that); a request naming ``outputs`` gets those, in its order; and the two models share the model's runtime,
version and dynamic batcher (with Classify). Raw and typed contents are exclusive. The request parameter ``timeout`` (int64 microseconds) may lower the queue timeout; ``priority`` is
accepted and ignored.

Versions are integers, as in Triton: :func:`~zfserve.wire.oip_version` of the model's version (config
version + weights hash), the same on every replica serving the same files; a request may also name the
zfserve version itself. ListModels and GetModelInfo (zfserve.v1) report both.

Extensions: model_configuration (ModelConfig's limits are the ones enforced: ``max_batch_size`` is
``--max-images-per-request``), statistics (see :mod:`.statistics`) and model_repository (the index always;
load/unload with ``--model-control explicit``). Not implemented: streaming, shared memory, trace, logging.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from .. import __version__
from .. import _checks as checks
from .._proto.inference import grpc_service_pb2 as pb
from .._proto.inference import grpc_service_pb2_grpc as pb_grpc
from .._proto.inference import model_config_pb2 as mc
from ..engine.results import DECONV_INTERPRETATION
from ..errors import InvalidArgumentError, NotFoundError
from ..wire import BYTES_INPUT, CLASSIFY, IMAGE_INPUT, infer_input, oip_model_name, parse_oip_model_name
from . import oip_explain
from .handlers import deadline_of, peer_of, unary
from .repository import Runtime, ServedModel
from .status import FailedPrecondition

# Triton's platform names of the two engines; a precision other than fp32 follows as "_int8" / "_bf16", so that
# ModelMetadata (which has no parameters) says what is served; ModelConfig also has it as parameters.
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}
OUTPUT = "probabilities"
OOD_SCORE = "ood_score"
OOD_FLAG = "out_of_distribution"
# Exactly what is implemented (Triton's extension names).
EXTENSIONS = ["model_configuration", "model_repository", "statistics"]


@dataclass(frozen=True)
class OipModel:
    """One OIP model: a served model's task seen through one of its two inputs."""

    name: str
    served: ServedModel
    input: str      # IMAGE_INPUT or BYTES_INPUT
    task: str = CLASSIFY   # or an explanation: wire.OCCLUSION, wire.DECONV


def platform(runtime: Runtime) -> str:
    """The OIP platform string of what ``runtime`` classifies with, e.g. "onnxruntime_onnx_int8"."""
    base = PLATFORMS[runtime.engine]
    return base if runtime.precision == "fp32" else f"{base}_{runtime.precision}"


def outputs(runtime: Runtime) -> list[tuple[str, str, list[int]]]:
    """(name, OIP datatype, dims without the batch) of each output of a model served by ``runtime``."""
    scored = [(OOD_SCORE, "FP32", [1]), (OOD_FLAG, "BOOL", [1])] if runtime.ood_detector is not None else []
    return [(OUTPUT, "FP32", [runtime.num_classes]), *scored]


def output_arrays(scored) -> dict[str, np.ndarray]:
    """A ScoredBatch's values per output name, in wire byte order (little-endian; BOOL one byte each)."""
    arrays = {OUTPUT: np.ascontiguousarray(scored.probabilities, dtype="<f4")}
    if scored.ood is not None:
        arrays[OOD_SCORE] = np.array([[v.score] for v in scored.ood], dtype="<f4")
        arrays[OOD_FLAG] = np.array([[v.out_of_distribution] for v in scored.ood], dtype=np.bool_)
    return arrays


def _param_value(param: pb.InferParameter):
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state):
        self.state = state
        self.metrics = state.metrics

    # ------------------------------------------------------------------------------------------- models
    def _oip_models(self) -> list[OipModel]:
        return [OipModel(oip_model_name(m.name, kind, task), m, kind, task)
                for m in self.state.repository for task in (CLASSIFY, *oip_explain.tasks(m.runtime))
                for kind in (IMAGE_INPUT, BYTES_INPUT)]

    def _model(self, name: str, field: str = "model_name") -> OipModel:
        if not name:
            raise InvalidArgumentError(f"{field}: required; served: {[m.name for m in self._oip_models()]}",
                                       field=field)
        models = self.state.repository.models
        for base, kind, task in parse_oip_model_name(name):
            served = models.get(base)
            if served is not None and (task == CLASSIFY or task in oip_explain.tasks(served.runtime)):
                return OipModel(name, served, kind, task)
        raise NotFoundError(f"{field}: unknown model {name!r}; served: {[m.name for m in self._oip_models()]}",
                            field=field)

    def _serving(self, name: str, version: str, context=None) -> tuple[OipModel, Runtime]:
        """The OIP model and the runtime it serves with now; the version, when given, must be that runtime's.
        With the call's ``context``, the call holds the runtime until it ends (see AppState.serving)."""
        model = self._model(name)
        runtime = self.state.serving(model.served, context)
        if version and version not in (runtime.oip_version, runtime.version):
            raise NotFoundError(f"model_version: model {name!r} has version {runtime.oip_version!r} (zfserve "
                                f"version {runtime.version!r}), not {version!r}", field="model_version")
        return model, runtime

    # ------------------------------------------------------------------------------------------- health
    @unary("ServerLive")
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @unary("ServerReady")
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.ready)

    @unary("ModelReady")
    async def ModelReady(self, request, context):
        model = self._model(request.name, "name")
        runtime = model.served.runtime
        if request.version and runtime is not None and request.version not in (runtime.oip_version, runtime.version):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.state.model_ready(model.served))

    @unary("ServerMetadata")
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="zfserve", version=__version__, extensions=EXTENSIONS)

    # ------------------------------------------------------------------------------------------- metadata
    @staticmethod
    def _input_dims(model: OipModel, runtime: Runtime) -> tuple[str, list[int]]:
        """The input's datatype and its dims without the batch dimension."""
        if model.input == IMAGE_INPUT:
            return "FP32", [3, runtime.input_size, runtime.input_size]
        return "BYTES", [1]

    @unary("ModelMetadata")
    async def ModelMetadata(self, request, context):
        model, runtime = self._serving(request.name, request.version)
        if model.task != CLASSIFY:
            return oip_explain.metadata(model, runtime, self.state.options)
        datatype, dims = self._input_dims(model, runtime)
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name, versions=[runtime.oip_version], platform=platform(runtime),
            inputs=[tm(name=model.input, datatype=datatype, shape=[-1, *dims])],
            outputs=[tm(name=name, datatype=kind, shape=[-1, *shape]) for name, kind, shape in outputs(runtime)])

    @unary("ModelConfig")
    async def ModelConfig(self, request, context):
        model, runtime = self._serving(request.name, request.version)
        if model.task != CLASSIFY:
            return pb.ModelConfigResponse(config=oip_explain.config(model, runtime, self.state.options))
        datatype, dims = self._input_dims(model, runtime)
        o = self.state.options
        batching = o.batching
        config = mc.ModelConfig(
            name=model.name, platform=platform(runtime), max_batch_size=o.max_images_per_request,
            input=[mc.ModelInput(name=model.input, data_type=mc.TYPE_FP32 if datatype == "FP32" else mc.TYPE_STRING,
                                 dims=dims)],
            output=[mc.ModelOutput(name=name, data_type=mc.TYPE_FP32 if kind == "FP32" else mc.TYPE_BOOL, dims=shape)
                    for name, kind, shape in outputs(runtime)],
            dynamic_batching=mc.ModelDynamicBatching(
                preferred_batch_size=[min(batching.max_batch_size, o.max_images_per_request)],
                max_queue_delay_microseconds=batching.max_queue_delay_us, preserve_ordering=False,
                default_queue_policy=mc.ModelQueuePolicy(
                    timeout_action=mc.ModelQueuePolicy.REJECT,
                    default_timeout_microseconds=batching.default_timeout_us,
                    allow_timeout_override=True, max_queue_size=batching.max_queue_size)))
        config.parameters["precision"].string_value = runtime.precision
        config.parameters["engine"].string_value = runtime.engine
        # What zfserve.v1 DeconvProject returns for this model (DeconvResponse.interpretation): not an attribution.
        config.parameters["deconv_interpretation"].string_value = DECONV_INTERPRETATION
        if runtime.ood_detector is not None:
            described = runtime.ood_detector.describe()
            config.parameters["ood_threshold"].string_value = repr(described["threshold"])
            config.parameters["ood_acceptance"].string_value = repr(described["acceptance"])
            config.parameters["ood_method"].string_value = described["method"]
        else:
            config.parameters["ood"].string_value = runtime.ood_note
        return pb.ModelConfigResponse(config=config)

    # ------------------------------------------------------------------------------------------- infer
    async def _inputs(self, request, model: OipModel, runtime: Runtime, context) -> np.ndarray:
        """The request's one input -> preprocessed float32 (N, 3, S, S): checked and converted off the event
        loop (repeated floats are slow to convert, ~50 ns each); encoded images go through the decode stage."""
        got = await asyncio.to_thread(infer_input, request, model.input, runtime.input_size,
                                      self.state.options.max_images_per_request, model.name)
        if isinstance(got, np.ndarray):
            return got
        _, deadline_mono = deadline_of(context)
        return await self.state.decode.decode(got, runtime.config, field="inputs[0]", deadline_mono=deadline_mono,
                                              client=peer_of(context))

    @unary("ModelInfer")
    async def ModelInfer(self, request, context):
        model, runtime = self._serving(request.model_name, request.model_version, context)
        if model.task != CLASSIFY:
            return await oip_explain.infer(self, request, model, runtime, context)
        with runtime.stats(model.input).measure() as measured:
            served = [name for name, _, _ in outputs(runtime)]
            for out in request.outputs:
                if out.name not in served:
                    raise InvalidArgumentError(f"outputs: {out.name!r} is not an output of model {model.name!r}; "
                                               f"accepted: {', '.join(map(repr, served))}", field="outputs")
            timeout_us = None
            if "timeout" in request.parameters:
                value = _param_value(request.parameters["timeout"])
                timeout_us = checks.integer(value, "parameters.timeout", 0, what="microseconds") or None
            images = await self._inputs(request, model, runtime, context)
            measured.inputs_done(len(images))
            deadline, _ = deadline_of(context)
            scored = await runtime.batcher.submit(images, timeout_us=timeout_us, deadline=deadline,
                                                  timing=measured.batch,
                                                  client=peer_of(context))
            measured.outputs_start()
            response = self._infer_response(request, model, runtime, scored,
                                            [out.name for out in request.outputs] or served)
        return response

    @staticmethod
    def _infer_response(request, model: OipModel, runtime: Runtime, scored, names: list[str]):
        arrays = output_arrays(scored)
        kinds = {name: kind for name, kind, _ in outputs(runtime)}
        response = pb.ModelInferResponse(model_name=model.name, model_version=runtime.oip_version, id=request.id)
        for name in names:
            out = response.outputs.add(name=name, datatype=kinds[name], shape=list(arrays[name].shape))
            if name == OOD_SCORE:
                out.parameters["threshold"].double_param = float(runtime.ood_detector.threshold)
            response.raw_output_contents.append(arrays[name].tobytes())
        return response

    # ------------------------------------------------------------------------------------------- statistics
    @unary("ModelStatistics")
    async def ModelStatistics(self, request, context):
        if request.name:
            model, runtime = self._serving(request.name, request.version)
            pairs = [(model, runtime)]
        else:   # every model that serves now (a version, when given, filters)
            pairs = [(m, m.served.runtime) for m in self._oip_models() if m.served.runtime is not None
                     and request.version in ("", m.served.runtime.oip_version, m.served.runtime.version)]
        return pb.ModelStatisticsResponse(model_stats=[
            runtime.stats(model.input, model.task).proto(model.name, runtime.oip_version) for model, runtime in pairs])

    # ------------------------------------------------------------------------------------------- repository
    @unary("RepositoryIndex")
    async def RepositoryIndex(self, request, context):
        response = pb.RepositoryIndexResponse()
        for model in sorted(self._oip_models(), key=lambda m: m.name):
            served = model.served
            if request.ready and not self.state.model_ready(served):
                continue
            response.models.add(name=model.name, version=served.runtime.oip_version if served.runtime else "",
                                state=served.state, reason=served.reason)
        return response

    def _controlled(self, request, accepted: tuple[str, ...] = ()) -> OipModel:
        if self.state.options.model_control != "explicit":
            raise FailedPrecondition("model control is disabled: this server loads its models at start-up and "
                                     "reloads them on SIGHUP; start it with --model-control explicit to allow "
                                     "RepositoryModelLoad and RepositoryModelUnload")
        unknown = sorted(set(request.parameters) - set(accepted))
        if unknown:   # Triton's "config" and "file:" overrides: a model's files are its only source here
            raise InvalidArgumentError(f"parameters: {unknown} not supported; accepted: {list(accepted)} (a model "
                                       f"loads from its own files only)", field="parameters")
        return self._model(request.model_name)

    @unary("RepositoryModelLoad")
    async def RepositoryModelLoad(self, request, context):
        model = self._controlled(request)
        await self.state.controller.load_model(model.served)
        return pb.RepositoryModelLoadResponse()

    @unary("RepositoryModelUnload")
    async def RepositoryModelUnload(self, request, context):
        # tritonclient always sends unload_dependents; zfserve models have no dependents (no ensembles).
        model = self._controlled(request, accepted=("unload_dependents",))
        await self.state.controller.unload_model(model.served)
        return pb.RepositoryModelUnloadResponse()
