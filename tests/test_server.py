"""Integration tests: a real server on 127.0.0.1 (ephemeral port) over a tiny-FC model directory.

Every RPC of both services (streaming included) is compared with the local engines on the same inputs;
tritonclient drives the Open Inference Protocol unmodified; bad input gets the right status with a message
naming the field and never takes the server down.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from zfserve._proto.inference import grpc_service_pb2 as oip
from zfserve._proto.inference import grpc_service_pb2_grpc as oip_grpc
from zfserve._proto.v1 import zfserve_pb2 as pb
from zfserve._proto.v1 import zfserve_pb2_grpc as pb_grpc
from zfserve.client import Client, ServerError
from zfserve.server import BackgroundServer, BatcherConfig, ServerOptions
from zfserve.wire import array_to_tensor, encode_bytes_elements, oip_version

TOKEN = "test-token-0123456789abcdef"


# A ZFServer on its own event loop in a background thread, so tests can use blocking clients.
RunningServer = BackgroundServer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from zfserve.model import ZFNet
    from zfserve.weights import save_model
    torch.manual_seed(7)
    model = ZFNet(num_classes=10, fc_width=64).eval()
    directory = tmp_path_factory.mktemp("models") / "tiny"
    save_model(model, directory, name="tiny", class_names=[f"c{i}" for i in range(10)])
    return directory


@pytest.fixture(scope="module")
def server(model_dir):
    # A position cap above the 217 x 217 sweep the cancellation test needs (the default is 4096).
    running = RunningServer(ServerOptions(port=0, model=str(model_dir), max_occlusion_positions=217 * 217,
                                          batching=BatcherConfig(max_batch_size=16, max_queue_delay_us=2000)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.ZFServeStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def oip_stub(server):
    channel = grpc.insecure_channel(server.target)
    yield oip_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def classifier(model_dir):
    from zfserve.engine.classifier import Classifier
    return Classifier(str(model_dir), warmup=False)


@pytest.fixture(scope="module")
def torch_model(model_dir):
    from zfserve.weights import load_model
    return load_model(str(model_dir))


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 60, (n, 3, 224, 224)).astype(np.float32)


def _png(seed: int, size=(240, 260)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _tensor_images(x: np.ndarray) -> pb.Images:
    return pb.Images(tensor=array_to_tensor(x))


def _status(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


# ------------------------------------------------------------------------------------------------ Classify
def test_classify_tensor_matches_local_engine(stub, classifier):
    x = _images(3, seed=1)
    response = stub.Classify(pb.ClassifyRequest(images=_tensor_images(x), top_k=4, return_probabilities=True))
    expected = classifier.probabilities(x)
    got = np.frombuffer(response.probabilities.data, "<f4").reshape(list(response.probabilities.shape))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert response.model == "tiny" and len(response.predictions) == 3
    for preds, ref in zip(response.predictions, classifier.top_k(expected, 4)):
        assert [c.index for c in preds.classes] == [p.index for p in ref]
        assert [c.name for c in preds.classes] == [p.name for p in ref]


def test_classify_encoded_images_use_the_model_preprocessing(stub, classifier, model_dir):
    from zfserve.preprocess import load_images
    pngs = [_png(2), _png(3, size=(300, 240))]
    response = stub.Classify(pb.ClassifyRequest(images=pb.Images(encoded=pngs), return_probabilities=True))
    expected = classifier.probabilities(load_images(pngs, classifier.config))
    got = np.frombuffer(response.probabilities.data, "<f4").reshape(2, 10)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert len(response.predictions[0].classes) == 5  # default top_k


def test_python_client_classify_and_models(server, classifier):
    x = _images(2, seed=4)
    with Client(server.target, timeout=60) as client:
        preds, probs = client.classify(x, top_k=2, return_probabilities=True)
        np.testing.assert_allclose(probs, classifier.probabilities(x), atol=1e-6)
        assert [p.index for p in preds[1]] == [p.index for p in classifier.top_k(probs, 2)[1]]
        models = client.list_models()
        assert [m.name for m in models.models] == ["tiny"] and models.default_model == "tiny"
        assert models.models[0].ready and models.models[0].num_classes == 10
        assert client.health() == "SERVING"


def test_get_model_info_lists_layers(stub, torch_model):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model="tiny"))
    assert info.num_classes == 10 and list(info.class_names) == [f"c{i}" for i in range(10)]
    assert list(info.input_shape) == [3, 224, 224]
    expected = [(li.name, list(li.shape)) for li in torch_model.layer_info()]
    assert [(layer.name, list(layer.shape)) for layer in info.layers] == expected
    assert '"crop": 224' in info.preprocess_json


def test_concurrent_requests_are_batched(server, stub, classifier):
    batcher = server.server.repository.get("tiny").runtime.batcher
    before = (batcher.stats.batches, batcher.stats.images_computed)
    x = _images(8, seed=5)

    def one(i):
        r = stub.Classify(pb.ClassifyRequest(images=_tensor_images(x[i:i + 1]), return_probabilities=True))
        return np.frombuffer(r.probabilities.data, "<f4")

    with ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(one, range(8)))
    np.testing.assert_allclose(np.stack(rows), classifier.probabilities(x), atol=1e-6)
    batches = batcher.stats.batches - before[0]
    assert batcher.stats.images_computed - before[1] == 8
    assert batches < 8, "8 concurrent single-image requests should share engine calls"


# ------------------------------------------------------------------------------------------------ Deconv
def test_deconv_matches_local_engine(stub, torch_model):
    from zfserve.engine.deconv import DeconvEngine
    x = _images(2, seed=6)
    response = stub.DeconvProject(pb.DeconvRequest(images=_tensor_images(x), layer="conv3", top_k=3,
                                                   return_tensor=True, return_png=True, return_patches=True))
    local = DeconvEngine(torch_model).project(x, "conv3", top_k=3)
    assert len(response.projections) == len(local) == 6
    assert response.interpretation == "feature visualisation (class-insensitive)" and "+" in response.model_version
    got = np.frombuffer(response.tensor.data, "<f4").reshape(list(response.tensor.shape))
    for i, (p, ref) in enumerate(zip(response.projections, local)):
        assert (p.image_index, p.unit.channel, p.unit.y, p.unit.x) == (ref.image_index, ref.channel, ref.y, ref.x)
        assert (p.box.x0, p.box.y0, p.box.x1, p.box.y1) == tuple(ref.box)
        assert p.activation == pytest.approx(ref.activation, rel=1e-6)
        np.testing.assert_allclose(got[i], ref.projection, rtol=1e-5, atol=1e-6)
        assert p.png.startswith(b"\x89PNG") and p.patch_png.startswith(b"\x89PNG")


def test_deconv_explicit_units_through_client(server, torch_model):
    from zfserve.engine.deconv import DeconvEngine
    x = _images(1, seed=7)
    with Client(server.target, timeout=60) as client:
        got = client.deconv(x, "conv5", units=[(3, 4, 5), (10, 0, 12)])
    local = DeconvEngine(torch_model).project(x, "conv5", units=[(3, 4, 5), (10, 0, 12)])
    assert [(u.channel, u.y, u.x) for u in got] == [(3, 4, 5), (10, 0, 12)]
    for u, ref in zip(got, local):
        np.testing.assert_allclose(u.projection, ref.projection, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ Occlusion
def test_occlusion_unary_and_stream_match_local_engine(stub, torch_model):
    from zfserve.engine.occlusion import OcclusionEngine
    x = _images(1, seed=8)
    request = pb.OcclusionRequest(images=_tensor_images(x), window=64, stride=32)
    local = OcclusionEngine(torch_model).sweep(x[0], window=64, stride=32)
    unary = stub.OcclusionSweep(request)
    events = list(stub.OcclusionSweepStream(request))
    assert events[-1].WhichOneof("event") == "result"
    progress = [e.progress for e in events[:-1]]
    assert progress and all(e.WhichOneof("event") == "progress" for e in events[:-1])
    assert progress[-1].done == progress[-1].total == 36
    assert [p.done for p in progress] == sorted(p.done for p in progress)
    models = stub.ListModels(pb.ListModelsRequest())
    version = next(m.version for m in models.models if m.name == models.default_model)
    for response in (unary, events[-1].result):
        assert response.target == local.target and (response.positions_y, response.positions_x) == (6, 6)
        # What reproduces the maps: the settings used and the served model version.
        assert (response.window, response.stride, list(response.fill), response.fill_units,
                response.attribution_on) == (64, 32, np.asarray(local.fill).reshape(-1).tolist(), local.fill_units,
                                             local.attribution_on)
        assert response.model_version == version and "+" in version
        for name, ref in local.arrays().items():
            tensor = getattr(response, name)
            dtype = "<i8" if name == "argmax" else "<f4"
            got = np.frombuffer(tensor.data, dtype).reshape(list(tensor.shape))
            if name == "argmax":
                np.testing.assert_array_equal(got, ref)
            else:
                np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_client_occlude_with_progress(server, torch_model):
    from zfserve.engine.occlusion import OcclusionEngine
    x = _images(1, seed=9)
    seen = []
    with Client(server.target, timeout=120) as client:
        maps = client.occlude(x, window=48, stride=48, target=3, outputs=["probability"],
                              progress=lambda d, t: seen.append((d, t)))
        models = client.list_models()
        version = next(m.version for m in models.models if m.name == models.default_model)
    local = OcclusionEngine(torch_model).sweep(x[0], window=48, stride=48, target=3, outputs=["probability"])
    assert seen and seen[-1][0] == seen[-1][1]
    assert maps.target == 3 and maps.argmax is None
    assert (maps.window, maps.stride, maps.attribution_on) == (48, 48, local.attribution_on)
    assert maps.model_version == version and "+" in version
    np.testing.assert_allclose(maps.probability, local.probability, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ OIP
def test_tritonclient_drives_the_inference_protocol(server, classifier, model_dir):
    from zfserve.weights import read_snapshot
    import tritonclient.grpc as tc
    client = tc.InferenceServerClient(server.target)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    assert client.is_model_ready("tiny-bytes")
    meta = client.get_server_metadata()
    assert meta.name == "zfserve"
    assert list(meta.extensions) == ["model_configuration", "model_repository", "statistics"]
    version = oip_version(read_snapshot(model_dir).version)   # of the config's "0" + the weights hash
    for name, inputs in (("tiny", [("image", "FP32", [-1, 3, 224, 224])]),
                         ("tiny-bytes", [("image_bytes", "BYTES", [-1, 1])])):
        md = client.get_model_metadata(name)
        assert md.platform == "onnxruntime_onnx" and list(md.versions) == [version] and version.isdigit()
        assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == inputs
        assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [("probabilities", "FP32", [-1, 10])]
        config = client.get_model_config(name).config
        # max_batch_size is the per-request limit the server enforces; the batcher's size is the preferred one.
        assert config.max_batch_size == 64 and config.platform == "onnxruntime_onnx"
        assert list(config.dynamic_batching.preferred_batch_size) == [16]
        assert config.parameters["deconv_interpretation"].string_value == "feature visualisation (class-insensitive)"
        assert config.dynamic_batching.max_queue_delay_microseconds == 2000

    x = _images(3, seed=10)
    inp = tc.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("tiny", [inp], outputs=[tc.InferRequestedOutput("probabilities")], request_id="req-7",
                          timeout=30_000_000, priority=1)
    np.testing.assert_allclose(result.as_numpy("probabilities"), classifier.probabilities(x), atol=1e-6)
    assert result.get_response().id == "req-7"

    from zfserve.preprocess import load_images
    pngs = [_png(11), _png(12)]
    inp = tc.InferInput("image_bytes", [2], "BYTES")
    inp.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    result = client.infer("tiny-bytes", [inp])
    np.testing.assert_allclose(result.as_numpy("probabilities"),
                               classifier.probabilities(load_images(pngs, classifier.config)), atol=1e-6)
    client.close()


def test_model_infer_typed_contents_and_raw_bytes(oip_stub, classifier):
    x = _images(1, seed=13)
    request = oip.ModelInferRequest(model_name="tiny", id="typed")
    tensor = request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 224, 224])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    response = oip_stub.ModelInfer(request)
    assert response.id == "typed" and not response.outputs[0].HasField("contents")
    got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(1, 10)
    np.testing.assert_allclose(got, classifier.probabilities(x), atol=1e-6)

    from zfserve.preprocess import load_images
    png = _png(14)
    request = oip.ModelInferRequest(model_name="tiny-bytes", raw_input_contents=[encode_bytes_elements([png])])
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1, 1])
    got = np.frombuffer(oip_stub.ModelInfer(request).raw_output_contents[0], "<f4").reshape(1, 10)
    np.testing.assert_allclose(got, classifier.probabilities(load_images([png], classifier.config)), atol=1e-6)


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    channel = grpc.insecure_channel(server.target)
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"zfserve.v1.ZFServe", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
    file = database.FindFileContainingSymbol("zfserve.v1.ZFServe")
    assert file.package == "zfserve.v1"
    channel.close()


def test_metrics_count_requests_and_batches(server, stub):
    stub.Classify(pb.ClassifyRequest(images=_tensor_images(_images(1, seed=15))))
    text = server.server.metrics.text()
    assert 'zfserve_requests_total{code="OK",rpc="Classify"}' in text
    assert 'zfserve_batch_size_count{model="tiny"}' in text
    assert "zfserve_request_duration_seconds_bucket" in text


# ------------------------------------------------------------------------------------------------ bad input
BAD_CLASSIFY = [
    ("corrupt bytes", dict(images=pb.Images(encoded=[b"definitely not an image"])), "images.encoded[0]"),
    ("empty image", dict(images=pb.Images(encoded=[b""])), "images.encoded[0]"),
    ("no images", dict(images=pb.Images()), "images"),
    ("wrong shape", dict(images=pb.Images(tensor=pb.Tensor(dtype="float32", shape=[1, 3, 100, 100],
                                                           data=bytes(4 * 3 * 100 * 100)))), "images.tensor"),
    ("wrong dtype", dict(images=pb.Images(tensor=pb.Tensor(dtype="float64", shape=[1, 3, 224, 224],
                                                           data=bytes(8 * 3 * 224 * 224)))), "images.tensor.dtype"),
    ("int dtype", dict(images=pb.Images(tensor=pb.Tensor(dtype="int32", shape=[1, 3, 224, 224],
                                                         data=bytes(4 * 3 * 224 * 224)))), "images.tensor"),
    ("wrong byte length", dict(images=pb.Images(tensor=pb.Tensor(dtype="float32", shape=[1, 3, 224, 224],
                                                                 data=bytes(100)))), "images.tensor.data"),
    ("negative shape", dict(images=pb.Images(tensor=pb.Tensor(dtype="float32", shape=[-1, 3, 224, 224]))),
     "images.tensor"),
    ("top_k too large", dict(images=pb.Images(encoded=[b"x"]), top_k=11), "top_k"),
]


@pytest.mark.parametrize("case,fields,named", BAD_CLASSIFY, ids=[c[0] for c in BAD_CLASSIFY])
def test_bad_classify_requests(stub, case, fields, named):
    err = _status(stub.Classify, pb.ClassifyRequest(**fields))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert named in err.details()


def test_nan_and_both_forms_and_unknown_model(stub):
    x = _images(1, seed=16)
    x[0, 1, 5, 5] = np.nan
    err = _status(stub.Classify, pb.ClassifyRequest(images=_tensor_images(x)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in err.details()
    both = pb.Images(encoded=[_png(1)], tensor=array_to_tensor(_images(1, 1)))
    err = _status(stub.Classify, pb.ClassifyRequest(images=both))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not both" in err.details()
    err = _status(stub.Classify, pb.ClassifyRequest(model="nope", images=pb.Images(encoded=[_png(1)])))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.details() and "tiny" in err.details()


def test_bad_deconv_and_occlusion_requests(stub):
    images = _tensor_images(_images(1, seed=17))
    cases = [
        (stub.DeconvProject, pb.DeconvRequest(images=images, layer="conv9"), "layer"),
        (stub.DeconvProject, pb.DeconvRequest(images=images, layer="fc6"), "layer"),
        (stub.DeconvProject, pb.DeconvRequest(images=images, layer="conv5", units=[pb.Unit(channel=256)]), "units"),
        (stub.DeconvProject, pb.DeconvRequest(images=images, layer="conv1", units=[pb.Unit(channel=1, y=110)]),
         "units"),
        (stub.DeconvProject, pb.DeconvRequest(images=images, layer="conv5", top_k=257), "top_k"),
        (stub.DeconvProject, pb.DeconvRequest(images=images, layer="conv5", top_k=97, allow_same_map=True),
         "at most 96"),
        (stub.OcclusionSweep, pb.OcclusionRequest(images=images, window=225), "window"),
        (stub.OcclusionSweep, pb.OcclusionRequest(images=images, window=16, stride=17), "stride"),
        (stub.OcclusionSweep, pb.OcclusionRequest(images=images, window=-3), "window"),
        (stub.OcclusionSweep, pb.OcclusionRequest(images=images, target=10), "target"),
        (stub.OcclusionSweep, pb.OcclusionRequest(images=images, activity_layer="conv7"), "layer"),
        (stub.OcclusionSweep, pb.OcclusionRequest(images=images, outputs=["heat"]), "outputs"),
        (stub.OcclusionSweep, pb.OcclusionRequest(images=_tensor_images(_images(2, 1))), "images"),
    ]
    for method, request, named in cases:
        err = _status(method, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, err.details())
        assert named in err.details(), err.details()
    # An explicit 0 is refused (unset means the default), as it is locally.
    stream_err = _status(lambda: list(stub.OcclusionSweepStream(pb.OcclusionRequest(images=images, window=0,
                                                                                    stride=40))))
    assert stream_err.code() == grpc.StatusCode.INVALID_ARGUMENT and "window: 0" in stream_err.details()


def test_bad_model_infer_requests(oip_stub):
    x = _images(1, seed=18)
    raw = x.tobytes()

    def request(**kw):
        r = oip.ModelInferRequest(model_name=kw.pop("model_name", "tiny"))
        for spec in kw.pop("inputs", [("image", "FP32", [1, 3, 224, 224])]):
            r.inputs.add(name=spec[0], datatype=spec[1], shape=spec[2])
        r.raw_input_contents.extend(kw.pop("raw", [raw]))
        for name in kw.pop("outputs", []):
            r.outputs.add(name=name)
        return r

    both = request()
    both.inputs[0].contents.fp32_contents.extend([1.0])
    cases = [
        (both, grpc.StatusCode.INVALID_ARGUMENT, "exclusive"),
        (request(inputs=[("image", "FP16", [1, 3, 224, 224])]), grpc.StatusCode.INVALID_ARGUMENT, "datatype"),
        (request(inputs=[("image", "FP32", [1, 3, 224, 223])]), grpc.StatusCode.INVALID_ARGUMENT,
         "raw_input_contents[0]"),
        (request(inputs=[("pixels", "FP32", [1, 3, 224, 224])]), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].name"),
        (request(inputs=[]), grpc.StatusCode.INVALID_ARGUMENT, "inputs"),
        (request(outputs=["logits"]), grpc.StatusCode.INVALID_ARGUMENT, "outputs"),
        (request(model_name="tiny-bytes", inputs=[("image_bytes", "BYTES", [1])], raw=[b"\x05\x00"]),
         grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents[0]"),
        (request(model_name="tiny-bytes", inputs=[("image_bytes", "BYTES", [1])],
                 raw=[encode_bytes_elements([b"junk"])]), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0]"),
        # Each OIP model takes its own input only, and the message names the model that takes the other.
        (request(inputs=[("image_bytes", "BYTES", [1])], raw=[encode_bytes_elements([_png(3)])]),
         grpc.StatusCode.INVALID_ARGUMENT, "send 'image_bytes' to model 'tiny-bytes'"),
        (request(model_name="tiny-bytes"), grpc.StatusCode.INVALID_ARGUMENT, "send 'image' to model 'tiny'"),
        (request(inputs=[("image", "FP32", [1, 3, 224, 224]), ("image_bytes", "BYTES", [1])]),
         grpc.StatusCode.INVALID_ARGUMENT, "exactly one input"),
        (request(model_name="other"), grpc.StatusCode.NOT_FOUND, "other"),
        (request(model_name="other-bytes"), grpc.StatusCode.NOT_FOUND, "other-bytes"),
    ]
    for req, code, named in cases:
        err = _status(oip_stub.ModelInfer, req)
        assert err.code() == code, err.details()
        assert named in err.details(), err.details()
    assert oip_stub.ServerLive(oip.ServerLiveRequest()).live  # still up


# ------------------------------------------------------------------------------------------------ deadlines
def test_deadline_shorter_than_the_work_is_never_computed(server, stub, oip_stub):
    batcher = server.server.repository.get("tiny").runtime.batcher
    blocker_images = _images(32, seed=19)
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(stub.Classify, pb.ClassifyRequest(images=_tensor_images(blocker_images)))
        deadline = time.monotonic() + 30
        while batcher.in_flight != 16 and time.monotonic() < deadline:  # the blocker's first part holds the engine
            time.sleep(0.002)
        before = (batcher.stats.images_computed, batcher.stats.submitted)
        # Two images each: a single image would not wait, it runs beside a large request's batch (express lane).
        err = _status(stub.Classify, pb.ClassifyRequest(images=_tensor_images(_images(2, seed=20))), timeout=0.05)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The OIP "timeout" parameter (microseconds) lowers the queue timeout: UNAVAILABLE, as in Triton.
        infer = oip.ModelInferRequest(model_name="tiny", raw_input_contents=[_images(2, seed=41).tobytes()])
        infer.inputs.add(name="image", datatype="FP32", shape=[2, 3, 224, 224])
        infer.parameters["timeout"].int64_param = 1000
        err = _status(oip_stub.ModelInfer, infer)
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "queue timeout" in err.details()
        blocker.result(120)
    # Let the batcher look at the expired request, then check it was dropped, not computed.
    stub.Classify(pb.ClassifyRequest(images=_tensor_images(_images(1, seed=21))))
    computed = batcher.stats.images_computed - before[0]
    assert computed == 33, computed  # blocker + probe: the expired requests never took a batch slot
    assert batcher.stats.dropped_cancelled + batcher.stats.dropped_deadline >= 1
    assert batcher.stats.dropped_timeout >= 1


def test_cancel_mid_sweep_stops_the_computation(server, stub):
    heavy = server.server.heavy
    aborted = heavy.aborted
    request = pb.OcclusionRequest(images=_tensor_images(_images(1, seed=22)), window=8, stride=1)  # 47k positions
    call = stub.OcclusionSweepStream(request)
    first = next(call)
    assert first.WhichOneof("event") == "progress" and first.progress.total == 217 * 217
    # While the sweep runs, classification is still served (the sweep has its own worker).
    reply = stub.Classify(pb.ClassifyRequest(images=_tensor_images(_images(2, seed=29))), timeout=120)
    assert len(reply.predictions) == 2 and heavy.admitted == 1
    call.cancel()
    deadline = time.monotonic() + 30
    while heavy.admitted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert heavy.admitted == 0, "the sweep kept running after its client cancelled"
    assert heavy.aborted == aborted + 1
    err = _status(stub.OcclusionSweep, request, timeout=0.3)  # deadline shorter than the sweep
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    while heavy.admitted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert heavy.admitted == 0


# ------------------------------------------------------------------------------------------------ limits, auth
@pytest.fixture(scope="module")
def guarded(model_dir, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    running = RunningServer(ServerOptions(
        port=0, model=str(model_dir), auth_token_file=str(token_file), max_message_bytes=1 << 20, metrics_port=0,
        heavy_queue_size=0, max_occlusion_positions=217 * 217,
        batching=BatcherConfig(max_batch_size=8, max_queue_delay_us=1000, max_queue_size=8)))
    yield running
    running.stop()


def test_auth_token_required_except_health(guarded):
    x = _images(1, seed=23)
    with Client(guarded.target, timeout=30) as anonymous:
        with pytest.raises(ServerError) as info:
            anonymous.classify(x)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and "authorization" in info.value.details
        assert anonymous.health() == "SERVING"  # health is exempt
    with Client(guarded.target, token="wrong-token-0123456789", timeout=30) as wrong:
        with pytest.raises(ServerError) as info:
            wrong.classify(x)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and "wrong token" in info.value.details
    with Client(guarded.target, token=TOKEN, timeout=30) as right:
        assert len(right.classify(x)[0]) == 5
    import tritonclient.grpc as tc
    client = tc.InferenceServerClient(guarded.target)
    # The OIP's liveness and readiness are health checks: exempt, as gRPC health is (and as over HTTP).
    assert client.is_server_live() and client.is_server_ready()
    with pytest.raises(Exception) as info:
        client.get_model_metadata("tiny")
    assert "UNAUTHENTICATED" in str(info.value)
    assert client.get_model_metadata("tiny", headers={"authorization": f"Bearer {TOKEN}"}).name == "tiny"
    # Two authorization values, the right one first: refused (HTTP refuses two headers alike).
    with grpc.insecure_channel(guarded.target) as channel:
        err = _status(pb_grpc.ZFServeStub(channel).ListModels, pb.ListModelsRequest(),
                      metadata=(("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer other-token-00000")))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "2 values; send exactly one" in err.details()


def test_busy_heavy_worker_answers_unavailable_at_once(guarded):
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    channel = grpc.insecure_channel(guarded.target)
    stub = pb_grpc.ZFServeStub(channel)
    image = pb.Images(encoded=[_png(60)])
    sweep = stub.OcclusionSweepStream(pb.OcclusionRequest(images=image, window=8, stride=1), metadata=metadata)
    assert next(sweep).WhichOneof("event") == "progress"
    err = _status(stub.DeconvProject, pb.DeconvRequest(images=image, layer="conv1"), metadata=metadata)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "--heavy-queue-size" in err.details()
    sweep.cancel()
    deadline = time.monotonic() + 30
    while guarded.server.heavy.admitted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(stub.DeconvProject(pb.DeconvRequest(images=image, layer="conv1", top_k=1),
                                  metadata=metadata).projections) == 1
    channel.close()


def test_prometheus_endpoint_and_debug_log_line(guarded, caplog):
    import logging
    import urllib.error
    import urllib.request
    with caplog.at_level(logging.DEBUG, logger="zfserve.server"):
        with Client(guarded.target, token=TOKEN, timeout=30) as client:
            client.classify(_images(1, seed=28))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rpc=Classify")]
    assert lines and "code=OK" in lines[-1] and "ms=" in lines[-1]
    url = f"http://127.0.0.1:{guarded.server.metrics_port}/metrics"
    with pytest.raises(urllib.error.HTTPError) as info:   # the same token as the RPCs
        urllib.request.urlopen(url, timeout=10)
    assert info.value.code == 401
    request = urllib.request.Request(url, headers={"Authorization": f"bearer {TOKEN}"})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    assert 'zfserve_requests_total{code="OK",rpc="Classify"}' in text
    assert 'zfserve_queue_depth{model="tiny"}' in text and "zfserve_heavy_requests" in text


def test_message_over_the_size_limit(guarded):
    with Client(guarded.target, token=TOKEN, timeout=30) as client:
        with pytest.raises(ServerError) as info:
            client.classify(_images(2, seed=24))  # 1.2 MB > 1 MiB
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(client.classify(_images(1, seed=25))) == 1  # and the server is fine


def test_64_concurrent_clients_every_request_accounted_for(guarded):
    """64 clients x 3 requests against a queue of 8: each gets its result or UNAVAILABLE, counts add up."""
    batcher = guarded.server.repository.get("tiny").runtime.batcher
    before = (batcher.stats.completed, batcher.stats.rejected_full)
    x = _images(4, seed=26)
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    barrier = threading.Barrier(64)

    def client(i):
        channel = grpc.insecure_channel(guarded.target)
        stub = pb_grpc.ZFServeStub(channel)
        barrier.wait(60)
        outcomes = []
        for j in range(3):
            k = (i + j) % 4
            try:
                r = stub.Classify(pb.ClassifyRequest(images=_tensor_images(x[k:k + 1]), top_k=1), timeout=120,
                                  metadata=metadata)
                outcomes.append(("OK", k, r.predictions[0].classes[0].index))
            except grpc.RpcError as exc:
                outcomes.append((exc.code().name, k, exc.details()))
        channel.close()
        return outcomes

    with ThreadPoolExecutor(64) as pool:
        results = [o for outcomes in pool.map(client, range(64)) for o in outcomes]
    codes = [r[0] for r in results]
    assert len(results) == 192
    assert set(codes) <= {"OK", "UNAVAILABLE"}, set(codes)
    ok, unavailable = codes.count("OK"), codes.count("UNAVAILABLE")
    assert ok + unavailable == 192 and ok > 0 and unavailable > 0
    assert batcher.stats.completed - before[0] == ok
    assert batcher.stats.rejected_full - before[1] == unavailable
    assert all("queue full" in r[2] for r in results if r[0] == "UNAVAILABLE")
    expected = {k: guarded.server.repository.get("tiny").runtime.classifier.classify(x[k:k + 1], 1)[0][0].index
                for k in range(4)}
    assert all(r[2] == expected[r[1]] for r in results if r[0] == "OK")


# ------------------------------------------------------------------------------------------------ health, TLS
def test_health_flips_on_start_and_shutdown(model_dir):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    running = RunningServer(ServerOptions(port=0, model=str(model_dir)), load=False)
    channel = grpc.insecure_channel(running.target)
    health = health_pb2_grpc.HealthStub(channel)
    check = lambda service="": health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status  # noqa
    try:
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not oip_grpc.GRPCInferenceServiceStub(channel).ServerReady(oip.ServerReadyRequest()).ready
        err = _status(pb_grpc.ZFServeStub(channel).Classify, pb.ClassifyRequest(images=_tensor_images(_images(1, 1))))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        running.call(running.server.load())
        assert check() == check("zfserve.v1.ZFServe") == health_pb2.HealthCheckResponse.SERVING
        assert oip_grpc.GRPCInferenceServiceStub(channel).ServerReady(oip.ServerReadyRequest()).ready
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(5), running.loop)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stopping.result(30)
    finally:
        channel.close()
        running.loop.call_soon_threadsafe(running.loop.stop)
        running.thread.join(10)


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make test certificates")
def test_mutual_tls(model_dir, tmp_path):
    subj = ["-subj"]
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             *subj, "/CN=test-ca", cwd=tmp_path)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", *subj,
                 f"/CN={name}", cwd=tmp_path)
        (tmp_path / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=tmp_path)
    p = lambda name: str(tmp_path / name)  # noqa: E731
    running = RunningServer(ServerOptions(port=0, http_port=0, model=str(model_dir), tls_cert=p("server.pem"),
                                          tls_key=p("server.key"), tls_client_ca=p("ca.pem")))
    try:
        import httpx
        import ssl
        https = f"https://127.0.0.1:{running.server.http_port}"
        context = ssl.create_default_context(cafile=p("ca.pem"))
        context.load_cert_chain(p("client.pem"), p("client.key"))
        with httpx.Client(base_url=https, verify=context) as web:   # the HTTP side: the same TLS and mTLS
            assert web.get("/v2/health/ready").status_code == 200
            r = web.post("/v2/repository/index", headers={"Origin": https})   # its own origin is https://
            assert r.status_code == 200 and r.headers["content-security-policy"]
        with pytest.raises(httpx.HTTPError):
            with httpx.Client(base_url=https, verify=ssl.create_default_context(cafile=p("ca.pem"))) as no_cert:
                no_cert.get("/v2/health/ready")
        x = _images(1, seed=27)
        with Client(running.target, tls_ca=p("ca.pem"), tls_cert=p("client.pem"), tls_key=p("client.key"),
                    timeout=30) as client:
            assert len(client.classify(x)[0]) == 5
        with Client(running.target, tls_ca=p("ca.pem"), timeout=10) as no_cert:  # mTLS: a client cert is required
            with pytest.raises(ServerError) as info:
                no_cert.classify(x)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        with Client(running.target, timeout=10) as plaintext:
            with pytest.raises(ServerError):
                plaintext.classify(x)
    finally:
        running.stop()


# ------------------------------------------------------------------------------------------------ CLI --server
def test_cli_classify_with_server_prints_what_the_local_run_prints(server, model_dir, tmp_path, capsys):
    from zfserve.cli import main
    paths = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(_png(30 + i))
        paths.append(str(path))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    files = [paths[0], str(corrupt), paths[1], str(tmp_path / "missing.jpg"), paths[2]]
    for extra in ([], ["--json"]):
        local_status = main(["classify", *files, "--model", str(model_dir), "--top-k", "3", "--batch-size", "4",
                             *extra])
        local = capsys.readouterr()
        remote_status = main(["classify", *files, "--server", server.target, "--top-k", "3", "--batch-size", "4",
                              *extra])
        remote = capsys.readouterr()
        assert local_status == remote_status == 2
        assert remote.out == local.out
        assert [line.split(":")[1] for line in remote.err.splitlines()] == \
               [line.split(":")[1] for line in local.err.splitlines()]  # the same files fail
    assert main(["classify", paths[0], "--server", "not-an-address"]) == 2
    assert "--server" in capsys.readouterr().err


def test_model_repository_serves_each_sub_directory(model_dir, tmp_path, classifier):
    import tritonclient.grpc as tc
    for name in ("alpha", "beta"):
        shutil.copytree(model_dir, tmp_path / name)
    (tmp_path / "notes").mkdir()  # not a model: ignored
    running = RunningServer(ServerOptions(port=0, model_repository=str(tmp_path)))
    try:
        with Client(running.target, timeout=60) as client:
            listed = client.list_models()
            assert [m.name for m in listed.models] == ["alpha", "beta"] and listed.default_model == "alpha"
            x = _images(1, seed=40)
            _, probs = client.classify(x, model="beta", return_probabilities=True)
            np.testing.assert_allclose(probs, classifier.probabilities(x), atol=1e-6)
        triton = tc.InferenceServerClient(running.target)
        assert triton.is_model_ready("alpha") and triton.is_model_ready("beta")
        alpha, beta = (running.server.repository.get(name).runtime for name in ("alpha", "beta"))
        assert alpha.batcher is not beta.batcher
    finally:
        running.stop()


def test_cli_deconv_with_server_writes_the_same_files(server, model_dir, tmp_path, capsys):
    import json

    from zfserve.cli import main
    image = tmp_path / "photo.png"
    image.write_bytes(_png(50))
    for where, extra in (("local", ["--model", str(model_dir)]), ("remote", ["--server", server.target])):
        assert main(["deconv", str(image), "--layer", "conv4", "--top-k", "3", "--units", "5,2,3",
                     "--out", str(tmp_path / where), *extra]) == 0
    capsys.readouterr()
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in remote.iterdir())
    doc_l, doc_r = (json.loads((d / "deconv.json").read_text()) for d in (local, remote))
    assert doc_l["model"] == "tiny" and doc_r["model"] == "tiny"
    assert doc_l["model_version"] == doc_r["model_version"] and "+" in doc_l["model_version"]
    assert doc_l["interpretation"] == doc_r["interpretation"] == "feature visualisation (class-insensitive)"
    assert [(u["channel"], u["y"], u["x"], u["box"]) for u in doc_l["units"]] == \
           [(u["channel"], u["y"], u["x"], u["box"]) for u in doc_r["units"]]
    for ul, ur in zip(doc_l["units"], doc_r["units"]):
        assert ur["activation"] == pytest.approx(ul["activation"], rel=1e-6)
    np.testing.assert_allclose(np.load(remote / "projections.npz")["projections"],
                               np.load(local / "projections.npz")["projections"], rtol=1e-5, atol=1e-6)
    for png in local.glob("unit_*.png"):
        a = np.asarray(Image.open(png))
        b = np.asarray(Image.open(remote / png.name))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_cli_occlude_with_server_writes_the_same_files(server, model_dir, tmp_path, capsys):
    import json

    from zfserve.cli import main
    image = tmp_path / "photo.png"
    image.write_bytes(_png(51))
    common = ["--window", "64", "--stride", "40", "--fill", "10,20,30", "--fill-units", "pixel", "--target", "2"]
    for where, extra in (("local", ["--model", str(model_dir)]), ("remote", ["--server", server.target])):
        assert main(["occlude", str(image), *common, "--out", str(tmp_path / where), *extra]) == 0
    capsys.readouterr()
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in remote.iterdir())
    doc_l, doc_r = (json.loads((d / "occlusion.json").read_text()) for d in (local, remote))
    for doc in (doc_l, doc_r):
        doc.pop("seconds")
        doc.pop("files")
    assert doc_r.pop("unoccluded_probability") == pytest.approx(doc_l.pop("unoccluded_probability"), rel=1e-6)
    assert doc_r == doc_l
    assert "+" in doc_l["model_version"] and doc_l["attribution_on"] == "probability" and doc_l["target"] == 2
    arrays_l, arrays_r = np.load(local / "occlusion.npz"), np.load(remote / "occlusion.npz")
    assert sorted(arrays_l.files) == sorted(arrays_r.files)
    for name in arrays_l.files:
        np.testing.assert_allclose(arrays_r[name], arrays_l[name], rtol=1e-5, atol=1e-6)
    for png in local.glob("*.png"):
        a, b = np.asarray(Image.open(png)), np.asarray(Image.open(remote / png.name))
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1
