"""zfserve.paper.faithfulness, .saliency and .saliency_metrics: every metric on hand-built cases with known answers
and against scipy / scikit-image / quantus on fresh random inputs; every map against Captum or brute force; the
randomisation cascade (occlusion maps of the embedded model change when its weights are randomised); the
``zfserve faithfulness`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zfserve.paper import saliency_metrics as sm
from zfserve.paper.faithfulness import score_image
from zfserve.paper.saliency import SaliencyMaps, bilinear_matrix, cascading_randomisation

# ZFNet's cascade, top down (Adebayo et al. 2018), written out rather than read from the product.
MPRT_ORDER = ("fc8", "fc7", "fc6", "conv5", "conv4", "conv3", "conv2", "conv1")

SIZE = 224


def _torch_predict(model):
    @torch.no_grad()
    def predict(batch):
        return torch.softmax(model(torch.from_numpy(batch)).double(), 1).numpy()
    return predict


@pytest.fixture(scope="module")
def narrow(spread_model):
    """Small conv widths (fast), He-scaled weights: probabilities far from uniform."""
    return spread_model(seed=5, widths=(8, 16, 24, 24, 16), num_classes=6, fc_width=32)


@pytest.fixture
def image(np_rng):
    return (np_rng.standard_normal((3, SIZE, SIZE)) * 40).astype(np.float32)


# ---------------------------------------------------------------------------------------------- hand-built cases
def test_pointing_game_known_answers():
    mask = np.zeros((SIZE, SIZE), bool)
    mask[10, 10] = True
    for col, expect in ((25, True), (26, False)):       # 15 px: a hit; 16 px: a miss
        saliency = np.zeros((SIZE, SIZE))
        saliency[10, col] = 1.0
        got = sm.pointing_hit(saliency, mask)
        assert got["point"] == [10.5, col + 0.5] and got["distance"] == col - 10 and got["hit"] is expect
    tied = np.zeros((SIZE, SIZE))
    tied[20, 30] = tied[40, 50] = 2.0                    # ties: the mean of the maximal pixels
    assert sm.pointing_point(tied) == (30.5, 40.5)
    assert sm.centre_hit(mask)["point"] == [112.0, 112.0] and not sm.centre_hit(mask)["hit"]
    assert sm.per_class_accuracy([1, 1, 0, 0], [0, 0, 0, 1]) == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(Exception, match="mask"):
        sm.pointing_hit(saliency, mask[:10])


def test_difficult_subset_known_answers():
    central = np.zeros((SIZE, SIZE), bool)
    central[62:162, 62:162] = True                        # centred, 20% of the image
    corner = np.roll(central, (-60, -60), axis=(0, 1))    # centroid 85 px from the centre
    small = np.zeros((SIZE, SIZE), bool)
    small[102:122, 102:122] = True                        # centred, 0.8% of the image
    assert [sm.is_difficult(m) for m in (central, corner, small)] == [False, True, True]


def _indicator_predict(object_pixels: np.ndarray):
    """A 'model' whose probability of class 0 is the share of the object's pixels still present (value 1)."""
    def predict(batch):
        present = (batch[:, 0][:, object_pixels] == 1).mean(axis=1)
        return np.stack([present, 1 - present], axis=1)
    return predict


def test_deletion_insertion_known_answers():
    size, steps = 4, 4
    x = np.zeros((3, size, size), np.float32)
    obj = np.zeros((size, size), bool)
    obj[0, :] = True                                       # 4 of 16 pixels: exactly one step
    x[:, obj] = 1.0
    best = obj.astype(float) + np.linspace(0, 0.1, 16).reshape(size, size)
    worst = 2.0 - best
    got = score_image({"best": best, "worst": worst}, x, obj, 0, _indicator_predict(obj), steps=steps,
                      base=(1.0, 0.0), tie_seed=0)
    assert got["best"]["deletion"] == [1, 0, 0, 0, 0] and got["best"]["deletion_auc"] == pytest.approx(0.125)
    assert got["best"]["insertion"] == [0, 1, 1, 1, 1] and got["best"]["insertion_auc"] == pytest.approx(0.875)
    assert got["worst"]["deletion_auc"] == pytest.approx(0.875) and got["worst"]["insertion_auc"] == \
        pytest.approx(0.125)
    assert sm.curve_auc([0, 1]) == 0.5 and sm.curve_auc([0.3] * 7) == pytest.approx(0.3)
    # Ties go in a fixed random order (not raster order), distinct values largest first.
    flat = np.ones((size, size))
    assert np.array_equal(sm.perturbation_order(flat, 3), sm.perturbation_order(flat, 3))
    assert sorted(sm.perturbation_order(flat, 3)) == list(range(16))
    assert not np.array_equal(sm.perturbation_order(flat, 3), np.arange(16))
    assert np.array_equal(sm.perturbation_order(best), np.argsort(-best.reshape(-1)))


def test_similarities_against_scipy_and_skimage(np_rng):
    stats = pytest.importorskip("scipy.stats")
    metrics = pytest.importorskip("skimage.metrics")
    for _ in range(3):
        a = np.round(np_rng.standard_normal((40, 50)), 1)          # rounded: many ties
        b = a + np.round(np_rng.standard_normal((40, 50)), 1)
        assert sm.spearman(a, b) == pytest.approx(stats.spearmanr(a.reshape(-1), b.reshape(-1))[0], abs=1e-12)
        x, y = np_rng.random((60, 70)), np_rng.random((60, 70))
        assert sm.ssim(x, y, 1.0) == pytest.approx(metrics.structural_similarity(x, y, data_range=1.0), abs=1e-10)
    assert sm.spearman_abs(np.ones((8, 8)), a[:8, :8]) == 0.0 and sm.spearman_abs(np.ones(4), np.zeros(4)) == 1.0
    assert sm.map_ssim(a, a) == pytest.approx(1.0) and sm.map_ssim(np.zeros((9, 9)), np.zeros((9, 9))) == 1.0
    # Known answers: a reversed ranking is -1, any increasing transform of |map| is 1, a rescaled map is the same
    # map for SSIM (both are divided by their maximum), and a map against an unrelated one is far from 1.
    ramp = np.arange(64, dtype=float).reshape(8, 8)
    assert sm.spearman(ramp, -ramp) == pytest.approx(-1.0) and sm.spearman_abs(ramp, np.exp(ramp)) == pytest.approx(1.0)
    assert sm.spearman_abs(-ramp, ramp) == pytest.approx(1.0)           # absolute values: the sign is dropped
    assert sm.map_ssim(ramp, 3 * ramp) == pytest.approx(1.0) and sm.map_ssim(ramp, -ramp) == pytest.approx(1.0)
    assert sm.spearman_abs(ramp, ramp[::-1, ::-1]) == pytest.approx(-1.0) and sm.map_ssim(ramp, ramp[::-1, ::-1]) < 0
    noise = np_rng.random((64, 64))
    assert abs(sm.spearman_abs(noise, np_rng.random((64, 64)))) < 0.1
    assert sm.map_ssim(noise, np_rng.random((64, 64))) < 0.2


# ---------------------------------------------------------------------------------------------- quantus
def _quantus():
    """quantus (the dev extra). Skipped only where it is not installed: installed but unimportable (its cv2 needs
    Debian's libgl1 and libglib2.0-0) is a failure, so CI cannot skip the cross-check silently."""
    try:
        import quantus
    except ModuleNotFoundError as exc:
        if exc.name != "quantus":
            raise
        pytest.skip("quantus is not installed (pip install -e '.[dev]')")
    return quantus


def test_quantus_cross_check(narrow, image, np_rng):
    """Our deletion curve, pointing game and similarities against quantus' PixelFlipping, PointingGame and
    similarity functions on the same maps: within 1e-3 (float rounding in practice)."""
    quantus = _quantus()
    grads = SaliencyMaps(narrow).maps(image, 2, 0, methods=("gradient",))["gradient"]   # continuous: no ties
    predict = _torch_predict(narrow)
    target = int(predict(image[None])[0].argmax())
    base = (predict(image[None])[0, target], predict(np.zeros_like(image)[None])[0, target])
    steps = 16
    ours = score_image({"g": grads}, image, np.ones((SIZE, SIZE), bool), target, predict, steps=steps, base=base,
                       tie_seed=0)["g"]["deletion"]
    # quantus flips channel values (the map broadcast to 3 channels); every third of its steps ends on whole pixels.
    flipping = quantus.PixelFlipping(features_in_step=SIZE * SIZE // steps, perturb_baseline=0.0, normalise=False,
                                     abs=False, disable_warnings=True)
    theirs = np.array(flipping(model=narrow, x_batch=image[None], y_batch=np.array([target]),
                               a_batch=grads[None, None], softmax=True, device="cpu")[0])
    assert np.abs(np.array(ours[1:]) - theirs[2::3]).max() < 1e-3
    assert sm.curve_auc(ours) == pytest.approx(sm.curve_auc(np.r_[base[0], theirs[2::3]]), abs=1e-3)

    # Pointing game: quantus counts a hit when the maximum lies on the mask, so give it the mask grown by 15 px.
    rows, cols = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    masks, maps, hits = [], [], []
    for _ in range(12):
        y0, x0 = np_rng.integers(0, 180, 2)
        mask = np.zeros((SIZE, SIZE), bool)
        mask[y0:y0 + 40, x0:x0 + 30] = True
        cy, cx = np_rng.uniform(-40, 80, 2) + (y0, x0)     # a peak near the object: some hits, some misses
        saliency = np_rng.random((SIZE, SIZE)) * 0.1 + np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / 200)
        grown = np.hypot(np.clip(np.maximum(y0 + 0.5 - rows, rows - (y0 + 39.5)), 0, None),
                         np.clip(np.maximum(x0 + 0.5 - cols, cols - (x0 + 29.5)), 0, None)) <= sm.POINTING_TOLERANCE
        masks.append(grown)
        maps.append(saliency)
        hits.append(sm.pointing_hit(saliency, mask)["hit"])
    game = quantus.PointingGame(disable_warnings=True)
    theirs = game(model=None, x_batch=np.zeros((12, 3, SIZE, SIZE), np.float32), y_batch=np.zeros(12, int),
                  a_batch=np.array(maps)[:, None], s_batch=np.array(masks)[:, None].astype(float))
    assert [bool(t) for t in theirs] == hits and 0 < sum(hits) < 12

    from quantus.functions import similarity_func as qs
    from quantus.functions.normalise_func import normalise_by_max
    a, b = np_rng.standard_normal((SIZE, SIZE)), np_rng.standard_normal((SIZE, SIZE))
    b = a + b
    assert sm.spearman_abs(a, b) == pytest.approx(qs.correlation_spearman(np.abs(a).ravel(), np.abs(b).ravel()),
                                                  abs=1e-3)
    for signed in (False, True):
        qa, qb = (normalise_by_max(v if signed else np.abs(v)) for v in (a, b))
        assert sm.map_ssim(a, b, signed=signed) == pytest.approx(qs.ssim(qa, qb), abs=1e-3)


# ---------------------------------------------------------------------------------------------- the maps
def test_maps_against_captum(narrow, image):
    captum = pytest.importorskip("captum.attr")
    x = torch.from_numpy(image)[None]
    target = 3
    maps = SaliencyMaps(narrow, window=112, stride=56)
    got = maps.maps(image, target, 0, methods=("gradient", "gradcam", "occlusion"))
    reference = captum.Saliency(narrow).attribute(x.clone().requires_grad_(), target=target, abs=True)
    np.testing.assert_allclose(got["gradient"], reference[0].sum(0).detach().double().numpy(), rtol=1e-5, atol=1e-9)

    _, conv5, d_conv5 = maps.gradients(image, target)
    cam = captum.LayerGradCam(narrow, narrow.relu5).attribute(x, target=target, relu_attributions=True)
    theirs = maps.upsample @ cam[0, 0].detach().double().numpy() @ maps.upsample.T
    # Captum sums in float32, ours in float64: where the channels' terms cancel, a value near 0 keeps an error
    # of float32's size relative to the terms, not to the value. So the absolute part of the tolerance is scaled
    # to the terms at each pixel (|weight| and the mean |gradient| behind it, times the activation), upsampled as
    # the map is: 1e-5 of it is ten times float32's worst case over 16 channels, on any x86 machine and at any
    # thread count.
    terms = np.tensordot(np.abs(d_conv5.mean(axis=(1, 2))) + np.abs(d_conv5).mean(axis=(1, 2)), conv5, axes=1)
    np.testing.assert_array_less(np.abs(maps.gradcam(conv5, d_conv5) - theirs),
                                 1e-5 * np.abs(theirs) + 1e-5 * (maps.upsample @ terms @ maps.upsample.T) + 1e-12)

    def probability(inp):
        return torch.softmax(narrow(inp), 1)
    occluded = captum.Occlusion(probability).attribute(x, sliding_window_shapes=(3, 112, 112), strides=(3, 56, 56),
                                                       baselines=0, target=target)
    np.testing.assert_allclose(got["occlusion"], occluded[0, 0].detach().double().numpy(), atol=1e-6)


def test_deconvnet_map_uses_the_class_units(narrow, image):
    captum = pytest.importorskip("captum.attr")
    maps = SaliencyMaps(narrow, units=4)
    target = 1
    contribution = captum.LayerGradientXActivation(narrow, narrow.relu5).attribute(
        torch.from_numpy(image)[None], target=target)[0].detach().double().numpy()
    # Brute force: per feature map its best unit, the 4 maps with the largest positive contribution.
    best = [(contribution[c].max(), c, *np.unravel_index(contribution[c].argmax(), contribution[c].shape))
            for c in range(contribution.shape[0])]
    chosen = [(c, int(y), int(x)) for v, c, y, x in sorted(best, key=lambda t: (-t[0], t[1]))[:4] if v > 0]
    _, acts, _ = maps.gradients(image, target)
    assert maps.select_units(contribution, acts) == chosen and chosen
    projected = maps.deconv.project(image, "conv5", units=chosen)
    expected = sum(np.abs(u.projection).sum(0) for u in projected)
    np.testing.assert_allclose(maps.maps(image, target, 0, methods=("deconvnet",))["deconvnet"], expected,
                               rtol=1e-5, atol=1e-9)


def test_upsampling_places_units_at_their_centres():
    weights = bilinear_matrix(SIZE, 13, 20.5, 16)
    values = np.random.default_rng(4).random(13)
    up = weights @ values
    assert np.allclose(weights.sum(1), 1)
    for i in range(13):                                    # a unit's centre pixel: between p and p + 1
        centre = 20.5 + 16 * i
        assert up[int(centre - 0.5)] == pytest.approx(values[i])
    assert np.all(up[:20] == values[0]) and np.all(up[213:] == values[-1])
    p = 100                                                # brute force between two centres
    t = (p + 0.5 - 20.5) / 16
    i = int(np.floor(t))
    assert up[p] == pytest.approx(values[i] * (1 - (t - i)) + values[i + 1] * (t - i))


def test_baselines_ignore_the_model(narrow, image, make_model):
    first = SaliencyMaps(narrow, seed=2).maps(image, 0, 7, methods=("random", "centre"))
    untrained = make_model(num_classes=6, widths=(8, 16, 24, 24, 16))
    other = SaliencyMaps(untrained, seed=2).maps(image, 4, 7, methods=("random", "centre"))
    assert all(np.array_equal(first[k], other[k]) for k in first)
    assert sm.pointing_point(first["centre"]) == (112.0, 112.0)
    assert not np.array_equal(first["random"], SaliencyMaps(narrow, seed=2).random_map(8))


# ---------------------------------------------------------------------------------------------- randomisation
def test_cascade_randomises_top_down(narrow):
    original = {k: v.clone() for k, v in narrow.state_dict().items()}
    seen = []
    for layer, twin in cascading_randomisation(narrow, seed=1):
        seen.append(layer)
        done = MPRT_ORDER[:MPRT_ORDER.index(layer) + 1]
        for name in MPRT_ORDER:
            weight = getattr(twin, name).weight.detach()
            assert torch.equal(weight, original[f"{name}.weight"]) is (name not in done), (layer, name)
        w = twin.fc6.weight.detach()    # the layer keeps its scale
        assert float(w.std()) == pytest.approx(float(original["fc6.weight"].std()), rel=0.02)
    assert seen == list(MPRT_ORDER)
    assert all(torch.equal(v, original[k]) for k, v in narrow.state_dict().items())   # the model is untouched


def test_occlusion_maps_change_when_the_model_is_randomised():
    """The embedded model's occlusion map of a held-out synthetic image, before and after randomising every
    layer: the rank correlation falls well below the insensitivity line, while the model-free maps stay."""
    from zfserve.data import render
    from zfserve.preprocess import to_input
    from zfserve.weights import load_model
    model = load_model("zfnet-demo")
    x = to_input(render(3, 5).image, model.config)
    target = int(model(torch.from_numpy(x)[None]).argmax())
    kwargs = dict(window=64, stride=32)
    before = SaliencyMaps(model, **kwargs).maps(x, target, 5, methods=("occlusion", "centre", "random"))
    *_, (layer, twin) = cascading_randomisation(model, seed=0)
    after = SaliencyMaps(twin, **kwargs).maps(x, target, 5, methods=("occlusion", "centre", "random"))
    assert layer == "conv1"
    assert sm.spearman_abs(before["occlusion"], after["occlusion"]) < 0.5
    assert sm.map_ssim(before["occlusion"], after["occlusion"]) < 0.9
    assert sm.spearman_abs(before["centre"], after["centre"]) == 1.0
    assert sm.spearman_abs(before["random"], after["random"]) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- the command
def test_cli_faithfulness_and_errors(tmp_path, capsys, spread_model):
    from zfserve.cli import main
    from zfserve.data import CLASSES
    from zfserve.weights import save_model
    model = spread_model(seed=2, widths=(8, 16, 24, 24, 16), num_classes=len(CLASSES), fc_width=32)
    directory = save_model(model, tmp_path / "m", class_names=list(CLASSES), name="narrow")
    out = tmp_path / "out"
    args = ["faithfulness", "--model", str(directory), "--out", str(out), "--images", "2", "--sanity-images", "1",
            "--steps", "2", "--window", "112", "--stride", "112"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "centre baseline" in printed and "deconvnet" in printed and "Verdict" in printed
    doc = json.loads((out / "faithfulness.json").read_text())
    assert set(doc["table"]) == {"occlusion", "deconvnet", "gradient", "gradcam", "random", "centre"}
    for baseline in ("random", "centre"):       # they ignore the model and the class: the checks must say so
        row = doc["table"][baseline]
        assert row["insensitive_to_model"] and row["insensitive_to_class"]
        assert row["mprt_spearman"] == pytest.approx(1.0) and row["mprt_ssim"] == pytest.approx(1.0)
        assert row["random_logit_ssim"] == pytest.approx(1.0)
    assert doc["mprt"]["layers"] == list(MPRT_ORDER)
    assert all(len(doc["mprt"]["spearman"][m]) == len(MPRT_ORDER) for m in doc["table"])
    assert (out / "report.html").is_file() and "faithfulness-mprt.png" in (out / "report.html").read_text()
    for flag, value, accepted in (("--images", "0", "1..100000"), ("--steps", "0", "1..1000"),
                                  ("--stride", "200", "1..112")):
        bad = list(args)
        bad[bad.index(flag) + 1] = value
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert flag in err and accepted in err and len(err.strip().splitlines()) == 1


def test_localization_puts_the_centre_baseline_beside_its_hit_rate():
    from zfserve.paper.localization import _beside
    rows = [(1, 1, 0, False), (1, 0, 0, True), (0, 0, 1, True), (1, 1, 1, False)]
    got = _beside([{"hit": h, "centre_hit": c, "label": label, "difficult": d} for h, c, label, d in rows])
    assert got == {"per_class_hit_rate": pytest.approx(((1 + 1) / 2 + (0 + 1) / 2) / 2), "centre_hit_rate": 0.5,
                   "centre_per_class_hit_rate": 0.5, "difficult_n": 2, "difficult_hit_rate": 0.5,
                   "centre_difficult_hit_rate": 0.0}


def test_cli_faithfulness_on_an_annotated_directory(tmp_path, capsys, spread_model):
    """``--data DIR``: a directory with annotations.json (object masks, as `zfserve data synth` writes) runs; an
    ImageFolder tree without masks is refused with one error line."""
    from zfserve.cli import main
    from zfserve.data import CLASSES, render
    from zfserve.weights import save_model
    model = spread_model(seed=3, widths=(8, 16, 24, 24, 16), num_classes=len(CLASSES), fc_width=32)
    directory = save_model(model, tmp_path / "m", class_names=list(CLASSES), name="narrow")
    data = tmp_path / "annotated"
    assert main(["data", "synth", "--out", str(data), "--n", "3", "--seed", "9"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    args = ["faithfulness", "--model", str(directory), "--out", str(out), "--data", str(data), "--images", "3",
            "--sanity-images", "1", "--steps", "2", "--window", "112", "--stride", "112"]
    assert main(args) == 0
    capsys.readouterr()
    doc = json.loads((out / "faithfulness.json").read_text())
    assert doc["n"] == 3 and str(data) in doc["data"] and len(doc["images"]) == 3
    # The masks are the directory's: the centre baseline's hits follow them.
    for record, seed_index in zip(doc["images"], range(3)):
        assert record["centre"]["hit"] == sm.centre_hit(_input_mask(render(9, seed_index).mask, model))["hit"]
    plain = tmp_path / "plain" / CLASSES[0]
    plain.mkdir(parents=True)
    from PIL import Image
    Image.fromarray(render(9, 0).image).save(plain / "a.png")
    bad = list(args)
    bad[bad.index("--data") + 1] = str(tmp_path / "plain")
    assert main(bad) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "needs object masks" in errors[0]


def _input_mask(mask, model):
    from zfserve.preprocess import mask_to_input
    return mask_to_input(mask, model.config)
