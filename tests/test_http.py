"""The HTTP side of the server (``--http-port``): the Open Inference Protocol over REST for tritonclient.http
(same probabilities as tritonclient.grpc from the same server, 1e-6), every route the gRPC side implements,
every bad request a 4xx naming the field (never a 500), the token, and the explorer page's API: uploads with
the same limits and messages as gRPC, classify / deconv / a streamed sweep equal to the engines, a sweep
cancelled when the client goes away."""

from __future__ import annotations

import io
import json
import time

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from zfserve._proto.v1 import zfserve_pb2 as pb
from zfserve._proto.v1 import zfserve_pb2_grpc as pb_grpc
from zfserve.data import CLASSES, render
from zfserve.server import BackgroundServer, BatcherConfig, ServerOptions

TOKEN = "http-test-token-0123456789"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spread_model):
    from zfserve.weights import save_model
    return save_model(spread_model(seed=9, num_classes=len(CLASSES)), tmp_path_factory.mktemp("m") / "tiny",
                      class_names=list(CLASSES), name="tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    with BackgroundServer(ServerOptions(port=0, http_port=0, model=str(model_dir), model_control="explicit",
                                        max_images_per_request=4, max_message_bytes=16 << 20,
                                        batching=BatcherConfig(max_batch_size=4, max_queue_delay_us=1000))) as s:
        s.http = f"127.0.0.1:{s.server.http_port}"
        yield s


@pytest.fixture(scope="module")
def classifier(model_dir):
    from zfserve.engine.classifier import Classifier
    return Classifier(str(model_dir), warmup=False)


@pytest.fixture(scope="module")
def web(server):
    with httpx.Client(base_url=f"http://{server.http}", timeout=120) as client:
        yield client


def _images(n, seed):
    return np.random.default_rng(seed).normal(0, 60, (n, 3, 224, 224)).astype(np.float32)


def _jpeg(seed, size=(260, 240)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(render(seed, seed).image).resize(size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ OIP REST
def test_tritonclient_http_and_grpc_agree(server, classifier):
    import tritonclient.grpc as tg
    import tritonclient.http as th
    http, rpc = th.InferenceServerClient(server.http), tg.InferenceServerClient(server.target)
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready("tiny-bytes")
    assert http.get_server_metadata()["extensions"] == list(rpc.get_server_metadata().extensions)
    x = _images(3, 1)
    jpegs = np.array([[_jpeg(2)], [_jpeg(3)]], dtype=object)
    got = {}
    for binary in (True, False):
        a = th.InferInput("image", list(x.shape), "FP32")
        a.set_data_from_numpy(x, binary_data=binary)
        out = [th.InferRequestedOutput("probabilities", binary_data=binary)]
        got[("tiny", binary)] = http.infer("tiny", [a], outputs=out).as_numpy("probabilities")
    b = th.InferInput("image_bytes", [2, 1], "BYTES")
    b.set_data_from_numpy(jpegs, binary_data=True)
    got[("tiny-bytes", True)] = http.infer("tiny-bytes", [b], request_id="r1").as_numpy("probabilities")
    ga = tg.InferInput("image", list(x.shape), "FP32")
    ga.set_data_from_numpy(x)
    gb = tg.InferInput("image_bytes", [2, 1], "BYTES")
    gb.set_data_from_numpy(jpegs)
    reference = {"tiny": rpc.infer("tiny", [ga]).as_numpy("probabilities"),
                 "tiny-bytes": rpc.infer("tiny-bytes", [gb]).as_numpy("probabilities")}
    for (name, _), probs in got.items():
        np.testing.assert_allclose(probs, reference[name], atol=1e-6, rtol=0)
    np.testing.assert_allclose(reference["tiny"], classifier.probabilities(x), atol=1e-5)
    for name in ("tiny", "tiny-bytes"):   # metadata, config and statistics are the gRPC side's, as JSON
        meta = http.get_model_metadata(name)
        assert meta["versions"] == list(rpc.get_model_metadata(name).versions)
        assert [i["shape"] for i in meta["inputs"]] == [list(i.shape) for i in rpc.get_model_metadata(name).inputs]
        config = http.get_model_config(name)
        assert config["max_batch_size"] == 4 and config["input"][0]["dims"] == list(
            rpc.get_model_config(name).config.input[0].dims)
        stats = http.get_inference_statistics(name)["model_stats"][0]
        assert stats["inference_count"] >= 2 and isinstance(stats["inference_stats"]["success"]["ns"], int)
    http.close()
    rpc.close()


def test_repository_routes_over_http(server, web):
    index = web.post("/v2/repository/index").json()
    assert [(m["name"], m["state"]) for m in index] == [(f"tiny{suffix}", "READY") for suffix in (
        "", "-bytes", "-deconv", "-deconv-bytes", "-occlusion", "-occlusion-bytes")]
    assert web.post("/v2/repository/models/tiny/unload", json={"parameters": {"unload_dependents": False}}
                    ).status_code == 200
    try:
        assert web.get("/v2/models/tiny/ready").status_code == 400
        assert web.get("/v2/health/ready").status_code == 400
        assert web.post("/v2/repository/index", json={"ready": True}).json() == []
        r = web.post("/v2/models/tiny/infer", json={"inputs": []})
        assert r.status_code == 503 and "unloaded" in r.json()["error"] and r.headers["retry-after"]
    finally:
        assert web.post("/v2/repository/models/tiny/load").status_code == 200
    assert web.get("/v2/health/ready").status_code == 200 and web.get("/v2/health/live").status_code == 200
    assert web.get("/v2/models/stats").json()["model_stats"][0]["name"] == "tiny"


def _infer(web, body, model="tiny", headers=None, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return web.post(f"/v2/models/{model}/infer", content=data, headers=headers or {}, **kw)


BAD_REQUESTS = [
    ("not json", b"{nope", {}, 400, "body"),
    ("no inputs", {"id": "x"}, {}, 400, "inputs"),
    ("shape not ints", {"inputs": [{"name": "image", "datatype": "FP32", "shape": "1x3", "data": [1]}]}, {}, 400,
     "inputs[0].shape"),
    ("data count", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": [1, 2]}]},
     {}, 400, "inputs[0].data"),
    ("data not numbers", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": ["a"]}]}, {}, 400,
     "inputs[0].data"),
    ("wrong datatype", {"inputs": [{"name": "image", "datatype": "FP64", "shape": [1, 3, 224, 224],
                                    "data": [0.0] * (3 * 224 * 224)}]}, {}, 400, "inputs[0].datatype"),
    ("unknown datatype", {"inputs": [{"name": "image", "datatype": "FP99", "shape": [1], "data": [1]}]}, {}, 400,
     "inputs[0].datatype"),
    ("wrong input", {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, {}, 400,
     "inputs[0].name"),
    ("two inputs", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}] * 2}, {}, 400,
     "inputs"),
    ("binary beyond body", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 224, 224],
                                        "parameters": {"binary_data_size": 10 ** 6}}]}, "binary", 400,
     "binary_data_size"),
    ("bad header length", {"inputs": []}, {"Inference-Header-Content-Length": "-4"}, 400,
     "Inference-Header-Content-Length"),
    ("too many images", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [5, 3, 224, 224],
                                     "parameters": {"binary_data_size": 5 * 3 * 224 * 224 * 4}}]}, "binary", 400,
     "1 <= N <= 4"),
    ("bytes as numbers", {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1, 1], "data": [7]}]},
     {"model": "tiny-bytes"}, 400, "inputs[0].data"),
    ("corrupt image", {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1, 1],
                                   "data": ["not an image"]}]}, {"model": "tiny-bytes"}, 400, "inputs[0]"),
    ("unknown model", {"inputs": []}, {"model": "nope"}, 404, "model_name"),
    ("unknown version", {"inputs": []}, {"model": "tiny/versions/77"}, 404, "model_version"),
    ("bad timeout", {"parameters": {"timeout": "soon"}, "inputs": []}, {}, 400, "parameters.timeout"),
    # Each of these was a 500 with a traceback once.
    ("nested 100,000 deep", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400,
     "nested deeper than 32 levels"),
    ("shape above int64", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [2 ** 64], "data": [1]}]}, {},
     400, "inputs[0].shape"),
    ("negative shape", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [-1], "data": [1]}]}, {}, 400,
     "inputs[0].shape"),
    ("INT64 value above int64", {"inputs": [{"name": "image", "datatype": "INT64", "shape": [1],
                                             "data": [2 ** 63]}]}, {}, 400, "inputs[0].data"),
    ("INT64 value above int64 in a long array", {"inputs": [{"name": "image", "datatype": "INT64", "shape": [40],
                                                             "data": [1] * 39 + [2 ** 64]}]}, {}, 400,
     "inputs[0].data: a value is out of range"),
    ("timeout above int64", {"parameters": {"timeout": 2 ** 63}, "inputs": []}, {}, 400, "parameters.timeout"),
    ("parameters a list", {"parameters": [1], "inputs": []}, {}, 400, "parameters: must be a JSON object"),
    ("input parameters a list", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1],
                                             "parameters": [1]}]}, {}, 400, "inputs[0].parameters"),
    ("outputs an object", {"inputs": [], "outputs": {"name": "probabilities"}}, {}, 400, "outputs"),
    ("output parameters a list", {"inputs": [], "outputs": [{"name": "x", "parameters": [1]}]}, {}, 400,
     "outputs[0].parameters"),
    ("id not a string", {"id": [1], "inputs": []}, {}, 400, "id: must be a string"),
    ("name not a string", {"inputs": [{"name": 7, "datatype": "FP32", "shape": [1], "data": [1]}]}, {}, 400,
     "inputs[0].name"),
    ("NaN", b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [NaN]}]}', {}, 400,
     "NaN is not JSON"),
    ("boolean data", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [2], "data": [True, 1]}]}, {}, 400,
     "inputs[0].data: not a (nested) list of numbers"),
    ("trailing comma in a long array", b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [40], "data": ['
     + b"1," * 40 + b"]}]}", {}, 400, "inputs[0].data: not a list of numbers"),
    ("not UTF-8", b'{"id": "\xff\xfe", "inputs": []}', {}, 400, "not UTF-8"),
    ("too many values", b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [3000000], "data": ['
     + b"0," * 3_000_000 + b"0]}]}", {}, 413, "--http-max-json-values"),
]


@pytest.mark.parametrize("what, body, extra, status, named", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_naming_the_field(web, what, body, extra, status, named):
    headers, model = {}, "tiny"
    if extra == "binary":   # the JSON header, then fewer binary bytes than it promises
        head = json.dumps(body).encode()
        body, headers = head + b"\x00" * 64, {"Inference-Header-Content-Length": str(len(head))}
        if what == "too many images":
            body = head + np.zeros((5, 3, 224, 224), np.float32).tobytes()
    elif isinstance(extra, dict):
        headers = {k: v for k, v in extra.items() if k != "model"}
        model = extra.get("model", model)
    r = _infer(web, body, model=model, headers=headers)
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json") and named in r.json()["error"], r.text


def test_bad_requests_leave_no_traceback_in_the_log(web, caplog):
    import logging
    with caplog.at_level(logging.DEBUG):
        for what, body, extra, status, _ in BAD_REQUESTS:
            if extra == {}:
                assert _infer(web, body).status_code == status, what
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text[-2000:]


def test_size_limit_method_and_unknown_route(web):
    r = _infer(web, b"{" + b" " * (17 << 20) + b"}")
    assert r.status_code == 413 and "--max-message-bytes" in r.json()["error"]
    assert web.get("/v2/models/tiny/infer").status_code == 405
    assert web.get("/v2/nothing/here").status_code == 404


def test_connections_send_without_nagle():
    """Responses are two writes (headers, body): with Nagle's algorithm the body waits for the client's delayed
    ACK, 40 ms a call (ModelMetadata took 44 ms over HTTP, 0.6 ms over gRPC, before). The listening socket has
    TCP_NODELAY, and Linux hands it to every accepted connection."""
    import socket

    from zfserve.server.http_server import _listen
    listener = _listen("127.0.0.1", 0)
    try:
        listener.setblocking(True)
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                client.sendall(b"ping")
                assert accepted.recv(4) == b"ping"
    finally:
        listener.close()


def test_token_guards_the_api_but_not_the_page(model_dir, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    with BackgroundServer(ServerOptions(port=0, http_port=0, model=str(model_dir), auth_token_file=str(token))) as s, \
            httpx.Client(base_url=f"http://127.0.0.1:{s.server.http_port}") as web:
        for path in ("/v2", "/v2/models/tiny", "/api/v1/models"):
            r = web.get(path)
            assert r.status_code == 401 and "authorization" in r.json()["error"], path
            assert web.get(path, headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200, path
        assert web.get("/v2", headers={"Authorization": "Bearer wrong-token-000000"}).status_code == 401
        assert web.get("/").status_code in (200, 404)   # the page itself is public (404 only when not installed)


# ------------------------------------------------------------------------------------------------ the page's API
def _upload(web, data: bytes):
    return web.post("/api/v1/images", content=data, headers={"content-type": "application/octet-stream"})


def _header_png(width, height) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (the pixel data is a stub: limits act on the header)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


HOSTILE = {"too many pixels": _header_png(9000, 9000), "tiny": _header_png(8, 8), "empty": b"",
           "gif": b"GIF89a" + b"\x00" * 64, "text": b"hello, not an image", "truncated": _jpeg(4)[:700]}


@pytest.mark.parametrize("what", sorted(HOSTILE))
def test_hostile_uploads_get_the_grpc_limits_and_messages(server, web, what):
    """The same bytes through the page (upload, then classify) and through gRPC Classify: the same refusal."""
    data = HOSTILE[what]
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ZFServeStub(channel).Classify(pb.ClassifyRequest(images=pb.Images(encoded=[data])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    expected = info.value.details().replace("images.encoded[0]", "image")
    r = _upload(web, data)
    if r.status_code == 200:   # the header was fine (a truncated body): the decoder refuses at classify
        r = web.post("/api/v1/classify", json={"image": r.json()["id"]})
    assert r.status_code == 400 and r.json()["field"] == "image", r.text
    assert r.json()["error"] == expected or (what == "empty" and "0 bytes" in r.json()["error"]), (r.text, expected)


def test_page_routes_equal_the_engines(server, web, model_dir, classifier):
    from zfserve.engine.deconv import DeconvEngine
    from zfserve.engine.occlusion import OcclusionEngine
    from zfserve.preprocess import load_image
    from zfserve.weights import load_model
    data = _jpeg(5)
    uploaded = _upload(web, data).json()
    assert uploaded["width"] == 260 and uploaded["id"] == __import__("hashlib").sha256(data).hexdigest()
    assert web.get(f"/api/v1/images/{uploaded['id']}").content == data
    model = load_model(str(model_dir))
    x = load_image(data, model.config)
    top = web.post("/api/v1/classify", json={"image": uploaded["id"], "top_k": 3}).json()
    np.testing.assert_allclose([p["probability"] for p in top["predictions"]],
                               np.sort(classifier.probabilities(x[None])[0])[::-1][:3], atol=1e-5)
    deconv = web.post("/api/v1/deconv", json={"image": uploaded["id"], "layer": "conv3", "top_k": 2}).json()
    assert deconv["label"] == "feature visualisation (class-insensitive)" and len(deconv["units"]) == 2
    local = DeconvEngine(model).project(x[None], "conv3", top_k=2)
    assert [(u["channel"], u["y"], u["x"]) for u in deconv["units"]] == [(u.channel, u.y, u.x) for u in local]
    assert all(u["projection_png"] and u["patch_png"] for u in deconv["units"])
    lines = []
    with web.stream("POST", "/api/v1/occlusion", json={"image": uploaded["id"], "window": 112, "stride": 56}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert "progress" in lines[0] and "result" in lines[-1]
    result = lines[-1]["result"]
    expected = OcclusionEngine(model).sweep(x, 112, 56, outputs=("probability", "attribution"))
    np.testing.assert_allclose(result["probability"], expected.probability, atol=1e-5)
    np.testing.assert_allclose(result["attribution"], expected.attribution, atol=1e-5)
    assert result["settings"]["target"] == expected.target and result["version"] == top["version"]
    r = web.post("/api/v1/occlusion", json={"image": uploaded["id"], "window": 0})
    assert r.status_code == 400 and "window" in r.json()["error"]
    r = web.post("/api/v1/classify", json={"image": "0" * 64})
    assert r.status_code == 404 and "upload the file again" in r.json()["error"]
    r = web.get("/api/v1/index/tiny/conv1/0")
    assert r.status_code in (200, 404) and ("units" in r.json() or "zfserve index" in r.json()["error"])


def test_a_sweep_stops_when_the_client_goes_away(server, web):
    uploaded = _upload(web, _jpeg(6)).json()
    heavy = server.server.heavy
    aborted = heavy.aborted
    with web.stream("POST", "/api/v1/occlusion", json={"image": uploaded["id"], "window": 8, "stride": 4}) as r:
        first = next(line for line in r.iter_lines() if line)
        assert "progress" in json.loads(first) and json.loads(first)["progress"]["total"] == 55 * 55
    deadline = time.monotonic() + 30   # leaving the block closed the connection mid-sweep
    while heavy.admitted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert heavy.admitted == 0 and heavy.aborted == aborted + 1
    assert web.post("/api/v1/classify", json={"image": uploaded["id"]}).status_code == 200
