"""Reloads under load: 16 clients classify large JPEGs (decoding takes a while, so requests are always between
picking their runtime and reaching the batcher) while the model's weights are replaced and reloaded three times.
Every request must succeed, and each answer must be the one the version it reports gives, exactly: the old
version or the new one, never a mix within one request (checked against each version's own outputs)."""

from __future__ import annotations

import io
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from zfserve import wire
from zfserve._proto.v1 import zfserve_pb2 as pb
from zfserve._proto.v1 import zfserve_pb2_grpc as pb_grpc
from zfserve.server import BackgroundServer, BatcherConfig, ServerOptions

CLIENTS = 16
RELOADS = 3
WIDTHS = (16, 32, 32, 32, 32)


def _jpeg(seed: int, size=(1400, 1100)) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 50, size[0] // 50, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize(size, Image.BILINEAR).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _save(spread_model, directory, seed: int) -> str:
    from zfserve.weights import read_snapshot, save_model
    save_model(spread_model(seed=seed, widths=WIDTHS, num_classes=6), directory, name="tiny",
               class_names=[f"c{i}" for i in range(6)])
    return read_snapshot(str(directory)).version


def _reference(directory, images: list[bytes]) -> np.ndarray:
    """The served version's probabilities for ``images``, from ONNX Runtime outside the server."""
    from zfserve.engine.classifier import Classifier
    from zfserve.preprocess import load_images
    classifier = Classifier(str(directory), warmup=False)
    return classifier.probabilities(load_images(images, classifier.config, field="image"))


def test_reloads_under_load_lose_no_request(spread_model, tmp_path):
    directory = tmp_path / "tiny"
    images = [_jpeg(seed) for seed in range(4)]
    versions = {_save(spread_model, directory, 100): None}
    options = ServerOptions(port=0, model=str(directory), batching=BatcherConfig(max_batch_size=8,
                                                                                 max_queue_delay_us=2000))
    answers, errors, stop = [], [], threading.Event()

    def client(i: int):
        with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            stub = pb_grpc.ZFServeStub(channel)
            while not stop.is_set():
                k = (i + len(answers)) % len(images)
                try:
                    r = stub.Classify(pb.ClassifyRequest(images=pb.Images(encoded=[images[k]]),
                                                         return_probabilities=True), timeout=120)
                    answers.append((r.model_version, k, wire.probabilities(r)[0]))
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")

    with BackgroundServer(options) as server:
        versions[next(iter(versions))] = _reference(directory, images)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        outcomes = []
        for n in range(RELOADS):
            time.sleep(1.0)
            version = _save(spread_model, directory, 101 + n)
            versions[version] = _reference(directory, images)
            outcomes.append(server.call(server.server.reload())["tiny"])
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(120)
        retiring = server.server._retiring
        deadline = time.monotonic() + 30
        while retiring and time.monotonic() < deadline:   # replaced runtimes close after their last request
            time.sleep(0.05)
        assert not retiring
    assert not errors, errors[:5]
    assert len(versions) == RELOADS + 1 and all(" -> " in o for o in outcomes), outcomes
    seen = {version for version, _, _ in answers}
    assert seen <= set(versions) and len(seen) >= 3, (seen, set(versions))
    for version, k, probs in answers:   # each answer is its version's own, for its image
        np.testing.assert_allclose(probs, versions[version][k], atol=1e-5, err_msg=version)
    assert len(answers) > 4 * CLIENTS


@pytest.mark.parametrize("runs", [2])
def test_concurrent_reloads_rebuild_once(spread_model, tmp_path, runs):
    directory = tmp_path / "tiny"
    first = _save(spread_model, directory, 1)
    with BackgroundServer(ServerOptions(port=0, model=str(directory))) as server:
        second = _save(spread_model, directory, 2)

        async def both():
            import asyncio
            return await asyncio.gather(*(server.server.reload() for _ in range(runs)))
        outcomes = [o["tiny"] for o in server.call(both())]
    assert outcomes == [f"{first} -> {second}", "unchanged"]
