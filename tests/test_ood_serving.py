"""The out-of-distribution score on every answer of a real server: zfserve.v1 Classify, DeconvProject and
OcclusionSweep, GetModelInfo, the Open Inference Protocol through tritonclient (extra output tensors, listed by
ModelMetadata and ModelConfig alike) and over REST. The server holds the embedded model (copied into a
repository, its statistics beside it) and a model without statistics, which serves all the same and says so.
Scores are compared with the local classifier's on the same bytes; a photo shipped in an installed package is
out of distribution, a held-out synthetic image is not.
"""

from __future__ import annotations

import io
import shutil

import grpc
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from zfserve._proto.v1 import zfserve_pb2 as pb
from zfserve._proto.v1 import zfserve_pb2_grpc as pb_grpc
from zfserve.server import BackgroundServer, BatcherConfig, ServerOptions

DEMO = "zfnet-demo"


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    from zfserve.model import ZFNet
    from zfserve.weights import EMBEDDED_DIR, save_model
    root = tmp_path_factory.mktemp("ood-repository")
    shutil.copytree(EMBEDDED_DIR / DEMO, root / DEMO, ignore=shutil.ignore_patterns("*.npz", "*.png"))
    torch.manual_seed(3)
    save_model(ZFNet(num_classes=11, fc_width=32, widths=(16,) * 5).eval(), root / "plain", name="plain")
    return root


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("ZFSERVE_CACHE_DIR", str(tmp_path_factory.mktemp("ood-serving-cache")))
    with BackgroundServer(ServerOptions(port=0, http_port=0, model_repository=str(repository),
                                        max_images_per_request=4,
                                        batching=BatcherConfig(max_batch_size=4, max_queue_delay_us=1000))) as s:
        s.http = f"127.0.0.1:{s.server.http_port}"
        yield s


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


@pytest.fixture(scope="module")
def images():
    """A photo shipped inside matplotlib and a held-out synthetic image (seed 4), encoded."""
    from zfserve.data import render
    from zfserve.data.probes import photo_files
    photo = next(p for p in photo_files() if p.name == "grace_hopper.jpg").read_bytes()
    buf = io.BytesIO()
    Image.fromarray(render(4, 1).image).save(buf, format="PNG")
    return [photo, buf.getvalue()]


@pytest.fixture(scope="module")
def local(server, repository, images):
    """The local classifier's verdicts on the same bytes (the reference)."""
    from zfserve.engine.classifier import Classifier
    from zfserve.preprocess import load_image
    classifier = Classifier(str(repository / DEMO), warmup=False)
    x = np.stack([load_image(data, classifier.config) for data in images])
    return classifier, x, classifier.scored(x).ood


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.ZFServeStub(channel)


def _close(got, want):
    assert got.out_of_distribution == want.out_of_distribution
    assert got.score == pytest.approx(want.score, rel=1e-4, abs=1e-4)
    assert got.threshold == pytest.approx(want.threshold, rel=1e-6)


# ---------------------------------------------------------------------------------------------------- zfserve.v1
def test_classify_marks_the_photo_and_not_the_synthetic_image(stub, images, local, repository):
    _, _, want = local
    assert [v.out_of_distribution for v in want] == [True, False]
    response = stub.Classify(pb.ClassifyRequest(model=DEMO, images=pb.Images(encoded=images), top_k=2))
    assert response.ood_note == ""
    for prediction, expected in zip(response.predictions, want):
        assert prediction.HasField("ood")
        _close(prediction.ood, expected)
    plain = stub.Classify(pb.ClassifyRequest(model="plain", images=pb.Images(encoded=images)))
    assert not any(p.HasField("ood") for p in plain.predictions)
    assert "model plain: no out-of-distribution score" in plain.ood_note
    assert str(repository) not in plain.ood_note and "--model <its directory>" in plain.ood_note   # no server path


def test_the_python_client_and_deconv_and_occlusion_carry_the_score(server, images, local):
    from zfserve.client import Client
    _, _, want = local
    with Client(server.target) as client:
        answers = client.classify(images, top_k=1, model=DEMO)
        for top, expected in zip(answers, want):
            _close(top.ood, expected)
        units = client.deconv(images, "conv1", top_k=1, model=DEMO, return_tensor=False)
        assert [u.image_index for u in units] == [0, 1]
        for unit in units:
            _close(unit.ood, want[unit.image_index])
        for data, expected in zip(images, want):
            result = client.occlude(data, window=112, stride=112, outputs=("probability",), model=DEMO)
            _close(result.ood, expected)
        sweep = client.occlude(images[0], window=112, stride=112, outputs=("probability",), model="plain")
        assert sweep.ood is None
        assert client.deconv(images[:1], "conv1", top_k=1, model="plain")[0].ood is None


def test_model_info_describes_the_score_and_the_training_data(stub, local):
    classifier, _, _ = local
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model=DEMO))
    assert info.ood.available and info.ood.acceptance == pytest.approx(0.95)
    assert info.ood.threshold == pytest.approx(classifier.ood_detector.threshold)
    assert info.ood.method == classifier.ood_detector.method and "synthetic seed 5" in info.ood.data
    assert info.training_data.startswith("synthetic images of 11 shapes")
    plain = stub.GetModelInfo(pb.GetModelInfoRequest(model="plain"))
    assert not plain.ood.available and "have not been fitted" in plain.ood.note
    assert plain.training_data == "not recorded in its provenance"


# ---------------------------------------------------------------------------------------------------- OIP
def test_tritonclient_reads_the_score_as_output_tensors(server, images, local):
    import tritonclient.grpc as tc
    from tritonclient.grpc import model_config_pb2 as mc
    _, x, want = local
    client = tc.InferenceServerClient(server.target)
    try:
        meta, config = client.get_model_metadata(DEMO), client.get_model_config(DEMO).config
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
            ("probabilities", "FP32", [-1, 11]), ("ood_score", "FP32", [-1, 1]), ("out_of_distribution", "BOOL", [-1, 1])]
        assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
            ("probabilities", mc.TYPE_FP32, [11]), ("ood_score", mc.TYPE_FP32, [1]),
            ("out_of_distribution", mc.TYPE_BOOL, [1])]
        assert float(config.parameters["ood_threshold"].string_value) == pytest.approx(want[0].threshold)
        tensor = tc.InferInput("image", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        encoded = tc.InferInput("image_bytes", [2, 1], "BYTES")
        encoded.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(-1, 1))
        for model, inp in ((DEMO, tensor), (f"{DEMO}-bytes", encoded)):
            result = client.infer(model, [inp])
            np.testing.assert_allclose(result.as_numpy("ood_score")[:, 0], [v.score for v in want], rtol=1e-4,
                                       atol=1e-4)
            assert result.as_numpy("out_of_distribution")[:, 0].tolist() == [True, False]
            score = next(o for o in result.get_response().outputs if o.name == "ood_score")
            assert score.parameters["threshold"].double_param == pytest.approx(want[0].threshold)
        only = client.infer(DEMO, [tensor], outputs=[tc.InferRequestedOutput("probabilities")])
        assert [o.name for o in only.get_response().outputs] == ["probabilities"]
        # A model without statistics declares and returns the probabilities alone, and refuses the others.
        assert [t.name for t in client.get_model_metadata("plain").outputs] == ["probabilities"]
        assert "ood" in client.get_model_config("plain").config.parameters
        with pytest.raises(Exception, match="ood_score.*is not an output of model 'plain'"):
            client.infer("plain", [tensor], outputs=[tc.InferRequestedOutput("ood_score")])
    finally:
        client.close()


def test_rest_infer_returns_the_same_outputs(server, local):
    _, x, want = local
    body = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    with httpx.Client(base_url=f"http://{server.http}", timeout=120) as web:
        reply = web.post(f"/v2/models/{DEMO}/infer", json=body)
    assert reply.status_code == 200, reply.text
    outputs = {o["name"]: o for o in reply.json()["outputs"]}
    assert outputs["out_of_distribution"]["data"] == [True, False]
    assert outputs["out_of_distribution"]["datatype"] == "BOOL"
    np.testing.assert_allclose(outputs["ood_score"]["data"], [v.score for v in want], rtol=1e-4, atol=1e-4)
    assert outputs["ood_score"]["parameters"]["threshold"] == pytest.approx(want[0].threshold)
