"""The out-of-distribution score of imported models (``zfserve import torchvision ... --calibration DIR``) and the
per-precision thresholds (zfserve.engine.ood_fit.precision_threshold).

Narrow random-weight AlexNet and VGG11 in torchvision's layout (``tests/torchvision_reference.py``, independent of
zfserve) are imported with a generated ImageFolder of held-out images (renderings of the synthetic set). Checked:
the features the served graph gives the score equal the reference network's (its fc7, its conv-after-the-first-pool
channel statistics, its logits, computed here from the reference's own modules); a fresh in-distribution image is
accepted and photographs are flagged; ``zfserve info`` says so; without ``--calibration`` the answers say there is
no score and name the command that fits it. Then int8: its own threshold accepts the asked share of the threshold
images when scored by the int8 graph, is stored beside the statistics and read back, and a refit makes it stale.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from torchvision_reference import randomize, reference
from zfserve.engine import ood, ood_fit

CLASSES = 5
NARROW = dict(shrink=8, fc=64)
FOLDER_IMAGES = 48            # 24 fitted, 24 threshold
ARCHS = ("alexnet", "vgg11")
# The conv after the first pool (what the low-level detector reads) and the penultimate fc, as the reference
# network's module indices: features[:5] ends at conv2's ReLU (AlexNet) and conv2_1's (VGG11); classifier[:6] at
# fc7's ReLU (AlexNet) or the eval-mode dropout after it (VGG).
LOW_LEVEL = {"alexnet": ("conv2", 5), "vgg11": ("conv2_1", 5)}


def zfserve(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zfserve.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def write_folder(root: Path, seed: int, n: int) -> Path:
    """An ImageFolder of ``n`` synthetic renderings in two class folders (names that are not the model's)."""
    from zfserve.data import render_images
    for i, image in enumerate(render_images(seed, range(n))):
        folder = root / ("left" if i % 2 else "right")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """{arch: (reference net, model directory fitted with --calibration)} and the ImageFolder."""
    root = tmp_path_factory.mktemp("family-ood")
    folder = write_folder(root / "held-out", seed=21, n=FOLDER_IMAGES)
    (root / "classes.txt").write_text("".join(f"kind {i}\n" for i in range(CLASSES)))
    out = {}
    for seed, arch in enumerate(ARCHS):
        net = randomize(reference(arch, CLASSES, **NARROW), seed=seed + 11)
        weights = root / f"{arch}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
        run = zfserve("import", "torchvision", weights, "--arch", arch, "--classes", root / "classes.txt",
                      "--out", root / arch, "--calibration", folder)
        assert run.returncode == 0, run.stderr
        assert f"imported {arch}" in run.stdout and "out-of-distribution statistics (fitted)" in run.stdout
        out[arch] = (net, root / arch)
    return out, folder


def reference_features(net, x: torch.Tensor, arch: str) -> dict:
    """The score's inputs from the reference network's own modules (not zfserve's trace)."""
    low_name, low_slot = LOW_LEVEL[arch]
    with torch.no_grad():
        low = net.features[:low_slot](x).numpy().astype(np.float64)
        flat = torch.flatten(net.avgpool(net.features(x)), 1)
        fc7 = net.classifier[:6](flat).numpy()
        logits = net(x).numpy()
    stats = np.concatenate([low.mean(axis=(2, 3)), low.std(axis=(2, 3))], axis=1)
    return {"fc7": fc7, "logits": logits, f"{low_name}.channel_stats": stats}


def inputs_of(images, config) -> np.ndarray:
    from zfserve.preprocess import to_input
    return np.stack([to_input(np.asarray(img), config) for img in images])


@pytest.mark.parametrize("arch", ARCHS)
def test_import_fits_a_score_on_the_reference_networks_features(imported, arch):
    from zfserve.data import render_images
    from zfserve.data.probes import photos
    from zfserve.engine.classifier import Classifier
    net, directory = imported[0][arch]
    classifier = Classifier(str(directory), warmup=False)
    detector = classifier.ood_detector
    low_name = LOW_LEVEL[arch][0]
    assert detector is not None and classifier.ood_note == ""
    assert detector.method == f"vim(fc7) + knn(fc7) + gaussian({low_name}.channel_stats)"
    assert detector.record["fitted_images"] == FOLDER_IMAGES // 2 == detector.record["threshold_images"]
    fresh = inputs_of(render_images(22, range(12)), classifier.config)       # held out, never fitted on
    noise = inputs_of(np.random.default_rng(7).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8), classifier.config)
    pictures = inputs_of([rgb for _, rgb in photos()[:6]], classifier.config)
    x = np.concatenate([fresh, noise, pictures])
    served = np.array([v.score for v in classifier.scored(x).ood])
    expected = detector.score(reference_features(net, torch.from_numpy(x), arch))
    np.testing.assert_allclose(served, expected, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(expected).max())))
    flagged = served > detector.threshold
    assert flagged[:12].sum() <= 3, served           # about 95% of in-distribution images pass (24 set the threshold)
    assert flagged[12:15].all(), served               # noise is nothing like a rendering
    # Random weights know little of photographs; they still score above the renderings' typical image.
    assert np.median(served[15:]) > np.median(served[:12]), served


def test_info_shows_the_imported_models_score(imported):
    directory = imported[0]["vgg11"][1]
    run = zfserve("info", "--model", directory, "--json")
    assert run.returncode == 0, run.stderr
    described = json.loads(run.stdout)["ood"]
    assert described["available"] and described["method"].startswith("vim(fc7)")
    assert str(imported[1]) in described["data"] and described["threshold_precision"] == "fp32"
    text = zfserve("info", "--model", directory).stdout
    assert "out-of-distribution score: vim(fc7) + knn(fc7) + gaussian(conv2_1.channel_stats)" in text


def test_without_calibration_answers_name_the_command_that_fits(imported, tmp_path):
    net = randomize(reference("alexnet", CLASSES, **NARROW), seed=3)
    weights = tmp_path / "a.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"kind {i}\n" for i in range(CLASSES)))
    run = zfserve("import", "torchvision", weights, "--arch", "alexnet", "--classes", classes, "--out",
                  tmp_path / "plain")
    assert run.returncode == 0, run.stderr
    assert "not fitted" in run.stdout and not (tmp_path / "plain" / ood.OOD_META).exists()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "grey.png")
    run = zfserve("classify", tmp_path / "grey.png", "--model", tmp_path / "plain", "--json")
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)[0]
    assert answer["ood"] is None
    assert "no out-of-distribution score" in answer["ood_note"]
    assert "zfserve export --model <its directory> --calibration DIR" in answer["ood_note"]


def test_a_failed_fit_leaves_nothing(tmp_path):
    net = randomize(reference("vgg11", CLASSES, **NARROW), seed=4)
    weights = tmp_path / "v.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"kind {i}\n" for i in range(CLASSES)))
    small = write_folder(tmp_path / "small", seed=23, n=6)          # fewer than the fit's 2 x 10
    run = zfserve("import", "torchvision", weights, "--arch", "vgg11", "--classes", classes, "--out",
                  tmp_path / "m", "--calibration", small)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert "at least 20" in run.stderr and not (tmp_path / "m").exists()
    run = zfserve("import", "torchvision", weights, "--arch", "vgg11", "--classes", classes, "--out",
                  tmp_path / "m", "--calibration", tmp_path / "nowhere")
    assert run.returncode == 2 and "--calibration" in run.stderr and not (tmp_path / "m").exists(), run.stderr


# ---------------------------------------------------------------------------------------------- per precision
def test_int8_gets_its_own_threshold_at_the_asked_acceptance(imported, monkeypatch):
    from zfserve.engine.classifier import Classifier
    from zfserve.engine.quantize import Int8Settings
    from zfserve.weights import read_snapshot
    directory = imported[0]["vgg11"][1]
    snapshot = read_snapshot(directory)
    settings = Int8Settings(calibration=str(imported[1]), calibration_images=8, accuracy_images=8,
                            max_accuracy_drop=100.0)
    int8 = Classifier(snapshot, precision="int8", int8=settings, warmup=False)
    fp32 = Classifier(snapshot, warmup=False)
    detector = int8.ood_detector
    assert detector.describe()["threshold_precision"] == "int8"
    assert detector.record["fp32_threshold"] == fp32.ood_detector.threshold
    # Independently: the threshold images (alternate images of the folder's evenly spaced subset, the second of
    # each pair) scored by the int8 graph; the threshold is their 95% quantile.
    from zfserve.data.folders import folder_entries
    from zfserve.preprocess import decode_image, resize_and_crop
    entries, _ = folder_entries(imported[1])
    chosen = np.unique(np.linspace(0, len(entries) - 1, FOLDER_IMAGES).round().astype(int))[1::2]
    size = snapshot.config.preprocess.resize
    x = inputs_of([resize_and_crop(decode_image(entries[i].path), size, size) for i in chosen], snapshot.config)
    scores = np.array([v.score for v in int8.scored(x).ood])
    assert detector.threshold == pytest.approx(float(np.quantile(scores, detector.acceptance)), rel=1e-4, abs=1e-6)
    assert np.mean(scores <= detector.threshold) == pytest.approx(detector.record["accepted_on_threshold_images"])
    stored = directory / ood.precision_file("int8", "onnxruntime")
    meta = json.loads(stored.read_text())
    assert meta["threshold"] == detector.threshold and meta["graph"]["calibration"]["images"] == 8
    # Read back, not scored again.
    monkeypatch.setattr(ood_fit, "threshold_half", lambda *a, **k: pytest.fail("scored the threshold images again"))
    again = Classifier(snapshot, precision="int8", int8=settings, warmup=False)
    assert again.ood_detector.threshold == detector.threshold
    # Other statistics (another acceptance) make it stale: it is made again for them.
    monkeypatch.undo()
    run = zfserve("export", "--model", directory, "--calibration", imported[1], "--ood-acceptance", "0.9")
    assert run.returncode == 0, run.stderr
    refit = Classifier(read_snapshot(directory), precision="int8", int8=settings, warmup=False).ood_detector
    assert refit.acceptance == 0.9 and refit.describe()["threshold_precision"] == "int8"
    assert json.loads(stored.read_text())["statistics_sha256"] == refit.digest() != meta["statistics_sha256"]


def test_without_its_threshold_images_a_precision_keeps_fp32s_with_a_warning(imported, monkeypatch):
    from zfserve.errors import ModelLoadError
    from zfserve.weights import read_snapshot
    snapshot = read_snapshot(imported[0]["alexnet"][1])
    detector, _ = ood.find(snapshot)

    def gone(*args, **kwargs):
        raise ModelLoadError("the folder moved")
    monkeypatch.setattr(ood_fit, "threshold_half", gone)
    with pytest.warns(RuntimeWarning, match="fp32's"):
        kept = ood_fit.precision_threshold(snapshot, detector, "bf16", "openvino", backend=None, metadata={})
    assert kept.threshold == detector.threshold and kept.describe()["threshold_precision"].startswith("fp32")
    assert ood_fit.precision_threshold(snapshot, detector, "fp32", "onnxruntime", None, {}) is detector


def test_the_embedded_model_ships_its_precisions_thresholds():
    """zfnet-demo's int8 (default calibration) and bf16 thresholds are committed beside its statistics, current
    for them, each the quantile that accepts 95% of the threshold images in that precision."""
    from zfserve.engine.quantize import INT8_FORMAT, META_CALIBRATION, META_INT8_FORMAT, Int8Settings
    from zfserve.weights import EMBEDDED_DIR, read_snapshot
    snapshot = read_snapshot("zfnet-demo")
    detector, _ = ood.find(snapshot)
    default_int8 = {META_INT8_FORMAT: INT8_FORMAT, META_CALIBRATION: json.dumps(Int8Settings().calibration_record())}
    for precision, engine in (("int8", "onnxruntime"), ("int8", "openvino"), ("bf16", "openvino")):
        meta = json.loads((EMBEDDED_DIR / "zfnet-demo" / ood.precision_file(precision, engine)).read_text())
        identity = ood.graph_identity(precision, default_int8)
        assert ood.find_precision_threshold(snapshot, detector, precision, engine, identity) == meta
        assert meta["threshold_images"] == 2200 and abs(meta["accepted_on_threshold_images"] - 0.95) < 1e-3
