"""Every engine on imported AlexNet and VGG models, against independent references: deconv against autograd's
deconvnet rule on the reference network of ``tests/torchvision_reference.py`` (and Captum), incremental occlusion
against brute force on the reference network, classification on ONNX Runtime / OpenVINO / int8 against eager
fp32, the unit index, the report's sections and the faithfulness maps. Narrow widths (1/8), random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from torchvision_reference import deconv_reference, feature_maps, named_slots, randomize, reference
from zfserve.engine.deconv import DeconvEngine, captum_model
from zfserve.engine.occlusion import OcclusionEngine
from zfserve.errors import InvalidArgumentError
from zfserve.import_torchvision import import_torchvision
from zfserve.weights import read_snapshot

CLASSES = 7
RTOL = 1e-5
HAS_OPENVINO = __import__("importlib").util.find_spec("openvino") is not None


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """{arch: (reference net, model directory, loaded model)} for a narrow AlexNet and VGG16-BN (imported)."""
    root = tmp_path_factory.mktemp("engines")
    (root / "classes.txt").write_text("".join(f"c{i}\n" for i in range(CLASSES)))
    out = {}
    for seed, arch in enumerate(("alexnet", "vgg16_bn")):
        net = randomize(reference(arch, CLASSES, shrink=8, fc=64), seed=20 + seed)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / f"{arch}.safetensors"))
        directory = import_torchvision(root / f"{arch}.safetensors", arch, root / "classes.txt", root / arch)
        out[arch] = (net, directory, read_snapshot(directory).model())
    return out


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(12))


def relative_error(ours, ref) -> float:
    return float((ours - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------------------------- deconv
DECONV_LAYERS = [("alexnet", name) for name in ("conv1", "pool1", "conv2", "conv5", "pool5")] + \
    [("vgg16_bn", name) for name in ("conv1_2", "pool1", "conv2_2", "conv3_3", "pool3", "conv4_3", "conv5_3",
                                     "pool5")]


@pytest.mark.parametrize("arch, layer", DECONV_LAYERS)
def test_deconv_of_the_nine_strongest_units_matches_autograd(family, images, arch, layer):
    net, _, model = family[arch]
    k = min(9, model.channels()[layer])     # the narrow first block has 8 maps
    units = DeconvEngine(model).project(images[:1], layer, top_k=k)
    assert len(units) == k and units[0].activation >= units[-1].activation > 0
    ref, act = deconv_reference(net, images, named_slots(net)[layer],
                                [(u.image_index, u.channel, u.y, u.x) for u in units])
    for i, unit in enumerate(units):
        assert unit.activation == pytest.approx(float(act[i]), rel=1e-5, abs=1e-6)
        assert relative_error(torch.from_numpy(unit.projection), ref[i] * unit.activation) < RTOL, (layer, i)
        x0, y0, x1, y1 = unit.box           # nothing outside the receptive field
        outside = unit.projection.copy()
        outside[:, y0:y1, x0:x1] = 0
        assert not outside.any()


def test_deconv_matches_captum(family, images):
    captum_attr = pytest.importorskip("captum.attr")
    _, _, model = family["vgg16_bn"]
    twin = captum_model(model)
    engine = DeconvEngine(model)
    for layer in ("conv5_3", "pool4"):
        deconv = captum_attr.NeuronDeconvolution(twin, getattr(twin, layer))
        for unit in engine.project(images[1:], layer, top_k=2, seed="one"):
            theirs = deconv.attribute(images[1:2], neuron_selector=(unit.channel, unit.y, unit.x))[0]
            assert relative_error(torch.from_numpy(unit.projection), theirs) < RTOL


def test_vgg_unpool_is_the_2x2_adjoint():
    """VGG's 2x2/2 unpool from int8 switches against max-pool's autograd backward (odd sides included)."""
    from zfserve.kernels import max_pool_with_switches, unpool_sum
    x = torch.randn(2, 5, 15, 14, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    pooled, switches = max_pool_with_switches(x.detach(), 2, 2, ceil_mode=False)
    grad = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(3))
    torch.nn.functional.max_pool2d(x, 2, 2).backward(grad)
    assert int(switches.max()) <= 3
    torch.testing.assert_close(unpool_sum(grad, switches, (15, 14), kernel=2, stride=2), x.grad, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- occlusion
def brute_force(net, image: torch.Tensor, window: int, stride: int, slot: int | None):
    """Occlude-and-forward on the reference network: probabilities (ny, nx, C) and a layer's per-channel sums."""
    from zfserve.engine.results import window_starts
    starts = window_starts(224, window, stride)
    batch = image[None].repeat(len(starts) ** 2, 1, 1, 1)
    for i, (y, x) in enumerate((y, x) for y in starts for x in starts):
        batch[i, :, y:y + window, x:x + window] = 0.0
    with torch.no_grad():
        probs = torch.softmax(net(batch).double(), 1).numpy().reshape(len(starts), len(starts), -1)
        sums = None if slot is None else feature_maps(net, batch, slot).double().sum((2, 3)).numpy()
    return probs, None if sums is None else sums.reshape(len(starts), len(starts), -1)


# window 32 / stride 16 (the acceptance's sweep) once per member; coarser sweeps for the other layers and the
# torch backend (the GPU path), to keep the brute force short.
@pytest.mark.parametrize("arch, layer, backend, window, stride", [
    ("alexnet", "conv1", "onnxruntime", 32, 16), ("alexnet", "pool2", "torch", 48, 32),
    ("vgg16_bn", "conv5_3", "onnxruntime", 32, 16), ("vgg16_bn", "conv2_1", "onnxruntime", 48, 32),
    ("vgg16_bn", "pool4", "torch", 48, 32)])
def test_occlusion_equals_brute_force(family, images, arch, layer, backend, window, stride):
    net, _, model = family[arch]
    engine = OcclusionEngine(model, backend=backend, batch_size=64)
    result = engine.sweep(images[0], window=window, stride=stride, layer=layer)
    probs, sums = brute_force(net, images[0], window, stride, named_slots(net)[layer])
    assert result.probability.shape == probs.shape[:2]
    np.testing.assert_allclose(result.probability, probs[..., result.target], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(result.argmax, probs.argmax(-1))
    activity = sums[..., result.channel]
    np.testing.assert_allclose(result.activity, activity, rtol=1e-5, atol=1e-5 * np.abs(activity).max())
    assert result.layer == layer and result.probability.std() > 0


def test_occlusion_defaults_to_the_last_conv_and_pixel_fills(family, images):
    net, _, model = family["vgg16_bn"]
    result = OcclusionEngine(model).sweep(images[0], window=112, stride=112, fill=(124, 116, 104),
                                          fill_units="pixel", outputs=("probability", "activity"))
    assert result.layer == "conv5_3"
    colour = (np.array([124, 116, 104]) / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    batch = images[:1].repeat(4, 1, 1, 1)
    for i, (y, x) in enumerate(((0, 0), (0, 112), (112, 0), (112, 112))):
        batch[i, :, y:y + 112, x:x + 112] = torch.tensor(colour, dtype=torch.float32)[:, None, None]
    with torch.no_grad():
        want = torch.softmax(net(batch).double(), 1)[:, result.target].numpy().reshape(2, 2)
    np.testing.assert_allclose(result.probability, want, atol=1e-5)
    with pytest.raises(InvalidArgumentError) as info:   # 0..255 pixels lie within +-255 / 255 / 0.224 here
        OcclusionEngine(model).sweep(images[0], window=112, stride=112, fill=10.0)
    assert info.value.field == "fill" and "-4.46429..4.46429" in str(info.value)


# ---------------------------------------------------------------------------------------------- classification
@pytest.fixture(scope="module")
def probabilities(family, images):
    net = family["vgg16_bn"][0]
    with torch.no_grad():
        return torch.softmax(net(images), 1).numpy()


@pytest.mark.parametrize("engine", ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(
    not HAS_OPENVINO, reason="openvino not installed"))])
def test_classifier_fp32_equals_the_reference(family, images, probabilities, engine, tmp_path, monkeypatch):
    from zfserve.engine.classifier import Classifier
    monkeypatch.setenv("ZFSERVE_CACHE_DIR", str(tmp_path))
    clf = Classifier(family["vgg16_bn"][1], engine=engine, warmup=False)
    np.testing.assert_allclose(clf.probabilities(images.numpy()), probabilities, atol=1e-5, rtol=0)


def test_int8_calibrates_and_gates_on_a_family_model(family, tmp_path, monkeypatch):
    """The int8 pipeline runs on an imported VGG (calibration, the gate, metadata); agreement on random weights
    means little (near-tie logits), so the gate is opened here: benchmarks/test_family.py measures agreement on
    a trained model."""
    import json

    from zfserve.engine.quantize import META_ACCURACY, Int8Settings, ensure_int8
    from zfserve.export import ensure_onnx, read_metadata
    monkeypatch.setenv("ZFSERVE_CACHE_DIR", str(tmp_path))
    snapshot = read_snapshot(family["vgg16_bn"][1])
    int8 = ensure_int8(ensure_onnx(snapshot), snapshot.config,
                       Int8Settings(calibration_images=16, accuracy_images=32, max_accuracy_drop=100))
    accuracy = json.loads(read_metadata(int8)[META_ACCURACY])
    assert accuracy["n"] == 32 and 0 <= accuracy["agreement"] <= 1 and "top1" not in accuracy   # no labels


# ---------------------------------------------------------------------------------------------- analyses
def test_unit_index_uses_the_models_layer_names(family, tmp_path, monkeypatch):
    from zfserve.paper.unit_index import build_index, find_index
    monkeypatch.setenv("ZFSERVE_CACHE_DIR", str(tmp_path))
    directory = family["vgg16_bn"][1]
    built = build_index(directory, "synthetic", n=4, seed=9, layers=["conv3_3", "conv5_3"], batch_size=4)
    assert built.layers == ["conv3_3", "conv5_3"] and find_index(directory).layers == built.layers
    units = built.units("conv5_3", 1)
    assert len(units) == 4 and units[0]["activation"] >= units[-1]["activation"]
    with pytest.raises(InvalidArgumentError):
        built.units("conv5", 1)              # ZFNet's name, not this model's
    with pytest.raises(InvalidArgumentError) as info:
        build_index(directory, "synthetic", n=4, layers=["conv5"])
    assert "conv5_3" in str(info.value)


def test_faithfulness_maps_on_vgg(family, images):
    """Grad-CAM and the deconvnet map read the model's last conv (conv5_3); Grad-CAM against Captum's."""
    captum = pytest.importorskip("captum.attr")
    from zfserve.paper.saliency import SaliencyMaps, mprt_order
    _, _, model = family["vgg16_bn"]
    maps = SaliencyMaps(model, window=112, stride=112)
    image = images[0].numpy()
    got = maps.maps(image, 2, 0, methods=("gradcam", "deconvnet", "occlusion"))
    assert maps.layer == "conv5_3" and all(np.isfinite(m).all() and m.shape == (224, 224) for m in got.values())
    _, acts, grads = maps.gradients(image, 2)
    cam = captum.LayerGradCam(model, model.relu5_3).attribute(images[:1], target=2, relu_attributions=True)
    np.testing.assert_allclose(maps.gradcam(acts, grads), maps.upsample @ cam[0, 0].detach().double().numpy() @
                               maps.upsample.T, rtol=1e-4, atol=1e-9)
    assert mprt_order(model)[:4] == ("fc8", "fc7", "fc6", "conv5_3") and mprt_order(model)[-1] == "conv1_1"


def test_report_notes_the_zfnet_only_sections(family, tmp_path):
    import json

    from zfserve.paper.report import Settings, build
    _, _, model = family["alexnet"]
    build(model, tmp_path, ("architecture", "evolution", "filters"), Settings(n=2))
    for name in ("architecture", "evolution"):
        note = json.loads((tmp_path / f"section-{name}.json").read_text())["note"]
        assert "ZFNet" in note and "alexnet" in note
    assert (tmp_path / "filters.png").is_file() and "not produced" in (tmp_path / "report.html").read_text()


def test_audit_runs_on_an_imported_model(family, tmp_path, monkeypatch):
    import json

    from zfserve import cli
    monkeypatch.setenv("ZFSERVE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "audit"
    assert cli.main(["audit", "synthetic:3", "--model", str(family["vgg16_bn"][1]), "--out", str(out),
                     "--occlusion", "112,112"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 3 and summary["status"]["ok"] == 3 and summary["pointing_game"]["images"] == 3
