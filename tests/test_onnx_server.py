"""ONNX models served beside zfnet-demo (``zfserve serve --model-repository``): per test model the probabilities
through zfserve.v1 Classify and both Open Inference Protocol models (tritonclient) equal eager PyTorch's within
1e-5; OcclusionSweep equals brute force; the stream reports progress and stops when cancelled; statistics; a
reload serves a new model.onnx; deconv is refused with FAILED_PRECONDITION (HTTP 409) naming the kind; the
explorer page serves the ONNX model (upload, top-5, a finished occlusion map, the units panel's one line)."""

from __future__ import annotations

import json
import shutil
import signal
import time

import grpc
import numpy as np
import pytest
import torch

import onnx_models as om
from test_explorer_page import (CHROMEDRIVER, CHROMIUM, HAVE_SELENIUM, MISSING, ExplorerServer, _browser, by_id,
                                canvas_pixels, open_page, predictions, script_errors, upload, wait)
from test_family_server import _jpeg
from test_onnx_explain import brute_force
from zfserve.import_onnx import import_onnx
from zfserve.preprocess import load_image
from zfserve.weights import EMBEDDED_DIR, read_snapshot

NAMES = ("resnet18", "mobilenet", "small160", "softmax")


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-repo")
    repo = root / "models"
    repo.mkdir()
    shutil.copytree(EMBEDDED_DIR / "zfnet-demo", repo / "zfnet-demo",
                    ignore=shutil.ignore_patterns("model.onnx", "*.int8.onnx", "index"))
    torch_models = {}
    for name in NAMES:
        spec = om.SPECS[name]
        model, path = om.export_named(name, root)
        import_onnx(path, om.classes_file(root, spec.num_classes), repo / name, output=spec.output,
                    preprocess={"resize": spec.resize})
        torch_models[name] = model
    return repo, torch_models, root


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    srv = ExplorerServer(["--model-repository", str(repository[0])],
                         env={"ZFSERVE_CACHE_DIR": str(tmp_path_factory.mktemp("onnx-cache"))})
    yield srv
    srv.stop()


def _pytorch(model, x: np.ndarray, output: str) -> np.ndarray:
    with torch.no_grad():
        y = model(torch.from_numpy(x))
    return (y if output == "probabilities" else torch.softmax(y, dim=1)).numpy()


@pytest.mark.parametrize("name", NAMES)
def test_grpc_and_oip_probabilities_equal_pytorch(server, repository, name):
    import tritonclient.grpc as tc
    from zfserve.client import Client
    repo, models, _ = repository
    spec = om.SPECS[name]
    config = read_snapshot(repo / name).config
    jpegs = [_jpeg(seed) for seed in range(3)]
    x = np.stack([load_image(j, config) for j in jpegs])
    want = _pytorch(models[name], x, spec.output)
    with Client(server.grpc) as client:
        top = client.classify(jpegs, model=name, top_k=spec.num_classes)
    for row, expected in zip(top, want):
        for p in row:
            assert abs(p.probability - expected[p.index]) <= 1e-5
    triton = tc.InferenceServerClient(server.grpc)
    tensor = tc.InferInput("image", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    encoded = tc.InferInput("image_bytes", [len(jpegs), 1], "BYTES")
    encoded.set_data_from_numpy(np.array(jpegs, dtype=np.object_).reshape(-1, 1))
    for model, inp in ((name, tensor), (f"{name}-bytes", encoded)):
        got = triton.infer(model, [inp]).as_numpy("probabilities")
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    stats = triton.get_inference_statistics(name, as_json=True)
    assert int(stats["model_stats"][0]["inference_count"]) >= 3
    triton.close()


def test_occlusion_sweep_equals_brute_force_streams_and_cancels(server, repository):
    from zfserve.client import Client
    from zfserve._proto.v1 import zfserve_pb2 as pb
    from zfserve._proto.v1 import zfserve_pb2_grpc as rpc
    repo, models, _ = repository
    jpeg = _jpeg(11)
    x = load_image(jpeg, read_snapshot(repo / "small160").config)
    seen = []
    with Client(server.grpc) as client:
        result = client.occlude(jpeg, window=40, stride=30, target=3, model="small160",
                                progress=lambda d, t: seen.append((d, t)))
        assert result.mode == "exact" and result.engine == "onnxruntime"
        np.testing.assert_allclose(result.probability, brute_force(models["small160"], x, 40, 30, 3, "logits"),
                                   atol=1e-5, rtol=0)
        assert seen and seen[-1] == (25, 25)
        with pytest.raises(Exception, match="ONNX model"):
            client.occlude(jpeg, window=40, stride=30, model="small160", outputs=["activity"])
        info = client.model_info("resnet18")
        assert list(info.layers) == [] and info.num_classes == 1000
    channel = grpc.insecure_channel(server.grpc)
    stub = rpc.ZFServeStub(channel)
    capped = pb.OcclusionRequest(images=pb.Images(encoded=[jpeg]), model="resnet18", window=16, stride=2)
    with pytest.raises(grpc.RpcError) as refused:
        next(stub.OcclusionSweepStream(capped))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 4096" in refused.value.details()
    request = pb.OcclusionRequest(images=pb.Images(encoded=[jpeg]), model="resnet18", window=16, stride=4)
    call = stub.OcclusionSweepStream(request)
    first = next(call)
    assert first.WhichOneof("event") == "progress" and first.progress.total == 53 * 53
    call.cancel()
    with Client(server.grpc) as client:      # the server goes on serving
        assert len(client.classify([jpeg], model="mobilenet", top_k=3)[0]) == 3
    channel.close()


def test_deconv_refused_failed_precondition_and_409(server):
    from zfserve.client import Client, ServerError
    with Client(server.grpc) as client:
        with pytest.raises(ServerError) as info:
            client.deconv([_jpeg(1)], model="mobilenet", top_k=2)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "ONNX model" in str(info.value)
    status, body = server.api("images", _jpeg(2))
    assert status == 200
    status, body = server.api("deconv", json.dumps({"image": body["id"], "model": "mobilenet"}).encode())
    assert status == 409 and "ONNX model" in body["error"]
    status, listing = server.api("models")
    entry = next(m for m in listing["models"] if m["name"] == "mobilenet")
    assert entry["conv_layers"] == [] and "ONNX model" in entry["layers_note"]


def test_reload_serves_a_new_model_onnx(server, repository):
    from zfserve.client import Client
    repo, _, root = repository
    (root / "other").mkdir()
    other, path = om.export_named("softmax", root / "other", seed=9)
    before = read_snapshot(repo / "softmax").version
    shutil.copyfile(path, repo / "softmax" / "model.onnx")
    server.proc.send_signal(signal.SIGHUP)
    jpeg = _jpeg(5)
    x = load_image(jpeg, read_snapshot(repo / "softmax").config)[None]
    deadline = time.monotonic() + 120
    with Client(server.grpc) as client:
        while time.monotonic() < deadline:
            versions = {m.name: m.version for m in client.list_models().models}
            if versions["softmax"] != before:
                break
            time.sleep(0.2)
        assert versions["softmax"] == read_snapshot(repo / "softmax").version != before
        got = client.classify([jpeg], model="softmax", top_k=5)[0]
    want = _pytorch(other, x, "probabilities")[0]
    for p in got:
        assert abs(p.probability - want[p.index]) <= 1e-5


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER and HAVE_SELENIUM), reason=MISSING)
def test_explorer_serves_an_onnx_model(server, tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(_jpeg(7))
    driver = _browser(tmp_path / "profile")
    try:
        open_page(driver, f"{server.url}#model=resnet18&window=64&stride=32")
        assert by_id(driver, "model-name").text == "resnet18"
        assert driver.find_elements("css selector", "#layer-tabs .tab") == []
        upload(driver, photo)
        wait(driver, lambda d: len(predictions(d)) == 5, "no predictions")
        wait(driver, lambda d: "ONNX model" in by_id(d, "deconv-status").text, "no units-panel explanation")
        assert driver.find_elements("css selector", "#units .unit") == []
        # The sweep starts by itself once the image is shown (no projections to wait for on this model).
        wait(driver, lambda d: by_id(d, "sweep-status").text == "done", "the sweep did not finish")
        heat = canvas_pixels(driver, "heatmap")
        assert heat["distinct"] > 3 and heat["alpha"] > 0, heat
        assert script_errors(driver) == []
    finally:
        driver.quit()

