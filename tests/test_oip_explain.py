"""The explanations through unmodified standard clients: tritonclient.grpc and tritonclient.http get occlusion
heatmaps (NAME-occlusion) equal to a brute-force eager PyTorch occlusion within 1e-5, and deconv projections
(NAME-deconv) equal to the local deconv engine within 1e-5, for zfnet-demo and an imported AlexNet (torchvision
layout, random weights), and NAME-occlusion for an imported ONNX classifier (160 px input; it has no NAME-deconv);
KServe's own SDK v1 client (in a child process: kserve and tritonclient.grpc cannot share
one) gets predictions and heatmaps over ``/v1``; the settings are checked; the statistics count zfserve.v1's
OcclusionSweep and DeconvProject with the OIP models'; and a cancelled OIP occlusion call stops the sweep.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import onnx_models as om
from test_interop import _jpeg
from torchvision_reference import randomize, reference
from zfserve.import_onnx import import_onnx
from zfserve.import_torchvision import import_torchvision
from zfserve.preprocess import load_image
from zfserve.server import BackgroundServer, ServerOptions
from zfserve.weights import EMBEDDED_DIR, read_snapshot

MODELS = ("zfnet-demo", "alexnet")          # the models with layers (deconv)
ONNX_MODEL = "small160"                        # an opaque ONNX classifier: occlusion only
WINDOW, STRIDE = 56, 28          # 7 x 7 positions that tile the 224 x 224 image exactly
# Window and stride per input size, so the windows tile the image (160 px: 7 x 7 positions).
TILING = {224: (WINDOW, STRIDE), 160: (40, 20)}
KSERVE_SCRIPT = Path(__file__).with_name("_kserve_v1.py")


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain-repo")
    repo = root / "models"
    repo.mkdir()
    shutil.copytree(EMBEDDED_DIR / "zfnet-demo", repo / "zfnet-demo",
                    ignore=shutil.ignore_patterns("model.onnx", "*.int8.onnx", "index"))
    (root / "classes.txt").write_text("".join(f"thing {i}\n" for i in range(5)))
    net = randomize(reference("alexnet", 5, shrink=8, fc=64), seed=41)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "alexnet.safetensors"))
    import_torchvision(root / "alexnet.safetensors", "alexnet", root / "classes.txt", repo / "alexnet")
    spec = om.SPECS[ONNX_MODEL]
    _, path = om.export_named(ONNX_MODEL, root, seed=3)
    import_onnx(path, om.classes_file(root, spec.num_classes), repo / ONNX_MODEL, output=spec.output,
                preprocess={"resize": spec.resize})
    return repo


def _probabilities_model(directory):
    """The PyTorch model behind a served model, giving probabilities: the snapshot's own for the layered models,
    the ONNX test model's PyTorch definition (same seed) for the ONNX one."""
    name = Path(directory).name
    if name == ONNX_MODEL:
        model = om.build(ONNX_MODEL, seed=3)
        if om.SPECS[name].output == "probabilities":
            return model
    else:
        model = read_snapshot(directory).model().eval()
    return lambda x: torch.softmax(model(x).double(), 1)


@pytest.fixture(scope="module")
def server(repository):
    with BackgroundServer(ServerOptions(port=0, http_port=0, model_repository=str(repository),
                                        max_images_per_request=4)) as s:
        s.http = f"127.0.0.1:{s.server.http_port}"
        yield s


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.grpc as tc
    client = tc.InferenceServerClient(server.target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def triton_http(server):
    import tritonclient.http as th
    client = th.InferenceServerClient(server.http, network_timeout=300, connection_timeout=300)
    yield client
    client.close()


def _brute_force_heatmaps(directory, images: np.ndarray, window: int, stride: int):
    """Captum's Occlusion by brute force in eager PyTorch: every occluded image (fill 0, the mean in input units)
    forwarded, each pixel the mean drop of the target's probability over the windows covering it; the target is
    each image's top-1. Returns (heatmaps, probabilities, targets)."""
    model = _probabilities_model(directory)
    size = images.shape[-1]
    starts = range(0, size - window + 1, stride)
    assert (size - window) % stride == 0   # the windows tile the image: no partial window to define
    heatmaps, probabilities, targets = [], [], []
    with torch.no_grad():
        for image in torch.from_numpy(images):
            base = model(image[None]).double()[0]
            target = int(base.argmax())
            occluded = []
            for y in starts:
                for x in starts:
                    copy = image.clone()
                    copy[:, y:y + window, x:x + window] = 0
                    occluded.append(copy)
            probs = model(torch.stack(occluded)).double()[:, target]
            total, count = torch.zeros(size, size, dtype=torch.float64), torch.zeros(size, size, dtype=torch.float64)
            for drop, (y, x) in zip(base[target] - probs, ((y, x) for y in starts for x in starts)):
                total[y:y + window, x:x + window] += drop
                count[y:y + window, x:x + window] += 1
            heatmaps.append((total / count).numpy())
            probabilities.append(base.numpy())
            targets.append(target)
    return np.stack(heatmaps), np.stack(probabilities), np.asarray(targets)


def _inputs(module, x: np.ndarray | None, jpegs: list[bytes] | None):
    if x is not None:
        inp = module.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
    else:
        inp = module.InferInput("image_bytes", [len(jpegs), 1], "BYTES")
        inp.set_data_from_numpy(np.array(jpegs, dtype=np.object_).reshape(-1, 1))
    return [inp]


# ------------------------------------------------------------------------------------------------ occlusion
@pytest.mark.parametrize("name", MODELS + (ONNX_MODEL,))
def test_tritonclients_get_the_brute_force_occlusion_heatmaps(server, triton, triton_http, repository, name):
    import tritonclient.grpc as tc
    import tritonclient.http as th
    config = read_snapshot(repository / name).config
    jpegs = [_jpeg(seed) for seed in (1, 2)]
    x = np.stack([load_image(j, config) for j in jpegs])
    window, stride = TILING[config.preprocess.crop]
    want, probabilities, targets = _brute_force_heatmaps(repository / name, x, window, stride)
    settings = {"window": window, "stride": stride}
    answers = {"grpc tensor": triton.infer(f"{name}-occlusion", _inputs(tc, x, None), parameters=settings),
               "grpc bytes": triton.infer(f"{name}-occlusion-bytes", _inputs(tc, None, jpegs), parameters=settings),
               "http tensor": triton_http.infer(f"{name}-occlusion", _inputs(th, x, None), parameters=settings)}
    for how, answer in answers.items():
        np.testing.assert_allclose(answer.as_numpy("heatmap"), want, atol=1e-5, rtol=0, err_msg=how)
        np.testing.assert_allclose(answer.as_numpy("probabilities"), probabilities, atol=1e-5, rtol=0, err_msg=how)
        assert answer.as_numpy("target").tolist() == [[t] for t in targets], how
        assert answer.as_numpy("heatmap").shape == (2, config.preprocess.crop, config.preprocess.crop)
    params = answers["grpc tensor"].get_response().parameters
    runtime = server.server.repository.get(name).runtime
    assert params["model_version"].string_param == runtime.version
    assert (params["window"].int64_param, params["stride"].int64_param) == (window, stride)
    assert answers["http tensor"].get_response()["parameters"]["model_version"] == runtime.version


def test_occlusion_settings_target_and_fill(server, triton, repository):
    """An explicit target and fill change the map as the brute force says; the engine's default window/stride
    (32/8) give the zfserve.v1 OcclusionSweep's attribution map."""
    import tritonclient.grpc as tc
    from zfserve.client import Client
    config = read_snapshot(repository / "zfnet-demo").config
    x = load_image(_jpeg(3), config)[None]
    got = triton.infer("zfnet-demo-occlusion", _inputs(tc, x, None),
                       parameters={"window": 112, "stride": 112, "target": 2, "fill": "0.5,-0.5,0"})
    model = read_snapshot(repository / "zfnet-demo").model().eval()
    with torch.no_grad():
        image = torch.from_numpy(x[0])
        base = torch.softmax(model(image[None]).double(), 1)[0, 2]
        want = np.zeros((224, 224))
        for y in (0, 112):
            for xx in (0, 112):
                copy = image.clone()
                copy[:, y:y + 112, xx:xx + 112] = torch.tensor([0.5, -0.5, 0.0])[:, None, None]
                want[y:y + 112, xx:xx + 112] = base - torch.softmax(model(copy[None]).double(), 1)[0, 2]
    np.testing.assert_allclose(got.as_numpy("heatmap")[0], want, atol=1e-5, rtol=0)
    assert got.as_numpy("target").tolist() == [[2]]
    default = triton.infer("zfnet-demo-occlusion", _inputs(tc, x, None)).as_numpy("heatmap")[0]
    with Client(server.target, timeout=300) as client:
        sweep = client.occlude(x[0], model="zfnet-demo", outputs=["attribution"])
    np.testing.assert_allclose(default, sweep.attribution, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ deconv
@pytest.mark.parametrize("name", MODELS)
def test_tritonclients_get_the_local_deconv_projections(server, triton, triton_http, repository, name):
    import tritonclient.grpc as tc
    import tritonclient.http as th
    from zfserve.engine.deconv import DeconvEngine
    snapshot = read_snapshot(repository / name)
    layer = snapshot.config.spatial_layers[2]
    jpegs = [_jpeg(seed) for seed in (4, 5)]
    x = np.stack([load_image(j, snapshot.config) for j in jpegs])
    local = DeconvEngine(snapshot.model().eval()).project(x, layer, top_k=3)
    want = np.stack([u.projection for u in local])
    settings = {"layer": layer, "top_k": 3}
    answers = {"grpc tensor": triton.infer(f"{name}-deconv", _inputs(tc, x, None), parameters=settings),
               "grpc bytes": triton.infer(f"{name}-deconv-bytes", _inputs(tc, None, jpegs), parameters=settings),
               "http tensor": triton_http.infer(f"{name}-deconv", _inputs(th, x, None), parameters=settings)}
    for how, answer in answers.items():
        np.testing.assert_allclose(answer.as_numpy("projections"), want, atol=1e-5, rtol=0, err_msg=how)
        assert answer.as_numpy("units").tolist() == [[u.image_index, u.channel, u.y, u.x] for u in local], how
        assert answer.as_numpy("boxes").tolist() == [list(u.box) for u in local], how
        np.testing.assert_allclose(answer.as_numpy("activations"), [u.activation for u in local], rtol=1e-5)
    params = answers["grpc tensor"].get_response().parameters
    assert params["interpretation"].string_param == "feature visualisation (class-insensitive)"
    assert params["model_version"].string_param == server.server.repository.get(name).runtime.version
    assert params["layer"].string_param == layer
    # Units named instead of the strongest ones.
    unit = local[0]
    named = triton.infer(f"{name}-deconv", _inputs(tc, x[:1], None),
                         parameters={"layer": layer, "units": f"{unit.channel},{unit.y},{unit.x}"})
    np.testing.assert_allclose(named.as_numpy("projections")[0], unit.projection, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ checks
@pytest.mark.parametrize("model, parameters, message", [
    ("alexnet-occlusion", {"window": 0}, "parameters.window: 0 out of range; accepted 1..224"),
    ("alexnet-occlusion", {"window": 32, "stride": 33}, "parameters.stride: 33 out of range; accepted 1..32"),
    ("alexnet-occlusion", {"target": 5}, "parameters.target: 5 out of range; accepted 0..4"),
    ("alexnet-occlusion", {"fill": "red"}, "parameters.fill: 'red'; accepted: 'mean'"),
    ("alexnet-occlusion", {"window": 2, "stride": 1}, "at most 4096 are accepted"),
    ("alexnet-occlusion", {"windw": 8}, "parameters: 'windw' not accepted by model 'alexnet-occlusion'; accepted:"),
    ("alexnet-deconv", {"layer": "fc6"}, "parameters.layer: 'fc6' not accepted; accepted: conv1"),
    ("alexnet-deconv", {"top_k": 97}, "parameters.top_k: 97 out of range; accepted 1..96"),
    ("alexnet-deconv", {"units": "1,2"}, "parameters.units: '1,2'; accepted: 1..96 units as 'channel,y,x"),
    ("alexnet-deconv", {"units": "1,2,3", "top_k": 2}, "parameters.units: give units or top_k, not both"),
])
def test_bad_settings_are_refused_naming_the_field(triton, triton_http, model, parameters, message):
    import tritonclient.grpc as tc
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException
    x = np.zeros((1, 3, 224, 224), np.float32)
    with pytest.raises(InferenceServerException) as info:
        triton.infer(model, _inputs(tc, x, None), parameters=parameters)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and message in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton_http.infer(model, _inputs(th, x, None), parameters=parameters)
    assert info.value.status() == "400" and message in info.value.message()


def test_deconv_only_where_the_model_has_layers(server, triton, triton_http):
    """The ONNX classifier has its occlusion models but no deconv models: absent from the index, NOT_FOUND."""
    from tritonclient.utils import InferenceServerException
    names = {m.name for m in triton.get_model_repository_index().models}
    assert {f"{ONNX_MODEL}-occlusion", f"{ONNX_MODEL}-occlusion-bytes", "alexnet-deconv"} <= names
    assert not any(n.startswith(f"{ONNX_MODEL}-deconv") for n in names)
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata(f"{ONNX_MODEL}-deconv")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        triton_http.get_model_metadata(f"{ONNX_MODEL}-deconv")
    assert info.value.status() == "404"
    assert triton.is_model_ready("alexnet-deconv") and triton.is_model_ready(f"{ONNX_MODEL}-occlusion")


def test_statistics_count_the_zfserve_v1_calls_too(server, triton, repository):
    import tritonclient.grpc as tc
    from zfserve.client import Client

    def counts(name):
        (entry,) = triton.get_inference_statistics(name).model_stats
        s = entry.inference_stats
        return entry.inference_count, entry.execution_count, s.success.count, s.compute_infer.count, s.queue.count

    x = load_image(_jpeg(6), read_snapshot(repository / "zfnet-demo").config)[None]
    before = {name: counts(name) for name in ("zfnet-demo-occlusion", "zfnet-demo-deconv", "zfnet-demo-deconv-bytes")}
    triton.infer("zfnet-demo-occlusion", _inputs(tc, x, None), parameters={"window": 112, "stride": 56})
    with Client(server.target, timeout=300) as client:
        client.occlude(x[0], model="zfnet-demo", window=112, stride=56)
        client.deconv(x, model="zfnet-demo", top_k=1)
        client.deconv([_jpeg(7)], model="zfnet-demo", top_k=1)
    after = {name: counts(name) for name in before}
    assert [a - b for a, b in zip(after["zfnet-demo-occlusion"], before["zfnet-demo-occlusion"])] == [2] * 5
    assert [a - b for a, b in zip(after["zfnet-demo-deconv"], before["zfnet-demo-deconv"])] == [1] * 5
    assert [a - b for a, b in zip(after["zfnet-demo-deconv-bytes"], before["zfnet-demo-deconv-bytes"])] == [1] * 5


# ------------------------------------------------------------------------------------------------ KServe v1
def test_kserve_v1_client_gets_predictions_and_explanations(server, repository, tmp_path):
    from zfserve.engine.classifier import Classifier
    jpegs = [_jpeg(8), _jpeg(9)]
    for i, data in enumerate(jpegs):
        (tmp_path / f"{i}.jpg").write_bytes(data)
    config = read_snapshot(repository / "alexnet").config
    x = np.stack([load_image(j, config) for j in jpegs])
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run([sys.executable, str(KSERVE_SCRIPT), f"http://{server.http}", "alexnet",
                           str(tmp_path / "x.npy"), str(WINDOW), str(STRIDE),
                           *(str(tmp_path / f"{i}.jpg") for i in range(len(jpegs)))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout)
    assert answer["ready"] is True and answer["absent_ready_error"] == 404
    want = Classifier(str(repository / "alexnet"), warmup=False).probabilities(x)
    np.testing.assert_allclose(answer["predict_b64"], want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(answer["predict_lists"], want, atol=1e-5, rtol=0)
    heatmaps, probabilities, targets = _brute_force_heatmaps(repository / "alexnet", x, WINDOW, STRIDE)
    explained = answer["explain"]
    np.testing.assert_allclose(explained["predictions"], probabilities, atol=1e-5, rtol=0)
    for got, heatmap, target in zip(explained["explanations"], heatmaps, targets):
        np.testing.assert_allclose(got["heatmap"], heatmap, atol=1e-5, rtol=0)
        assert got["target"] == target and (got["window"], got["stride"]) == (WINDOW, STRIDE)


def test_kserve_v1_explains_the_onnx_model(server, repository):
    """KServe v1's documented format over plain HTTP: the ONNX classifier's predictions and heatmaps equal the
    brute force."""
    import base64
    jpegs = [_jpeg(11), _jpeg(12)]
    config = read_snapshot(repository / ONNX_MODEL).config
    x = np.stack([load_image(j, config) for j in jpegs])
    window, stride = TILING[config.preprocess.crop]
    heatmaps, probabilities, targets = _brute_force_heatmaps(repository / ONNX_MODEL, x, window, stride)
    instances = [{"b64": base64.b64encode(j).decode()} for j in jpegs]
    with httpx.Client(base_url=f"http://{server.http}", timeout=300) as web:
        assert web.get(f"/v1/models/{ONNX_MODEL}").json() == {"name": ONNX_MODEL, "ready": True}
        predicted = web.post(f"/v1/models/{ONNX_MODEL}:predict", json={"instances": instances})
        np.testing.assert_allclose(predicted.json()["predictions"], probabilities, atol=1e-5, rtol=0)
        explained = web.post(f"/v1/models/{ONNX_MODEL}:explain",
                             json={"instances": instances, "parameters": {"window": window, "stride": stride}})
    assert explained.status_code == 200, explained.text
    for got, heatmap, target in zip(explained.json()["explanations"], heatmaps, targets):
        np.testing.assert_allclose(got["heatmap"], heatmap, atol=1e-5, rtol=0)
        assert got["target"] == target


def test_kserve_v1_errors_and_limits(server):
    import base64
    base = f"http://{server.http}"
    with httpx.Client(base_url=base, timeout=120) as web:
        assert web.get("/v1/models").json() == {"models": ["alexnet", ONNX_MODEL, "zfnet-demo"]}
        assert web.get("/v1/models/alexnet").json() == {"name": "alexnet", "ready": True}
        # zfnet-demo answers ModelInfer with its out-of-distribution tensors too; v1 predicts the probabilities.
        jpeg = base64.b64encode(_jpeg(10)).decode()
        got = web.post("/v1/models/zfnet-demo:predict", json={"instances": [{"b64": jpeg}]}).json()
        assert np.asarray(got["predictions"]).shape == (1, 11) and abs(sum(got["predictions"][0]) - 1) < 1e-5
        cases = [
            ("/v1/models/absent:predict", {"instances": [{"b64": ""}]}, 404, "model: unknown model 'absent'"),
            ("/v1/models/alexnet:predict", {"instances": []}, 400, "instances: missing or empty"),
            ("/v1/models/alexnet:predict", {"inputs": [1]}, 400, "instances: missing or empty"),
            ("/v1/models/alexnet:predict", {"instances": [{"b64": "%%%"}]}, 400, "instances[0].b64: not base64"),
            ("/v1/models/alexnet:predict", {"instances": [{"b64": base64.b64encode(b"not an image").decode()}]},
             400, "inputs[0]"),
            ("/v1/models/alexnet:predict", {"instances": [{"b64": "AA=="}, [1.0, 2.0, 3.0]]}, 400, "mixes b64"),
            ("/v1/models/alexnet:predict", {"instances": [[0.0] * 12]}, 400, "shape must be (N, 3, 224, 224)"),
            ("/v1/models/alexnet:predict", {"instances": [{"b64": "AA=="}] * 5}, 400, "1 <= N <= 4"),
            ("/v1/models/alexnet:explain", {"instances": [[0.0] * (3 * 224 * 224)], "parameters": {"window": 0}},
             400, "parameters.window: 0 out of range"),
        ]
        for path, body, status, message in cases:
            got = web.post(path, json=body)
            assert got.status_code == status and message in got.json()["error"], (path, got.text)
            assert set(got.json()) == {"error"}
        # The /v2 guards hold: a page on another site cannot start work; the body cap applies.
        refused = web.post("/v1/models/alexnet:explain", content=b"{}", headers={"origin": "http://evil.example"})
        assert refused.status_code == 403 and "origin" in refused.json()["error"]
        big = web.post("/v1/models/alexnet:predict", content=b" " * (65 << 20),
                       headers={"content-type": "application/json"})
        assert big.status_code == 413


def test_kserve_v1_needs_the_token(repository, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    with BackgroundServer(ServerOptions(port=0, http_port=0, model_repository=str(repository),
                                        auth_token_file=str(token))) as s, \
            httpx.Client(base_url=f"http://127.0.0.1:{s.server.http_port}", timeout=60) as web:
        assert web.get("/v1/models/alexnet").status_code == 401
        got = web.get("/v1/models/alexnet", headers={"authorization": "Bearer s3cret-token-0123456789"})
        assert got.json() == {"name": "alexnet", "ready": True}


# ------------------------------------------------------------------------------------------------ cancellation
def test_a_cancelled_oip_occlusion_call_stops_the_sweep(tmp_path):
    """A plain ``zfserve serve``: an OIP occlusion call of 3,025 positions (about 10 s of one core) is cancelled
    once the sweep runs; the server process's CPU is back to idle within 1 s (no 0.2 s window starting 1 s or
    more after the cancellation holds 10% of a core), and the next call is served."""
    import psutil
    import tritonclient.grpc as tc
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import perf_analyzer_sweep as sweep
    finally:
        sys.path.pop(0)
    proc, target = sweep.start_server()
    try:
        process = psutil.Process(proc.pid)
        client = tc.InferenceServerClient(target)
        x = np.random.default_rng(12).normal(0, 1, (1, 3, 224, 224)).astype(np.float32)
        client.infer("zfnet-demo-occlusion", _inputs(tc, x, None), parameters={"window": 112, "stride": 112})

        def busy(seconds: float) -> float:
            """The server's CPU use over the next ``seconds``, in cores."""
            start = sum(process.cpu_times()[:2])
            time.sleep(seconds)
            return (sum(process.cpu_times()[:2]) - start) / seconds

        answers = []
        call = client.async_infer("zfnet-demo-occlusion", _inputs(tc, x, None), parameters={"window": 8, "stride": 4},
                                  callback=lambda result, error: answers.append((result, error)))
        running = time.monotonic() + 60
        while busy(0.2) < 0.5:
            assert time.monotonic() < running, "the sweep never started"
        call.cancel()
        cancelled = time.monotonic()
        while busy(0.2) >= 0.1:
            assert time.monotonic() - cancelled < 1.0 + 0.2, "the server stayed busy after the cancellation"
        assert len(answers) == 1 and answers[0][0] is None and "CANCELLED" in str(answers[0][1])
        again = client.infer("zfnet-demo-occlusion", _inputs(tc, x, None), parameters={"window": 112, "stride": 112})
        assert again.as_numpy("heatmap").shape == (1, 224, 224)
        client.close()
    finally:
        assert sweep.stop_server(proc) == 0
