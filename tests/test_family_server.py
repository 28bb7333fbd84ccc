"""``zfserve serve`` with a repository of three members of the family: a copy of the embedded zfnet-demo, an
imported AlexNet and an imported VGG16 (torchvision layout, random weights, narrow widths). tritonclient gets
each model's probabilities (tensor and JPEG inputs) within 1e-5 of the local engine (eager PyTorch on the same
preprocessing); the explorer page, in a real browser, shows the VGG16's own layer names as tabs and a unit's
projection, the units being the ones the local deconv engine picks."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from test_explorer_page import (CHROMEDRIVER, CHROMIUM, HAVE_SELENIUM, MISSING, ExplorerServer, _browser, by_id,
                                canvas_pixels, open_page, predictions, script_errors, upload, wait)
from torchvision_reference import randomize, reference
from zfserve.import_torchvision import import_torchvision
from zfserve.preprocess import load_image
from zfserve.weights import EMBEDDED_DIR, read_snapshot

VGG16_CONVS = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2",
               "conv4_3", "conv5_1", "conv5_2", "conv5_3"]
CLASSES = 5


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-repo")
    repo = root / "models"
    repo.mkdir()
    shutil.copytree(EMBEDDED_DIR / "zfnet-demo", repo / "zfnet-demo",
                    ignore=shutil.ignore_patterns("model.onnx", "*.int8.onnx", "index"))
    (root / "classes.txt").write_text("".join(f"thing {i}\n" for i in range(CLASSES)))
    for seed, arch in enumerate(("alexnet", "vgg16")):
        net = randomize(reference(arch, CLASSES, shrink=8, fc=64), seed=40 + seed)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / f"{arch}.safetensors"))
        import_torchvision(root / f"{arch}.safetensors", arch, root / "classes.txt", repo / arch)
    return repo


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    srv = ExplorerServer(["--model-repository", str(repository)],
                         env={"ZFSERVE_CACHE_DIR": str(tmp_path_factory.mktemp("family-cache"))})
    yield srv
    srv.stop()


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (240, 300, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _local(directory, batch: np.ndarray) -> np.ndarray:
    model = read_snapshot(directory).model()
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(batch)), dim=1).numpy()


@pytest.mark.parametrize("name", ["zfnet-demo", "alexnet", "vgg16"])
def test_tritonclient_gets_each_models_probabilities(server, repository, name):
    import tritonclient.grpc as tc
    triton = tc.InferenceServerClient(server.grpc)
    config = read_snapshot(repository / name).config
    jpegs = [_jpeg(seed) for seed in range(3)]
    x = np.stack([load_image(j, config) for j in jpegs])
    want = _local(repository / name, x)
    tensor = tc.InferInput("image", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    encoded = tc.InferInput("image_bytes", [len(jpegs), 1], "BYTES")
    encoded.set_data_from_numpy(np.array(jpegs, dtype=np.object_).reshape(-1, 1))
    for model, inp in ((name, tensor), (f"{name}-bytes", encoded)):
        got = triton.infer(model, [inp]).as_numpy("probabilities")
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert want.max(1).min() < 0.999 and want.shape == (3, len(config.class_names))


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER and HAVE_SELENIUM), reason=MISSING)
def test_explorer_shows_vgg16_layers_and_a_unit(server, repository, tmp_path):
    from zfserve.engine.deconv import DeconvEngine
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(_jpeg(7))
    driver = _browser(tmp_path / "profile")
    try:
        open_page(driver, f"{server.url}#model=vgg16")
        assert by_id(driver, "model-name").text == "vgg16"
        tabs = [tab.text for tab in driver.find_elements("css selector", "#layer-tabs .tab")]
        assert tabs == VGG16_CONVS
        upload(driver, photo)
        wait(driver, lambda d: len(predictions(d)) == 5, "no predictions")
        by_id(driver, "tab-conv4_3").click()
        wait(driver, lambda d: by_id(d, "tab-conv4_3").get_attribute("aria-selected") == "true")
        wait(driver, lambda d: len(d.find_elements("css selector", "#units .unit")) == 9, "no conv4_3 units")
        model = read_snapshot(repository / "vgg16").model()
        expected = [u.channel for u in DeconvEngine(model).project(load_image(photo.read_bytes(), model.config),
                                                                   "conv4_3", top_k=9)]
        cards = driver.find_elements("css selector", "#units .unit")
        assert [int(card.get_attribute("data-channel")) for card in cards] == expected
        projection = driver.execute_script(
            "const c = arguments[0].querySelector('canvas.projection'); c.id = 'first-projection'; return c.width",
            cards[0])
        assert projection > 0 and canvas_pixels(driver, "first-projection")["distinct"] > 10
        assert "layer=conv4_3" in driver.current_url
        open_page(driver, f"{server.url}#model=zfnet-demo&layer=conv4_3")   # a layer this model lacks: its first
        tabs = [tab.text for tab in driver.find_elements("css selector", "#layer-tabs .tab")]
        assert tabs == ["conv1", "conv2", "conv3", "conv4", "conv5"]
        assert by_id(driver, "tab-conv1").get_attribute("aria-selected") == "true"
        assert script_errors(driver) == []
    finally:
        driver.quit()


def test_deconv_and_occlusion_default_to_the_models_last_conv(server):
    from zfserve.client import Client
    with Client(server.grpc) as client:
        units = client.deconv([_jpeg(3)], model="vgg16", top_k=2)
        assert [u.layer for u in units] == ["conv5_3", "conv5_3"]
        result = client.occlude(_jpeg(4), window=112, stride=112, model="alexnet")
        assert result.layer == "conv5" and result.probability.shape == (2, 2)
        info = client.model_info("vgg16")
        assert [layer.name for layer in info.layers][:3] == ["conv1_1", "conv1_2", "pool1"]
        assert '"std": [0.229, 0.224, 0.225]' in info.preprocess_json
