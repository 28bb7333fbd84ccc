"""The standard Open Inference Protocol clients against a real server: every model's metadata agrees with its
config, the config's limits are the ones enforced, the statistics and repository extensions answer what
happened, and tritonclient and KServe's own client get the local engine's probabilities (1e-5).

tritonclient.grpc and kserve cannot be imported into one process (both register the ``inference.*`` messages
in protobuf's default pool), so the KServe client runs in a child process (tests/_kserve_infer.py).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from zfserve._proto.inference import grpc_service_pb2 as oip
from zfserve._proto.inference import grpc_service_pb2_grpc as oip_grpc
from zfserve.server import BackgroundServer, BatcherConfig, ServerOptions

MAX_IMAGES = 4            # --max-images-per-request of the servers here: ModelConfig.max_batch_size
KSERVE_SCRIPT = Path(__file__).with_name("_kserve_infer.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from zfserve.model import ZFNet
    from zfserve.weights import save_model
    torch.manual_seed(11)
    directory = tmp_path_factory.mktemp("interop") / "tiny"
    save_model(ZFNet(num_classes=10, fc_width=64).eval(), directory, name="tiny",
               class_names=[f"c{i}" for i in range(10)])
    return directory


@pytest.fixture(scope="module")
def server(model_dir):
    with BackgroundServer(ServerOptions(port=0, model=str(model_dir), max_images_per_request=MAX_IMAGES,
                                        model_control="explicit",
                                        batching=BatcherConfig(max_batch_size=3, max_queue_delay_us=1000))) as s:
        yield s


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.grpc as tc
    client = tc.InferenceServerClient(server.target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def classifier(model_dir):
    from zfserve.engine.classifier import Classifier
    return Classifier(str(model_dir), warmup=False)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 60, (n, 3, 224, 224)).astype(np.float32)


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (250, 270, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tensor_input(x):
    import tritonclient.grpc as tc
    inp = tc.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def _bytes_input(images: list[bytes]):
    import tritonclient.grpc as tc
    inp = tc.InferInput("image_bytes", [len(images), 1], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(-1, 1))
    return inp


# ------------------------------------------------------------------------------------------------ conformance
def test_metadata_and_config_agree_for_every_model(triton):
    from tritonclient.grpc import model_config_pb2 as mc
    datatypes = {mc.TYPE_FP32: "FP32", mc.TYPE_STRING: "BYTES", mc.TYPE_INT64: "INT64", mc.TYPE_BOOL: "BOOL"}
    names = [m.name for m in triton.get_model_repository_index().models]
    assert names == ["tiny", "tiny-bytes", "tiny-deconv", "tiny-deconv-bytes", "tiny-occlusion",
                     "tiny-occlusion-bytes"]
    for name in names:
        meta = triton.get_model_metadata(name)
        config = triton.get_model_config(name).config
        # Deconv answers per unit, not per image: no batch dimension (its shapes are whole).
        assert config.name == name and config.max_batch_size == (0 if "-deconv" in name else MAX_IMAGES)
        batch = [-1] if config.max_batch_size else []
        for declared, configured in ((meta.inputs, config.input), (meta.outputs, config.output)):
            assert [t.name for t in declared] == [t.name for t in configured]
            for tensor, entry in zip(declared, configured):
                # perf_analyzer's rule: with max_batch_size > 0 the metadata shape is [-1] + the config dims.
                assert list(tensor.shape) == [*batch, *entry.dims], (name, tensor.name)
                assert tensor.datatype == datatypes[entry.data_type], (name, tensor.name)
        assert len(meta.inputs) == 1   # generic clients send every declared input: one per model
        assert [t.name for t in meta.inputs] == ["image_bytes" if name.endswith("-bytes") else "image"]
        # And the answers carry exactly the declared outputs, datatypes and shapes (-1: any size).
        inp = _bytes_input([_jpeg(1), _jpeg(2)]) if name.endswith("-bytes") else _tensor_input(_images(2, seed=1))
        settings = {"window": 112, "stride": 112} if "-occlusion" in name else None
        response = triton.infer(name, [inp], parameters=settings).get_response()
        assert [(t.name, t.datatype) for t in response.outputs] == [(t.name, t.datatype) for t in meta.outputs]
        for tensor, declared in zip(response.outputs, meta.outputs):
            assert len(tensor.shape) == len(declared.shape), (name, tensor.name)
            assert all(d in (-1, s) for s, d in zip(tensor.shape, declared.shape)), (name, tensor.name)


def test_config_limits_are_the_enforced_ones(triton, classifier):
    from tritonclient.utils import InferenceServerException
    config = triton.get_model_config("tiny").config
    limit = config.max_batch_size
    x = _images(limit, seed=1)   # above the batcher's size (3): one request of max_batch_size still runs
    got = triton.infer("tiny", [_tensor_input(x)]).as_numpy("probabilities")
    np.testing.assert_allclose(got, classifier.probabilities(x), atol=1e-5)
    with pytest.raises(InferenceServerException) as info:
        triton.infer("tiny", [_tensor_input(_images(limit + 1, seed=2))])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and f"1 <= N <= {limit}" in info.value.message()
    images = [_jpeg(s) for s in range(limit + 1)]
    assert triton.infer("tiny-bytes", [_bytes_input(images[:limit])]).as_numpy("probabilities").shape == (limit, 10)
    with pytest.raises(InferenceServerException) as info:
        triton.infer("tiny-bytes", [_bytes_input(images)])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    policy = config.dynamic_batching.default_queue_policy
    assert policy.max_queue_size == BatcherConfig().max_queue_size and policy.allow_timeout_override
    assert list(config.dynamic_batching.preferred_batch_size) == [3]


def test_tensor_model_takes_any_float32_and_keeps_images_apart(triton, classifier):
    """perf_analyzer's default data are random bytes (some NaN/Inf patterns): they run, as on Triton. The image
    holding them gets what the network makes of it alone; the other images of its request are exact."""
    x = _images(3, seed=31)
    bad = x.copy()
    bad[1, 0, 5, 5], bad[1, 2, 100, 7] = np.nan, np.inf
    got = triton.infer("tiny", [_tensor_input(bad)]).as_numpy("probabilities")
    np.testing.assert_allclose(got[[0, 2]], classifier.probabilities(x[[0, 2]]), atol=1e-5)
    np.testing.assert_allclose(got[1], classifier.probabilities(bad[1:2], finite=False)[0], atol=1e-5)
    noise = np.random.default_rng(32).integers(0, 256, x.nbytes, dtype=np.uint8).view(np.float32).reshape(x.shape)
    assert not np.isfinite(noise).all()
    got = triton.infer("tiny", [_tensor_input(noise)]).as_numpy("probabilities")
    np.testing.assert_allclose(got, classifier.probabilities(noise, finite=False), atol=1e-5, equal_nan=True)
    with pytest.raises(Exception, match="finite"):   # the library refuses them unless told otherwise
        classifier.probabilities(noise)


# ------------------------------------------------------------------------------------------------ statistics
def _stats(triton, name: str):
    (entry,) = triton.get_inference_statistics(name).model_stats
    return entry


def _durations(entry) -> dict[str, tuple[int, int]]:
    s = entry.inference_stats
    return {k: (getattr(s, k).count, getattr(s, k).ns)
            for k in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")}


def test_statistics_count_every_request_and_its_durations(server, triton):
    from tritonclient.utils import InferenceServerException
    from zfserve.client import Client
    version = server.server.repository.get("tiny").runtime.oip_version
    before = {name: _stats(triton, name) for name in ("tiny", "tiny-bytes")}
    counts = {"tiny": (3, 2), "tiny-bytes": (2, 3)}   # requests, images per request
    for _ in range(counts["tiny"][0]):
        triton.infer("tiny", [_tensor_input(_images(counts["tiny"][1], seed=3))])
    for _ in range(counts["tiny-bytes"][0] - 1):
        triton.infer("tiny-bytes", [_bytes_input([_jpeg(4), _jpeg(5), _jpeg(6)])])
    with Client(server.target, timeout=60) as client:   # zfserve's own Classify counts too (encoded: -bytes)
        client.classify([_jpeg(7), _jpeg(8), _jpeg(9)])
    with pytest.raises(InferenceServerException):
        triton.infer("tiny-bytes", [_bytes_input([b"not an image"])])
    for name, (requests, images) in counts.items():
        entry, old = _stats(triton, name), before[name]
        assert entry.name == name and entry.version == version
        now, was = _durations(entry), _durations(old)
        delta = {k: (now[k][0] - was[k][0], now[k][1] - was[k][1]) for k in now}
        assert delta["success"][0] == requests and delta["fail"][0] == (1 if name == "tiny-bytes" else 0)
        assert entry.inference_count - old.inference_count == requests * images
        for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
            assert delta[stage][0] == requests and delta[stage][1] > 0, (name, stage)
        # The parts of a request lie inside its whole duration.
        parts = sum(delta[k][1] for k in ("queue", "compute_input", "compute_infer", "compute_output"))
        assert parts <= delta["success"][1]
        executions = entry.execution_count - old.execution_count
        assert 1 <= executions <= requests
        assert sum(b.compute_infer.count for b in entry.batch_stats) == entry.execution_count
        assert all(1 <= b.batch_size <= MAX_IMAGES for b in entry.batch_stats)
        assert entry.last_inference >= old.last_inference > 0
    every = triton.get_inference_statistics("").model_stats
    assert [m.name for m in every] == ["tiny", "tiny-bytes", "tiny-occlusion", "tiny-occlusion-bytes", "tiny-deconv",
                                       "tiny-deconv-bytes"]
    with pytest.raises(InferenceServerException) as info:
        triton.get_inference_statistics("tiny", model_version="7")
    assert info.value.status() == "StatusCode.NOT_FOUND"


# ------------------------------------------------------------------------------------------------ repository
def test_repository_index_unload_and_load(server, triton, classifier):
    from tritonclient.utils import InferenceServerException
    version = server.server.repository.get("tiny").runtime.oip_version
    index = triton.get_model_repository_index().models
    assert [(m.name, m.version, m.state, m.reason) for m in index][:2] == [
        ("tiny", version, "READY", ""), ("tiny-bytes", version, "READY", "")]
    assert len(index) == 6 and {(m.version, m.state) for m in index} == {(version, "READY")}
    x = _images(2, seed=12)
    try:
        triton.unload_model("tiny-bytes")     # both OIP models share the runtime: both go
        assert not triton.is_model_ready("tiny") and not triton.is_server_ready()
        index = triton.get_model_repository_index().models
        assert {m.state for m in index} == {"UNAVAILABLE"} and "unloaded" in index[0].reason
        with grpc.insecure_channel(server.target) as channel:   # tritonclient cannot ask for ready ones only
            ready_only = oip_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
                oip.RepositoryIndexRequest(ready=True))
        assert list(ready_only.models) == []
        with pytest.raises(InferenceServerException) as info:
            triton.infer("tiny", [_tensor_input(x)])
        assert info.value.status() == "StatusCode.UNAVAILABLE" and "unloaded" in info.value.message()
    finally:
        triton.load_model("tiny")
    assert triton.is_model_ready("tiny-bytes") and triton.is_server_ready()
    assert triton.get_model_metadata("tiny").versions == [version]   # same files: same version
    assert version.isdigit() and str(int(version)) == version         # an integer, as perf_analyzer reads it
    zfserve_version = server.server.repository.get("tiny").runtime.version
    for named in (version, zfserve_version):   # a request may name either form
        assert triton.infer("tiny", [_tensor_input(x)], model_version=named).get_response().model_version == version
    got = triton.infer("tiny", [_tensor_input(x)]).as_numpy("probabilities")
    np.testing.assert_allclose(got, classifier.probabilities(x), atol=1e-5)
    with pytest.raises(InferenceServerException) as info:
        triton.load_model("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_load_and_unload_need_explicit_model_control(model_dir):
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException
    with BackgroundServer(ServerOptions(port=0, model=str(model_dir))) as plain:
        client = tc.InferenceServerClient(plain.target)
        for call in (client.load_model, client.unload_model):
            with pytest.raises(InferenceServerException) as info:
                call("tiny")
            assert info.value.status() == "StatusCode.FAILED_PRECONDITION"
            assert "--model-control explicit" in info.value.message()
        assert client.is_model_ready("tiny")
        assert [m.state for m in client.get_model_repository_index().models] == ["READY"] * 6
        client.close()


def test_colliding_oip_names_are_refused(model_dir, tmp_path):
    import shutil
    from zfserve.errors import InvalidArgumentError
    from zfserve.server import ZFServer
    for other in ("m-bytes", "m-occlusion"):
        for name in ("m", other):
            shutil.copytree(model_dir, tmp_path / other / name)
        with pytest.raises(InvalidArgumentError, match=f"'m' and '{other}' collide"):
            ZFServer(ServerOptions(port=0, model_repository=str(tmp_path / other)))


# ------------------------------------------------------------------------------------------------ clients
def test_tritonclient_and_kserve_client_agree_with_the_local_engine(server, triton, classifier, tmp_path):
    from zfserve.preprocess import load_images
    x = _images(3, seed=21)
    jpegs = [_jpeg(22), _jpeg(23)]
    expected = {"tiny": classifier.probabilities(x),
                "tiny-bytes": classifier.probabilities(load_images(jpegs, classifier.config))}
    ours = {"tiny": triton.infer("tiny", [_tensor_input(x)]).as_numpy("probabilities"),
            "tiny-bytes": triton.infer("tiny-bytes", [_bytes_input(jpegs)]).as_numpy("probabilities")}
    np.save(tmp_path / "x.npy", x)
    for i, data in enumerate(jpegs):
        (tmp_path / f"{i}.jpg").write_bytes(data)
    done = subprocess.run([sys.executable, str(KSERVE_SCRIPT), server.target, str(tmp_path / "x.npy"),
                           *(str(tmp_path / f"{i}.jpg") for i in range(len(jpegs)))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["ready"] == [True, True]
    for name in ("tiny", "tiny-bytes"):
        kserve = np.asarray(answer[name], dtype=np.float32)
        np.testing.assert_allclose(ours[name], expected[name], atol=1e-5, rtol=0)
        np.testing.assert_allclose(kserve, expected[name], atol=1e-5, rtol=0)
        np.testing.assert_allclose(kserve, ours[name], atol=1e-5, rtol=0)


def test_tritonclient_kserve_and_zfserve_install_together():
    """One environment holds all three (pip check passes) and zfserve's stubs import beside each client."""
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for client in ("tritonclient.grpc", "kserve"):
        code = (f"import {client}; from zfserve._proto.inference import grpc_service_pb2; "
                "from zfserve.server import app; print('ok')")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_status_codes_for_missing_models(triton):
    from tritonclient.utils import InferenceServerException
    for call in (lambda: triton.get_model_metadata("absent"), lambda: triton.get_inference_statistics("absent"),
                 lambda: triton.get_model_config("absent-bytes")):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == str(grpc.StatusCode.NOT_FOUND) and "'tiny-bytes'" in info.value.message()
