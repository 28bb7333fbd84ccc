"""The zfserve.v1 API: Classify (through the dynamic batcher), DeconvProject and OcclusionSweep[Stream]
(on the heavy-work scheduler), ListModels and GetModelInfo. Every answer about images carries their
out-of-distribution scores (or a note saying why the model has none)."""

from __future__ import annotations

import asyncio
import json

import numpy as np

from .. import _checks as checks
from .. import render, wire
from .._proto.v1 import zfserve_pb2 as pb
from .._proto.v1 import zfserve_pb2_grpc as pb_grpc
from ..config import training_data
from ..engine.results import DEFAULT_TOP_K, TopK
from ..errors import InvalidArgumentError
from ..preprocess import to_display
from . import explain
from .explain import DEFAULT_MAX_OCCLUSION_POSITIONS
from .handlers import deadline_of, peer_of, server_stream, unary

# A streaming sweep sends at most this many progress events per second.
PROGRESS_INTERVAL_S = 0.1


class ZFServeServicer(pb_grpc.ZFServeServicer):
    def __init__(self, state):
        self.state = state
        self.metrics = state.metrics

    # ------------------------------------------------------------------------------------------- helpers
    def _model(self, name: str, context):
        """The runtime of model ``name`` (empty: the default): every request uses the one it took here, and holds
        it until it ends (a reload meanwhile lets it finish on this one)."""
        return self.state.serving(self.state.repository.get(name), context)

    async def _images(self, images: pb.Images, model, context, *, exactly_one: bool = False) -> np.ndarray:
        """The request's images -> preprocessed float32 (N, 3, S, S); encoded ones go through the decode stage
        (budget, bounded lanes, the client's deadline)."""
        max_images = 1 if exactly_one else self.state.options.max_images_per_request
        has_tensor = images.HasField("tensor")
        if images.encoded and has_tensor:
            raise InvalidArgumentError("images: give images.encoded or images.tensor, not both", field="images")
        if images.encoded:
            if not 1 <= len(images.encoded) <= max_images:
                raise InvalidArgumentError(f"images.encoded: {len(images.encoded)} images; accepted 1..{max_images}",
                                           field="images.encoded")
            _, deadline_mono = deadline_of(context)
            return await self.state.decode.decode(images.encoded, model.config, field="images.encoded",
                                                  deadline_mono=deadline_mono, client=peer_of(context))
        if has_tensor:
            arr = wire.tensor_to_array(images.tensor, "images.tensor")
            return wire.check_images(arr, "images.tensor", model.input_size, max_images)
        raise InvalidArgumentError("images: empty; send images.encoded (JPEG/PNG/WebP bytes) or images.tensor "
                                   f"(float32 (N, 3, {model.input_size}, {model.input_size}))", field="images")

    # ------------------------------------------------------------------------------------------- Classify
    @unary("Classify")
    async def Classify(self, request, context):
        model = self._model(request.model, context)
        classes = model.num_classes
        top_k = checks.integer(request.top_k if request.HasField("top_k") else min(DEFAULT_TOP_K, classes),
                               "top_k", 1, classes, what=f"unset = {min(DEFAULT_TOP_K, classes)}")
        # Counted in the statistics of the OIP model of the same input kind (NAME or NAME-bytes).
        kind = wire.BYTES_INPUT if request.images.encoded else wire.IMAGE_INPUT
        with model.stats(kind).measure() as measured:
            images = await self._images(request.images, model, context)
            measured.inputs_done(len(images))
            deadline, _ = deadline_of(context)
            scored = await model.batcher.submit(images, deadline=deadline, timing=measured.batch,
                                                client=peer_of(context))
            measured.outputs_start()
            probs, verdicts = scored.probabilities, scored.ood or [None] * len(scored)
            predictions = [TopK(p, v) for p, v in zip(model.classifier.top_k(probs, top_k), verdicts)]
            response = wire.classify_response(model.name, model.version, predictions,
                                              probs if request.return_probabilities else None, model.ood_note)
        return response

    # ------------------------------------------------------------------------------------------- Deconv
    @unary("DeconvProject")
    async def DeconvProject(self, request, context):
        model = self._model(request.model, context)
        layer = request.layer or model.config.last_conv
        checks.layer(layer, model.config.spatial_layers)
        args = wire.deconv_arguments(request)
        # Counted in the statistics of the OIP model NAME-deconv[-bytes] (see .explain).
        kind = wire.BYTES_INPUT if request.images.encoded else wire.IMAGE_INPUT
        with model.stats(kind, wire.DECONV).measure() as measured:
            images = await self._images(request.images, model, context)
            explain.check_deconv_size(len(images), args)
            measured.inputs_done(len(images))

            def work(job):
                projected = explain.project(model, images, layer, job, **args)
                for unit in projected:   # PNG encoding is CPU work too: on this worker, off the event loop
                    if request.return_png:
                        unit.png = render.png_bytes(render.signed_to_rgb(unit.projection))
                    if request.return_patches:
                        unit.patch_png = render.png_bytes(render.patch_to_rgb(unit.patch, model.config, unit.box))
                return wire.deconv_response(model.name, projected, tensor=request.return_tensor,
                                            version=model.version, ood=model.ood_of(images), ood_note=model.ood_note)

            return await explain.run_measured(self.state, work, context, measured)

    # ------------------------------------------------------------------------------------------- Occlusion
    async def _sweep(self, request, context, on_progress=None):
        model = self._model(request.model, context)
        args = wire.sweep_arguments(request)
        args["max_positions"] = self.state.options.max_occlusion_positions
        asked, gated = wire.sweep_mode(request)
        # Counted in the statistics of the OIP model NAME-occlusion[-bytes] (see .explain).
        kind = wire.BYTES_INPUT if request.images.encoded else wire.IMAGE_INPUT
        with model.stats(kind, wire.OCCLUSION).measure() as measured:
            images = await self._images(request.images, model, context, exactly_one=True)
            measured.inputs_done(1)

            def work(job):
                result = explain.sweep(model, images[0], job, asked=asked, gated=gated, **args)
                scores = model.ood_of(images[:1])
                result.ood = scores[0] if scores else None
                if request.return_png:   # rendering is CPU work too: keep it on this worker, off the event loop
                    pictures = render.occlusion_pictures(result, to_display(images[0], model.config),
                                                         model.config.class_names)
                    result.png = {name: render.png_bytes(picture) for name, picture in pictures.items()}
                return wire.occlusion_response(model.name, result, version=model.version, ood_note=model.ood_note)

            return await explain.run_measured(self.state, work, context, measured, on_progress=on_progress)

    @unary("OcclusionSweep")
    async def OcclusionSweep(self, request, context):
        return await self._sweep(request, context)

    @server_stream("OcclusionSweepStream")
    async def OcclusionSweepStream(self, request, context):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        last = [0.0]

        def on_progress(done, total):  # called in the worker thread
            now = loop.time()
            if done == total or now - last[0] >= PROGRESS_INTERVAL_S:
                last[0] = now
                loop.call_soon_threadsafe(events.put_nowait, (done, total))

        task = asyncio.ensure_future(self._sweep(request, context, on_progress))
        getter = None
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    d, t = getter.result()
                    yield pb.OcclusionEvent(progress=pb.Progress(done=d, total=t))
                    continue
                getter.cancel()
                while not events.empty():
                    d, t = events.get_nowait()
                    yield pb.OcclusionEvent(progress=pb.Progress(done=d, total=t))
                yield pb.OcclusionEvent(result=task.result())
                return
        finally:
            if getter is not None and not getter.done():
                getter.cancel()
            if not task.done():  # the client went away mid-sweep: stop the computation
                task.cancel()

    # ------------------------------------------------------------------------------------------- models
    @unary("ListModels")
    async def ListModels(self, request, context):
        response = pb.ListModelsResponse(default_model=self.state.repository.default)
        for m in self.state.repository:
            runtime = m.runtime
            if runtime is None:
                response.models.add(name=m.name, ready=False, reason=m.reason)
            else:
                response.models.add(name=m.name, version=runtime.version, num_classes=runtime.num_classes,
                                    ready=self.state.model_ready(m), oip_version=runtime.oip_version,
                                    precision=runtime.precision, engine=runtime.engine)
        return response

    @unary("GetModelInfo")
    async def GetModelInfo(self, request, context):
        model = self._model(request.model, context)
        torch_model = await asyncio.to_thread(model.torch_model) if model.has_layers else None
        config = model.config
        info = pb.ModelInfo(name=model.name, version=model.version, oip_version=model.oip_version,
                            num_classes=model.num_classes, class_names=list(config.class_names),
                            input_shape=[3, model.input_size, model.input_size],
                            preprocess_json=json.dumps(config.preprocess.to_json()),
                            precision=model.precision, engine=model.engine, training_data=training_data(config))
        if model.ood_detector is not None:
            described = model.ood_detector.describe()
            info.ood.CopyFrom(pb.OodInfo(available=True, method=described["method"],
                                         threshold=described["threshold"], acceptance=described["acceptance"],
                                         data=described["data"]))
        else:
            info.ood.CopyFrom(pb.OodInfo(available=False, note=model.ood_note))
        for layer in torch_model.layer_info() if torch_model is not None else ():   # an ONNX model lists none
            info.layers.add(name=layer.name, shape=list(layer.shape), parameters=int(layer.params),
                            receptive_field=int(layer.receptive_field or 0), stride=int(layer.jump or 0))
        return info
