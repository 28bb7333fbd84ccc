"""The zfserve.v1 API: Classify (through the dynamic batcher), DeconvProject and OcclusionSweep[Stream]
(on the heavy-work scheduler), ListModels and GetModelInfo."""

from __future__ import annotations

import asyncio
import json

import numpy as np

from .._proto.v1 import zfserve_pb2 as pb
from .._proto.v1 import zfserve_pb2_grpc as pb_grpc
from ..errors import InvalidArgumentError
from ..preprocess import load_images
from .handlers import deadline_of, server_stream, unary
from .status import Unavailable
from .tensors import array_to_tensor, check_images, tensor_to_array

DEFAULT_TOP_K = 5
DEFAULT_DECONV_TOP_K = 9
# Most units one DeconvProject may project (each is a 3 x 224 x 224 float32 map, 0.6 MB): bounds memory and
# keeps a response with return_tensor under the message limit.
MAX_DECONV_UNITS = 96
DEFAULT_WINDOW = 32
DEFAULT_STRIDE = 8
# A streaming sweep sends at most this many progress events per second.
PROGRESS_INTERVAL_S = 0.1


class ZFServeServicer(pb_grpc.ZFServeServicer):
    def __init__(self, state):
        self.state = state
        self.metrics = state.metrics

    # ------------------------------------------------------------------------------------------- helpers
    def _model(self, name: str):
        model = self.state.repository.get(name)
        if self.state.shutting_down:
            raise Unavailable("server is shutting down; retry on another replica")
        if not model.ready:
            raise Unavailable(f"model {model.name!r} is still loading; retry shortly")
        return model

    async def _images(self, images: pb.Images, model, *, exactly_one: bool = False) -> np.ndarray:
        """The request's images -> preprocessed float32 (N, 3, S, S); encoded ones are decoded off the loop."""
        max_images = 1 if exactly_one else self.state.options.max_images_per_request
        has_tensor = images.HasField("tensor")
        if images.encoded and has_tensor:
            raise InvalidArgumentError("images: give images.encoded or images.tensor, not both", field="images")
        if images.encoded:
            if not 1 <= len(images.encoded) <= max_images:
                raise InvalidArgumentError(f"images.encoded: {len(images.encoded)} images; accepted 1..{max_images}",
                                           field="images.encoded")
            return await asyncio.to_thread(load_images, list(images.encoded), model.config, field="images.encoded")
        if has_tensor:
            arr = tensor_to_array(images.tensor, "images.tensor")
            return check_images(arr, "images.tensor", model.input_size, max_images)
        raise InvalidArgumentError("images: empty; send images.encoded (JPEG/PNG/WebP bytes) or images.tensor "
                                   f"(float32 (N, 3, {model.input_size}, {model.input_size}))", field="images")

    # ------------------------------------------------------------------------------------------- Classify
    @unary("Classify")
    async def Classify(self, request, context):
        model = self._model(request.model)
        classes = model.num_classes
        top_k = request.top_k or min(DEFAULT_TOP_K, classes)
        if not 1 <= top_k <= classes:
            raise InvalidArgumentError(f"top_k: {request.top_k} out of range; accepted 1..{classes} (0 = default "
                                       f"{min(DEFAULT_TOP_K, classes)})", field="top_k")
        images = await self._images(request.images, model)
        deadline, _ = deadline_of(context)
        probs = await model.batcher.submit(images, deadline=deadline)
        response = pb.ClassifyResponse(model=model.name, model_version=model.version)
        for preds in model.classifier.top_k(probs, top_k):
            response.predictions.add(classes=[pb.ClassScore(index=int(p.index), name=p.name,
                                                            probability=float(p.probability)) for p in preds])
        if request.return_probabilities:
            response.probabilities.CopyFrom(array_to_tensor(np.asarray(probs, dtype=np.float32), pb.Tensor))
        return response

    # ------------------------------------------------------------------------------------------- Deconv
    @unary("DeconvProject")
    async def DeconvProject(self, request, context):
        model = self._model(request.model)
        from ..engine.deconv import PROJECTABLE
        if request.layer not in PROJECTABLE:
            raise InvalidArgumentError(f"layer: {request.layer!r} cannot be projected; accepted: "
                                       f"{list(PROJECTABLE)}", field="layer")
        if request.units and request.maps:
            raise InvalidArgumentError("units/maps: give one of them, not both", field="units")
        images = await self._images(request.images, model)
        units = [(u.channel, u.y, u.x) for u in request.units] or None
        maps = list(request.maps) or None
        # top_k 0: the engine's default (9 strongest when no units or maps are named, else none).
        top_k = request.top_k or None
        default_k = DEFAULT_DECONV_TOP_K if units is None and maps is None else 0
        per_image = (top_k or default_k) + len(units or ()) + len(maps or ())
        if per_image * len(images) > MAX_DECONV_UNITS:
            what = "units" if units else "maps" if maps else "top_k"
            raise InvalidArgumentError(f"{what}: {len(images)} images x {per_image} units = "
                                       f"{per_image * len(images)} projections; at most {MAX_DECONV_UNITS} per "
                                       f"request", field=what)
        _, deadline_mono = deadline_of(context)

        def work(job):
            engine = model.deconv_engine()
            job.check()
            return engine.project(images, request.layer, top_k=top_k, one_per_map=not request.allow_same_map,
                                  units=units, maps=maps)

        projections = await self.state.heavy.run(work, deadline_mono=deadline_mono)
        response = pb.DeconvResponse(model=model.name)
        from .. import render
        for unit in projections:
            x0, y0, x1, y1 = unit.box
            item = response.projections.add(
                image_index=unit.image_index, layer=unit.layer,
                unit=pb.Unit(channel=unit.channel, y=unit.y, x=unit.x), activation=float(unit.activation),
                box=pb.Box(y0=y0, x0=x0, y1=y1, x1=x1))
            if request.return_png:
                item.png = render.png_bytes(render.projection_to_rgb(unit.projection))
            if request.return_patches:
                item.patch_png = render.png_bytes(render.patch_to_rgb(unit.patch, model.config, unit.box))
        if request.return_tensor and projections:
            stack = np.stack([u.projection for u in projections]).astype(np.float32)
            response.tensor.CopyFrom(array_to_tensor(stack, pb.Tensor))
        return response

    # ------------------------------------------------------------------------------------------- Occlusion
    def _sweep_args(self, request, model) -> dict:
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
        args = dict(window=request.window or DEFAULT_WINDOW, stride=request.stride or DEFAULT_STRIDE, fill=fill,
                    target=request.target if request.HasField("target") else None,
                    layer=request.activity_layer or "conv5",
                    channel=request.activity_channel if request.HasField("activity_channel") else None,
                    attribution_on="logit" if request.attribution_on_logits else "probability",
                    fill_units="pixel" if request.fill_in_pixels else "input")
        if request.outputs:
            args["outputs"] = tuple(request.outputs)
        return args

    def _sweep_response(self, result, model, return_png: bool, image, backend: str) -> pb.OcclusionResponse:
        ny, nx = result.shape
        response = pb.OcclusionResponse(
            model=model.name, target=int(result.target), positions_y=ny, positions_x=nx,
            activity_layer=result.layer, activity_channel=int(result.channel),
            base_probability=float(result.base_probability), base_activity=float(result.base_activity),
            starts=[int(s) for s in result.starts], window=int(result.window), stride=int(result.stride),
            fill=[float(v) for v in np.asarray(result.fill).reshape(-1)], fill_units=result.fill_units,
            attribution_on=result.attribution_on, backend=backend,
            seconds=float(sum(result.timings.get(k, 0.0) for k in ("base_s", "sweep_s"))))
        for name, arr in result.arrays().items():
            arr = np.asarray(arr)
            arr = arr.astype(np.int64 if name == "argmax" else np.float32, copy=False)
            getattr(response, name).CopyFrom(array_to_tensor(arr, pb.Tensor))
        if return_png:
            from .. import render
            from ..preprocess import to_display
            pictures = render.occlusion_pictures(result, to_display(image, model.config), model.config.class_names)
            for name, picture in pictures.items():
                response.png[name] = render.png_bytes(picture)
        return response

    async def _start_sweep(self, request, context, on_progress=None):
        model = self._model(request.model)
        args = self._sweep_args(request, model)
        images = await self._images(request.images, model, exactly_one=True)
        _, deadline_mono = deadline_of(context)

        def work(job):
            engine = model.occlusion_engine()
            job.check()
            result = engine.sweep(images[0], progress=job.progress, **args)
            # Rendering is CPU work too: keep it on this worker, off the event loop.
            return self._sweep_response(result, model, request.return_png, images[0], engine.backend)

        return self.state.heavy.run(work, deadline_mono=deadline_mono, on_progress=on_progress)

    @unary("OcclusionSweep")
    async def OcclusionSweep(self, request, context):
        return await (await self._start_sweep(request, context))

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

        task = asyncio.ensure_future(await self._start_sweep(request, context, on_progress))
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
            if m.classifier is None:
                response.models.add(name=m.name, ready=False)
            else:
                response.models.add(name=m.name, version=m.version, num_classes=m.num_classes,
                                    ready=m.ready and not self.state.shutting_down)
        return response

    @unary("GetModelInfo")
    async def GetModelInfo(self, request, context):
        model = self._model(request.model)
        torch_model = await asyncio.to_thread(model.torch_model)
        config = model.config
        info = pb.ModelInfo(name=model.name, version=model.version, num_classes=model.num_classes,
                            class_names=list(config.class_names),
                            input_shape=[3, model.input_size, model.input_size],
                            preprocess_json=json.dumps(config.preprocess.to_json()))
        for layer in torch_model.layer_info():
            info.layers.add(name=layer.name, shape=list(layer.shape), parameters=int(layer.params),
                            receptive_field=int(layer.receptive_field or 0), stride=int(layer.jump or 0))
        return info

