"""render.py: projection contrast, patches (exact mean under the box), grids, PNG round trips."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from zfserve import render
from zfserve.config import PreprocessConfig
from zfserve.errors import InvalidArgumentError
from zfserve.preprocess import to_display


def test_projection_is_stretched_symmetrically_around_grey(np_rng):
    proj = np_rng.normal(size=(3, 20, 30)).astype(np.float32)
    proj[1, 4, 5] = -3 * np.abs(proj).max()   # the peak is negative: it must map to 0, zero stays grey
    rgb = render.signed_to_rgb(proj)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    assert rgb[4, 5, 1] == 1
    expected = np.clip(np.rint(128 + proj * 127 / np.abs(proj).max()), 0, 255).transpose(1, 2, 0)
    np.testing.assert_array_equal(rgb, expected)
    # Sign is kept: positive above grey, negative below.
    assert np.all(rgb[proj.transpose(1, 2, 0) > 0.01 * np.abs(proj).max()] >= 128)
    assert np.all(rgb[proj.transpose(1, 2, 0) < -0.01 * np.abs(proj).max()] <= 128)


def test_dead_projection_is_plain_grey():
    rgb = render.signed_to_rgb(np.zeros((3, 8, 8), np.float32))
    assert np.all(rgb == 128)


def test_projection_shape_error():
    with pytest.raises(InvalidArgumentError) as info:
        render.signed_to_rgb(np.zeros((8, 8), np.float32))
    assert info.value.field == "projection"


def test_patch_uses_the_mean_under_its_box(np_rng):
    mean_image = np_rng.uniform(60, 200, size=(3, 256, 256)).astype(np.float32)
    config = PreprocessConfig(mean="image", mean_image=mean_image)
    x = np_rng.normal(0, 40, size=(3, 224, 224)).astype(np.float32)
    box = (30, 50, 101, 90)  # x0, y0, x1, y1
    patch = x[:, 50:90, 30:101]
    got = render.patch_to_rgb(patch, config, box)
    np.testing.assert_array_equal(got, to_display(x, config)[50:90, 30:101])
    # Per-channel means: with or without the box, the same picture.
    np.testing.assert_array_equal(render.patch_to_rgb(patch, None, box), render.patch_to_rgb(patch))
    with pytest.raises(InvalidArgumentError):
        render.patch_to_rgb(patch, config, (0, 0, 10, 10))


def test_grid_places_every_picture_and_png_round_trips(np_rng):
    a = np_rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    b = np_rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)
    pad = 3
    picture = render.grid([[a, b], [b]], pad=pad)
    cell_h, cell_w = 10, 12
    assert picture.shape == (pad + 2 * (cell_h + pad), pad + 2 * (cell_w + pad), 3)
    np.testing.assert_array_equal(picture[pad:pad + 10, pad:pad + 12], a)
    # b is centred in its cell.
    y, x = pad + (cell_h - 6) // 2, pad + cell_w + pad + (cell_w - 4) // 2
    np.testing.assert_array_equal(picture[y:y + 6, x:x + 4], b)
    labelled = render.grid([[a], [b]], labels=["first", "second"])
    assert labelled.shape[0] > render.grid([[a], [b]]).shape[0]
    decoded = np.asarray(Image.open(io.BytesIO(render.png_bytes(picture))))
    np.testing.assert_array_equal(decoded, picture)


def test_grid_and_png_errors():
    with pytest.raises(InvalidArgumentError):
        render.grid([])
    with pytest.raises(InvalidArgumentError):
        render.grid([[np.zeros((4, 4, 3), np.float32)]])
    with pytest.raises(InvalidArgumentError):
        render.grid([[np.zeros((4, 4, 3), np.uint8)]], labels=["a", "b"])
    with pytest.raises(InvalidArgumentError):
        render.png_bytes(np.zeros((4, 4, 3), np.float64))
