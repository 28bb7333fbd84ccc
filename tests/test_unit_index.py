"""The unit index (zfserve.paper.unit_index, ``zfserve index``): the top-9 of every feature map against a
brute-force search done image by image, the stored patches against crops of the raw images, the receptive
fields against the paper's arithmetic and a perturbation test, staleness, and where the index is stored."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from zfserve.data import CLASSES, render
from zfserve.errors import InvalidArgumentError, NotFoundError
from zfserve.paper import unit_index
from zfserve.paper.unit_index import build_index, find_index, index_locations
from zfserve.preprocess import resize_and_crop, to_input
from zfserve.weights import read_snapshot, save_model

CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")   # ZFNet's, written out

WIDTHS = (6, 8, 10, 8, 6)
SEED, N = 5, 13        # a synthetic seed no other test of the index uses; fewer images than a batch multiple
# Receptive fields of conv1..conv5 worked out by hand from the paper's Fig. 3 (kernel, stride): 7/2, pool 3/2,
# 5/2, pool 3/2, 3/1, 3/1, 3/1 -> 7, 7+2*2=11 -> 11+4*4=27, 27+2*8=43 -> 43+2*16=75, 107, 139.
PAPER_RECEPTIVE_FIELDS = {"conv1": 7, "conv2": 27, "conv3": 75, "conv4": 107, "conv5": 139}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZFSERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, spread_model):
    directory = tmp_path_factory.mktemp("tiny-model") / "tiny"
    save_model(spread_model(seed=7, widths=WIDTHS, num_classes=len(CLASSES)), directory, name="tiny",
               class_names=list(CLASSES))
    return directory


@pytest.fixture(scope="module")
def built(saved_model, tmp_path_factory):
    os.environ["ZFSERVE_CACHE_DIR"] = str(tmp_path_factory.mktemp("module-cache"))
    try:
        return build_index(saved_model, "synthetic", n=N, seed=SEED, batch_size=4)
    finally:
        del os.environ["ZFSERVE_CACHE_DIR"]


@pytest.fixture(scope="module")
def brute_force(saved_model):
    """Per layer and map, every image's strongest activation and its first position, one image at a time."""
    model = read_snapshot(saved_model).model()
    best = {layer: [] for layer in CONV_LAYERS}
    with torch.no_grad():
        for i in range(N):
            x = torch.from_numpy(to_input(render(SEED, i).image, model.config))[None]
            trace = model.trace(x, layers=CONV_LAYERS)
            for layer in CONV_LAYERS:
                acts = trace.activations[layer][0].numpy()            # (C, H, W)
                flat = acts.reshape(acts.shape[0], -1)
                pos = flat.argmax(axis=1)                             # numpy: the first maximum
                best[layer].append((flat.max(axis=1), pos // acts.shape[2], pos % acts.shape[2]))
    return best


def _decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png), formats=["PNG"]) as picture:
        return np.asarray(picture.convert("RGB"))


def test_top9_matches_a_brute_force_search(built, brute_force):
    assert built.layers == list(CONV_LAYERS)
    assert built.describe() == {"data": f"synthetic seed {SEED}, {N} images", "layers": list(CONV_LAYERS), "k": 9}
    for layer, width in zip(CONV_LAYERS, WIDTHS):
        for channel in range(width):
            values = np.array([best[0][channel] for best in brute_force[layer]])
            expected = sorted(range(N), key=lambda i: (-values[i], i))[:9]   # ties: the earlier image
            got = built.units(layer, channel)
            assert [u["image"] for u in got] == expected, (layer, channel)
            for unit in got:
                best = brute_force[layer][unit["image"]]
                assert unit["activation"] == pytest.approx(float(best[0][channel]), rel=1e-5, abs=1e-6)
                assert (unit["y"], unit["x"]) == (int(best[1][channel]), int(best[2][channel]))
                assert unit["label"] == CLASSES[unit["image"] % len(CLASSES)]


def test_boxes_are_the_receptive_fields(built, saved_model):
    model = read_snapshot(saved_model).model()
    for layer, rf in PAPER_RECEPTIVE_FIELDS.items():
        assert built.meta["layers"][layer]["receptive_field"] == rf
        for unit in built.units(layer, 1):
            x0, y0, x1, y1 = unit["box"]
            assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
            # Clipped only at the image border.
            assert (x1 - x0 == rf) or x0 == 0 or x1 == 224
            assert (y1 - y0 == rf) or y0 == 0 or y1 == 224
    # Pixels outside a conv5 unit's box cannot change its activation; its own box's pixels do.
    unit = built.units("conv5", 2)[0]
    x0, y0, x1, y1 = unit["box"]
    x = torch.from_numpy(to_input(render(SEED, unit["image"]).image, model.config))[None]
    outside, inside = x.clone(), x.clone()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * 60
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[..., y0:y1, x0:x1] = True
    outside[~keep] += noise[~keep]
    inside[keep] += noise[keep]
    with torch.no_grad():
        acts = {name: model.trace(v, layers=("conv5",)).activations["conv5"][0, 2, unit["y"], unit["x"]].item()
                for name, v in (("same", x), ("outside", outside), ("inside", inside))}
    assert acts["same"] == pytest.approx(unit["activation"], rel=1e-5)
    assert acts["outside"] == pytest.approx(acts["same"], rel=1e-5, abs=1e-6)
    assert abs(acts["inside"] - acts["same"]) > 1e-3 * max(1.0, abs(acts["same"]))


def _expected_patch(image: np.ndarray, box, scale: float) -> np.ndarray:
    x0, y0, x1, y1 = box
    crop = image[y0:y1, x0:x1]
    if scale < 1:
        size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
        crop = np.asarray(Image.fromarray(crop).resize(size, Image.LANCZOS))
    return crop


def test_patches_are_the_input_under_the_box(built):
    for layer in CONV_LAYERS:
        scale = min(1.0, 96 / PAPER_RECEPTIVE_FIELDS[layer])
        for unit in built.units(layer, 3):
            image = resize_and_crop(render(SEED, unit["image"]).image, 256, 224)   # what the network saw
            x0, y0, x1, y1 = box = unit["box"]
            patch = _decode(unit["patch_png"]).astype(int)
            assert patch.shape == _expected_patch(image, box, scale).shape and max(patch.shape[:2]) <= 96
            if layer in ("conv1", "conv2"):       # stored losslessly
                assert (patch == _expected_patch(image, box, scale)).all(), layer
                continue
            # JPEG (quality 90, 4:4:4) loses some of the images' noise: the patch is close to its crop and
            # closer to it than to the same box moved by 3 pixels.
            errors = {}
            for dy in (-3, 0, 3):
                for dx in (-3, 0, 3):
                    moved = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
                    if min(moved) >= 0 and max(moved) <= 224:
                        errors[dy, dx] = np.abs(patch - _expected_patch(image, moved, scale)).mean()
            assert errors[0, 0] < 8, (layer, errors[0, 0])
            assert min(errors, key=errors.get) == (0, 0), (layer, errors)


def test_changed_weights_find_no_index(built, saved_model, tmp_path, spread_model):
    assert built.path == saved_model / "index"
    assert find_index(saved_model).path == built.path
    assert find_index(read_snapshot(saved_model)).path == built.path
    retrained = tmp_path / "retrained"
    for name in os.listdir(saved_model):
        if name != "index":
            (retrained / name).parent.mkdir(exist_ok=True)
            (retrained / name).write_bytes((saved_model / name).read_bytes())
    (retrained / "index").symlink_to(built.path, target_is_directory=True)   # the old index beside new weights
    assert find_index(retrained) is not None
    save_model(spread_model(seed=8, widths=WIDTHS, num_classes=len(CLASSES)), retrained, name="tiny",
               class_names=list(CLASSES))
    assert find_index(retrained) is None
    meta = json.loads((built.path / "index.json").read_text())
    assert meta["weights_sha256"] == read_snapshot(saved_model).sha256


def _copy_model(source, target):
    target.mkdir(parents=True)
    for name in ("weights.safetensors", "config.json"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def test_read_only_model_directory_uses_the_cache(saved_model, tmp_path, private_cache, monkeypatch):
    model_dir = _copy_model(saved_model, tmp_path / "readonly" / "tiny")
    if os.geteuid() == 0:
        # Permission bits do not bind root: make the write probe read them, as they would bind anyone else.
        real = unit_index._can_create_in
        monkeypatch.setattr(unit_index, "_can_create_in",
                            lambda d: bool(d.stat().st_mode & 0o222) and real(d) if d.exists() else real(d))
    model_dir.chmod(0o555)
    try:
        index = build_index(model_dir, "synthetic", n=3, seed=SEED, layers=["conv1", "conv5"], batch_size=2)
    finally:
        model_dir.chmod(0o755)
    sha = read_snapshot(model_dir).sha256
    assert index.path == private_cache / f"tiny-{sha[:16]}" / "index"
    assert sorted(os.listdir(model_dir)) == ["config.json", "weights.safetensors"]
    assert find_index(model_dir).path == index.path
    assert index.layers == ["conv1", "conv5"] and index.meta["k"] == 3
    with pytest.raises(NotFoundError, match="conv2 is not in the unit index"):
        index.units("conv2", 0)


def test_embedded_models_use_the_cache(saved_model, tmp_path, private_cache, monkeypatch):
    package = tmp_path / "package-models"
    model_dir = _copy_model(saved_model, package / "tiny")
    monkeypatch.setattr(unit_index, "EMBEDDED_DIR", package.resolve())
    assert index_locations(model_dir) == [private_cache / f"tiny-{read_snapshot(model_dir).sha256[:16]}" / "index"]
    index = build_index(model_dir, "synthetic", n=2, seed=SEED, layers=["conv2"], batch_size=2)
    assert index.path.is_relative_to(private_cache) and not (model_dir / "index").exists()
    # A rebuild replaces the index atomically and leaves no staging or old directories behind.
    again = build_index(model_dir, "synthetic", n=4, seed=SEED, layers=["conv2"], batch_size=2)
    assert again.path == index.path and find_index(model_dir).meta["k"] == 4
    assert sorted(os.listdir(index.path.parent)) == ["index"]


def test_unit_arguments_are_checked(built):
    with pytest.raises(InvalidArgumentError, match=r"channel: 6 out of range; accepted 0\.\.5") as err:
        built.units("conv5", 6)
    assert err.value.field == "channel"
    with pytest.raises(InvalidArgumentError, match="layer") as err:
        built.units("pool5", 0)
    assert err.value.field == "layer"
    with pytest.raises(InvalidArgumentError, match="layers"):
        build_index("zfnet-paper", layers=["fc6"])
    with pytest.raises(InvalidArgumentError, match="data"):
        build_index("zfnet-paper", "/nonexistent/folder")


def test_cli_over_an_image_folder(saved_model, tmp_path, capsys):
    from zfserve.cli import main
    from zfserve.data import write_synthetic
    folder = write_synthetic(tmp_path / "folder", 4, SEED)
    model_dir = _copy_model(saved_model, tmp_path / "cli-model")
    assert main(["index", "--model", str(model_dir), "--data", str(folder), "--layers", "conv1,conv3",
                 "--batch-size", "4"]) == 0
    out, err = capsys.readouterr()
    assert str(model_dir / "index") in out and "4/4 images searched" in err
    index = find_index(model_dir)
    assert index.data == f"{folder}, 4 images" and index.layers == ["conv1", "conv3"]
    # The folder holds the same 4 synthetic images (as PNG, lossless) in annotations order: same units.
    reference = build_index(_copy_model(saved_model, tmp_path / "other"), "synthetic", n=4, seed=SEED,
                            layers=["conv1", "conv3"], batch_size=4)
    for channel in range(WIDTHS[2]):
        strip = [{k: v for k, v in u.items() if k != "patch_png"} for u in index.units("conv3", channel)]
        assert strip == [{k: v for k, v in u.items() if k != "patch_png"} for u in reference.units("conv3", channel)]
    assert main(["index", "--model", str(model_dir), "--layers", "conv1,fc6"]) == 2
    assert "--layers" in capsys.readouterr().err
