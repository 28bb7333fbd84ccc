"""The paper's analyses (zfserve.paper) against brute-force references on small random models and random images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zfserve import preprocess
from zfserve.data import CLASSES
from zfserve.errors import InvalidArgumentError, NotFoundError
from zfserve.paper import architecture, correspondence, dataset, evolution, filters, invariance, localization, top9


class RandomData(dataset.AnalysisData):
    """Random 256x256 images with random labels and a random rectangular object mask."""

    def __init__(self, n: int, seed: int = 7):
        rng = np.random.default_rng(seed)
        self.n, self.seed, self.source, self._files = n, seed, "random", []
        self.classes = list(CLASSES)
        self._images = rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)
        self._labels = rng.integers(0, len(CLASSES), n)
        self._masks = np.zeros((n, 256, 256), dtype=bool)
        for i in range(n):
            y0, x0 = rng.integers(16, 150, 2)
            h, w = rng.integers(30, 90, 2)
            self._masks[i, y0:y0 + h, x0:x0 + w] = True

    @property
    def has_masks(self) -> bool:
        return True

    def item(self, index):
        return dataset.Item(self._images[index], int(self._labels[index]), self._masks[index], {})

    def labels(self):
        return self._labels.copy()


@pytest.fixture(scope="module")
def model():
    from zfserve.model import ZFNet
    torch.manual_seed(3)
    m = ZFNet(num_classes=len(CLASSES), fc_width=64).eval()
    # Random conv biases so that maps differ in strength and ties are rare.
    with torch.no_grad():
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
            getattr(m, name).weight.mul_(8.0)
            getattr(m, name).bias.uniform_(-0.05, 0.05)
    m.config.class_names = list(CLASSES)
    return m


@pytest.fixture(scope="module")
def data():
    return RandomData(7)


def _brute_top(acts: np.ndarray, k: int):
    """acts (N, C, H, W) -> {c: [(value, image, y, x)]}: per image the first maximum, then images sorted by
    value (descending), earlier image first on ties."""
    n, c, h, w = acts.shape
    out = {}
    for ch in range(c):
        flat = acts[:, ch].reshape(n, -1)
        pos = flat.argmax(1)
        val = flat[np.arange(n), pos]
        order = sorted(range(n), key=lambda i: (-val[i], i))[:k]
        out[ch] = [(float(val[i]), i, int(pos[i] // w), int(pos[i] % w)) for i in order]
    return out


def test_top_activations_match_brute_force(model, data):
    maps = {"conv2": [0, 5, 17, 200], "conv5": [1, 2, 99]}
    got = top9.top_activations(model, data, maps, k=4, batch=3)   # batches 3+3+1: partial batch and evictions
    x = torch.from_numpy(data.inputs(range(len(data)), model.config))
    with torch.no_grad():
        acts = model.trace(x, layers=("conv2", "conv5")).activations
    for layer, channels in maps.items():
        ref = _brute_top(acts[layer][:, channels].numpy(), 4)
        for i, c in enumerate(channels):
            units = got[layer][c]
            assert [(u.image_index, u.y, u.x) for u in units] == [r[1:] for r in ref[i]]
            np.testing.assert_allclose([u.activation for u in units], [r[0] for r in ref[i]], rtol=1e-5)
    # One layer at a time gives the same as the shared pass.
    single = top9.top_activations(model, data, "conv5", [1, 2, 99], k=4, batch=7)
    assert single == got["conv5"]


def test_top9_projection_belongs_to_the_dataset_image(model, data):
    from zfserve.engine.deconv import DeconvEngine
    got = top9.top9(model, data, "conv4", [11], k=2, batch=4)
    engine = DeconvEngine(model)
    for c, units in got.items():
        assert len(units) == 2 and units[0].activation >= units[1].activation
        for u in units:
            x = data.inputs([u.image_index], model.config)
            x0, y0, x1, y1 = u.box
            np.testing.assert_array_equal(u.patch, x[0, :, y0:y1, x0:x1])
            ref = engine.project(x, "conv4", units=[(c, u.y, u.x)])[0]
            # Batched and single forwards round differently: compare at the scale of the projection.
            np.testing.assert_allclose(u.projection, ref.projection, rtol=0,
                                       atol=1e-4 * np.abs(ref.projection).max())
            assert abs(ref.activation - u.activation) <= 1e-5 * max(1.0, abs(u.activation))


def test_top_activations_rejects_bad_arguments(model, data):
    with pytest.raises(InvalidArgumentError) as err:
        top9.top_activations(model, data, "fc7", [0])
    assert err.value.field == "layer"
    with pytest.raises(InvalidArgumentError) as err:
        top9.top_activations(model, data, "conv2", [256])
    assert err.value.field == "maps" and "0..255" in str(err.value)
    with pytest.raises(InvalidArgumentError) as err:
        top9.top_activations(model, data, "conv2", [0], k=8)
    assert err.value.field == "k"


def test_transforms_move_pixels_as_specified(np_rng):
    image = np_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    fill = (10, 20, 30)
    down = invariance.transform_image(image, "translation", 10, fill)
    np.testing.assert_array_equal(down[10:], image[:-10])
    assert (down[:10] == np.array(fill, np.uint8)).all()
    up = invariance.transform_image(image, "translation", -5, fill)
    np.testing.assert_array_equal(up[:-5], image[5:])
    np.testing.assert_array_equal(invariance.transform_image(image, "scale", 1.0, fill), image)
    np.testing.assert_array_equal(invariance.transform_image(image, "rotation", 180, fill), image[::-1, ::-1])
    # Zooming 2x about the centre of a linear ramp (bilinear sampling is exact on it): output pixel centre
    # (x + 0.5, y + 0.5) samples the input at pixel index x / 2 + 15.75 (same for y).
    yy, xx = np.mgrid[0:64, 0:64]
    ramp = np.repeat((xx + 2 * yy).astype(np.uint8)[..., None], 3, axis=2)
    zoom = invariance.transform_image(ramp, "scale", 2.0, fill)[..., 0].astype(float)
    expected = (xx / 2 + 15.75) + 2 * (yy / 2 + 15.75)
    np.testing.assert_allclose(zoom[1:-1, 1:-1], expected[1:-1, 1:-1], atol=1.01)
    with pytest.raises(InvalidArgumentError):
        invariance.transform_image(image, "shear", 1, fill)


def test_invariance_matches_direct_forward(model, data):
    amounts = {"translation": [-20, 0, 30], "scale": [1.0, 1.5], "rotation": [0, 90]}
    got = invariance.invariance(model, data, [2], amounts=amounts, batch=4)
    fill = model.config.preprocess.mean_rgb()
    from zfserve.preprocess import to_input
    for kind, values in amounts.items():
        for i, index in enumerate([2]):
            image = data.item(index).image
            x = np.stack([to_input(image, model.config)] +
                         [to_input(invariance.transform_image(image, kind, a, fill), model.config) for a in values])
            with torch.no_grad():
                trace = model.trace(torch.from_numpy(x), layers=("conv1", "fc7"))
            for layer in ("conv1", "fc7"):
                f = trace.activations[layer].flatten(1).double().numpy()
                ref = np.linalg.norm(f[1:] - f[0], axis=1)
                # Different batch sizes round differently: compare at the scale of the features.
                scale = np.linalg.norm(f[0])
                np.testing.assert_allclose(got[kind]["distance"][layer][i], ref, rtol=1e-4, atol=1e-5 * scale)
                np.testing.assert_allclose(got[kind]["relative"][layer][i], ref / scale, rtol=1e-4, atol=1e-5)
            prob = torch.softmax(trace.logits.double(), 1)[1:, data.item(index).label].numpy()
            np.testing.assert_allclose(got[kind]["probability"][i], prob, rtol=1e-4, atol=1e-7)
        identity = values.index(invariance.IDENTITY[kind])
        assert np.allclose(got[kind]["relative"]["conv1"][:, identity], 0, atol=1e-5)


def test_growth_share():
    amounts = [-2, -1, 0, 1, 2]
    jump = np.array([[1.0, 1.0, 0.0, 1.0, 1.0]])
    linear = np.array([[2.0, 1.0, 0.0, 1.0, 2.0]])
    assert invariance.growth_share(jump, amounts, 0.0) == pytest.approx(1.0)
    assert invariance.growth_share(linear, amounts, 0.0) == pytest.approx(0.75)


def test_hamming_score_matches_pairwise_loop(np_rng):
    eps = np_rng.normal(size=(5, 40))
    eps[:, :10] = 0.0
    mean, std, values = correspondence.hamming_score(eps)
    ref = []
    for i in range(5):
        for j in range(i + 1, 5):
            ref.append(sum(int(np.sign(a) != np.sign(b)) for a, b in zip(eps[i], eps[j])) / 40)
    np.testing.assert_allclose(values, ref)
    assert mean == pytest.approx(np.mean(ref)) and std == pytest.approx(np.std(ref))
    assert correspondence.hamming_score(np.stack([eps[0], eps[0]]))[0] == 0.0
    assert correspondence.hamming_score(np.stack([eps[0], -eps[0]]))[0] == pytest.approx(0.75)  # zeros agree
    with pytest.raises(InvalidArgumentError):
        correspondence.hamming_score(eps[:1])


def test_correspondence_occludes_the_parts(model):
    data = dataset.AnalysisData("synthetic", seed=5, n=33)
    faces = data.indices_of(CLASSES.index("face"))
    assert faces == [10, 21, 32]
    got = correspondence.correspondence(model, data, faces, parts=("left_eye", "nose"), layers=("conv5",), seed=1)
    assert set(got["rows"]) == {"left_eye", "nose", "random"}
    x = got["inputs"]
    # Reference for one part: occlude its box by hand and score the sign changes of conv5.
    occluded = x.copy()
    for i, box in enumerate(got["boxes"]["nose"]):
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
        occluded[i, :, y0:y1, x0:x1] = 0.0
    with torch.no_grad():
        a = model.trace(torch.from_numpy(x), layers=("conv5",)).activations["conv5"].flatten(1).double()
        b = model.trace(torch.from_numpy(occluded), layers=("conv5",)).activations["conv5"].flatten(1).double()
    mean, std, _ = correspondence.hamming_score((a - b).numpy())
    assert got["rows"]["nose"]["conv5"]["mean"] == pytest.approx(mean)
    assert got["rows"]["nose"]["conv5"]["std"] == pytest.approx(std)
    # The aligned crop keeps the face's part boxes inside the image and in the face's layout.
    eyes = [data.item(i).parts for i in faces]
    assert all(p["left_eye"][0] < p["right_eye"][0] for p in eyes)


def test_pointing_game_matches_brute_force_occlusion(model, data):
    from zfserve.preprocess import to_input
    got = localization.pointing_game(model, data, [4], window=112, stride=56)
    for record in got["images"]:
        item = data.item(record["index"])
        x = to_input(item.image, model.config)
        starts = [0, 56, 112]
        batch, centres = [], []
        for y0 in starts:
            for x0 in starts:
                occluded = x.copy()
                occluded[:, y0:y0 + 112, x0:x0 + 112] = 0.0
                batch.append(occluded)
                centres.append((x0 + 56, y0 + 56))
        with torch.no_grad():
            prob = torch.softmax(model(torch.from_numpy(np.stack(batch))).double(), 1)[:, item.label].numpy()
        cx, cy = centres[int(prob.argmin())]
        mask = preprocess.mask_to_input(item.mask, model.config)
        ys, xs = np.nonzero(mask)
        dist = np.sqrt((ys + 0.5 - cy) ** 2 + (xs + 0.5 - cx) ** 2).min()
        assert record["point"] == [cx, cy]
        assert record["distance"] == pytest.approx(dist)
        assert record["hit"] == (dist <= got["tolerance"])
        assert record["min_probability"] == pytest.approx(prob.min(), rel=1e-4)
    assert got["hit_rate"] == np.mean([r["hit"] for r in got["images"]])


def test_deconv_mask_energy_uses_the_strongest_unit(model, data):
    from zfserve.engine.deconv import DeconvEngine
    got = localization.deconv_mask_energy(model, data, [0, 3, 5], batch=2)
    engine = DeconvEngine(model)
    for i, index in enumerate([0, 3, 5]):
        x = data.inputs([index], model.config)
        with torch.no_grad():
            acts = model.trace(torch.from_numpy(x), layers=("conv5",)).activations["conv5"][0]
        c, y, xx = np.unravel_index(int(acts.argmax()), acts.shape)
        proj = engine.project(x, "conv5", units=[(int(c), int(y), int(xx))])[0].projection.astype(np.float64)
        energy = (proj ** 2).sum(0)
        mask = data.item(index).mask[16:240, 16:240]   # 256 images: the centre 224 crop
        assert got["energy_share"][i] == pytest.approx(energy[mask].sum() / energy.sum(), rel=1e-5)
        assert got["area_share"][i] == pytest.approx(mask.mean())
    assert got["ratio"] == pytest.approx(np.mean(got["energy_share"]) / np.mean(got["area_share"]))


def test_directory_data_with_annotations(tmp_path):
    from zfserve.data import render, write_synthetic
    from zfserve.config import ModelConfig
    write_synthetic(tmp_path, 3, seed=4)
    data = dataset.AnalysisData(str(tmp_path), n=10)
    assert len(data) == 3 and data.has_masks and data.classes == list(CLASSES)
    config = ModelConfig(num_classes=len(CLASSES))
    for i in range(3):
        ref = render(4, i)
        item = data.item(i)
        np.testing.assert_array_equal(item.image, ref.image)
        np.testing.assert_array_equal(item.mask, ref.mask)
        np.testing.assert_array_equal(preprocess.mask_to_input(item.mask, config), ref.mask[16:240, 16:240])
        assert item.label == ref.label
    assert preprocess.box_to_input([20, 30, 60, 250], (256, 256), config) == (4, 14, 44, 224)
    with pytest.raises(NotFoundError):
        dataset.AnalysisData(str(tmp_path / "missing"))


def test_filter_stats():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.01, (8, 3, 7, 7))
    w[3] *= 10
    stats = filters.filter_stats(w)
    assert stats["dominance"] > 5
    checker = np.indices((7, 7)).sum(0) % 2 * 2 - 1.0
    smooth = np.outer(np.hanning(7), np.hanning(7))
    high = filters.filter_stats(np.broadcast_to(checker, (2, 3, 7, 7)))["high_frequency_share"]
    low = filters.filter_stats(np.broadcast_to(smooth, (2, 3, 7, 7)))["high_frequency_share"]
    assert high > 0.5 > low
    acts = np.zeros((2, 8, 4, 4))
    acts[1, :6, 2, 2] = 1.0
    assert filters.filter_stats(w, acts)["dead_share"] == pytest.approx(0.25)


def test_architecture_runs_clip_and_cache(tmp_path):
    runs = architecture.architecture_runs(tmp_path, steps=2, batch=4, pool=8, variants=("alexnet-11x11s4",))
    rec = runs["alexnet-11x11s4"]
    assert rec["weights"]["conv1"].shape == (96, 3, 11, 11) and not rec["cached"]
    rms = np.sqrt((rec["weights"]["conv1"] ** 2).mean(axis=(1, 2, 3)))
    assert rms.max() <= 0.1 + 1e-6
    again = architecture.architecture_runs(tmp_path, steps=2, batch=4, pool=8, variants=("alexnet-11x11s4",))
    assert again["alexnet-11x11s4"]["cached"]
    np.testing.assert_array_equal(again["alexnet-11x11s4"]["weights"]["conv1"], rec["weights"]["conv1"])
    assert json.loads((tmp_path / "alexnet-11x11s4.json").read_text())["stats"] == rec["stats"]


def test_load_evolution(tmp_path, model):
    from zfserve.weights import load_model, save_model
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    with pytest.raises(NotFoundError) as err:
        evolution.load_evolution(loaded)
    assert err.value.field == "model"
    renders = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "m" / "evolution.npz", renders=renders, epochs=np.array([1, 2, 3, 4]))
    got = evolution.load_evolution(loaded)
    np.testing.assert_array_equal(got["renders"], renders)
