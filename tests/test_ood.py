"""The out-of-distribution score (zfserve.engine.ood, .ood_features, .ood_fit): each detector against an
independent reference on fresh random data, the threshold's acceptance, storage keyed by the weights, the
features the exported graph computes against PyTorch, the feature choice from a model's layer list, fitting on a
model directory, and, on the embedded model, photos and shapes it never saw against held-out synthetic images;
then the CLI (info, classify, export) and the audit.

Near out-of-distribution images are drawn here: scenes of the synthetic set around six shapes that are neither
the model's classes nor the benchmark's probes (zfserve.data.probes.NOVEL_SHAPES).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import rankdata

from zfserve.engine import ood, ood_fit
from zfserve.engine.ood_features import channel_stats, feature_spec
from zfserve.errors import ModelLoadError

WIDTHS = (16, 16, 16, 16, 16)
ID_IMAGES = 110              # held-out synthetic images of seed 4 (never fitted on): 10 per class
PHOTO_CROPS = 60


def auroc(id_scores, ood_scores) -> float:
    ranks = rankdata(np.concatenate([id_scores, ood_scores]))
    n, m = len(id_scores), len(ood_scores)
    return float((ranks[n:].sum() - m * (m + 1) / 2) / (n * m))


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """One export cache for the module (the embedded model is exported once)."""
    old = os.environ.get("ZFSERVE_CACHE_DIR")
    os.environ["ZFSERVE_CACHE_DIR"] = str(tmp_path_factory.mktemp("ood-cache"))
    yield Path(os.environ["ZFSERVE_CACHE_DIR"])
    if old is None:
        del os.environ["ZFSERVE_CACHE_DIR"]
    else:
        os.environ["ZFSERVE_CACHE_DIR"] = old


# ---------------------------------------------------------------------------------------------------- detectors
def _blobs(rng, n, d=12, shift=0.0):
    """Draws from a mixture of four Gaussians whose centres are fixed (a second generator), shifted by ``shift``."""
    centres = np.random.default_rng(99).normal(0, 3, (4, d))
    return (centres[rng.integers(0, 4, n)] + rng.normal(0, 1, (n, d)) + shift).astype(np.float32)


def test_knn_is_the_distance_to_the_kth_nearest_normalised_neighbour(np_rng):
    from scipy.spatial.distance import cdist
    fit, query = _blobs(np_rng, 200), _blobs(np_rng, 30, shift=0.5)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)   # noqa: E731
    for k in (1, 5):
        detector = ood.Knn.fit("f", {"f": fit}, k)
        reference = np.sort(cdist(unit(query), unit(fit)), axis=1)[:, k - 1]
        np.testing.assert_allclose(detector.score({"f": query}), reference, atol=2e-3)   # the bank is float16


def test_gaussian_is_the_shrunk_mahalanobis_distance(np_rng):
    from sklearn.covariance import ShrunkCovariance
    fit, query = _blobs(np_rng, 300).astype(np.float64), _blobs(np_rng, 40, shift=1.0).astype(np.float64)
    detector = ood.Gaussian.fit("f", {"f": fit})
    # scikit-learn's (1 - a) C + a mu I is this detector's covariance times (1 - a) for a = s / (1 + s).
    a = ood.SHRINKAGE / (1 + ood.SHRINKAGE)
    reference = ShrunkCovariance(shrinkage=a, assume_centered=False).fit(fit).mahalanobis(query) * (1 - a)
    np.testing.assert_allclose(detector.score({"f": query}), reference, rtol=1e-6)


def test_vim_is_the_residual_off_the_principal_subspace_minus_the_energy(np_rng):
    d, classes = 16, 5
    fit = np.abs(_blobs(np_rng, 400, d)).astype(np.float64)
    weight, bias = np_rng.normal(0, 0.3, (classes, d)), np_rng.normal(0, 0.5, classes)
    data = {"f": fit, "logits": fit @ weight.T + bias}
    query = np.abs(_blobs(np_rng, 25, d, shift=0.7)).astype(np.float64)
    detector = ood.Vim.fit("f", "logits", data, weight, bias)
    # Independently: the origin solves W u = -b (least squares), the principal directions from an SVD.
    origin = np.linalg.lstsq(weight, -bias, rcond=None)[0]
    _, _, vt = np.linalg.svd(fit - origin, full_matrices=False)
    principal = vt[:d // 2]

    def residual(x):
        z = x - origin
        return np.sqrt(np.maximum((z * z).sum(1) - ((z @ principal.T) ** 2).sum(1), 0))

    alpha = data["logits"].max(1).mean() / residual(fit).mean()
    logits = query @ weight.T + bias
    reference = alpha * residual(query) - logsumexp(logits, axis=1)
    np.testing.assert_allclose(detector.score({"f": query, "logits": logits}), reference, rtol=1e-6, atol=1e-6)


def test_the_threshold_accepts_the_asked_share_of_fresh_in_distribution_data(np_rng):
    fit, threshold_data, fresh = _blobs(np_rng, 400), _blobs(np_rng, 2000), _blobs(np_rng, 2000)
    outside = _blobs(np_rng, 500, shift=4.0)
    detectors = [ood.Knn.fit("f", {"f": fit}), ood.Gaussian.fit("f", {"f": fit})]
    for acceptance in (0.9, 0.95):
        detector = ood.calibrate(detectors, {"f": threshold_data}, acceptance)
        assert detector.record["accepted_on_threshold_images"] == pytest.approx(acceptance, abs=1e-3)
        accepted = np.mean(detector.score({"f": fresh}) <= detector.threshold)
        assert abs(accepted - acceptance) < 0.025      # 2,000 fresh draws: the sampling error is ~0.5 pt
        verdicts = detector.verdicts({"f": outside})
        assert np.mean([v.out_of_distribution for v in verdicts]) > 0.9
        # The score is the sum of the detectors' normalised scores.
        raw = detector.detector_scores({"f": fresh})
        manual = ((raw - np.median(detector.detector_scores({"f": threshold_data}), axis=0)) / detector.scales).sum(1)
        np.testing.assert_allclose(detector.score({"f": fresh}), manual, rtol=1e-9, atol=1e-9)


def test_statistics_round_trip_as_safetensors_and_json_keyed_by_the_weights(tmp_path, np_rng):
    fit = _blobs(np_rng, 100)
    detector = ood.calibrate([ood.Knn.fit("f", {"f": fit}), ood.Gaussian.fit("f", {"f": fit})],
                             {"f": _blobs(np_rng, 100)}, record={"data": "blobs"})
    ood.save(detector, tmp_path, "a" * 64, "b" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ood.json", "ood.safetensors"]
    meta = json.loads((tmp_path / "ood.json").read_text())
    assert meta["weights_sha256"] == "a" * 64 and meta["detectors"][0]["kind"] == "knn"
    assert ood.is_current(meta, "a" * 64, "b" * 64) and not ood.is_current(meta, "c" * 64, "b" * 64)
    loaded = ood.load(tmp_path)
    query = {"f": _blobs(np_rng, 20, shift=2.0)}
    np.testing.assert_allclose(loaded.score(query), detector.score(query), rtol=1e-5, atol=1e-5)
    assert loaded.threshold == detector.threshold and loaded.record["data"] == "blobs"
    (tmp_path / "ood.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelLoadError, match="ood.safetensors"):
        ood.load(tmp_path)


# ---------------------------------------------------------------------------------------------------- features
class _Layers:
    """A model seen only through its layer list (what feature_spec reads)."""

    def __init__(self, layers):
        from zfserve.model import LayerInfo
        self.infos = [LayerInfo(name, shape, params, None, None, None) for name, shape, params in layers]

    def layer_info(self):
        return self.infos


def test_features_are_chosen_from_the_layer_list(make_model):
    spec = feature_spec(make_model(widths=WIDTHS))
    assert (spec.penultimate, spec.low_level) == ("fc7", "conv2")
    assert spec.outputs == ("fc7", "conv2.channel_stats")
    # An AlexNet-like and a VGG-like list, with their own names: the conv after the first pool, the fc before last.
    alexnet = _Layers([("conv1", (64, 55, 55), 1), ("pool1", (64, 27, 27), 0), ("conv2", (192, 27, 27), 1),
                       ("pool2", (192, 13, 13), 0), ("conv3", (384, 13, 13), 1), ("fc6", (4096,), 1),
                       ("fc7", (4096,), 1), ("fc8", (1000,), 1)])
    vgg = _Layers([("conv1_1", (64, 224, 224), 1), ("conv1_2", (64, 224, 224), 1), ("pool1", (64, 112, 112), 0),
                   ("conv2_1", (128, 112, 112), 1), ("classifier.0", (4096,), 1), ("classifier.3", (4096,), 1),
                   ("classifier.6", (1000,), 1)])
    assert feature_spec(alexnet).low_level == "conv2" and feature_spec(alexnet).penultimate == "fc7"
    assert feature_spec(vgg).low_level == "conv2_1" and feature_spec(vgg).penultimate == "classifier.3"


def test_channel_stats_are_each_channels_mean_and_standard_deviation(generator):
    x = torch.randn(3, 5, 7, 9, generator=generator) * 4 + 1
    reference = np.concatenate([x.numpy().mean(axis=(2, 3)), x.numpy().std(axis=(2, 3))], axis=1)
    np.testing.assert_allclose(channel_stats(x).numpy(), reference, rtol=1e-5, atol=1e-5)


def test_the_served_graph_gives_the_features_pytorch_computes(module_cache, spread_model, generator):
    from zfserve.engine.classifier import Classifier
    model = spread_model(seed=3, widths=WIDTHS)
    classifier = Classifier(model, warmup=False)
    assert classifier.ood_detector is None and "in-memory" in classifier.ood_note
    x = torch.randn(4, 3, 224, 224, generator=generator) * 50
    probabilities, fc7, stats = classifier.backend.run_outputs(x.numpy(), ["probabilities", "fc7",
                                                                          "conv2.channel_stats"])
    with torch.no_grad():
        trace = model.trace(x, layers=("conv2", "fc7"))
    np.testing.assert_allclose(fc7, trace.activations["fc7"].numpy(), rtol=1e-4,
                               atol=1e-4 * float(trace.activations["fc7"].abs().max()))
    reference = channel_stats(trace.activations["conv2"]).numpy()
    np.testing.assert_allclose(stats, reference, rtol=1e-4, atol=1e-4 * float(np.abs(reference).max()))
    np.testing.assert_allclose(probabilities, torch.softmax(trace.logits, 1).numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def fitted_dir(module_cache, tmp_path_factory):
    """A tiny model directory whose statistics `zfserve export` fitted on 60 synthetic images."""
    from zfserve.model import ZFNet
    from zfserve.weights import save_model
    torch.manual_seed(5)
    directory = tmp_path_factory.mktemp("ood-fit") / "tiny"
    save_model(ZFNet(num_classes=11, fc_width=32, widths=WIDTHS).eval(), directory, name="tiny")
    run = subprocess.run([sys.executable, "-m", "zfserve.cli", "export", "--model", str(directory), "--calibration",
                          "synthetic:6", "--calibration-images", "60", "--ood-acceptance", "0.9"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "out-of-distribution statistics (fitted)" in run.stdout and (directory / "ood.json").is_file()
    return directory


def test_export_fits_statistics_that_score_what_pytorch_features_score(fitted_dir):
    from zfserve.data import render_images
    from zfserve.engine.classifier import Classifier
    from zfserve.preprocess import to_input
    from zfserve.weights import read_snapshot
    snapshot = read_snapshot(fitted_dir)
    meta = ood.read_meta(fitted_dir)
    assert meta["weights_sha256"] == snapshot.sha256 and meta["acceptance"] == 0.9
    assert meta["record"]["fitted_images"] == 30 and meta["record"]["threshold_images"] == 30
    classifier = Classifier(snapshot, warmup=False)
    assert classifier.ood_note == "" and classifier.ood_detector.method.startswith("vim(fc7)")
    x = np.stack([to_input(img, snapshot.config) for img in render_images(9, range(6))])
    scored = classifier.scored(x)
    model = snapshot.model()
    with torch.no_grad():
        trace = model.trace(torch.from_numpy(x), layers=("conv2", "fc7"))
    features = {"fc7": trace.activations["fc7"].numpy(), "logits": trace.logits.numpy(),
                "conv2.channel_stats": channel_stats(trace.activations["conv2"]).numpy()}
    np.testing.assert_allclose([v.score for v in scored.ood], classifier.ood_detector.score(features),
                               rtol=1e-3, atol=1e-3)
    assert [v.out_of_distribution for v in scored.ood] == \
        [bool(s > classifier.ood_detector.threshold) for s in classifier.ood_detector.score(features)]
    # Other weights make the statistics stale: the model still serves, and says why there is no score.
    torch.manual_seed(6)
    from zfserve.model import ZFNet
    from zfserve.weights import save_model
    save_model(ZFNet(num_classes=11, fc_width=32, widths=WIDTHS).eval(), fitted_dir.parent / "other", name="tiny")
    shutil.copy(fitted_dir / "ood.json", fitted_dir.parent / "other" / "ood.json")
    shutil.copy(fitted_dir / "ood.safetensors", fitted_dir.parent / "other" / "ood.safetensors")
    other = Classifier(str(fitted_dir.parent / "other"), warmup=False)
    assert other.ood_detector is None and "fitted for other weights" in other.ood_note
    assert other.scored(x).ood is None and other.classify(x, 2)[0].ood is None


def test_a_model_of_unknown_data_is_not_fitted_without_calibration_images(module_cache, tmp_path, make_model):
    from zfserve.weights import read_snapshot, save_model
    directory = save_model(make_model(num_classes=11, fc_width=32, widths=WIDTHS), tmp_path / "m", name="m")
    outcome, where = ood_fit.ensure(read_snapshot(directory))
    assert where is None and "--calibration" in outcome and not (directory / "ood.json").exists()


# ---------------------------------------------------------------------------------------------------- the embedded model
def _u_shape(rng):
    w = rng.uniform(0.3, 0.4)
    return [(np.array([[-1, -1], [-1 + w, -1], [-1 + w, 1 - w], [1 - w, 1 - w], [1 - w, -1], [1, -1], [1, 1],
                       [-1, 1]]) * 0.9, 1)]


def _hourglass(rng):
    return [(np.array([[-0.8, -1], [0.8, -1], [0.1, 0], [0.8, 1], [-0.8, 1], [-0.1, 0]]), 1)]


def _kite(rng):
    return [(np.array([[0, -1], [0.55, -0.35], [0, 1], [-0.55, -0.35]]), 1)]


def _frame(rng):
    t = rng.uniform(0.25, 0.35)
    outer = np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    return [(outer, 1), (outer * (0.8 - t) / 0.8, 0)]


def _stairs(rng):
    return [(np.array([[-1, 1], [-1, 0.33], [-0.33, 0.33], [-0.33, -0.33], [0.33, -0.33], [0.33, -1], [1, -1],
                       [1, 1]]), 1)]


def _trefoil(rng):
    from zfserve.data.synthetic import _ellipse
    return [(_ellipse(0.42, 0.42, 0.5 * np.cos(a), 0.5 * np.sin(a)), 1) for a in np.pi / 2 + np.arange(3) * 2.1]


# Shapes neither the embedded model's classes nor the benchmark's probes have.
TEST_SHAPES = {"u_shape": _u_shape, "hourglass": _hourglass, "kite": _kite, "frame": _frame, "stairs": _stairs,
               "trefoil": _trefoil}


@pytest.fixture(scope="module")
def demo(module_cache):
    from zfserve.engine.classifier import Classifier
    return Classifier("zfnet-demo", warmup=False)


@pytest.fixture(scope="module")
def probe_scores(demo):
    """Scores of held-out synthetic images (seed 4), photo crops and scenes of TEST_SHAPES."""
    from zfserve.data import render_images
    from zfserve.data.probes import NOVEL_SHAPES, novel_images, photo_crops, photos
    from zfserve.preprocess import to_input
    assert not set(TEST_SHAPES) & set(NOVEL_SHAPES)
    crops, _ = photo_crops(photos(), PHOTO_CROPS, seed=21)
    sets = {"id": render_images(4, range(ID_IMAGES)), "photo": crops,
            "novel": novel_images(12, 60, TEST_SHAPES)[0]}
    return {key: np.array([v.score for v in demo.scored(np.stack([to_input(img, demo.config) for img in images])).ood])
            for key, images in sets.items()}


def test_the_embedded_model_tells_photos_and_unseen_shapes_from_its_own_data(demo, probe_scores):
    assert demo.ood_note == "" and "synthetic seed 5" in demo.ood_detector.record["data"]
    threshold = demo.ood_detector.threshold
    s = probe_scores
    assert auroc(s["id"], s["photo"]) >= 0.99
    assert np.mean(s["photo"] <= threshold) <= 0.05
    assert auroc(s["id"], s["novel"]) >= 0.90
    # 95% of held-out images are accepted by design; 110 images bound the sampling error to a few points.
    assert 0.85 <= np.mean(s["id"] <= threshold) <= 1.0


def test_whole_photos_are_out_of_distribution_and_answers_carry_the_verdict(demo):
    from zfserve.data.probes import photos
    from zfserve.preprocess import to_input
    pictures = photos()
    assert len(pictures) >= 20     # scikit-image, scikit-learn and matplotlib (the dev extra) ship them
    answers = demo.classify(np.stack([to_input(rgb, demo.config) for _, rgb in pictures]), top_k=3)
    flagged = [name for (name, _), top in zip(pictures, answers) if top.ood.out_of_distribution]
    assert len(flagged) >= 0.9 * len(pictures), sorted(set(n for n, _ in pictures) - set(flagged))
    assert all(len(top) == 3 and top.ood.threshold == demo.ood_detector.threshold for top in answers)


# ---------------------------------------------------------------------------------------------------- CLI
def _zfserve(*args, timeout=600):
    run = subprocess.run([sys.executable, "-m", "zfserve.cli", *args], capture_output=True, text=True,
                         timeout=timeout)
    return run.returncode, run.stdout, run.stderr


@pytest.fixture(scope="module")
def photo_and_shape(tmp_path_factory):
    """A photo shipped in an installed package and a held-out synthetic image, as files."""
    from PIL import Image

    from zfserve.data import render
    from zfserve.data.probes import photo_files
    folder = tmp_path_factory.mktemp("ood-images")
    photo = next(p for p in photo_files() if p.name == "grace_hopper.jpg")
    shape = folder / "circle.png"
    Image.fromarray(render(4, 0).image).save(shape)
    return photo, shape


def test_info_says_what_the_model_knows(module_cache):
    code, out, err = _zfserve("info")
    assert code == 0, err
    assert "classes: circle, square, triangle, star, cross, ring, bar, hexagon, arrow, crescent, face" in out
    assert "trained on: synthetic images of 11 shapes" in out and "real photos need a model trained on them" in out
    assert "out-of-distribution score: vim(fc7) + knn(fc7) + gaussian(conv2.channel_stats)" in out
    code, out, _ = _zfserve("info", "--json")
    doc = json.loads(out)
    assert doc["class_names"][-1] == "face" and doc["ood"]["available"] and doc["ood"]["acceptance"] == 0.95
    assert doc["training_data"].startswith("synthetic images of 11 shapes")
    code, out, _ = _zfserve("info", "--model", "zfnet-paper")
    assert "trained on: none: untrained" in out and "out-of-distribution score: none (model zfnet-paper" in out


def test_classify_says_when_an_image_is_outside_the_model(module_cache, photo_and_shape):
    photo, shape = photo_and_shape
    code, out, err = _zfserve("classify", str(photo), str(shape), "--top-k", "2")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"{photo}: ") and lines[1].startswith(f"{photo}: out of distribution: unlike the "
                                                                     f"images zfnet-demo knows (score ")
    assert len(lines) == 3 and lines[2].startswith(f"{shape}: circle (")
    code, out, _ = _zfserve("classify", str(photo), str(shape), "--json")
    records = json.loads(out)
    assert records[0]["ood"]["out_of_distribution"] is True and records[1]["ood"]["out_of_distribution"] is False
    assert records[0]["ood"]["score"] > records[0]["ood"]["threshold"] > records[1]["ood"]["score"]


def test_classify_with_a_model_without_statistics_serves_and_says_so(module_cache, tmp_path, make_model,
                                                                      photo_and_shape):
    from zfserve.weights import save_model
    directory = save_model(make_model(num_classes=11, fc_width=32, widths=WIDTHS), tmp_path / "plain", name="plain")
    code, out, err = _zfserve("classify", str(photo_and_shape[0]), "--model", str(directory))
    assert code == 0 and len(out.strip().splitlines()) == 1
    assert "note: model plain: no out-of-distribution score (its statistics have not been fitted)" in err
    code, out, _ = _zfserve("classify", str(photo_and_shape[0]), "--model", str(directory), "--json")
    record = json.loads(out)[0]
    assert record["ood"] is None and "have not been fitted" in record["ood_note"]


# ---------------------------------------------------------------------------------------------------- audit
def test_an_audit_flags_the_photos_and_names_the_labels_no_class_has(module_cache, tmp_path, photo_and_shape):
    from PIL import Image

    from zfserve import audit
    from zfserve.audit.store import ResultStore
    from zfserve.data import render
    from zfserve.data.probes import photo_files
    corpus = tmp_path / "corpus"
    files = {p.name: p for p in photo_files()}
    for label, name in (("cat", "chelsea.png"), ("person", "astronaut.png"), ("person", "grace_hopper.jpg"),
                        ("coffee", "coffee.png")):
        (corpus / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(files[name], corpus / label / name)
    for i in range(4):     # held-out synthetic images in folders named after their classes
        sample = render(4, i)
        (corpus / sample.class_name).mkdir(exist_ok=True)
        Image.fromarray(sample.image).save(corpus / sample.class_name / f"{i}.png")
    summary = audit.run(str(corpus), tmp_path / "out", model="zfnet-demo", occlusion=None, quiet=True)
    rows = {Path(r["path"]).name: r for r in ResultStore(tmp_path / "out").read().to_pylist()}
    photos = ("chelsea.png", "astronaut.png", "grace_hopper.jpg", "coffee.png")
    assert all(rows[name]["out_of_distribution"] and rows[name]["ood_score"] > rows[name]["ood_threshold"]
               for name in photos)
    synthetic = [r for name, r in rows.items() if name not in photos]
    assert len(synthetic) == 4 and not any(r["out_of_distribution"] for r in synthetic)
    assert summary["flags"]["out_of_distribution"] == 4 and summary["out_of_distribution"]["scored"] == 8
    assert summary["labels"] == {"rows_with_label": 8, "matching_a_class": 4,
                                 "unknown": {"cat": 1, "coffee": 1, "person": 2}}
    assert summary["labelled"] == 4
    page = (tmp_path / "out" / "index.html").read_text()
    assert "3 label(s) on 4 rows match no class of the model" in page and "cat (1), coffee (1), person (2)" in page
    assert "over 4 of 8 rows" in page and "4 of 8 images are unlike the model&#x27;s data" in page
    assert page.count("out of distribution: unlike the model") == 4



# ---------------------------------------------------------------------------------------------------- faithfulness
def test_faithfulness_scores_the_images_of_the_models_own_directory(demo):
    from zfserve.paper import faithfulness
    from zfserve.preprocess import to_input
    from zfserve.data import render_images
    from zfserve.weights import load_model
    model = load_model("zfnet-demo")
    scorer, note = faithfulness._ood_scorer(model)
    assert note == ""
    x = np.stack([to_input(img, demo.config) for img in render_images(4, range(3))])
    assert [v.score for v in scorer(x)] == pytest.approx([v.score for v in demo.scored(x).ood], rel=1e-6)
    with torch.no_grad():
        model.fc8.bias[0] += 5.0      # no longer the directory's weights: their statistics do not apply
    scorer, note = faithfulness._ood_scorer(model)
    assert scorer is None and "differ from" in note
    records = [{"out_of_distribution": flag} for flag in (True, False, False)]
    counts = faithfulness.ood_count(records, "")
    assert counts == {"scored": 3, "flagged": 1, "note": ""}
    rows = faithfulness.summary({"table": {}, "n": 3, "out_of_distribution": counts})
    assert rows == []   # no table, no section summary
    assert faithfulness.ood_text(counts).startswith("1 of 3 images scored out of distribution")


def test_openvino_and_int8_give_the_score_too(demo, probe_scores):
    """The same statistics on the other engine and precision: OpenVINO fp32 scores as ONNX Runtime does; int8 (its
    features' reductions kept float) still flags the photos and accepts most held-out images."""
    from zfserve.data import render_images
    from zfserve.data.probes import photos
    from zfserve.engine.classifier import Classifier
    from zfserve.preprocess import to_input
    x = np.stack([to_input(img, demo.config) for img in render_images(4, range(11))] +
                 [to_input(rgb, demo.config) for _, rgb in photos()[:5]])
    reference = demo.scored(x).ood
    openvino = Classifier("zfnet-demo", engine="openvino", warmup=False).scored(x).ood
    np.testing.assert_allclose([v.score for v in openvino], [v.score for v in reference], rtol=1e-3, atol=1e-3)
    from zfserve.engine.quantize import Int8Settings
    small = Int8Settings(calibration_images=16, accuracy_images=48)     # a quick quantization, as test_precision's
    int8 = Classifier("zfnet-demo", precision="int8", warmup=False, int8=small).scored(x).ood
    assert [v.out_of_distribution for v in int8[11:]] == [True] * 5
    assert sum(not v.out_of_distribution for v in int8[:11]) >= 9
