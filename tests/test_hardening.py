"""Hardening against hostile uploads and faults: the decoder's bounded cost, the decode stage's budget, lanes
and deadlines, one snapshot per served model and its explicit reload, start-up failures as one line, checked
inputs, and the auth gaps. Every server is real (loopback); images are made here, never fetched."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from zfserve._proto.inference import grpc_service_pb2 as oip
from zfserve._proto.inference import grpc_service_pb2_grpc as oip_grpc
from zfserve._proto.v1 import zfserve_pb2 as pb
from zfserve._proto.v1 import zfserve_pb2_grpc as pb_grpc
from zfserve.errors import ImageSizeError
from zfserve.preprocess import decode_image, load_image, read_header
from zfserve.server import BackgroundServer, ServerOptions
from zfserve.server.batcher import DeadlineExpired
from zfserve.server.decode import DecodeStage
from zfserve.server.status import Unavailable
from zfserve.wire import array_to_tensor, oip_version

TOKEN = "hardening-token-0123456789"


# ------------------------------------------------------------------------------------------------ helpers
def encode(array: np.ndarray, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **options)
    return buf.getvalue()


def smooth(rng, h: int, w: int, channels: int = 3) -> np.ndarray:
    coarse = rng.integers(0, 256, (h // 64 + 2, w // 64 + 2, channels), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse.squeeze()).resize((w, h), Image.BICUBIC))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB and whose pixel data is a token (not decodable)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def full_resolution_input(rgba: np.ndarray, mean_rgb) -> np.ndarray:
    """Independent reference: composite on the mean at full size in float64, resize the short side to 256
    (PIL bilinear), centre 224, subtract the mean."""
    rgb = rgba[..., :3].astype(np.float64)
    if rgba.shape[2] == 4:
        alpha = rgba[..., 3:].astype(np.float64) / 255
        rgb = rgb * alpha + np.asarray(mean_rgb) * (1 - alpha)
    rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    h, w = rgb.shape[:2]
    scale = 256 / min(h, w)
    size = (max(256, round(w * scale)), max(256, round(h * scale)))
    resized = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR)).astype(np.float64)
    top, left = (size[1] - 224) // 2, (size[0] - 224) // 2
    return (resized[top:top + 224, left:left + 224] - np.asarray(mean_rgb)).transpose(2, 0, 1)


# ------------------------------------------------------------------------------------------------ the decoder
@pytest.mark.parametrize("fmt, channels", [("PNG", 3), ("JPEG", 3), ("PNG", 4), ("WEBP", 3)])
def test_large_images_decode_at_working_size_close_to_full_resolution(fmt, channels):
    """2400 x 1800 images take the working-size path (JPEG draft, uint8 reduce, premultiplied alpha); the
    input differs from a full-resolution float pipeline by rounding only."""
    from zfserve.config import IMAGENET_MEAN_RGB
    rng = np.random.default_rng(channels + len(fmt))
    image = smooth(rng, 1800, 2400, channels)
    data = encode(image, fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    reference = full_resolution_input(np.asarray(Image.open(io.BytesIO(data))), IMAGENET_MEAN_RGB)
    diff = np.abs(load_image(data) - reference)
    assert diff.mean() < 1.0 and diff.max() <= 6, (diff.mean(), diff.max())


def test_working_size_keeps_the_short_side_above_it_and_decodes_less():
    image = smooth(np.random.default_rng(1), 3000, 4000)
    for fmt in ("PNG", "JPEG"):
        small = decode_image(encode(image, fmt), working_size=512)
        assert 512 <= min(small.shape[:2]) < 1024 and small.dtype == np.uint8, small.shape
        assert decode_image(encode(image, fmt)).shape == (3000, 4000, 3)   # without it: full size


def test_read_header_decodes_nothing_and_applies_the_limits():
    header = read_header(png_header_only(3000, 2000))    # its pixel data would not decode
    assert (header.width, header.height, header.format, header.pixels) == (3000, 2000, "PNG", 6_000_000)
    with pytest.raises(ImageSizeError):
        read_header(png_header_only(9000, 9000))
    with pytest.raises(Exception):
        load_image(png_header_only(3000, 2000))


def test_our_limit_in_our_words_without_pillows_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for width, height in ((10_000, 10_000), (100_000, 100_000)):
            with pytest.raises(ImageSizeError) as info:
                load_image(png_header_only(width, height))
            message = str(info.value)
            assert "40000000" in message and "178956970" not in message and "89478485" not in message
    assert not caught, [str(w.message) for w in caught]


def test_a_webp_canvas_beyond_pillows_limit_is_our_size_error():
    """Found by fuzz/decoder.py: Pillow's WebP plugin checks the canvas of an animated WebP itself, while the
    header is read, and raised its DecompressionBombError (with its own limit) past our error handling."""
    frames = [Image.fromarray(np.full((40, 40, 3), value, np.uint8)) for value in (0, 50)]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:])
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"VP8X"
    data[24:30] = (40_000 - 1).to_bytes(3, "little") * 2     # canvas width - 1, height - 1: 40000 x 40000
    with pytest.raises(ImageSizeError) as info:
        load_image(bytes(data))
    assert "40000000" in str(info.value) and "178956970" not in str(info.value)


def test_check_is_called_between_steps_and_stops_the_decode():
    data = encode(smooth(np.random.default_rng(2), 1200, 1600), "PNG")
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise TimeoutError("stop here")

    with pytest.raises(TimeoutError):
        load_image(data, check=check)
    assert len(calls) == 3
    counted = []
    load_image(data, check=lambda: counted.append(1))
    assert len(counted) >= 4   # open, decode, reduce, convert


# ------------------------------------------------------------------------------------------------ the decode stage
def test_decode_stage_budget_lanes_and_deadline():
    rng = np.random.default_rng(3)
    small = encode(smooth(rng, 300, 400), "PNG")
    large = encode(smooth(rng, 2200, 2400), "PNG")          # 5.3 MP: the large lane

    async def scenario():
        stage = DecodeStage(max_request_pixels=12_000_000, workers=1, queue_size=0)
        try:
            with pytest.raises(Exception) as info:
                await stage.decode([large, large, large], None, field="images")   # 15.8 MP > 12 MP
            assert "--max-request-pixels" in str(info.value)
            gate = threading.Event()
            busy = asyncio.ensure_future(stage.large.run(lambda job: gate.wait(30)))
            await asyncio.sleep(0.05)
            with pytest.raises(Unavailable) as info:                   # the large lane is full ...
                await stage.decode([large], None, field="images")
            assert "--decode-workers" in str(info.value)
            assert (await stage.decode([small], None, field="images")).shape == (1, 3, 224, 224)   # ... not the small
            with pytest.raises(Unavailable):   # lanes go by a request's pixels in all: 40 small images are large work
                await stage.decode([small] * 40, None, field="images")
            gate.set()
            await busy
            aborted = stage.large.aborted
            with pytest.raises(DeadlineExpired):                       # stopped between images
                await stage.decode([large] * 2, None, field="images", deadline_mono=time.monotonic() + 0.01)
            assert stage.large.aborted == aborted + 1 and stage.large.admitted == 0
            assert (await stage.decode([large, small], None, field="images")).shape == (2, 3, 224, 224)
        finally:
            stage.shutdown()

    asyncio.run(scenario())


def test_a_pool_starts_jobs_in_fair_order_by_work():
    """A client with one small job waits behind the job running, not behind another client's queued large
    ones; a job whose caller leaves while it waits never starts, and gives its place back."""
    from zfserve.server.pools import BoundedPool

    async def scenario():
        pool = BoundedPool(1, 8, name="fair-test")
        gate, order = threading.Event(), []

        def job(name):
            def run(_):
                gate.wait(10)
                order.append(name)
            return run
        try:
            running = asyncio.ensure_future(pool.run(job("running"), client="a", work=1))
            await asyncio.sleep(0.05)
            hogs = [asyncio.ensure_future(pool.run(job(f"large{i}"), client="hog", work=4_000_000))
                    for i in range(3)]
            leaving = asyncio.ensure_future(pool.run(job("left"), client="b", work=1))
            await asyncio.sleep(0.01)
            small = asyncio.ensure_future(pool.run(job("small"), client="c", work=65_536))
            await asyncio.sleep(0.01)
            leaving.cancel()
            await asyncio.sleep(0.01)
            gate.set()
            await asyncio.gather(running, small, *hogs)
            return order, pool.admitted, pool.aborted
        finally:
            pool.shutdown()

    order, admitted, aborted = asyncio.run(scenario())
    assert order == ["running", "small", "large0", "large1", "large2"] and admitted == 0 and aborted == 1


# ------------------------------------------------------------------------------------------------ servers
class Running(BackgroundServer):
    """A started server with blocking stubs on one channel."""

    def __init__(self, options: ServerOptions):
        super().__init__(options)
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.ZFServeStub(self.channel)
        self.oip = oip_grpc.GRPCInferenceServiceStub(self.channel)

    def stop(self, grace: float = 5):
        self.channel.close()
        super().stop(grace)


def tiny_model(seed: int):
    from zfserve.model import ZFNet
    torch.manual_seed(seed)
    model = ZFNet(num_classes=10, fc_width=64).eval()
    with torch.no_grad():   # spread logits, so two seeds answer differently
        model.fc8.weight.mul_(300.0)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from zfserve.weights import save_model
    root = tmp_path_factory.mktemp("hardening-models")
    names = [f"c{i}" for i in range(10)]
    first = save_model(tiny_model(1), root / "first", name="tiny", class_names=names)
    second = save_model(tiny_model(2), root / "second", name="tiny", class_names=names)
    return root, first, second


def _x(seed: int, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 60, (n, 3, 224, 224)).astype(np.float32)


def _classify(stub, x):
    reply = stub.Classify(pb.ClassifyRequest(images=pb.Images(tensor=array_to_tensor(x)), return_probabilities=True))
    probs = np.frombuffer(reply.probabilities.data, "<f4").reshape(list(reply.probabilities.shape))
    return probs, reply.model_version


def test_replaced_weights_are_served_only_after_the_reload(models, tmp_path):
    from zfserve.engine.classifier import Classifier
    from zfserve.weights import load_model, read_snapshot
    _, first, second = models
    served = shutil.copytree(first, tmp_path / "served")
    old_model, new_model = load_model(first), load_model(second)
    x = _x(5)
    running = Running(ServerOptions(port=0, model=str(served)))
    try:
        probs, version = _classify(running.stub, x)
        assert version == read_snapshot(first).version
        np.testing.assert_allclose(probs, Classifier(first, warmup=False).probabilities(x), atol=1e-6)
        shutil.copy(second / "weights.safetensors", served / "weights.safetensors")   # while serving
        sweep = pb.OcclusionRequest(images=pb.Images(tensor=array_to_tensor(x)), window=112, stride=112,
                                    target=3)
        deconv = pb.DeconvRequest(images=pb.Images(tensor=array_to_tensor(x)), layer="conv5", top_k=1)
        # Every RPC still answers from the loaded snapshot, the PyTorch ones (built lazily, after the copy) too.
        again, same = _classify(running.stub, x)
        assert same == version
        np.testing.assert_array_equal(again, probs)
        occlusion = running.stub.OcclusionSweep(sweep)
        with torch.no_grad():
            old_p3, new_p3 = (float(torch.softmax(m(torch.from_numpy(x)), 1)[0, 3]) for m in (old_model, new_model))
        assert occlusion.base_probability == pytest.approx(old_p3, rel=1e-4)
        unit = running.stub.DeconvProject(deconv).projections[0]
        with torch.no_grad():
            assert unit.activation == pytest.approx(float(old_model.trace(torch.from_numpy(x), ("conv5",))
                                                          .activations["conv5"].max()), rel=1e-5)
        outcome = running.call(running.server.reload())
        assert outcome["tiny"] == f"{version} -> {read_snapshot(second).version}"
        probs2, version2 = _classify(running.stub, x)
        assert version2 == read_snapshot(second).version != version
        np.testing.assert_allclose(probs2, Classifier(second, warmup=False).probabilities(x), atol=1e-6)
        assert not np.allclose(probs2, probs, atol=1e-3)
        assert running.stub.OcclusionSweep(sweep).base_probability == pytest.approx(new_p3, rel=1e-4)
        infer = oip.ModelInferRequest(model_name="tiny", raw_input_contents=[x.tobytes()])
        infer.inputs.add(name="image", datatype="FP32", shape=[1, 3, 224, 224])
        assert running.oip.ModelInfer(infer).model_version == oip_version(version2) != oip_version(version)
        # A corrupt file now: the reload fails, the served version stays, no path in what clients see.
        (served / "weights.safetensors").write_bytes(b"not safetensors")
        outcome = running.call(running.server.reload())
        assert outcome["tiny"].startswith("failed:") and str(tmp_path) not in outcome["tiny"]
        assert _classify(running.stub, x)[1] == version2
        listed = running.stub.ListModels(pb.ListModelsRequest()).models[0]
        assert listed.ready and listed.version == version2 and listed.oip_version == oip_version(version2)
    finally:
        running.stop()


def test_a_bad_model_does_not_stop_the_others_and_inputs_are_checked(models, tmp_path):
    _, first, _ = models
    repo = tmp_path / "repo"
    shutil.copytree(first, repo / "good")
    shutil.copytree(first, repo / "bad")
    (repo / "bad" / "weights.safetensors").write_bytes(b"\x00" * 12)
    running = Running(ServerOptions(port=0, model_repository=str(repo)))
    try:
        listed = {m.name: m for m in running.stub.ListModels(pb.ListModelsRequest()).models}
        assert listed["good"].ready and not listed["bad"].ready
        assert "safetensors" in listed["bad"].reason and str(tmp_path) not in listed["bad"].reason
        images = pb.Images(tensor=array_to_tensor(_x(6)))
        err = _rpc_error(running.stub.Classify, pb.ClassifyRequest(model="bad", images=images))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "failed to load" in err.details()
        assert str(tmp_path) not in err.details()
        assert len(running.stub.Classify(pb.ClassifyRequest(model="good", images=images)).predictions) == 1
        invalid = [
            (running.stub.Classify, pb.ClassifyRequest(model="good", images=images, top_k=0), "top_k: 0"),
            (running.stub.DeconvProject, pb.DeconvRequest(model="good", images=images, layer="conv5", top_k=0),
             "top_k: 0"),
            (running.stub.OcclusionSweep, pb.OcclusionRequest(model="good", images=images, stride=0), "stride: 0"),
            (running.stub.OcclusionSweep, pb.OcclusionRequest(model="good", images=images, fill_value=1e308),
             "fill"),
            (running.stub.OcclusionSweep, pb.OcclusionRequest(model="good", images=images, window=1, stride=1),
             "50176 positions; at most 4096"),
        ]
        for method, request, named in invalid:
            err = _rpc_error(method, request)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and named in err.details(), err.details()
        infer = oip.ModelInferRequest(model_name="good", raw_input_contents=[b"\x00" * 16])
        infer.inputs.add(name="image", datatype="FP32", shape=[1 << 40, 1 << 40, 3, 224])
        err = _rpc_error(running.oip.ModelInfer, infer)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "elements" in err.details()
    finally:
        running.stop()


def _rpc_error(method, request, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        method(request, **kwargs)
    return info.value


def test_an_explicit_zero_is_refused_alike_locally_and_on_a_server(models, tmp_path, capsys):
    from zfserve.cli import main
    _, first, _ = models
    image = tmp_path / "in.png"
    image.write_bytes(encode(smooth(np.random.default_rng(7), 240, 260), "PNG"))
    running = Running(ServerOptions(port=0, model=str(first)))
    try:
        for flag in ("--stride", "--window"):
            outputs = []
            for where in (["--model", str(first)], ["--server", running.target]):
                assert main(["occlude", str(image), flag, "0", "--out", str(tmp_path / "o"), *where]) == 2
                outputs.append(capsys.readouterr().err)
            assert f"{flag.lstrip('-')}: 0 out of range" in outputs[0]
            assert f"{flag.lstrip('-')}: 0 out of range" in outputs[1]
    finally:
        running.stop()


def test_bearer_scheme_any_case_and_unknown_methods_hidden_without_the_token(models, tmp_path):
    _, first, _ = models
    token = tmp_path / "token"
    token.write_text(TOKEN)
    running = Running(ServerOptions(port=0, model=str(first), auth_token_file=str(token)))
    try:
        images = pb.Images(tensor=array_to_tensor(_x(8)))
        for scheme in ("Bearer", "bearer", "BEARER"):
            reply = running.stub.Classify(pb.ClassifyRequest(images=images),
                                          metadata=(("authorization", f"{scheme} {TOKEN}"),))
            assert len(reply.predictions) == 1
        unknown = running.channel.unary_unary("/zfserve.v1.ZFServe/NoSuchMethod")
        real = running.channel.unary_unary("/zfserve.v1.ZFServe/ListModels")
        for method in (unknown, real):   # without the token, both look alike
            err = _rpc_error(method, b"")
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = _rpc_error(unknown, b"", metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        running.stop()


# ------------------------------------------------------------------------------------------------ start-up failures
def _serve(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zfserve.cli", "serve", "--port", "0", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def _one_line_failure(result: subprocess.CompletedProcess, *named: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
    for text in named:
        assert text in lines[0], lines[0]


def test_start_up_failures_are_one_line_and_exit_2(models, tmp_path):
    _, first, _ = models
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        result = subprocess.run([sys.executable, "-m", "zfserve.cli", "serve", "--port", port, "--model", str(first)],
                                capture_output=True, text=True, timeout=120)
        _one_line_failure(result, "--host/--port", port, "in use")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    _one_line_failure(_serve("--model", str(first), "--tls-cert", str(key), "--tls-key", str(cert)),
                      "--tls-cert/--tls-key", "swapped")
    corrupt = shutil.copytree(first, tmp_path / "corrupt")
    (corrupt / "weights.safetensors").write_bytes(b"garbage")
    _one_line_failure(_serve("--model", str(corrupt)), "weights.safetensors", "corrupt")
    _one_line_failure(_serve("--model", str(tmp_path / "missing")), "missing", "neither a directory")
    repo = tmp_path / "repo"
    shutil.copytree(first, repo / "a")
    shutil.copytree(corrupt, repo / "b")
    _one_line_failure(_serve("--model-repository", str(repo), "--strict"), "b", "corrupt")


def test_a_full_disk_during_export_is_one_line_and_exit_2(models, tmp_path, monkeypatch, capsys):
    """The export's temporary file is /dev/full, where every write fails with the kernel's ENOSPC."""
    from zfserve import export
    from zfserve.cli import main
    _, first, _ = models
    model = shutil.copytree(first, tmp_path / "model")
    (model / "model.onnx").unlink(missing_ok=True)   # earlier tests may have exported it: export again here
    monkeypatch.setenv("ZFSERVE_CACHE_DIR", str(tmp_path / "cache"))
    real_mkstemp = export.tempfile.mkstemp

    def full_disk(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(export.tempfile, "mkstemp", full_disk)
    # Should the export ever succeed, the server would run: a SIGTERM then ends it (rc 0, the test fails).
    watchdog = threading.Timer(120, lambda: os.kill(os.getpid(), signal.SIGTERM))
    watchdog.start()
    try:
        assert main(["serve", "--port", "0", "--model", str(model)]) == 2
    finally:
        watchdog.cancel()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "ZFSERVE_CACHE_DIR" in err[0], err


def test_status_messages_carry_no_server_path():
    from zfserve.errors import ModelLoadError
    from zfserve.server.status import to_status
    code, message = to_status(ModelLoadError("/srv/models/tiny/weights.safetensors: tensor 'fc6.weight' has "
                                             "shape (1, 2), expected (3, 4)"))
    assert code == grpc.StatusCode.INTERNAL and "/srv" not in message and "weights.safetensors" in message
    assert to_status(ImageSizeError("image: 1x1 is too small", field="image"))[1] == "image: 1x1 is too small"
