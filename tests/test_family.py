"""ZFNet's family: torchvision-layout AlexNet and VGG imported with the user's weights, against an independent
reference written in the tests (``tests/torchvision_reference.py``, from the published layer tables).

Random weights (He-scaled, random biases and BN statistics so folding is exercised); narrow widths (1/8) for
speed except one full-size VGG16; fresh random inputs in torchvision's units (about N(0, 1)).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from torchvision_reference import PARAMETERS, randomize, reference
from zfserve import cli
from zfserve.config import ModelConfig
from zfserve.errors import ModelLoadError
from zfserve.import_torchvision import import_torchvision
from zfserve.model import build
from zfserve.weights import CONFIG_FILE, load_model, read_snapshot

LOGIT_RTOL = 1e-4     # of the logits' largest magnitude (the acceptance line)
CLASSES = 7
NARROW = dict(shrink=8, fc=64)
FAMILY = ("alexnet", "vgg16", "vgg16_bn")


def write_weights(net: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def write_classes(path: Path, n: int = CLASSES) -> Path:
    path.write_text("".join(f"class {i}\n" for i in range(n)))
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """{arch: (reference net, imported model directory)} for the narrow AlexNet, VGG16 and VGG16-BN."""
    root = tmp_path_factory.mktemp("family")
    classes = write_classes(root / "classes.txt")
    out = {}
    for seed, arch in enumerate(FAMILY):
        net = randomize(reference(arch, CLASSES, **NARROW), seed=seed)
        directory = import_torchvision(write_weights(net, root / f"{arch}.safetensors"), arch, classes, root / arch)
        out[arch] = (net, directory)
    return out


def inputs(n: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---------------------------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("arch", ["alexnet", "vgg11", "vgg13", "vgg16", "vgg19"])
def test_parameter_counts_are_the_published_ones(arch):
    with torch.device("meta"):
        model = build(ModelConfig(architecture=arch))
        ref = reference(arch, 1000)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[arch] == sum(p.numel() for p in ref.parameters())


def test_paper_zfnet_is_unchanged_by_the_family():
    with torch.device("meta"):
        model = build(ModelConfig())
    assert sum(p.numel() for p in model.parameters()) == 62_357_608
    assert model.layer_names == ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6",
                                 "fc7", "fc8")
    assert "architecture" not in ModelConfig().to_json()            # ZFNet configs are written as before


def test_vgg_layer_names_follow_the_documented_scheme():
    names = ModelConfig(architecture="vgg16").layer_names()
    assert names[:3] == ("conv1_1", "conv1_2", "pool1") and names[-5:] == ("conv5_3", "pool5", "fc6", "fc7", "fc8")
    assert len([n for n in names if n.startswith("conv")]) == 13 and ModelConfig(architecture="vgg16").last_conv \
        == "conv5_3"


def test_spatial_sizes_match_the_reference_forward():
    net = reference("vgg16", CLASSES, **NARROW).eval()
    model = build(ModelConfig(architecture="vgg16", widths=tuple(max(1, w // 8) for w in
                                                                   ModelConfig(architecture="vgg16").widths),
                              num_classes=CLASSES, fc_width=64))
    shapes, x = [], torch.zeros(1, 3, 224, 224)
    for layer in net.features:
        x = layer(x)
        if isinstance(layer, (torch.nn.ReLU, torch.nn.MaxPool2d)):
            shapes.append(x.shape[-1])
    with torch.no_grad():
        trace = model.trace(torch.zeros(1, 3, 224, 224), switches=True)
    assert [trace.activations[n].shape[-1] for n in model.spatial_layers] == shapes
    assert set(trace.switches) == set(model.pool_layers) and int(trace.switches["pool3"].max()) <= 3


# ---------------------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("arch", FAMILY)
def test_imported_logits_equal_the_reference(imported, arch):
    net, directory = imported[arch]
    model = load_model(directory)
    x = inputs()
    with torch.no_grad():
        want, got = net(x).numpy(), model(x).numpy()
    assert relative(got, want) < LOGIT_RTOL
    assert np.abs(want).max() > 1.0     # logits with a spread, not ~0


@pytest.mark.parametrize("arch", FAMILY)
def test_onnx_export_logits_equal_the_reference(imported, arch, tmp_path, monkeypatch):
    import onnxruntime as ort

    from zfserve.export import ensure_onnx, read_metadata
    monkeypatch.setenv("ZFSERVE_CACHE_DIR", str(tmp_path / "cache"))
    net, directory = imported[arch]
    path = ensure_onnx(read_snapshot(directory))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = inputs(seed=6)
    got = session.run(["logits"], {"image": x.numpy()})[0]
    with torch.no_grad():
        want = net(x).numpy()
    assert relative(got, want) < LOGIT_RTOL
    preprocess = json.loads(read_metadata(path)["zfserve.preprocess"])
    assert preprocess["std"] == pytest.approx([0.229, 0.224, 0.225]) and preprocess["scale"] == pytest.approx(1 / 255)


def test_full_size_vgg16_imports_and_matches(tmp_path):
    net = randomize(reference("vgg16", 1000), seed=11)
    directory = import_torchvision(write_weights(net, tmp_path / "vgg16.safetensors"), "vgg16",
                                   write_classes(tmp_path / "classes.txt", 1000), tmp_path / "vgg16")
    model = load_model(directory)
    assert model.config.widths == (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    assert (model.config.fc_width, model.config.num_classes) == (4096, 1000)
    x = inputs(1, seed=7)
    with torch.no_grad():
        assert relative(model(x).numpy(), net(x).numpy()) < LOGIT_RTOL


def test_batchnorm_is_folded_into_the_convs(imported):
    net, directory = imported["vgg16_bn"]
    state = read_snapshot(directory).tensors
    assert not any("running" in k or "bn" in k for k in state) and read_snapshot(directory).config.architecture \
        == "vgg16"
    conv, bn = net.features[0], net.features[1]    # fold by hand: w * s, (b - mean) * s + beta
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(state["conv1_1.weight"], conv.weight * s[:, None, None, None], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(state["conv1_1.bias"], (conv.bias - bn.running_mean) * s + bn.bias,
                               rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- preprocessing
def test_torchvision_preprocessing_is_torchvisions(imported, tmp_path):
    """resize 256 (bilinear, antialiased), centre crop 224, / 255, ImageNet mean and std, computed here by hand
    with Pillow, against the one preprocessing path."""
    from PIL import Image

    from zfserve.preprocess import load_image, to_display
    config = read_snapshot(imported["vgg16"][1]).config
    rgb = np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in.png")
    resized = np.asarray(Image.fromarray(rgb).resize((341, 256), Image.BILINEAR), dtype=np.float32)
    top, left = (256 - 224) // 2, (341 - 224) // 2
    crop = resized[top:top + 224, left:left + 224] / 255.0
    want = ((crop - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])).transpose(2, 0, 1)
    got = load_image(tmp_path / "in.png", config)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(to_display(got, config), np.rint(crop * 255).astype(np.uint8))


def test_alpha_composites_onto_the_mean_colour(imported):
    from zfserve.preprocess import load_image
    config = read_snapshot(imported["alexnet"][1]).config
    transparent = np.zeros((256, 256, 4), np.uint8)
    np.testing.assert_allclose(load_image(transparent, config), 0.0, atol=0.01)   # within a pixel's rounding


# ---------------------------------------------------------------------------------------------- import errors
def run_cli(args) -> tuple[int, str]:
    run = subprocess.run([sys.executable, "-m", "zfserve.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=300)
    return run.returncode, run.stderr


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """A narrow VGG16's state dict, and ways to break it."""
    root = tmp_path_factory.mktemp("broken")
    state = {k: v.contiguous() for k, v in randomize(reference("vgg16", CLASSES, **NARROW), seed=3).state_dict().items()}
    return root, state, write_classes(root / "classes.txt")


def import_error(root: Path, name: str, state: dict | None, arch: str, classes: Path, *, raw: bytes | None = None):
    """Run the CLI on a weights file; assert one line, exit 2, nothing written; return the line."""
    weights = root / f"{name}.safetensors"
    if raw is not None:
        weights.write_bytes(raw)
    else:
        save_file(state, str(weights))
    out = root / f"out-{name}"
    code, err = run_cli(["import", "torchvision", weights, "--arch", arch, "--classes", classes, "--out", out])
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists() and not [p for p in root.iterdir() if p.name.startswith(f".out-{name}")]
    return err


def test_import_refuses_a_truncated_file(broken):
    root, state, classes = broken
    save_file(state, str(root / "whole.safetensors"))
    data = (root / "whole.safetensors").read_bytes()
    err = import_error(root, "truncated", None, "vgg16", classes, raw=data[:len(data) // 2])
    assert "truncated" in err


def test_import_refuses_a_missing_key(broken):
    root, state, classes = broken
    err = import_error(root, "missing", {k: v for k, v in state.items() if k != "features.7.weight"}, "vgg16", classes)
    assert "'features.7.weight' is missing" in err


def test_import_refuses_a_wrong_shape(broken):
    root, state, classes = broken
    bad = dict(state, **{"features.5.weight": torch.randn(16, 9, 3, 3)})
    err = import_error(root, "shape", bad, "vgg16", classes)
    assert "features.5.weight: shape (16, 9, 3, 3); expected (C, 8, 3, 3)" in err and "conv2_1" in err


def test_import_refuses_a_mismatched_architecture(broken):
    root, state, classes = broken
    err = import_error(root, "arch", state, "vgg11", classes)
    assert "vgg11" in err and "features." in err and "the keys fit vgg16" in err
    err = import_error(root, "bn", state, "vgg16_bn", classes)
    assert "'features.1.weight' is missing" in err


def test_import_refuses_a_wrong_class_count(broken):
    root, state, classes = broken
    err = import_error(root, "classes", state, "vgg16", write_classes(root / "three.txt", 3))
    assert "3 classes" in err and f"{CLASSES}" in err and "classifier.6.weight" in err


def test_pth_is_read_with_the_weights_only_loader(broken, tmp_path):
    root, state, classes = broken
    torch.save({"state_dict": state}, tmp_path / "vgg.pth")
    code, err = run_cli(["import", "torchvision", tmp_path / "vgg.pth", "--arch", "vgg16", "--classes", classes,
                         "--out", tmp_path / "ok"])
    assert code == 0, err
    assert (tmp_path / "ok" / CONFIG_FILE).is_file()

    class Payload:   # a pickle that would run code under a plain pickle load
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"features.0.weight": Payload()}))
    code, err = run_cli(["import", "torchvision", tmp_path / "evil.pth", "--arch", "vgg16", "--classes", classes,
                         "--out", tmp_path / "evil"])
    assert code == 2 and err.count("\n") == 1 and "weights-only" in err, err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "evil").exists()


def test_import_refuses_an_existing_directory(imported, broken):
    root, state, classes = broken
    save_file(state, str(root / "again.safetensors"))
    with pytest.raises(ModelLoadError, match="already exists"):
        import_torchvision(root / "again.safetensors", "vgg16", classes, imported["vgg16"][1])


def test_cli_import_prints_the_model(broken, tmp_path, capsys):
    root, state, classes = broken
    save_file(state, str(tmp_path / "w.safetensors"))
    assert cli.main(["import", "torchvision", str(tmp_path / "w.safetensors"), "--arch", "vgg16", "--classes",
                     str(classes), "--out", str(tmp_path / "m"), "--name", "my-vgg"]) == 0
    printed = capsys.readouterr().out
    assert "my-vgg" in printed and "vgg16" in printed
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert config["architecture"] == "vgg16" and config["class_names"][0] == "class 0"
    assert config["preprocess"]["scale"] == pytest.approx(1 / 255) and config["provenance"]["torchvision_arch"] \
        == "vgg16"


def test_info_shows_the_architecture_and_preprocessing(imported, capsys):
    directory = imported["vgg16_bn"][1]
    assert cli.main(["info", "--model", str(directory)]) == 0
    text = capsys.readouterr().out
    assert "vgg16" in text and "conv5_3" in text and "pixels x 0.00392157" in text and "(0.229, 0.224, 0.225)" in text
    assert cli.main(["info", "--model", str(directory), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["architecture"] == "vgg16" and doc["layers"][0]["name"] == "conv1_1"
    assert doc["preprocess"]["std"] == [0.229, 0.224, 0.225]
